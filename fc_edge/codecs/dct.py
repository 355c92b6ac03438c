"""The orthonormal DCT-II along the last axis (and its inverse, the DCT-III).

``y = T x`` with ``T[k, n] = c_k cos(pi k (2n+1) / 2N)``, ``c_0 = sqrt(1/N)``, ``c_k = sqrt(2/N)``:
one FFT of length N (Makhoul) for many rows, one product with the cached matrix for a few.
"""

from __future__ import annotations

import functools
import math

import torch


@functools.lru_cache(maxsize=32)
def _dct_tables(N: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Twiddles and scales of :func:`dct` / :func:`idct` for length N (cached: a decode row
    would otherwise spend more time building them than transforming)."""
    k = torch.arange(N, dtype=torch.float64)
    w = torch.exp(-0.5j * math.pi * k / N).to(torch.complex64)
    w_inv = (0.5 * torch.exp(0.5j * math.pi * k / N)).to(torch.complex64)
    scale = torch.full((N,), math.sqrt(1 / (2 * N)))
    scale[0] = math.sqrt(1 / (4 * N))
    scale_inv = torch.full((N,), math.sqrt(2 * N))
    scale_inv[0] = math.sqrt(4 * N)
    return tuple(t.to(device) for t in (w, scale, w_inv, scale_inv))


# A few rows (a decode step) are cheaper as one product with the D x D matrix than as the FFT
# path's six kernel launches; the matrix is cached per D (16 MiB at D = 2048).
_MATRIX_ROWS, _MATRIX_MAX_D = 16, 2048


@functools.lru_cache(maxsize=4)
def dct_matrix(N: int, device: torch.device) -> torch.Tensor:
    """``(N, N)`` float32 orthonormal DCT-II matrix ``T`` (``y = T x``), built in float64."""
    k = torch.arange(N, dtype=torch.float64).unsqueeze(1)
    n = torch.arange(N, dtype=torch.float64).unsqueeze(0)
    T = torch.cos(math.pi * k * (2 * n + 1) / (2 * N)) * math.sqrt(2 / N)
    T[0] /= math.sqrt(2)
    return T.float().to(device)


@functools.lru_cache(maxsize=4)
def _dct_matrix_t(N: int, device: torch.device) -> torch.Tensor:
    return dct_matrix(N, device).T.contiguous()  # a contiguous right operand: 2x faster


def _few_rows(x: torch.Tensor) -> bool:
    return x.shape[-1] <= _MATRIX_MAX_D and x.numel() <= _MATRIX_ROWS * x.shape[-1]


def dct(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal DCT-II along the last axis via one FFT of length D (Makhoul), O(D) memory;
    a product with the cached matrix for a few rows."""
    N = x.shape[-1]
    if _few_rows(x):
        return x @ _dct_matrix_t(N, x.device)
    w, scale, _, _ = _dct_tables(N, x.device)
    v = torch.cat([x[..., ::2], x[..., 1::2].flip(-1)], dim=-1)
    return 2 * (torch.fft.fft(v, dim=-1) * w).real * scale


def idct(y: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`dct` (orthonormal DCT-III)."""
    N = y.shape[-1]
    if _few_rows(y):
        return y @ dct_matrix(N, y.device)
    _, _, w, scale = _dct_tables(N, y.device)
    u = y * scale  # unnormalised DCT-II coefficients
    u_rev = torch.cat([torch.zeros_like(u[..., :1]), u[..., 1:].flip(-1)], dim=-1)  # u[N-k]
    v = torch.fft.ifft(torch.complex(u, -u_rev) * w, dim=-1).real
    half = (N + 1) // 2
    if N % 2 == 0:  # x[2i] = v[i], x[2i+1] = v[N-1-i]: one interleaving copy
        return torch.stack([v[..., :half], v[..., half:].flip(-1)], dim=-1).flatten(-2)
    x = torch.empty_like(v)
    x[..., ::2] = v[..., :half]
    x[..., 1::2] = v[..., half:].flip(-1)
    return x
