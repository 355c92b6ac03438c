"""fc_edge/codecs/cupy_rotated.py: the GPU row coder of ``rotated`` against the numba coder.

The oracle is the CPU implementation (:mod:`fc_edge.codecs.entropy`): payloads must be equal byte
for byte. Three levels, so most of it runs on a machine without a GPU:

- the kernel source compiles with nvcc to PTX for Jetson Orin (sm_87) and H100 (sm_90);
- the same source, compiled by g++ with tests/codecs/cupy_host_shim.cpp (each warp's 32 lanes
  run as fibers that meet at every shuffle), runs under a host
  :class:`~fc_edge.codecs.cupy_rotated.Runner` (numpy arrays, ctypes launches): every kernel's
  output equals the numba loop's, and ``RotatedCodec`` driven through ``DeviceRows`` (the GPU
  path's orchestration, rate control included) gives the very same Encoded;
- the CPU cutoff: which sizes go to the GPU coder, and that below it no kernel runs;
- on a CUDA GPU with CuPy (skipped otherwise): CuPy encode == CPU encode, decode == decode.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import importlib.util
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fc_edge import ops
from fc_edge.codecs import cupy_rotated, entropy, get_codec, transform
from fc_edge.codecs.base import Encoded
from fc_edge.errors import ConfigError, WireError

ROOT = Path(__file__).resolve().parents[2]
SHIM = Path(__file__).with_name("cupy_host_shim.cpp")
STEPS = [0, 1, 17, 40, 48, 64, 100, 128]


# ------------------------------------------------------------------------ nvcc: it compiles


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if found is None and home and (Path(home) / "bin" / "nvcc").exists():
            found = str(Path(home) / "bin" / "nvcc")
    return found


@pytest.mark.parametrize("arch", ["sm_87", "sm_90"])
def test_kernel_source_compiles_with_nvcc(arch: str, tmp_path: Path) -> None:
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (no CUDA toolkit): the kernels are not compiled here")
    ptx = tmp_path / "kernels.ptx"
    cmd = [nvcc, "--ptx", f"-arch={arch}", "-std=c++11", "--fmad=false", "-Werror",
           "all-warnings", "-x", "cu", str(cupy_rotated.KERNEL_SOURCE), "-o", str(ptx)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stderr}"
    text = ptx.read_text()
    for name in cupy_rotated.KERNEL_NAMES:  # extern "C": the names CuPy looks up
        assert f".entry {name}(" in text


#: The only flush-to-zero instructions allowed under CuPy's -ftz=true, each harmless: float32 ->
#: float64 of a value known to be normal, float64 -> float32 where a subnormal result would
#: round to quantizer level 0 anyway (or is known to be normal), and conversions / comparisons
#: of integer-valued floats.
FTZ_ALLOWED = {"cvt.ftz.f64.f32", "cvt.rn.ftz.f32.f64", "cvt.rzi.ftz.s32.f32",
               "cvt.rni.ftz.f32.f32", "setp.gt.ftz.f32", "setp.lt.ftz.f32"}


def test_kernels_do_not_depend_on_flush_to_zero(tmp_path: Path) -> None:
    """CuPy compiles with -ftz=true; compiled so, no arithmetic may flush a float32 subnormal
    (the host emulation cannot see this, so the PTX is read)."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (no CUDA toolkit): the kernels are not compiled here")
    ptx = tmp_path / "ftz.ptx"
    cmd = [nvcc, "--ptx", "-arch=sm_87", "-std=c++11", "--fmad=false", "-ftz=true", "-x", "cu",
           str(cupy_rotated.KERNEL_SOURCE), "-o", str(ptx)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    ftz = set(re.findall(r"\b[a-z0-9.]*\.ftz[a-z0-9.]*", ptx.read_text()))
    assert ftz <= FTZ_ALLOWED, sorted(ftz - FTZ_ALLOWED)


def _nvrtc() -> ctypes.CDLL | None:
    """libnvrtc: $FC_EDGE_NVRTC, the nvidia-cuda-nvrtc wheel's (CUDA 13: nvidia/cu13/lib; 12:
    nvidia/cuda_nvrtc/lib), or the system's. Its builtins library beside it is loaded first, so
    NVRTC finds it without LD_LIBRARY_PATH."""
    candidates = [os.environ.get("FC_EDGE_NVRTC")]
    spec = importlib.util.find_spec("nvidia")
    for root in list(spec.submodule_search_locations or []) if spec else []:
        candidates += sorted(glob.glob(os.path.join(root, "*", "lib", "libnvrtc.so*")))
    candidates.append(ctypes.util.find_library("nvrtc"))
    for path in candidates:
        if path:
            folder = os.path.dirname(path)
            for builtins in sorted(glob.glob(os.path.join(folder, "libnvrtc-builtins.so*"))):
                try:
                    ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
                except OSError:
                    pass
            try:
                return ctypes.CDLL(path)
            except OSError:
                continue
    return None


def test_kernel_source_compiles_with_nvrtc() -> None:
    """With NVRTC itself and the options CuPy's RawModule passes (ours, then -ftz=true, -arch,
    --device-as-default-execution-space): what a Jetson without a toolkit does at run time."""
    lib = _nvrtc()
    if lib is None:
        pytest.skip("libnvrtc not found (pip install nvidia-cuda-nvrtc, or FC_EDGE_NVRTC)")
    prog = ctypes.c_void_p()
    src = cupy_rotated.KERNEL_SOURCE.read_bytes()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), src, b"cupy_rotated.cu", 0, None, None) == 0
    opts = [*cupy_rotated.NVRTC_OPTIONS, "-ftz=true", "-arch=compute_87",
            "--device-as-default-execution-space"]
    argv = (ctypes.c_char_p * len(opts))(*(o.encode() for o in opts))
    rc = lib.nvrtcCompileProgram(prog, len(opts), argv)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    assert rc == 0, log.value.decode(errors="replace")
    lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
    ptx = ctypes.create_string_buffer(size.value)
    assert lib.nvrtcGetPTX(prog, ptx) == 0
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    text = ptx.value.decode()
    for name in cupy_rotated.KERNEL_NAMES:
        assert f".entry {name}(" in text
    ftz = set(re.findall(r"\b[a-z0-9.]*\.ftz[a-z0-9.]*", text))
    assert ftz <= FTZ_ALLOWED, sorted(ftz - FTZ_ALLOWED)


# ------------------------------------------------------------------------ host emulation


@pytest.fixture(scope="module")
def host_lib(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler (g++/c++) to build the kernel emulation")
    lib = tmp_path_factory.mktemp("cupy_shim") / "libcupy_shim.so"
    cmd = [cxx, "-std=c++17", "-O1", "-ffp-contract=off", "-Wall", "-Wextra", "-Werror",
           "-shared", "-fPIC", f"-I{cupy_rotated.KERNEL_SOURCE.parent}", str(SHIM), "-o",
           str(lib)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stderr}"
    return ctypes.CDLL(str(lib))


_SCALARS = {np.int64: ctypes.c_longlong, np.int32: ctypes.c_int, np.uint32: ctypes.c_uint}


def _emulator_error(lib: ctypes.CDLL) -> str:
    lib.host_error.restype = ctypes.c_char_p
    return lib.host_error().decode()


def test_emulated_shuffles_follow_cuda(host_lib):
    """The emulator's shuffles against CUDA's definitions (CUDA C++ Programming Guide, warp
    shuffle functions): __shfl_sync reads lane src; __shfl_up_sync lane - delta, or its own value
    below delta; __shfl_down_sync lane + delta, or its own past 31; __shfl_xor_sync lane ^ m;
    64-bit values (double) whole."""
    out = np.zeros((32, 5), dtype=np.int64)
    assert host_lib.host_shim_shuffles(ctypes.c_void_p(out.ctypes.data)) == 0
    lane = np.arange(32)
    assert np.array_equal(out[:, 0], np.full(32, 1007))
    assert np.array_equal(out[:, 1], 1000 + np.where(lane >= 3, lane - 3, lane))
    assert np.array_equal(out[:, 2], 1000 + np.where(lane + 5 < 32, lane + 5, lane))
    assert np.array_equal(out[:, 3], 1000 + (lane ^ 6))
    assert np.array_equal(out[:, 4], 2 * (31 - lane))


def test_emulator_refuses_a_divergent_shuffle(host_lib):
    """A shuffle that half the warp skips is wrong on a GPU; the emulator stops there."""
    out = np.zeros(32, dtype=np.int64)
    assert host_lib.host_shim_divergent(ctypes.c_void_p(out.ctypes.data)) != 0
    assert "returned while others wait at a shuffle" in _emulator_error(host_lib)


class HostRunner(cupy_rotated.Runner):
    """The kernels of cupy_rotated.cu run on the host: numpy arrays, ctypes launches over the
    grid CuPy would use (THREADS per block)."""

    xp = np

    def __init__(self, lib: ctypes.CDLL) -> None:
        super().__init__()
        self.lib = lib
        self.launched: list[str] = []

    def launch(self, name: str, n_rows: int, *args: Any) -> None:
        c_args: list[Any] = [ctypes.c_longlong(n_rows), ctypes.c_uint(cupy_rotated.THREADS)]
        for a in args:
            if isinstance(a, np.ndarray):
                assert a.flags.c_contiguous, f"{name}: non-contiguous argument"
                c_args.append(ctypes.c_void_p(a.ctypes.data))
            else:
                c_args.append(_SCALARS[type(a)](a))  # a kernel takes exact scalar types
        self.launched.append(name)
        if getattr(self.lib, f"host_{name}")(*c_args) != 0:
            raise AssertionError(f"{name}: {_emulator_error(self.lib)}")

    def from_tensor(self, t: torch.Tensor) -> np.ndarray:
        return t.contiguous().numpy()

    def to_tensor(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a)


@pytest.fixture
def runner(host_lib: ctypes.CDLL) -> Iterator[HostRunner]:
    """The emulated GPU coder at every size (no CPU cutoff)."""
    with cupy_rotated.gpu_cutoff(0):
        yield HostRunner(host_lib)


def heavy_rows(n: int, k: int, seed: int) -> torch.Tensor:
    """Real-looking rows: Student-t (3 dof) values, a few outlier channels, scales spanning
    decades (the layer-1 activation of a small LLM has kurtosis ~26 along D)."""
    g = np.random.default_rng(seed)
    x = g.standard_t(3, size=(n, k)) * 10.0 ** g.uniform(-3, 2, size=(n, 1))
    x[:, g.integers(0, k, size=max(1, k // 64))] *= 50
    return torch.from_numpy(x.astype(np.float32))


def tie_row(k: int) -> torch.Tensor:
    """A row whose bfloat16 RMS is exactly 1 and whose values are odd multiples of 0.25: at
    step 48 (alpha = 0.5) each of them lies exactly half-way between two quantizer levels, so
    the rounding must tie to even as numba's np.rint does."""
    ties = torch.tensor([0.25, -0.75, 1.25, -1.75]).repeat(max(1, k // 8))[: max(1, k // 2)]
    fill = k - len(ties)
    rest = float(k - ties.square().sum())
    row = torch.cat([ties, torch.full((fill,), (rest / fill) ** 0.5 if fill else 0.0)])
    return row[:k]


def edge_rows(k: int) -> torch.Tensor:
    """All-zero row, a row clamped at +-Q (one huge outlier among small values), a constant row,
    a row of subnormals, a row near float32's top, ties of the rounding (tie_row)."""
    rows = torch.zeros(6, k)
    rows[1, 0] = 1e6
    rows[1, 1:] = 1e-3
    if k > 1:
        rows[1, -1] = -1e6
    rows[2] = 3.0
    rows[3] = torch.full((k,), 1e-40)
    rows[4] = torch.linspace(-1e30, 1e30, k)
    rows[5] = tie_row(k)
    return rows


def _coefs(rows: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(rows.numpy(), dtype=np.float32)


def _row_sets() -> list[tuple[str, torch.Tensor]]:
    return [
        ("gauss", torch.randn(37, 64, generator=torch.Generator().manual_seed(1))),
        ("heavy", heavy_rows(50, 576, 2)),
        ("one-row", heavy_rows(1, 2048, 3)),
        ("odd-k", heavy_rows(9, 577, 4)),
        ("k1", heavy_rows(200, 1, 5)),  # more rows than a block: the grid's tail runs too
        ("subnormal", heavy_rows(8, 40, 6) * 1e-41),  # RMS below float32's normal range
        ("edges", edge_rows(33)),
        ("edges-k1", edge_rows(1)),
    ]


ROW_SETS = _row_sets()


def test_tie_row_has_unit_sigma():
    """The precondition of the ties in edge_rows: sigma rounds to exactly 1."""
    assert entropy.row_sigma(_coefs(tie_row(33)[None]))[0] == 1.0
    assert entropy.step_alpha(48) == 0.5


@pytest.mark.parametrize("name,rows", ROW_SETS, ids=[n for n, _ in ROW_SETS])
def test_row_sigma_equals_numba_bit_for_bit(runner, name, rows):
    want = entropy.row_sigma(_coefs(rows))
    got = cupy_rotated.DeviceRows(runner, rows).sigma
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("name,rows", ROW_SETS, ids=[n for n, _ in ROW_SETS])
@pytest.mark.parametrize("step", STEPS)
def test_stream_equals_numba_byte_for_byte(runner, name, rows, step):
    """Bits per row, the stream, the lengths; then the reader and the dequantizer on it."""
    c = _coefs(rows)
    sigma = entropy.row_sigma(c)
    symbols, bits = entropy.quantize_at(c, sigma, step)
    stream, lengths = entropy.encode_rows(symbols, step, bits)

    dev = cupy_rotated.DeviceRows(runner, rows)
    assert dev.code_bytes(step) == len(stream)
    assert np.array_equal(dev._nbytes[step], (bits + 7) // 8)
    got = dev.tensors(step)
    assert got["codes"].numpy().tobytes() == stream
    assert torch.equal(got["lengths"], torch.from_numpy(lengths[:-1].astype(np.int64)))
    assert torch.equal(got["scales"], torch.from_numpy(sigma).to(torch.bfloat16))

    K = c.shape[1]
    decoded = cupy_rotated.decode_rows(runner, got["codes"], lengths, K, step, got["scales"])
    want = entropy.dequantize(entropy.decode_rows(stream, lengths, K, step), sigma, step)
    assert np.array_equal(decoded.numpy().view(np.uint32), want.numpy().view(np.uint32))


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 20), st.integers(1, 300), st.integers(0, 128), st.integers(0, 2**31),
       st.booleans())
def test_random_rows_round_trip_like_numba(host_lib, n, k, step, seed, heavy):
    runner = HostRunner(host_lib)
    if heavy:
        rows = heavy_rows(n, k, seed)
    else:
        g = torch.Generator().manual_seed(seed)
        rows = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) * 10
    c = _coefs(rows)
    sigma = entropy.row_sigma(c)
    symbols, bits = entropy.quantize_at(c, sigma, step)
    stream, lengths = entropy.encode_rows(symbols, step, bits)
    with cupy_rotated.gpu_cutoff(0):
        got = cupy_rotated.DeviceRows(runner, rows).tensors(step)
        back = cupy_rotated.decode_rows(runner, got["codes"], lengths, k, step, got["scales"])
    assert got["codes"].numpy().tobytes() == stream
    assert torch.equal(back, entropy.dequantize(symbols, sigma, step))


def _corruptions(stream: bytes, lengths: np.ndarray) -> list[tuple[bytes, np.ndarray]]:
    s = bytearray(stream)
    out = []
    flipped = bytearray(s)
    flipped[len(s) // 2] ^= 0xFF
    out.append((bytes(flipped), lengths))
    padded = bytearray(s)
    padded[lengths[0] - 1] |= 0x01  # padding bit of row 0 (or a code bit: fails either way)
    out.append((bytes(padded), lengths))
    shifted = lengths.copy()
    shifted[0] += 1
    shifted[1] -= 1
    out.append((stream, shifted))
    zeros = bytes(len(s))  # all-zero stream: a run of the shortest-prefix code word
    out.append((zeros, lengths))
    return out


@pytest.mark.parametrize("step", [0, 40, 128])
def test_corrupt_streams_fail_on_the_same_row(runner, step):
    """Whatever the numba reader refuses, the kernel refuses, naming the same first row."""
    rows = heavy_rows(6, 100, 11)
    c = _coefs(rows)
    sigma = entropy.row_sigma(c)
    stream, lengths = entropy.encode_rows(entropy.quantize_at(c, sigma, step)[0], step)
    scales = torch.from_numpy(sigma).to(torch.bfloat16)
    for data, lens in _corruptions(stream, lengths):
        try:
            entropy.decode_rows(data, lens, 100, step)
            cpu = None
        except WireError as e:
            cpu = str(e)
        codes = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        try:
            cupy_rotated.decode_rows(runner, codes, lens, 100, step, scales)
            gpu = None
        except WireError as e:
            gpu = str(e)
        assert gpu == cpu


WRITER_K = [1, 5, 31, 32, 33, 64, 577, 2048]


@pytest.mark.parametrize("K", WRITER_K)
@pytest.mark.parametrize("step", [0, 64, 128])
def test_writer_writes_every_byte_once(runner, K, step):
    """fc_write_rows straight into buffers poisoned with 0x00 and with 0xFF, with guard bytes
    either side: the stream equals numba's whatever the poison (every byte written, by the lane
    that completes it, with the carry between 32-value passes), and no guard byte changes. K
    covers one value, part of a pass, exact passes, a pass and one, many passes; step 0 has
    1-3 bit code words (many bytes completed by a lane's carry), step 128 up to 15 bits."""
    rows = heavy_rows(7, K, 1000 + K)
    c = _coefs(rows)
    sigma = entropy.row_sigma(c)
    symbols, bits = entropy.quantize_at(c, sigma, step)
    stream, lengths = entropy.encode_rows(symbols, step, bits)
    t = runner.table(step)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    guard = 16
    for poison in (0x00, 0xFF):
        out = np.full(len(stream) + 2 * guard, poison, dtype=np.uint8)
        runner.launch("fc_write_rows", 7, c.view(np.uint32), sigma.view(np.uint32), np.int64(7),
                      np.int32(K), cupy_rotated.alpha_bits(step), np.int32(t.Q),
                      t.code_lengths, t.codes, offsets + guard, out)
        assert out[guard:-guard].tobytes() == stream
        assert (out[:guard] == poison).all() and (out[-guard:] == poison).all()


def test_cutoff_default_and_override(monkeypatch):
    """N x K below the cutoff goes to the CPU coder; the environment and gpu_cutoff move it."""
    monkeypatch.delenv("FC_EDGE_CUPY_MIN_VALUES", raising=False)
    assert cupy_rotated.min_gpu_values() == cupy_rotated.MIN_GPU_VALUES == 8192
    assert not cupy_rotated.use_gpu(576)  # a decode step's row of SmolLM2
    assert not cupy_rotated.use_gpu(8191)
    assert cupy_rotated.use_gpu(8192)
    assert cupy_rotated.use_gpu(512 * 2048)
    with cupy_rotated.gpu_cutoff(0):
        assert cupy_rotated.use_gpu(1)
        with cupy_rotated.gpu_cutoff(10**9):
            assert not cupy_rotated.use_gpu(512 * 2048)
        assert cupy_rotated.use_gpu(1)
    assert not cupy_rotated.use_gpu(576)
    monkeypatch.setenv("FC_EDGE_CUPY_MIN_VALUES", "100")
    assert cupy_rotated.use_gpu(576) and not cupy_rotated.use_gpu(99)


@pytest.mark.parametrize("raw", ["many", "-1", "1.5", ""])
def test_cutoff_from_the_environment_is_checked(monkeypatch, raw):
    monkeypatch.setenv("FC_EDGE_CUPY_MIN_VALUES", raw)
    with pytest.raises(ConfigError, match="FC_EDGE_CUPY_MIN_VALUES"):
        cupy_rotated.min_gpu_values()


def test_runner_for_applies_the_cutoff_to_coefficient_rows(monkeypatch):
    """On a CUDA tensor with CuPy there: coefficient rows (floating point) get the GPU runner
    from the cutoff up, a byte stream always (decode_rows then decides from N x K)."""
    monkeypatch.delenv("FC_EDGE_CUPY_MIN_VALUES", raising=False)
    gpu = object()
    monkeypatch.setattr(ops, "cupy_available", lambda: True)
    monkeypatch.setattr(cupy_rotated, "_cupy_runner", lambda index: gpu)

    def cuda_tensor(n: int, floating: bool) -> Any:  # what runner_for reads of a tensor
        return SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0), numel=lambda: n,
                               is_floating_point=lambda: floating)

    assert cupy_rotated.runner_for(cuda_tensor(576, True)) is None
    assert cupy_rotated.runner_for(cuda_tensor(8192, True)) is gpu
    assert cupy_rotated.runner_for(cuda_tensor(10, False)) is gpu
    with cupy_rotated.gpu_cutoff(0):
        assert cupy_rotated.runner_for(cuda_tensor(1, True)) is gpu


def test_decode_below_the_cutoff_runs_no_kernel(host_lib, monkeypatch):
    """decode_rows below the cutoff decodes on the host (numba), launching nothing, and refuses
    a corrupt row with the numba reader's error; from the cutoff up the kernels run."""
    monkeypatch.delenv("FC_EDGE_CUPY_MIN_VALUES", raising=False)
    runner = HostRunner(host_lib)
    for n, k in ((1, 576), (14, 576)):  # 576 values, then 8064 < 8192
        rows = heavy_rows(n, k, 5)
        c = _coefs(rows)
        sigma = entropy.row_sigma(c)
        symbols, bits = entropy.quantize_at(c, sigma, 40)
        stream, lengths = entropy.encode_rows(symbols, 40, bits)
        codes = torch.frombuffer(bytearray(stream), dtype=torch.uint8)
        scales = torch.from_numpy(sigma).to(torch.bfloat16)
        got = cupy_rotated.decode_rows(runner, codes, lengths, k, 40, scales)
        assert runner.launched == []
        assert torch.equal(got, entropy.dequantize(symbols, sigma, 40))
        bad = codes.clone()
        bad[: lengths[0]] = 0
        with pytest.raises(WireError, match="row 0 "):
            cupy_rotated.decode_rows(runner, bad, lengths, k, 40, scales)
    rows = heavy_rows(15, 576, 5)  # 8640 values: the GPU coder
    c = _coefs(rows)
    sigma = entropy.row_sigma(c)
    stream, lengths = entropy.encode_rows(entropy.quantize_at(c, sigma, 40)[0], 40)
    cupy_rotated.decode_rows(runner, torch.frombuffer(bytearray(stream), dtype=torch.uint8),
                             lengths, 576, 40, torch.from_numpy(sigma).to(torch.bfloat16))
    assert runner.launched == ["fc_read_rows", "fc_dequantize"]


# ------------------------------------------------------------------ the codec, end to end


def _same_encoded(a: Encoded, b: Encoded) -> None:
    assert (a.codec, a.params, a.shape, a.dtype) == (b.codec, b.params, b.shape, b.dtype)
    assert a.tensors.keys() == b.tensors.keys()
    for name in a.tensors:
        ta, tb = a.tensors[name], b.tensors[name]
        assert ta.dtype == tb.dtype and ta.device == tb.device and ta.shape == tb.shape, name
        assert torch.equal(ta, tb), name


CODEC_CASES = [  # (codec kwargs, x shape)
    ({}, (1, 12, 576)),
    ({}, (1, 1, 576)),
    ({"bits": 2}, (2, 7, 333)),
    ({"ratio": 3.0}, (1, 40, 64)),
    ({"transform": "hadamard", "seed": 7}, (1, 20, 100)),
    ({"keep": 50}, (1, 9, 128)),
    ({"bits": 8}, (1, 16, 31)),
    ({"ratio": 1.0}, (1, 4, 7)),
]


@pytest.mark.parametrize("kwargs,shape", CODEC_CASES, ids=[str(i) for i in range(len(CODEC_CASES))])
def test_codec_through_device_rows_equals_cpu(runner, monkeypatch, kwargs, shape):
    """RotatedCodec with the GPU path's orchestration (DeviceRows, rate control on its byte
    counts, decode_rows) over the emulated kernels gives the CPU path's Encoded and decode."""
    codec = get_codec("rotated", **kwargs)
    x = heavy_rows(int(np.prod(shape[:-1])), shape[-1], sum(shape)).reshape(shape)
    want = codec.encode(x)
    want_back = codec.decode(want)
    monkeypatch.setattr(cupy_rotated, "runner_for", lambda t: runner)
    got = codec.encode(x)
    assert "fc_write_rows" in runner.launched  # the emulated GPU path ran
    _same_encoded(got, want)
    runner.launched.clear()
    back = codec.decode(got)
    assert "fc_read_rows" in runner.launched
    assert torch.equal(back, want_back)


def test_codec_with_noise_shaping_through_device_rows(runner, monkeypatch):
    codec = get_codec("rotated").bind(torch.rand(64) + 0.5)
    x = heavy_rows(10, 64, 99).reshape(1, 10, 64)
    want = codec.encode(x)
    assert want.params["shaping"]
    monkeypatch.setattr(cupy_rotated, "runner_for", lambda t: runner)
    _same_encoded(codec.encode(x), want)
    assert torch.equal(codec.decode(want), transform.RotatedCodec.decode(want))


def test_runner_for_cpu_tensors_is_none():
    """CPU tensors never take the CuPy path (nor import CuPy)."""
    assert cupy_rotated.runner_for(torch.zeros(3)) is None


# ------------------------------------------------------------------ on a GPU with CuPy

GPU_SHAPES = [(1, 1, 576), (1, 12, 576), (1, 128, 576), (1, 512, 2048), (2, 33, 577),
              (1, 2048, 2048)]


@pytest.mark.parametrize("shape", GPU_SHAPES, ids=["x".join(map(str, s)) for s in GPU_SHAPES])
@pytest.mark.parametrize("kwargs", [{}, {"bits": 3}, {"transform": "hadamard"}, {"ratio": 5.0}])
@pytest.mark.cupy
def test_cupy_encode_equals_cpu_encode(shape, kwargs):
    """The CuPy kernels at every size (the cutoff off) against the numba coder."""
    codec = get_codec("rotated", **kwargs)
    x = heavy_rows(int(np.prod(shape[:-1])), shape[-1], 7).reshape(shape).cuda()
    with cupy_rotated.gpu_cutoff(0):
        assert cupy_rotated.runner_for(x) is not None
        got = codec.encode(x)
        got_back = codec.decode(got)
    with ops.without_cupy():
        want = codec.encode(x)  # the same torch transform on the GPU, then the numba coder
        want_back = codec.decode(want)
    _same_encoded(got, want)
    assert torch.equal(got_back, want_back)


@pytest.mark.cupy
def test_cupy_cutoff_sends_a_decode_row_to_the_cpu(monkeypatch):
    monkeypatch.delenv("FC_EDGE_CUPY_MIN_VALUES", raising=False)
    assert cupy_rotated.runner_for(torch.zeros(1, 576, device="cuda")) is None
    assert cupy_rotated.runner_for(torch.zeros(512, 576, device="cuda")) is not None


@pytest.mark.cupy
def test_cupy_edge_rows_and_corruption():
    x = edge_rows(33).reshape(1, 6, 33).cuda()
    codec = get_codec("rotated")
    with cupy_rotated.gpu_cutoff(0):
        got = codec.encode(x)
    with ops.without_cupy():
        want = codec.encode(x)
    _same_encoded(got, want)
    bad = Encoded(got.codec, got.params, got.shape, got.dtype, dict(got.tensors))
    bad.tensors["codes"] = got.tensors["codes"].clone()
    bad.tensors["codes"][0] ^= 0xFF
    bad.tensors["codes"][-1] ^= 0xFF
    with ops.without_cupy():
        try:
            codec.decode(Encoded(bad.codec, bad.params, bad.shape, bad.dtype, dict(bad.tensors)))
            cpu = None
        except WireError as e:
            cpu = str(e)
    try:
        with cupy_rotated.gpu_cutoff(0):
            codec.decode(bad)
        gpu = None
    except WireError as e:
        gpu = str(e)
    assert gpu == cpu
