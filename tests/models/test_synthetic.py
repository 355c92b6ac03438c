"""Synthetic models: the real configurations, seeded weights."""

from __future__ import annotations

import pytest
import torch

from fc_edge.models.pretrained import load_model, model_fingerprint
from fc_edge.models.synthetic import build_synthetic, synthetic_config

# Parameter counts of the published checkpoints (tied embeddings counted once).
PUBLISHED_PARAMETERS = {
    "llama-3.2-1b": 1_235_814_400,
    "llama-3.2-3b": 3_212_749_824,
    "qwen2.5-1.5b": 1_543_714_304,
    "qwen2.5-3b": 3_085_938_688,
}


@pytest.mark.parametrize("name", list(PUBLISHED_PARAMETERS))
def test_real_configs_have_the_published_size(name):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(synthetic_config(name))
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMETERS[name]


def test_llama_3_2_uses_llama3_rope_scaling_and_qwen_has_qkv_bias():
    llama = synthetic_config("llama-3.2-1b")
    assert llama.rope_parameters["rope_type"] == "llama3"
    assert llama.rope_parameters["factor"] == 32.0
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        qwen = AutoModelForCausalLM.from_config(synthetic_config("tiny-qwen2"))
    assert qwen.model.layers[0].self_attn.q_proj.bias is not None


def test_same_seed_same_weights_other_seed_other_weights(tiny_llama):
    again = build_synthetic("tiny-llama")
    for (n1, p1), (n2, p2) in zip(
        tiny_llama.state_dict().items(), again.state_dict().items(), strict=True
    ):
        assert n1 == n2 and torch.equal(p1, p2), n1
    other = build_synthetic("tiny-llama", seed=1)
    assert model_fingerprint(other) != model_fingerprint(tiny_llama)


def test_tied_embeddings_stay_tied(tiny_qwen2, tiny_llama):
    assert tiny_qwen2.lm_head.weight is tiny_qwen2.model.embed_tokens.weight
    assert tiny_llama.lm_head.weight is not tiny_llama.model.embed_tokens.weight


def test_bfloat16_build_and_its_rotary_buffers(tiny_qwen2):
    model, tokenizer = load_model("synthetic:tiny-llama", dtype=torch.bfloat16)
    assert tokenizer is None
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()


def test_weights_have_the_initializer_scale(tiny_llama):
    w = tiny_llama.model.layers[0].mlp.up_proj.weight
    assert abs(w.std().item() - 0.1) < 0.01
    norm = tiny_llama.model.layers[0].input_layernorm.weight
    assert abs(norm.mean().item() - 1.0) < 0.05
