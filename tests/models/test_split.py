"""Split generation against Hugging Face's own greedy generate, and split()'s errors."""

from __future__ import annotations

import pytest
import torch

from fc_edge.errors import ConfigError, ModelError
from fc_edge.models.local import generate_split
from fc_edge.models.split import split


def hf_greedy(model, ids: torch.Tensor, n: int, eos) -> list[int]:
    out = model.generate(
        ids[None],
        attention_mask=torch.ones(1, ids.numel(), dtype=torch.long),
        do_sample=False,
        max_new_tokens=n,
        eos_token_id=eos,
        pad_token_id=eos[0] if isinstance(eos, list) else eos,
    )
    return out[0, ids.numel() :].tolist()


@pytest.mark.parametrize("prompt", ["The capital of France is", "def fibonacci(n):\n"])
def test_smollm2_split_generation_equals_generate(smollm2, prompt):
    model, tokenizer = smollm2
    ids = tokenizer(prompt, return_tensors="pt").input_ids[0]
    eos = model.generation_config.eos_token_id
    ref = hf_greedy(model, ids, 64, eos)
    head, tail = split(model, layer=3)
    got = generate_split(head, tail, ids, max_new_tokens=64, eos_token_id=eos)
    assert got == ref
    if prompt.startswith("The capital"):
        assert tokenizer.decode(got).startswith(" Paris")


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_qwen2"])
@pytest.mark.parametrize("layer", [1, 3])
def test_tiny_split_generation_equals_generate(request, name, layer):
    model = request.getfixturevalue(name)
    assert model.generation_config.eos_token_id is None  # never stops early
    ids = torch.randint(0, 256, (9,), generator=torch.Generator().manual_seed(layer))
    ref = model.generate(
        ids[None],
        attention_mask=torch.ones(1, 9, dtype=torch.long),
        do_sample=False,
        max_new_tokens=64,
    )[0, 9:].tolist()
    head, tail = split(model, layer)
    got = generate_split(head, tail, ids, max_new_tokens=64)
    assert len(got) == 64 and got == ref


def test_generation_stops_after_eos(tiny_llama):
    head, tail = split(tiny_llama, 2)
    ids = torch.tensor([5, 6, 7])
    free = generate_split(head, tail, ids, max_new_tokens=10)
    stopped = generate_split(head, tail, ids, max_new_tokens=10, eos_token_id=[free[2]])
    assert stopped == free[: free.index(free[2]) + 1]
    assert generate_split(head, tail, ids, max_new_tokens=0) == []


def test_identity_codec_round_trip_changes_nothing(tiny_qwen2):
    try:
        from fc_edge.codecs import get_codec

        codec = get_codec("identity")
    except (ImportError, KeyError, ConfigError) as e:
        pytest.skip(f"no identity codec yet: {e}")
    head, tail = split(tiny_qwen2, 2)
    ids = torch.arange(10, 18)
    assert generate_split(head, tail, ids, 12, codec=codec) == generate_split(head, tail, ids, 12)


def assert_tail_matches(model, layer: int = 2, n: int = 14, seed: int = 7) -> None:
    """The tail after ``layer``, fed the model's own hidden states in three steps (a prefill,
    one row, the rest), and in one forward, gives the model's logits."""
    ids = torch.randint(0, model.config.vocab_size, (n,),
                        generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        out = model(ids[None], output_hidden_states=True)
    _, tail = split(model, layer)
    ts = tail.start()
    h = out.hidden_states[layer][0]
    logits = torch.cat([ts.step(h[: n - 4]), ts.step(h[n - 4: n - 3]), ts.step(h[n - 3:])])
    assert logits.dtype == torch.float32 and logits.shape == (n, model.config.vocab_size)
    torch.testing.assert_close(logits, out.logits[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tail.forward(h[None])[0], out.logits[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_qwen2"])
def test_tail_logits_equal_the_full_model(request, name):
    assert_tail_matches(request.getfixturevalue(name))


def test_tail_rejects_a_wrong_width(tiny_llama):
    _, tail = split(tiny_llama, 1)
    with pytest.raises(ConfigError, match="64"):
        tail.start().step(torch.zeros(3, 32))


@pytest.mark.parametrize("layer", [0, 4, -1, 1.5])
def test_split_layer_out_of_range(tiny_llama, layer):
    with pytest.raises(ConfigError, match="1..3"):
        split(tiny_llama, layer)


def test_split_unsupported_family():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(ModelError, match="GPT2LMHeadModel.*LlamaForCausalLM.*Phi3ForCausalLM"):
        split(model, 1)


def test_head_is_independent_of_later_changes_to_the_model(tiny_llama):
    head, _ = split(tiny_llama, 1)
    before = head.start(4).step(torch.tensor([1, 2]))
    assert head.embed_tokens.weight.data_ptr() != tiny_llama.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(head.start(4).step(torch.tensor([1, 2])), before, rtol=0, atol=0)


def test_qwen2_sliding_window_layers_in_head_and_tail():
    from transformers import AutoConfig, AutoModelForCausalLM

    from fc_edge.models.synthetic import SYNTHETIC_CONFIGS

    fields = {k: v for k, v in SYNTHETIC_CONFIGS["tiny-qwen2"].items() if k != "model_type"}
    fields.update(use_sliding_window=True, sliding_window=4, max_window_layers=1)
    config = AutoConfig.for_model("qwen2", **fields)
    assert config.layer_types[1:] == ["sliding_attention"] * 3
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, 256, (12,), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        out = model(ids[None], output_hidden_states=True)
    head, tail = split(model, 2)
    hs, ts = head.start(12), tail.start()
    rows, logits = [], []
    for s, e in [(0, 6), (6, 7), (7, 8), (8, 12)]:
        rows.append(hs.step(ids[s:e]))
        logits.append(ts.step(out.hidden_states[2][0, s:e]))
    a = torch.cat(rows)
    ref = out.hidden_states[2][0]
    assert (torch.linalg.norm(a - ref) / torch.linalg.norm(ref)).item() <= 1e-5
    torch.testing.assert_close(torch.cat(logits), out.logits[0], rtol=1e-5, atol=1e-5)
    ref_ids = model.generate(
        ids[None],
        attention_mask=torch.ones(1, 12, dtype=torch.long),
        do_sample=False,
        max_new_tokens=16,
    )[0, 12:].tolist()
    assert generate_split(head, tail, ids, 16) == ref_ids
