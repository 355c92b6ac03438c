"""Engine-driven generation: the same greedy tokens as the torch head (identity codec)."""

from __future__ import annotations

import pytest
import torch

from fc_edge.engine.runner import EngineHead
from fc_edge.models.local import generate_split
from fc_edge.models.split import split


def same_tokens(result, model, layer, ids, n):
    head, tail = split(model, layer)
    engine = EngineHead(result.folder, providers=["CPUExecutionProvider"], threads=1)
    expected = generate_split(head, tail, ids, n)
    assert generate_split(engine, tail, ids, n) == expected
    return engine, expected


def test_tiny_llama(llama_engine, tiny_llama):
    same_tokens(llama_engine, tiny_llama, 2, torch.tensor([1, 17, 42, 99, 3, 250, 7]), 24)


def test_tiny_qwen2(qwen2_fourier_engine, tiny_qwen2):
    same_tokens(qwen2_fourier_engine, tiny_qwen2, 1, torch.tensor([5, 6, 7, 8, 9, 10]), 24)


def test_smollm2(smollm2_engine, smollm2):
    model, tokenizer = smollm2
    ids = torch.tensor(tokenizer("The three primary colors are")["input_ids"])
    same_tokens(smollm2_engine, model, 1, ids, 12)


def test_device_client_with_engine_head(llama_engine, tiny_llama):
    """The real loopback server, the device client running the engine as its head."""
    client_mod = pytest.importorskip("fc_edge.runtime.client")
    from fc_edge.runtime.server import start_server

    ids = torch.tensor([1, 17, 42, 99, 3, 250, 7])
    head, tail = split(tiny_llama, 2)
    expected = generate_split(head, tail, ids, 16)
    engine = EngineHead(llama_engine.folder, threads=1)
    with start_server(tiny_llama, 2, port=0) as handle, client_mod.DeviceClient(
        handle.address, None, engine.layer, "identity", head=engine,
        fingerprint=engine.fingerprint,
    ) as client:
        result = client.generate(ids, 16, eos_token_id=None)
    assert result.token_ids == expected
