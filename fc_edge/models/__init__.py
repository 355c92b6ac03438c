"""Models: loading, the device head, the server tail, and the split between them."""

from fc_edge.models.head import Head, HeadSession
from fc_edge.models.local import generate_split
from fc_edge.models.pretrained import DEFAULT_MODEL, load_model, model_fingerprint
from fc_edge.models.split import SUPPORTED_FAMILIES, split
from fc_edge.models.tail import Tail, TailSession

__all__ = [
    "DEFAULT_MODEL",
    "SUPPORTED_FAMILIES",
    "Head",
    "HeadSession",
    "Tail",
    "TailSession",
    "generate_split",
    "load_model",
    "model_fingerprint",
    "split",
]
