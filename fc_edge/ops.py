"""Spectral block ops: the fused CUDA op, CuPy's cuFFT, or torch.fft, whichever is there.

``spectral_compress(x, k_s, k_d)`` maps a real ``(B, S, D)`` activation to the low-frequency block
of its 2-D real FFT, as a float32 tensor ``(B, R, k_d, 2)`` (real, imaginary) with
``R = min(2 k_s - 1, S)`` rows: token frequencies ``0..k_s-1`` then their mirrors
``S-k_s+1..S-1`` (FFT order), and half-spectrum columns ``0..k_d-1``. ``spectral_decompress``
zero-pads that block and inverts it: the orthogonal projection of ``x`` onto the kept frequencies.

The transform is unnormalised along both axes (``torch.fft`` "backward"), as in the paper.
The torch path transforms along the token axis only the ``k_d`` kept columns, so compress costs
no more than a bare ``rfft2``.

Backend order for a CUDA tensor (:func:`backend` says which one runs):

1. ``"extension"``: the fused op of ``fc_edge._C`` (built with ``tools/build_ext.sh``);
2. ``"cupy"``: ``cupy.fft`` (cuFFT through CuPy, no build step), the same math as the torch path,
   zero-copy through DLPack on torch's current stream;
3. ``"torch"``: ``torch.fft``.

CPU tensors and ``D == 1`` (cuFFT has no useful size-1 plan) always take the torch path.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

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


_USE_CUPY: ContextVar[bool] = ContextVar("fc_edge_use_cupy", default=True)


@functools.cache
def _import_cupy() -> Any | None:
    try:
        return importlib.import_module("cupy")
    except Exception:  # ImportError, or a CuPy built for another CUDA failing to load
        return None


def cupy_available() -> bool:
    """True when CuPy imports (and is not switched off by :func:`without_cupy`)."""
    return _USE_CUPY.get() and _import_cupy() is not None


@contextmanager
def without_cupy() -> Iterator[None]:
    """Within this context (this thread or task) nothing runs through CuPy: the extension or
    torch for the spectral ops, the numba coder for ``rotated``. For side-by-side comparisons."""
    token = _USE_CUPY.set(False)
    try:
        yield
    finally:
        _USE_CUPY.reset(token)


def cupy_stream(device: torch.device) -> Any:
    """Context that makes ``device`` CuPy's current device and torch's current stream on it
    CuPy's current stream, so arrays move between the two through DLPack without a copy or a
    synchronisation."""
    cupy = _import_cupy()
    if cupy is None:
        raise RuntimeError("CuPy is not installed")
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = torch.cuda.current_stream(index)

    @contextmanager
    def scope() -> Iterator[None]:
        with cupy.cuda.Device(index), cupy.cuda.ExternalStream(stream.cuda_stream, index):
            yield

    return scope()


def backend_for(device_type: str, D: int) -> str:
    """Which implementation runs the spectral ops on ``device_type`` tensors with ``D`` columns:
    ``"extension"``, ``"cupy"`` or ``"torch"``, in that order of preference (module docstring).
    D == 1 has no cuFFT plan (the op refuses it); torch.fft handles it."""
    if device_type != "cuda" or D < 2:
        return "torch"
    if extension_available():
        return "extension"
    if cupy_available():
        return "cupy"
    return "torch"


def backend(x: torch.Tensor) -> str:
    """The backend :func:`spectral_compress` uses for ``x`` ``(B, S, D)`` (or
    :func:`spectral_decompress` for a block on ``x``'s device with ``D = x.shape[-1]``)."""
    return backend_for(x.device.type, x.shape[-1])


def spectral_compress(x: torch.Tensor, k_s: int, k_d: int) -> torch.Tensor:
    """``(B, S, D)`` float -> ``(B, R, k_d, 2)`` float32 low-frequency block."""
    _, S, D = x.shape
    check_geometry(S, D, k_s, k_d)
    which = backend(x)
    if which == "extension":
        return torch.ops.fc_edge.spectral_compress(x, k_s, k_d)
    if which == "cupy":
        return spectral_compress_cupy(x, k_s, k_d)
    return spectral_compress_torch(x, k_s, k_d)


def spectral_decompress(block: torch.Tensor, S: int, D: int, k_s: int) -> torch.Tensor:
    """``(B, R, k_d, 2)`` float32 block -> ``(B, S, D)`` float32 reconstruction."""
    which = backend_for(block.device.type, D)
    if which == "extension":
        return torch.ops.fc_edge.spectral_decompress(block, S, D, k_s)
    if which == "cupy":
        return spectral_decompress_cupy(block, S, D, k_s)
    return spectral_decompress_torch(block, S, D, k_s)


def spectral_compress_cupy(x: torch.Tensor, k_s: int, k_d: int) -> torch.Tensor:
    """The torch path's math with ``cupy.fft`` on a CUDA ``x`` (float32 compute)."""
    cupy = _import_cupy()
    S = x.shape[1]
    R = n_block_rows(S, k_s)
    xf = x.float().contiguous()
    with cupy_stream(x.device):
        a = cupy.from_dlpack(xf)
        spec = cupy.fft.rfft(a, axis=-1)[..., :k_d]  # R2C along D, keep k_d columns
        if S > 1:
            spec = cupy.fft.fft(spec, axis=-2)  # C2C along S on the kept columns only
        if R != S:
            spec = cupy.concatenate([spec[:, :k_s], spec[:, S - (R - k_s) :]], axis=1)
        spec = cupy.ascontiguousarray(spec, dtype=cupy.complex64)
        out = spec.view(cupy.float32).reshape(spec.shape + (2,))
        return torch.from_dlpack(out)


def spectral_decompress_cupy(block: torch.Tensor, S: int, D: int, k_s: int) -> torch.Tensor:
    """Inverse of :func:`spectral_compress_cupy` (zero-pads, then ``cupy.fft`` inverses)."""
    cupy = _import_cupy()
    B, R, k_d, _ = block.shape
    bf = block.float().contiguous()
    with cupy_stream(block.device):
        coef = cupy.from_dlpack(bf).view(cupy.complex64).reshape(B, R, k_d)
        if R == S:
            full = coef
        else:
            full = cupy.zeros((B, S, k_d), dtype=cupy.complex64)
            full[:, :k_s] = coef[:, :k_s]
            full[:, S - (R - k_s) :] = coef[:, k_s:]
        if S > 1:
            full = cupy.fft.ifft(full, axis=-2)
        out = cupy.fft.irfft(full, n=D, axis=-1)  # zero-pads the missing columns
        return torch.from_dlpack(cupy.ascontiguousarray(out, dtype=cupy.float32))


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
