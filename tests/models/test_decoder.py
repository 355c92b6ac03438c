"""The decoder's configuration and rotary frequencies against transformers' own."""

from __future__ import annotations

import pytest
import torch

from fc_edge.errors import ModelError
from fc_edge.models.decoder import DecoderConfig, rope_inv_freq
from fc_edge.models.synthetic import SYNTHETIC_CONFIGS, synthetic_config


@pytest.mark.parametrize("name", list(SYNTHETIC_CONFIGS))
def test_rope_frequencies_match_transformers(name):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = synthetic_config(name)
    ours = rope_inv_freq(DecoderConfig.from_hf(config, 1))
    rope_type = config.rope_parameters["rope_type"]
    if rope_type == "default":
        d = config.head_dim if getattr(config, "head_dim", None) else None
        d = d or config.hidden_size // config.num_attention_heads
        theirs = 1.0 / (config.rope_parameters["rope_theta"] ** (torch.arange(0, d, 2).float() / d))
    else:
        theirs, _ = ROPE_INIT_FUNCTIONS[rope_type](config)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_llama3_scaling_bends_some_frequencies_of_the_tiny_model():
    cfg = DecoderConfig.from_hf(synthetic_config("tiny-llama"), 1)
    plain = rope_inv_freq(DecoderConfig(**{**cfg.__dict__, "rope_type": "default"}))
    scaled = rope_inv_freq(cfg)
    assert (scaled < plain).any() and (scaled == plain).any()


def test_config_from_transformers_4_fields():
    class Old:
        model_type = "llama"
        vocab_size, hidden_size, intermediate_size = 10, 8, 16
        num_attention_heads, num_key_value_heads, max_position_embeddings = 2, 1, 64
        rms_norm_eps, hidden_act, rope_theta = 1e-6, "silu", 5000.0
        rope_scaling = {"type": "linear", "factor": 2.0}

    cfg = DecoderConfig.from_hf(Old(), 1)
    assert (cfg.rope_theta, cfg.rope_type, cfg.rope_factor, cfg.head_dim) == (
        5000.0,
        "linear",
        2.0,
        4,
    )


def test_unsupported_rope_type_is_a_model_error():
    config = synthetic_config("tiny-llama")
    config.rope_parameters = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}
    with pytest.raises(ModelError, match="yarn"):
        DecoderConfig.from_hf(config, 1)
