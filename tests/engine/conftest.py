"""Engines exported once per test session (tiny Llama, tiny Qwen2 with the in-graph fourier
block, SmolLM2-135M at split layer 1)."""

from __future__ import annotations

import pytest
import torch


def _export(tmp_path_factory, model, layer, **kwargs):
    from fc_edge.engine.export import export_engine

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("engines")
    return export_engine(model, layer, out, **kwargs)


@pytest.fixture(scope="session")
def llama_engine(tiny_llama, tmp_path_factory):
    """tiny Llama, split layer 2, the default (dynamo) exporter."""
    return _export(tmp_path_factory, tiny_llama, 2, model_spec="synthetic:tiny-llama")


@pytest.fixture(scope="session")
def qwen2_fourier_engine(tiny_qwen2, tmp_path_factory):
    """tiny Qwen2, split layer 1, in-graph fourier block k_s=3, k_d=8 (torchscript exporter)."""
    return _export(tmp_path_factory, tiny_qwen2, 1, model_spec="synthetic:tiny-qwen2",
                   fourier=(3, 8), exporter="torchscript")


@pytest.fixture(scope="session")
def smollm2_engine(smollm2, tmp_path_factory):
    """SmolLM2-135M, split layer 1 (skips with the smollm2 fixture)."""
    return _export(tmp_path_factory, smollm2[0], 1, model_spec="smollm2-135m",
                   tokenizer=smollm2[1])
