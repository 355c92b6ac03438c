"""The lm-evaluation-harness backend scores like `fc-edge eval` (eval/lm_eval_backend.py)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

pytest.importorskip("lm_eval", reason="the lm-eval extra is not installed")

from fc_edge.eval.runner import evaluate  # noqa: E402
from fc_edge.eval.settings import build_settings  # noqa: E402
from fc_edge.eval.tasks import load_task  # noqa: E402


class CharTokenizer:
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [1 + ord(c) % 250 for c in text]}


def test_registered_under_fc_edge():
    from lm_eval.api.registry import get_model

    from fc_edge.eval.lm_eval_backend import FcEdgeLM

    assert get_model("fc-edge") is FcEdgeLM


def test_loglikelihood_equals_eval_path(tiny_llama, tmp_path):
    from fc_edge.eval.lm_eval_backend import FcEdgeLM

    (tmp_path / "toy").mkdir()
    recs = [{"id": str(i), "question": f"q{i}?", "choices": ["yes", "no way", "z"], "label": 1}
            for i in range(3)]
    (tmp_path / "toy" / "dev.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    tok = CharTokenizer()
    res = evaluate(tiny_llama, tok, ["toy"], build_settings("none,int8"), [2],
                   data_dir=tmp_path, progress=False, record_items=True)
    want = res["results"]["2"]["int8"]["items"]["toy"]
    lm = FcEdgeLM(pretrained=(tiny_llama, tok), split_layer=2, codec="int8", batch_size=2)
    items = load_task("toy", tmp_path)
    reqs = [SimpleNamespace(args=(ctx, cont)) for it in items
            for ctx, cont in zip(it.contexts, it.continuations, strict=True)]
    got = [ll for ll, _ in lm.loglikelihood(reqs, disable_tqdm=True)]
    flat = [x for row in want for x in row]
    assert got == pytest.approx(flat, rel=1e-5, abs=1e-5)
    with pytest.raises(NotImplementedError):
        lm.generate_until([])
