"""The fixed orthonormal transforms along the hidden axis that ``rotated`` codes in.

``transform`` codes on the wire: ``1`` the orthonormal DCT-II (:mod:`fc_edge.codecs.dct`),
``2`` the randomized Walsh-Hadamard transform (:mod:`fc_edge.codecs.hadamard`). The codec
itself is :class:`fc_edge.codecs.rotated.RotatedCodec` (also reachable here as
``transform.RotatedCodec``, where earlier code imported it from).
"""

from __future__ import annotations

from typing import Any

import torch

from fc_edge.codecs.dct import dct, idct
from fc_edge.codecs.hadamard import _blockwise, hadamard_signs

TRANSFORMS = {"dct": 1, "hadamard": 2}
TRANSFORM_NAMES = {v: k for k, v in TRANSFORMS.items()}


def rotate(rows: torch.Tensor, transform: int, seed: int) -> torch.Tensor:
    """``(N, D)`` float32 -> ``(N, D)`` transformed rows (orthonormal)."""
    if transform == TRANSFORMS["dct"]:
        return dct(rows)
    D = rows.shape[1]
    return _blockwise(rows * hadamard_signs(D, seed, str(rows.device)), transpose=False)


def unrotate(coefs: torch.Tensor, transform: int, seed: int) -> torch.Tensor:
    """Inverse of :func:`rotate` (the transpose)."""
    if transform == TRANSFORMS["dct"]:
        return idct(coefs)
    D = coefs.shape[1]
    return _blockwise(coefs, transpose=True) * hadamard_signs(D, seed, str(coefs.device))


def __getattr__(name: str) -> Any:
    if name == "RotatedCodec":  # the codec moved to rotated.py; a lazy import avoids a cycle
        from fc_edge.codecs.rotated import RotatedCodec

        return RotatedCodec
    raise AttributeError(name)
