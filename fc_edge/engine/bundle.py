"""What the engine runners share, so neither imports the other: the bundle's manifest, the
config fields a client reads, where the plans are, and the in-graph fourier block's fallback for
short prompts. (A step's token checks are :func:`fc_edge.models.head.step_ids`, the torch head's
too.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from fc_edge.models.checkpoint import MANIFEST, load_manifest

__all__ = ["MANIFEST", "EngineConfig", "fourier_block_fallback", "has_plans", "load_manifest"]


class EngineConfig:
    """The few Hugging Face config fields a client reads, from the manifest."""

    def __init__(self, manifest: dict[str, Any]) -> None:
        self.model_type = manifest["model_type"]
        self.hidden_size = manifest["hidden_size"]
        self.num_hidden_layers = manifest["num_hidden_layers"]
        self.vocab_size = manifest["vocab_size"]


def has_plans(folder: Path, manifest: dict[str, Any]) -> bool:
    """Whether the manifest lists TensorRT plans and both files are in ``folder``."""
    entry = manifest.get("tensorrt")
    return bool(entry) and all((folder / entry[g]).is_file() for g in ("prefill", "decode"))


def fourier_block_fallback(activation: Tensor, fourier: dict[str, Any] | None) -> Tensor | None:
    """The fourier block of a prefill ``activation`` (1, S, D) shorter than the graph's
    ``2 k_s - 1`` rows, where the graph's own block output is undefined:
    :func:`fc_edge.ops.spectral_compress` of the activation with ``k_s`` clipped to
    ``S // 2 + 1``, as the codec does. None when the graph's block stands (no block, or S long
    enough)."""
    if not fourier or activation.shape[1] >= fourier["prefill_min_seq_len"]:
        return None
    from fc_edge.ops import spectral_compress

    s = activation.shape[1]
    return spectral_compress(activation.float(), min(fourier["k_s"], s // 2 + 1),
                             fourier["k_d"])
