"""model_fingerprint against a second implementation written from docs/protocol.md (hashlib,
json and struct only: what a device in another language would write), and the doc's vector."""

from __future__ import annotations

import hashlib
import json
import re
import struct
from pathlib import Path
from types import SimpleNamespace

import torch

from fc_edge.models.pretrained import model_fingerprint

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
          "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
          "rms_norm_eps", "rope_parameters", "rope_theta", "rope_scaling", "attention_bias",
          "mlp_bias", "tie_word_embeddings", "use_sliding_window", "sliding_window",
          "layer_types")


def from_the_doc(config: dict, tensors: dict[str, tuple[list[int], str, list[float]]]) -> str:
    """tensors: name -> (shape, dtype name, values in row-major order as Python floats)."""
    arch = {k: config[k] for k in FIELDS if k in config}
    message = json.dumps(arch, sort_keys=True, separators=(",", ":")).encode("utf-8")
    for name in sorted(tensors):
        shape, dtype, values = tensors[name]
        message += f"{name}|{','.join(map(str, shape))}|{dtype}|".encode()
        n = len(values)
        k = min(n, 1024)
        for i in range(k):
            j = i * (n - 1) // (k - 1) if k > 1 else 0
            message += struct.pack("<f", values[j])
    return hashlib.sha256(message).hexdigest()[:16]


class Toy(torch.nn.Module):
    """Config + state dict, the two things the fingerprint reads."""

    def __init__(self, config: dict, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.config = SimpleNamespace(to_dict=lambda: dict(config))
        for name, t in tensors.items():
            self.register_buffer(name, t)


def vector_model() -> Toy:
    config = {"model_type": "llama", "hidden_size": 4, "rms_norm_eps": 1e-05,
              "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
              "not_a_field": 7}
    tensors = {"w": torch.arange(2000, dtype=torch.float32).reshape(40, 50) / 8,
               "b": torch.tensor([0.5, -1.25, 3.0]), "s": torch.tensor(2.0),
               "h": torch.tensor([1.5, 2.5], dtype=torch.float16)}
    return Toy(config, tensors)


def test_fingerprint_follows_the_doc():
    model = vector_model()
    tensors = {name: (list(t.shape), str(t.dtype).removeprefix("torch."),
                      [float(v) for v in t.reshape(-1).tolist()])
               for name, t in model.state_dict().items()}
    assert model_fingerprint(model) == from_the_doc(model.config.to_dict(), tensors)


def test_the_docs_test_vector():
    vector = re.search(r"Fingerprint test vector: `([0-9a-f]{16})`", DOC.read_text())
    assert vector, "docs/protocol.md lost its fingerprint test vector"
    assert model_fingerprint(vector_model()) == vector.group(1)


def test_fingerprint_sees_a_sampled_change():
    model = vector_model()
    before = model_fingerprint(model)
    model.w[-1, -1] += 1  # the last element is always sampled
    assert model_fingerprint(model) != before
