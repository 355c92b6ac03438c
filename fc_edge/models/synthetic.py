"""Random-initialised models of real configurations, for profiling where no weights are at hand.

``load_model("synthetic:<name>")`` builds one of :data:`SYNTHETIC_CONFIGS`. The weights are drawn
from a seeded generator in a fixed order, so two processes (a server and a client) build the same
model and their :func:`~fc_edge.models.pretrained.model_fingerprint` agree. Building skips
Hugging Face's weight initialisation (slow on big matrices) and fills every tensor once:
matrices and biases ~ N(0, initializer_range), norm weights ~ 1 + N(0, initializer_range).

Memory (weights alone; activations and caches come on top):

=====================  ==========  =========  ==========
name                   parameters  float32    bfloat16
=====================  ==========  =========  ==========
llama-3.2-1b           1.24 B      4.9 GB     2.5 GB
llama-3.2-3b           3.21 B      12.8 GB    6.4 GB
qwen2.5-1.5b           1.54 B      6.2 GB     3.1 GB
qwen2.5-3b             3.09 B      12.3 GB    6.2 GB
=====================  ==========  =========  ==========

On a 24 GB machine build the 3B models with ``dtype=torch.bfloat16``.
"""

from __future__ import annotations

from typing import Any

import torch

from fc_edge.errors import ModelError

SEED = 20240501

_LLAMA3_ROPE_8K = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

# The published configs (config.json of each Hugging Face repository), written out.
SYNTHETIC_CONFIGS: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": {
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "hidden_act": "silu",
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_parameters": dict(_LLAMA3_ROPE_8K),
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": True,
        "initializer_range": 0.02,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
    },
    "llama-3.2-3b": {
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_hidden_layers": 28,
        "num_attention_heads": 24,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "hidden_act": "silu",
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_parameters": dict(_LLAMA3_ROPE_8K),
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": True,
        "initializer_range": 0.02,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
    },
    "qwen2.5-1.5b": {
        "model_type": "qwen2",
        "vocab_size": 151936,
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        "use_sliding_window": False,
        "max_window_layers": 21,
        "tie_word_embeddings": True,
        "initializer_range": 0.02,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
    },
    "qwen2.5-3b": {
        "model_type": "qwen2",
        "vocab_size": 151936,
        "hidden_size": 2048,
        "intermediate_size": 11008,
        "num_hidden_layers": 36,
        "num_attention_heads": 16,
        "num_key_value_heads": 2,
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        "use_sliding_window": False,
        "max_window_layers": 36,
        "tie_word_embeddings": True,
        "initializer_range": 0.02,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
    },
    # Test models: a few layers, hidden 64. The Llama one uses Llama 3 rope scaling with a short
    # original context so the scaling bends frequencies that matter at test lengths, and unties
    # its lm_head; Qwen2 has its q/k/v biases (Qwen2 always has them) and tied embeddings.
    # eos_token_id is None so greedy generation never stops early.
    "tiny-llama": {
        "model_type": "llama",
        "vocab_size": 256,
        "hidden_size": 64,
        "intermediate_size": 160,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "hidden_act": "silu",
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": 0.1,
        "bos_token_id": 1,
        "eos_token_id": None,
    },
    "tiny-qwen2": {
        "model_type": "qwen2",
        "vocab_size": 256,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "hidden_act": "silu",
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        "use_sliding_window": False,
        "tie_word_embeddings": True,
        "initializer_range": 0.1,
        "bos_token_id": 1,
        "eos_token_id": None,
    },
}


def synthetic_config(name: str) -> Any:
    """The Hugging Face config of the synthetic model ``name`` (a key of SYNTHETIC_CONFIGS)."""
    from transformers import AutoConfig

    if name not in SYNTHETIC_CONFIGS:
        raise ModelError(
            f"unknown synthetic model {name!r}; choose one of "
            + ", ".join(f"synthetic:{n}" for n in SYNTHETIC_CONFIGS)
        )
    fields = dict(SYNTHETIC_CONFIGS[name])
    model_type = fields.pop("model_type")
    return AutoConfig.for_model(model_type, **fields)


def build_synthetic(name: str, dtype: torch.dtype = torch.float32, seed: int = SEED) -> Any:
    """Build ``synthetic:<name>`` in eval mode on the CPU, seeded random weights in ``dtype``."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    config = synthetic_config(name)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()
    generator = torch.Generator().manual_seed(seed)
    std = float(config.initializer_range)
    with torch.no_grad():
        # named_parameters lists a tied tensor once, in module order: the same order every run.
        for pname, p in model.named_parameters():
            if p.ndim == 1 and "norm" in pname:
                p.normal_(0.0, std, generator=generator).add_(1.0)
            else:
                p.normal_(0.0, std, generator=generator)
    return model.eval()
