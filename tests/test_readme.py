"""README's Python quick start runs as written (in a fresh process, from another folder)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def quick_start() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("In Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_python_quick_start_is_five_lines():
    assert len(quick_start().strip().splitlines()) == 5


@pytest.mark.slow
def test_the_python_quick_start_runs(smollm2, tmp_path):
    """It serves SmolLM2-135M on loopback and generates through the lazy device head; the
    oracle is the model's own greedy continuation of the prompt (the codec is lossy, so the
    first word)."""
    model, tokenizer = smollm2
    import torch

    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        first = model.generate(ids, max_new_tokens=2, do_sample=False)[0, ids.shape[1]:]
    word = tokenizer.decode(first).split()[0]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", quick_start()], capture_output=True, text=True,
                         cwd=tmp_path, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == word
