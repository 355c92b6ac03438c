"""Models: loading, the device head, the server tail, and the split between them.

The names below are imported on first use, so ``fc_edge.models.defaults`` (and the CLI's help)
does not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DEFAULT_MODEL": "fc_edge.models.defaults",
    "DEFAULT_SPLIT_LAYER": "fc_edge.models.defaults",
    "DEFAULT_CODEC": "fc_edge.models.defaults",
    "SUPPORTED_FAMILIES": "fc_edge.models.split",
    "Head": "fc_edge.models.head",
    "HeadSession": "fc_edge.models.head",
    "Tail": "fc_edge.models.tail",
    "TailSession": "fc_edge.models.tail",
    "generate_split": "fc_edge.models.local",
    "load_model": "fc_edge.models.pretrained",
    "model_fingerprint": "fc_edge.models.pretrained",
    "open_checkpoint": "fc_edge.models.checkpoint",
    "DeviceHead": "fc_edge.models.checkpoint",
    "split": "fc_edge.models.split",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fc_edge.models' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
