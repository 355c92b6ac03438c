"""The explicit head against the Hugging Face model's own hidden states."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fc_edge.errors import ConfigError
from fc_edge.models.split import split

TOL = 1e-5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (torch.linalg.norm(a.double() - b.double()) / torch.linalg.norm(b.double())).item()


def hf_hidden(model, ids: torch.Tensor, layer: int) -> torch.Tensor:
    with torch.no_grad():
        return model(ids[None], output_hidden_states=True).hidden_states[layer][0]


@pytest.fixture(params=["tiny_llama", "tiny_qwen2", "smollm2"])
def model(request):
    m = request.getfixturevalue(request.param)
    return m[0] if isinstance(m, tuple) else m


@pytest.mark.parametrize("layer", [1, 2])
def test_session_matches_hf_at_prefill_and_every_decode_step(model, layer):
    ids = torch.randint(
        0, model.config.vocab_size, (20,), generator=torch.Generator().manual_seed(1)
    )
    ref = hf_hidden(model, ids, layer)
    head, _ = split(model, layer)
    hs = head.start(max_seq_len=32)
    a = hs.step(ids[:7])
    assert a.dtype == torch.float32 and a.shape == (7, model.config.hidden_size)
    assert rel_err(a, ref[:7]) <= TOL
    for t in range(7, 20):
        row = hs.step(ids[t : t + 1])
        assert row.shape == (1, model.config.hidden_size)
        assert rel_err(row[0], ref[t]) <= TOL, f"decode step at position {t}"
    assert hs.position == 20


@pytest.mark.parametrize("layer", [1, 2])
def test_functional_forward_concatenates_the_cache(model, layer):
    ids = torch.randint(
        0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(2)
    )
    ref = hf_hidden(model, ids[0], layer)
    head, _ = split(model, layer)
    past_k, past_v = head.empty_kv(batch=1, length=0)
    with torch.no_grad():
        a, k, v = head(ids[:, :9], torch.arange(9)[None], past_k, past_v)
        assert k.shape == v.shape == head.kv_shape(1, 9)
        b, k2, v2 = head(ids[:, 9:], torch.arange(9, 12)[None], k, v)
    assert k2.shape == head.kv_shape(1, 12)
    assert torch.equal(k2[:, :, :, :9], k)
    assert rel_err(torch.cat([a[0], b[0]]), ref) <= TOL


@settings(max_examples=15, deadline=None)
@given(cuts=st.lists(st.integers(1, 15), min_size=1, max_size=6, unique=True))
def test_any_chunking_of_the_sequence_gives_the_same_activation(tiny_qwen2, cuts):
    ids = torch.randint(0, 256, (16,), generator=torch.Generator().manual_seed(3))
    head, _ = split(tiny_qwen2, 2)
    whole = head.start(16).step(ids)
    hs = head.start(16)
    bounds = [0, *sorted(cuts), 16]
    parts = [hs.step(ids[s:e]) for s, e in zip(bounds, bounds[1:], strict=False)]
    assert rel_err(torch.cat(parts), whole) <= TOL


def test_batched_functional_forward_matches_rows(tiny_llama):
    ids = torch.randint(0, 256, (3, 10), generator=torch.Generator().manual_seed(4))
    head, _ = split(tiny_llama, 2)
    with torch.no_grad():
        a, _, _ = head(ids, torch.arange(10).expand(3, 10), *head.empty_kv(batch=3))
    for b in range(3):
        assert rel_err(a[b], hf_hidden(tiny_llama, ids[b], 2)) <= TOL


def test_session_refuses_tokens_past_max_seq_len(tiny_llama):
    head, _ = split(tiny_llama, 1)
    hs = head.start(max_seq_len=4)
    hs.step(torch.tensor([1, 2, 3]))
    with pytest.raises(ConfigError, match="max_seq_len"):
        hs.step(torch.tensor([4, 5]))
    hs.step(torch.tensor([4]))
    assert hs.position == 4


def test_head_attributes(tiny_qwen2):
    head, tail = split(tiny_qwen2, 3)
    assert head.layer == tail.layer == head.num_layers == 3
    assert head.hidden_size == 64 and head.config is tiny_qwen2.config is tail.config


def test_bfloat16_head_keeps_float32_rotary_and_tracks_hf():
    from fc_edge.models.pretrained import load_model

    model, _ = load_model("synthetic:tiny-llama", dtype=torch.bfloat16)
    head, _ = split(model, 2)
    assert head.dtype == torch.bfloat16 and head.inv_freq.dtype == torch.float32
    ids = torch.arange(3, 15)
    a = head.start(12).step(ids)
    assert a.dtype == torch.float32
    assert rel_err(a, hf_hidden(model, ids, 2).float()) <= 2e-2
