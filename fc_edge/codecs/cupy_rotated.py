"""``rotated``'s entropy-coded uniform quantizer on the GPU, with CuPy (NVRTC: no build step).

Used by :class:`~fc_edge.codecs.transform.RotatedCodec` when the coefficients are on a CUDA device,
CuPy imports (:func:`fc_edge.ops.cupy_available`) and there are at least :func:`min_gpu_values`
of them; everywhere else the numba coder of :mod:`fc_edge.codecs.entropy` runs. The payload is
byte-identical to the numba coder's: same params, same ``codes`` / ``scales`` / ``lengths``
tensors (the tests hold the two to that).

The transform itself is not here: :func:`~fc_edge.codecs.transform.rotate` already runs with torch
on the tensor's device (a matrix product for a few rows, cuFFT otherwise), and computing it a
second way would round differently and lose the byte identity. This module takes over from the
coefficients: per-row RMS, the quantizer, and the Huffman bit writer and reader, as kernels of
one warp per row (``cupy_rotated.cu`` says how each splits its row among the 32 lanes):

* ``fc_row_sigma``: bfloat16-rounded RMS of each row;
* ``fc_row_bits``: each row's Huffman bit count at a step; rate control (the same host code as
  the CPU path, :meth:`RotatedCodec._encode_uniform`) sums them per probed step;
* ``fc_write_rows``: byte offsets are the exclusive cumulative sum of the row byte lengths; within
  a row, a warp scan gives each code word its bit offset;
* ``fc_read_rows`` + ``fc_dequantize``: from the sent lengths and the decode tables; a row that
  does not decode is a WireError naming the first such row, as on the CPU.

**When the GPU coder pays** (:data:`MIN_GPU_VALUES`). Its cost is fixed, not per value: about
``6 + 4 P`` kernel launches (P = steps the rate control probes: 1 without a byte cap, 2-3 with
one) and ``1 + P`` host synchronisations, each launch ~5-20 us from Python and each sync
~10-20 us plus the kernel's own latency: F_gpu ~ 0.1-0.2 ms whatever N and K, plus one serial
chain per row (the RMS: K float64 additions by one lane). The CPU coder pays a fixed
F_cpu ~ 0.05 ms (one device-to-host copy of the N x K float32 coefficients, three host-to-device
copies of the payload, ~10-20 us each at these sizes) and then numba at ~5 ns per value and pass,
``2 + P`` passes (RMS, P quantizer passes, the writer): c ~ 15-25 ns per value. They cross at
``N K = (F_gpu - F_cpu) / c`` ~ (0.05-0.15 ms) / (15-25 ns) ~ 2,000-10,000 values on a desktop
CPU core; a Jetson's Arm cores run numba slower, and launch slower too. A decode step's row
(N = 1, K = 576: 576 values) is 3-17x below that; a 512-row prefill (295k values) 30x above.
The threshold is 8,192 values, the upper half of the range on purpose (below the crossover the
CPU coder costs tens of microseconds either way; above it the GPU's lead grows with N K);
``FC_EDGE_CUPY_MIN_VALUES`` overrides it (0 sends everything to the GPU). To be confirmed by
``tools/bench_cupy.py``, which times both coders around it.

A :class:`Runner` launches the kernels; :class:`CupyRunner` is the GPU one. The tests run this
module's logic on the host with a runner over numpy arrays and the same kernel source compiled
by g++ (tests/codecs/cupy_host_shim.cpp), each warp's lanes run as fibers that meet at shuffles.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fc_edge import ops
from fc_edge.codecs import entropy
from fc_edge.errors import ConfigError, WireError

#: The kernels' source (NVRTC, nvcc and the host emulation all compile this file).
KERNEL_SOURCE = Path(__file__).with_name("cupy_rotated.cu")
KERNEL_NAMES = ("fc_row_sigma", "fc_row_bits", "fc_write_rows", "fc_read_rows", "fc_dequantize")
#: NVRTC options (CuPy adds -arch and -ftz=true, which the kernels do not depend on): no FMA
#: contraction, so results equal the host's bit for bit (the kernels also spell their float64
#: arithmetic with __d*_rn intrinsics).
NVRTC_OPTIONS = ("--std=c++11", "--fmad=false")
WARP = 32  # lanes per warp: one warp per row
THREADS = 128  # threads per block: 4 rows
#: Fewest values (N x K) the GPU coder takes; below it the numba coder runs (the module's
#: docstring gives the cost model). ``FC_EDGE_CUPY_MIN_VALUES`` overrides it.
MIN_GPU_VALUES = 8192
#: The longest code word the kernels handle (fc_write_rows keeps the stream's last 32 bits).
MAX_CODE_BITS = 24

_CUTOFF: ContextVar[int | None] = ContextVar("fc_edge_cupy_min_values", default=None)


def min_gpu_values() -> int:
    """The cutoff now: :func:`gpu_cutoff`'s value inside one, else ``FC_EDGE_CUPY_MIN_VALUES``,
    else :data:`MIN_GPU_VALUES`."""
    override = _CUTOFF.get()
    if override is not None:
        return override
    raw = os.environ.get("FC_EDGE_CUPY_MIN_VALUES")
    if raw is None:
        return MIN_GPU_VALUES
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ConfigError(f"FC_EDGE_CUPY_MIN_VALUES must be a whole number >= 0, got {raw!r}")
    return value


@contextmanager
def gpu_cutoff(values: int) -> Iterator[None]:
    """Within the block (this thread or task) the GPU coder takes N x K >= ``values`` (0: every
    size), whatever the default: for benchmarks and tests that compare the coders at one size."""
    if values < 0:
        raise ConfigError(f"the GPU coder's cutoff must be >= 0 values, got {values}")
    token = _CUTOFF.set(values)
    try:
        yield
    finally:
        _CUTOFF.reset(token)


def use_gpu(n_values: int) -> bool:
    """Whether ``n_values`` (N x K) values are worth the GPU coder (:func:`min_gpu_values`)."""
    return n_values >= min_gpu_values()


def alpha_bits(step: int) -> np.uint32:
    """float32 bits of the step's alpha, as the kernels take it (entropy passes float32 alpha)."""
    return np.float32(entropy.step_alpha(step)).view(np.uint32)


@dataclass(frozen=True)
class DeviceTable:
    """One step's Huffman table as device arrays (:class:`entropy.HuffmanTable`)."""

    Q: int
    max_len: int
    code_lengths: Any  # (2Q+1,) int32
    codes: Any  # (2Q+1,) uint32
    dec_symbol: Any  # (2^max_len,) int16
    dec_length: Any  # (2^max_len,) uint8


class Runner:
    """Array module + kernel launcher of one device: CuPy on a GPU, numpy + ctypes in tests."""

    xp: Any

    def __init__(self) -> None:
        self._tables: dict[int, DeviceTable] = {}

    def launch(self, name: str, n_rows: int, *args: Any) -> None:
        """Run kernel ``name`` with one warp per row over ``n_rows`` rows (:func:`grid`)."""
        raise NotImplementedError

    def from_tensor(self, t: torch.Tensor) -> Any:
        """A contiguous tensor as an array of this runner, sharing memory."""
        raise NotImplementedError

    def to_tensor(self, a: Any) -> torch.Tensor:
        """An array of this runner as a tensor, sharing memory."""
        raise NotImplementedError

    def table(self, step: int) -> DeviceTable:
        """The step's table on this device (built once per step)."""
        t = self._tables.get(step)
        if t is None:
            h = entropy.table_for_step(step)
            if h.max_len > MAX_CODE_BITS:  # entropy caps codes at 15 bits
                raise ValueError(f"step {step}: {h.max_len}-bit code words, the kernels take "
                                 f"<= {MAX_CODE_BITS}")
            xp = self.xp
            t = self._tables[step] = DeviceTable(
                h.Q,
                h.max_len,
                xp.asarray(h.lengths.astype(np.int32)),
                xp.asarray(h.codes.astype(np.uint32)),
                xp.asarray(h.dec_symbol.astype(np.int16)),
                xp.asarray(h.dec_length.astype(np.uint8)),
            )
        return t


class CupyRunner(Runner):
    """Kernels compiled by NVRTC through CuPy on one CUDA device, launched on torch's current
    stream of that device (enter :meth:`on_stream` around a sequence of launches)."""

    def __init__(self, device_index: int) -> None:
        super().__init__()
        import cupy

        self.xp = cupy
        self.device_index = device_index
        with cupy.cuda.Device(device_index):
            self.module = cupy.RawModule(code=KERNEL_SOURCE.read_text(), options=NVRTC_OPTIONS)
            self._fns = {name: self.module.get_function(name) for name in KERNEL_NAMES}

    def launch(self, name: str, n_rows: int, *args: Any) -> None:
        self._fns[name]((grid(n_rows),), (THREADS,), args)

    def from_tensor(self, t: torch.Tensor) -> Any:
        return self.xp.from_dlpack(t.contiguous())

    def to_tensor(self, a: Any) -> torch.Tensor:
        return torch.from_dlpack(a)

    def on_stream(self) -> Any:
        """Context: this device current, torch's current stream as CuPy's (zero-copy hand-offs
        need no synchronisation)."""
        return ops.cupy_stream(torch.device("cuda", self.device_index))


def grid(n_rows: int) -> int:
    """Blocks of :data:`THREADS` threads for one warp per row over ``n_rows`` rows."""
    rows_per_block = THREADS // WARP
    return max(1, (n_rows + rows_per_block - 1) // rows_per_block)


@functools.cache
def _cupy_runner(device_index: int) -> CupyRunner:
    return CupyRunner(device_index)


def runner_for(t: torch.Tensor) -> Runner | None:
    """The GPU runner for a CUDA tensor when CuPy is usable (:func:`fc_edge.ops.cupy_available`),
    else None (the numba coder runs).

    For coefficient rows (a floating-point tensor, N x K values) None also below
    :func:`min_gpu_values` values. A byte stream's size does not say how many values it holds,
    so for one the cutoff is :func:`decode_rows`'s, from N and K."""
    if not t.is_cuda or not ops.cupy_available():
        return None
    if t.is_floating_point() and not use_gpu(t.numel()):
        return None
    return _cupy_runner(t.device.index if t.device.index is not None else 0)


def _stream_scope(runner: Runner) -> Any:
    on_stream = getattr(runner, "on_stream", None)
    return on_stream() if on_stream is not None else _NoScope()


class _NoScope:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


class DeviceRows:
    """The uniform quantizer's rows ``(N, K)`` float32 on a device: the GPU twin of
    ``transform._HostRows`` (same methods, same results)."""

    def __init__(self, runner: Runner, coefs: torch.Tensor) -> None:
        self.runner, self.device = runner, coefs.device
        xp = runner.xp
        with _stream_scope(runner):
            self.coefs = runner.from_tensor(coefs.float())
            self.N, self.K = (int(n) for n in self.coefs.shape)
            self.sigma = xp.empty(self.N, dtype=xp.float32)
            runner.launch(
                "fc_row_sigma", self.N, self.coefs, np.int64(self.N), np.int32(self.K), self.sigma
            )
        self._nbytes: dict[int, Any] = {}
        self._totals: dict[int, int] = {}

    def sigma_max(self) -> float:
        """Largest row RMS (bfloat16-rounded), for the overflow check."""
        with _stream_scope(self.runner):
            return float(self.sigma.max())

    def code_bytes(self, step: int) -> int:
        """Bytes of the code stream at ``step`` (rows byte-aligned); quantizes once per step."""
        if step not in self._totals:
            r, xp = self.runner, self.runner.xp
            t = r.table(step)
            with _stream_scope(r):
                bits = xp.empty(self.N, dtype=xp.int64)
                r.launch("fc_row_bits", self.N, self.coefs, self.sigma, np.int64(self.N),
                         np.int32(self.K), alpha_bits(step), np.int32(t.Q),
                         t.code_lengths, bits)
                nbytes = (bits + 7) // 8
                self._nbytes[step] = nbytes
                self._totals[step] = int(nbytes.sum())
        return self._totals[step]

    def tensors(self, step: int) -> dict[str, torch.Tensor]:
        """The payload tensors at ``step``: ``codes`` (bytes), ``scales`` (N,) bfloat16 and
        ``lengths`` (N-1,) int64, on the rows' device."""
        total = self.code_bytes(step)
        r, xp = self.runner, self.runner.xp
        t = r.table(step)
        with _stream_scope(r):
            nbytes = self._nbytes[step]
            offsets = xp.cumsum(nbytes) - nbytes  # exclusive: where each row starts
            out = xp.empty(total, dtype=xp.uint8)
            r.launch("fc_write_rows", self.N, self.coefs, self.sigma, np.int64(self.N),
                     np.int32(self.K), alpha_bits(step), np.int32(t.Q),
                     t.code_lengths, t.codes, offsets, out)
            return {
                "codes": r.to_tensor(out),
                "scales": r.to_tensor(self.sigma).to(torch.bfloat16),
                "lengths": r.to_tensor(xp.ascontiguousarray(nbytes[:-1])),
            }


def decode_rows(runner: Runner, codes: torch.Tensor, lengths: np.ndarray, K: int, step: int,
                scales: torch.Tensor) -> torch.Tensor:
    """``(N, K)`` float32 dequantized rows on the device from a ``codes`` stream, every row's
    byte length (host, already range-checked) and the ``(N,)`` scales; the device twin of
    ``entropy.decode_rows`` + ``entropy.dequantize``. A row that does not decode to exactly
    ``K`` code words and fewer than 8 zero padding bits is a WireError naming the first one.
    Below :func:`min_gpu_values` values (N x K) the numba decoder runs on a host copy."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if not use_gpu(len(lengths) * K):
        symbols = entropy.decode_rows(codes.to(torch.uint8).reshape(-1).cpu().numpy(), lengths,
                                      K, step)
        sigma = scales.float().reshape(-1).cpu().numpy()
        return entropy.dequantize(symbols, sigma, step).to(codes.device)
    if lengths.size and int(lengths.min()) < 0:
        raise WireError("entropy-coded row lengths are negative")
    starts_np = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts_np[1:])
    if int(starts_np[-1]) != codes.numel():
        raise WireError("entropy-coded row lengths do not add up to the stream")
    N = len(lengths)
    t = runner.table(step)
    xp = runner.xp
    with _stream_scope(runner):
        stream = runner.from_tensor(codes.to(torch.uint8).reshape(-1))
        starts = xp.asarray(starts_np)
        symbols = xp.empty((N, K), dtype=xp.int16)
        bad = xp.empty(N, dtype=xp.int32)
        runner.launch("fc_read_rows", N, stream, starts, np.int64(N), np.int32(K), t.dec_symbol,
                      t.dec_length, np.int32(t.max_len), symbols, bad)
        flagged = xp.flatnonzero(bad)
        if int(flagged.size):
            raise WireError(f"entropy-coded row {int(flagged[0])} does not decode to {K} values")
        sigma = runner.from_tensor(scales.float().reshape(-1))
        out = xp.empty((N, K), dtype=xp.float32)
        runner.launch("fc_dequantize", N, symbols, sigma, np.int64(N), np.int32(K),
                      alpha_bits(step), np.int32(t.Q), out)
        return runner.to_tensor(out)
