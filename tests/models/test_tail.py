"""The paged tail against Hugging Face: batched rows of different lengths, each over its own KV
blocks, give the full model's logits; a batched step equals the solo step."""

from __future__ import annotations

import pytest
import torch

from fc_edge.errors import ConfigError
from fc_edge.models.split import split
from fc_edge.models.tail import CacheFullError, Tail

MODELS = ["tiny_llama", "tiny_qwen2", "sliding_qwen2"]


def get_model(request, name):
    return request.getfixturevalue(name)


@pytest.mark.parametrize("name", MODELS)
def test_batched_decode_step_equals_hugging_face(request, name):
    model = get_model(request, name)
    layer = 2
    tail = Tail.from_hf(model, layer)
    cache = tail.new_cache(num_blocks=40, block_size=4)
    lengths = [3, 9, 1, 14, 6]
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 256, (n,), generator=g) for n in lengths]
    refs = []
    tables = []
    with torch.no_grad():
        for ids in seqs:
            out = model(ids[None], output_hidden_states=True)
            refs.append((out.hidden_states[layer][0], out.logits[0, -1]))
            tables.append(cache.allocate(cache.blocks_for(len(ids))))
        # each sequence's prefix as its own prefill (row n-1 left for the batched step)
        for (h, _), table, n in zip(refs, tables, lengths):
            if n > 1:
                t = cache.table([table], cache.blocks_for(n - 1))
                tail.forward_paged(h[None, : n - 1], torch.arange(n - 1)[None], cache, t)
        # one batched decode step: every sequence's last row at its own position
        x = torch.stack([h[-1] for h, _ in refs])[:, None]
        positions = torch.tensor([[n - 1] for n in lengths])
        t = cache.table(tables, cache.blocks_for(max(lengths)))
        logits = tail.forward_paged(x, positions, cache, t, last_only=True)
    for i, (_, ref) in enumerate(refs):
        torch.testing.assert_close(logits[i], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny_llama", "sliding_qwen2"])
def test_batched_step_equals_solo_step(request, name):
    """The same decode step, alone and in a batch of 16 of different lengths: within 1e-4
    relative (float32)."""
    model = get_model(request, name)
    tail = Tail.from_hf(model, 1)
    g = torch.Generator().manual_seed(5)
    lengths = [int(n) for n in torch.randint(1, 30, (16,), generator=g)]
    acts = [torch.randn(n + 1, 64, generator=g) for n in lengths]
    solo = []
    for a in acts:
        ts = tail.start(len(a))
        ts.step(a[:-1])
        solo.append(ts.step(a[-1:], last_only=True))
    cache = tail.new_cache(num_blocks=200, block_size=16)
    tables = [cache.allocate(cache.blocks_for(len(a))) for a in acts]
    with torch.no_grad():
        for a, table in zip(acts, tables):
            n = len(a) - 1
            tail.forward_paged(a[None, :n], torch.arange(n)[None], cache,
                               cache.table([table], cache.blocks_for(n)))
        x = torch.stack([a[-1] for a in acts])[:, None]
        positions = torch.tensor([[len(a) - 1] for a in acts])
        batched = tail.forward_paged(x, positions, cache,
                                     cache.table(tables, cache.blocks_for(max(map(len, acts)))),
                                     last_only=True)
    for i, ref in enumerate(solo):
        err = (torch.linalg.norm(batched[i] - ref) / torch.linalg.norm(ref)).item()
        assert err <= 1e-4, (i, err)


def test_tail_session_grows_past_its_reservation(tiny_llama):
    ids = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = tiny_llama(ids[None], output_hidden_states=True)
    _, tail = split(tiny_llama, 2)
    ts = tail.start(max_seq_len=4)  # grows by copying its blocks
    h = out.hidden_states[2][0]
    logits = torch.cat([ts.step(h[i : i + 5]) for i in range(0, 40, 5)])
    torch.testing.assert_close(logits, out.logits[0], rtol=1e-5, atol=1e-5)


def test_tail_weights_are_the_models_own(tiny_llama):
    tail = Tail.from_hf(tiny_llama, 1)
    assert tail.lm_head.weight.data_ptr() == tiny_llama.lm_head.weight.data_ptr()
    assert tail.layers[0].mlp.up_proj.weight.data_ptr() == \
        tiny_llama.model.layers[1].mlp.up_proj.weight.data_ptr()
    bf16 = Tail.from_hf(tiny_llama, 1, dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and bf16.inv_freq.dtype == torch.float32
    assert tiny_llama.lm_head.weight.dtype == torch.float32  # the model is untouched


def test_bfloat16_tail_stays_close_to_float32(tiny_llama):
    h = torch.randn(1, 12, 64, generator=torch.Generator().manual_seed(2))
    ref = Tail.from_hf(tiny_llama, 2)(h)
    got = Tail.from_hf(tiny_llama, 2, dtype=torch.bfloat16)(h)
    assert got.dtype == torch.float32
    assert (torch.linalg.norm(got - ref) / torch.linalg.norm(ref)).item() < 0.05


def test_cache_blocks_are_accounted(tiny_llama):
    cache = Tail.from_hf(tiny_llama, 1).new_cache(num_blocks=5, block_size=8)
    assert cache.free_blocks == 4 and cache.blocks_for(17) == 3
    a = cache.allocate(3)
    assert 0 not in a and len(set(a)) == 3
    with pytest.raises(CacheFullError, match="1 free blocks"):
        cache.allocate(2)
    cache.release(a)
    assert cache.free_blocks == 4
    with pytest.raises(ConfigError):
        Tail.from_hf(tiny_llama, 1).new_cache(num_blocks=1)
