"""The randomized Walsh-Hadamard transform along the hidden axis.

Random signs (from ``seed``, via splitmix64) then a block-diagonal Walsh-Hadamard transform over
the power-of-two blocks of D's binary expansion, largest first, each at most 4096 (all of D when
D is a power of two; 576 = 512 + 64; 100 = 64 + 32 + 4), so every D is rotated.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

#: Largest Walsh-Hadamard block (a 4096 x 4096 float32 matrix is 64 MiB).
MAX_HADAMARD_BLOCK = 4096


def hadamard_blocks(D: int) -> tuple[int, ...]:
    """Block sizes for D: its binary expansion, largest first, blocks capped at 4096.

    ``576 -> (512, 64)``, ``100 -> (64, 32, 4)``, ``2048 -> (2048,)``; they add up to D.
    """
    out, rest = [], D
    while rest:
        h = min(1 << (rest.bit_length() - 1), MAX_HADAMARD_BLOCK)
        out.append(h)
        rest -= h
    return tuple(out)


@functools.lru_cache(maxsize=16)
def hadamard_matrix(h: int, device: str = "cpu") -> torch.Tensor:
    """Orthonormal Sylvester-Hadamard matrix ``(h, h)``, h a power of two."""
    H = torch.ones(1, 1, dtype=torch.float32)
    while H.shape[0] < h:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return (H / math.sqrt(h)).to(device)


@functools.lru_cache(maxsize=16)
def hadamard_signs(D: int, seed: int, device: str = "cpu") -> torch.Tensor:
    """``(D,)`` random signs: ``-1`` where bit 0 of splitmix64 output ``i`` (1-based) is set.

    splitmix64 is a few lines in any language, so a non-Python receiver derives the same signs
    (docs/wire-format.md gives the recurrence).
    """
    with np.errstate(over="ignore"):
        z = np.uint64(seed) + np.arange(1, D + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    signs = 1.0 - 2.0 * (z & np.uint64(1)).astype(np.float32)
    return torch.from_numpy(signs).to(device)


def _blockwise(rows: torch.Tensor, transpose: bool) -> torch.Tensor:
    """Multiply each power-of-two block of the columns by its (symmetric) Hadamard matrix."""
    D = rows.shape[1]
    dev = str(rows.device)
    out, start = [], 0
    for h in hadamard_blocks(D):
        H = hadamard_matrix(h, dev)
        out.append(rows[:, start : start + h] @ (H.T if transpose else H))
        start += h
    return out[0] if len(out) == 1 else torch.cat(out, dim=1)
