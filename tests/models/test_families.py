"""Every family the decoder supports, held to Hugging Face: a tiny random model built from the
installed transformers' own config class, its head against the model's hidden states, its tail
against its logits, a split generation against ``model.generate``, and the head read lazily from
a saved folder (with the full model's fingerprint computed from the files)."""

from __future__ import annotations

import pytest
import torch

from fc_edge.models.checkpoint import open_checkpoint
from fc_edge.models.local import generate_split
from fc_edge.models.pretrained import load_model, model_fingerprint
from fc_edge.models.split import split

COMMON = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
          "tie_word_embeddings": False, "eos_token_id": None, "bos_token_id": None,
          "pad_token_id": None}


def _configs() -> dict[str, object]:
    from transformers import Gemma2Config, Gemma3TextConfig, MistralConfig, Phi3Config, Qwen3Config

    return {
        # a window of 5 in every layer (Mistral applies sliding_window to all layers)
        "mistral": MistralConfig(**COMMON, sliding_window=5),
        # q/k norms; sliding windows in the layers from max_window_layers on
        "qwen3": Qwen3Config(**COMMON, head_dim=16, use_sliding_window=True, sliding_window=5,
                             max_window_layers=2),
        # soft caps small enough to bend the scores and the logits of a random model; a query
        # scale that is not head_dim; alternating sliding windows; tied embeddings (the default)
        "gemma2": Gemma2Config(**{**COMMON, "tie_word_embeddings": True}, head_dim=16,
                               query_pre_attn_scalar=24, sliding_window=5,
                               attn_logit_softcapping=0.5, final_logit_softcapping=0.2),
        # q/k norms of (1 + w); sliding layers 0, 1 and 3 with their own rotary base, layer 2
        # full attention with linear rope scaling
        "gemma3": Gemma3TextConfig(**{**COMMON, "tie_word_embeddings": True}, head_dim=16,
                                   query_pre_attn_scalar=24, sliding_window=5,
                                   sliding_window_pattern=3, final_logit_softcapping=0.2,
                                   rope_parameters={
                                       "full_attention": {"rope_type": "linear",
                                                          "rope_theta": 1e6, "factor": 4.0},
                                       "sliding_attention": {"rope_type": "default",
                                                             "rope_theta": 100.0}}),
        # fused qkv / gate_up, half of each head rotating, a window in every layer
        "phi3": Phi3Config(**COMMON, sliding_window=6,
                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                            "partial_rotary_factor": 0.5}),
    }


FAMILIES = ["mistral", "qwen3", "gemma2", "gemma3", "phi3"]


def build(family: str):
    """A seeded random model of ``family`` in eval mode; every norm gain perturbed (Gemma's
    start at 0, the others at 1: a (1 + w) mistake would otherwise go unseen)."""
    from transformers import AutoModelForCausalLM

    config = _configs()[family]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
            elif p.dim() >= 2:
                p.mul_(4.0)  # weights of std 0.08: attention that is not uniform
    return model


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    return request.param, build(request.param)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (torch.linalg.norm(a.double() - b.double()) / torch.linalg.norm(b.double())).item()


def test_the_family_is_what_the_decoder_reads(family_model):
    """The config switches that make the family differ from Llama are set (so the tests below
    exercise them)."""
    from fc_edge.models.decoder import DecoderConfig

    family, model = family_model
    cfg = DecoderConfig.from_hf(model.config, 4)
    assert any(w is not None for w in cfg.sliding_windows)
    if family == "qwen3":
        assert cfg.qk_norm
    if family == "gemma2":
        assert cfg.sandwich_norms and cfg.norm_offset == 1.0 and cfg.embed_scale == 8.0
        assert cfg.attn_softcap == 0.5 and cfg.final_softcap == 0.2
        assert cfg.attn_scale == 24 ** -0.5 and cfg.hidden_act == "gelu_pytorch_tanh"
    if family == "gemma3":
        assert cfg.qk_norm and cfg.norm_offset == 1.0 and cfg.local_rope_theta == 100.0
        assert cfg.rope_type == "linear" and cfg.sliding_windows == (5, 5, None, 5)
    if family == "phi3":
        assert cfg.fused_qkv and cfg.fused_gate_up and cfg.rotary_dim == 8


@pytest.mark.parametrize("layer", [1, 3])
def test_head_matches_hidden_states_at_prefill_and_each_decode_step(family_model, layer):
    _, model = family_model
    ids = torch.randint(0, 256, (14,), generator=torch.Generator().manual_seed(layer))
    with torch.no_grad():
        ref = model(ids[None], output_hidden_states=True).hidden_states[layer][0]
    head, _ = split(model, layer)
    hs = head.start(14)
    rows = [hs.step(ids[:8])] + [hs.step(ids[t: t + 1]) for t in range(8, 14)]
    assert rel_err(torch.cat(rows), ref) <= 1e-5


def test_tail_matches_the_logits(family_model):
    from test_split import assert_tail_matches  # tests/models is on sys.path (rootdir mode)

    assert_tail_matches(family_model[1], layer=2, n=13, seed=3)


def test_split_generation_equals_generate(family_model):
    _, model = family_model
    ids = torch.randint(0, 256, (9,), generator=torch.Generator().manual_seed(5))
    ref = model.generate(ids[None], attention_mask=torch.ones(1, 9, dtype=torch.long),
                         do_sample=False, max_new_tokens=20)[0, 9:].tolist()
    head, tail = split(model, 2)
    assert generate_split(head, tail, ids, 20) == ref


def test_head_from_a_saved_folder(family_model, tmp_path):
    """The lazy reader builds the same head from the folder, and its fingerprint (sampled
    elements read from the files) is the loaded model's."""
    _, model = family_model
    model.save_pretrained(tmp_path)
    checkpoint = open_checkpoint(str(tmp_path))
    assert checkpoint.fingerprint() == model_fingerprint(load_model(str(tmp_path))[0])
    ids = torch.randint(0, 256, (10,), generator=torch.Generator().manual_seed(6))
    lazy = checkpoint.load_head(2).start(10).step(ids)
    eager = split(model, 2)[0].start(10).step(ids)
    torch.testing.assert_close(lazy, eager, rtol=0, atol=0)
    from fc_edge.models.split import channel_weights

    torch.testing.assert_close(checkpoint.channel_weights(2), channel_weights(model, 2),
                               rtol=0, atol=0)
