"""Spectral block ops: the fused CUDA op where ``fc_edge._C`` is built, torch.fft otherwise.

``spectral_compress(x, k_s, k_d)`` maps a real ``(B, S, D)`` activation to the low-frequency block
of its 2-D real FFT, as a float32 tensor ``(B, R, k_d, 2)`` (real, imaginary) with
``R = min(2 k_s - 1, S)`` rows: token frequencies ``0..k_s-1`` then their mirrors
``S-k_s+1..S-1`` (FFT order), and half-spectrum columns ``0..k_d-1``. ``spectral_decompress``
zero-pads that block and inverts it: the orthogonal projection of ``x`` onto the kept frequencies.

The transform is unnormalised along both axes (``torch.fft`` "backward"), as in the paper.
The torch path transforms along the token axis only the ``k_d`` kept columns, so compress costs
no more than a bare ``rfft2``.
"""

from __future__ import annotations

import functools

import torch

from fc_edge.errors import ConfigError


def block_rows(S: int, k_s: int) -> torch.Tensor:
    """Kept token frequencies, FFT order: ``0..k_s-1, S-k_s+1..S-1`` (deduplicated)."""
    low = list(range(k_s))
    high = [u for u in range(S - k_s + 1, S) if u >= k_s]
    return torch.tensor(low + high, dtype=torch.long)


def check_geometry(S: int, D: int, k_s: int, k_d: int) -> None:
    if not 1 <= k_s <= S // 2 + 1:
        raise ConfigError(f"k_s must be in 1..{S // 2 + 1} for S = {S}, got {k_s}")
    if not 1 <= k_d <= D // 2 + 1:
        raise ConfigError(f"k_d must be in 1..{D // 2 + 1} for D = {D}, got {k_d}")


def n_block_rows(S: int, k_s: int) -> int:
    return min(2 * k_s - 1, S)


@functools.cache
def extension_available() -> bool:
    """True when ``fc_edge._C`` (the fused CUDA ops) is built and loaded.

    Loading it registers ``torch.ops.fc_edge.*``; the fake (meta) kernels that let
    ``torch.compile`` and ``torch.library.opcheck`` trace the ops are registered here, once.
    """
    try:
        import fc_edge._C  # noqa: F401
    except ImportError:
        return False
    _register_fakes()
    return True


def _register_fakes() -> None:
    @torch.library.register_fake("fc_edge::spectral_compress")
    def _compress_fake(x: torch.Tensor, k_s: int, k_d: int) -> torch.Tensor:
        B, S, _ = x.shape
        return x.new_empty((B, torch.sym_min(2 * k_s - 1, S), k_d, 2), dtype=torch.float32)

    @torch.library.register_fake("fc_edge::spectral_decompress")
    def _decompress_fake(block: torch.Tensor, S: int, D: int, k_s: int) -> torch.Tensor:
        return block.new_empty((block.shape[0], S, D), dtype=torch.float32)


def _cuda_ops_available(x: torch.Tensor) -> bool:
    # D == 1 has no cuFFT plan (the op refuses it); torch.fft handles it.
    return x.is_cuda and x.shape[-1] >= 2 and extension_available()


def spectral_compress(x: torch.Tensor, k_s: int, k_d: int) -> torch.Tensor:
    """``(B, S, D)`` float -> ``(B, R, k_d, 2)`` float32 low-frequency block."""
    _, S, D = x.shape
    check_geometry(S, D, k_s, k_d)
    if _cuda_ops_available(x):
        return torch.ops.fc_edge.spectral_compress(x, k_s, k_d)
    return spectral_compress_torch(x, k_s, k_d)


def spectral_decompress(block: torch.Tensor, S: int, D: int, k_s: int) -> torch.Tensor:
    """``(B, R, k_d, 2)`` float32 block -> ``(B, S, D)`` float32 reconstruction."""
    if block.is_cuda and D >= 2 and extension_available():
        return torch.ops.fc_edge.spectral_decompress(block, S, D, k_s)
    return spectral_decompress_torch(block, S, D, k_s)


def spectral_compress_torch(x: torch.Tensor, k_s: int, k_d: int) -> torch.Tensor:
    S = x.shape[1]
    cols = torch.fft.rfft(x.float(), dim=-1)[..., :k_d]  # R2C along D, keep k_d columns
    if S == 1:
        spec = cols
    else:
        spec = torch.fft.fft(cols, dim=-2)  # C2C along S on the kept columns only
    R = n_block_rows(S, k_s)
    # the kept rows are two contiguous runs, 0..k_s-1 and S-R+k_s..S-1: slices, not a gather
    block = spec if R == S else torch.cat([spec[:, :k_s], spec[:, S - (R - k_s) :]], dim=1)
    return torch.view_as_real(block.contiguous()).contiguous()


def spectral_decompress_torch(block: torch.Tensor, S: int, D: int, k_s: int) -> torch.Tensor:
    B, R, k_d, _ = block.shape
    coef = torch.view_as_complex(block.float().contiguous())
    if R == S:
        full = coef
    else:  # scatter the two runs of rows back with slices
        full = coef.new_zeros(B, S, k_d)
        full[:, :k_s] = coef[:, :k_s]
        full[:, S - (R - k_s) :] = coef[:, k_s:]
    if S > 1:
        full = torch.fft.ifft(full, dim=-2)
    return torch.fft.irfft(full, n=D, dim=-1)  # zero-pads the missing columns
