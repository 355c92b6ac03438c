"""fc_edge/ops.py: the spectral block ops.

CPU (always): the torch path equals a float64 oracle built from explicit DFT matrices, and
decompress . compress is a projection (idempotent). CUDA (marked ``cuda``, skipped without a GPU
or without the built ``fc_edge._C``): the fused op equals the torch path and passes
``torch.library.opcheck``, also from 8 host threads sharing and evicting plans, replayed from a
captured CUDA graph, and with the device's free memory held in torch's cache (its cuFFT work
area comes from torch's caching allocator).
"""

from __future__ import annotations

import math
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fc_edge import ops
from fc_edge.errors import ConfigError

# ---------------------------------------------------------------- float64 oracle (DFT matrices)


def dft(n: int, sign: float) -> torch.Tensor:
    """(n, n) complex128 DFT matrix exp(sign 2 pi i j k / n)."""
    j = torch.arange(n, dtype=torch.float64)
    angle = sign * 2 * math.pi * torch.outer(j, j).remainder_(n) / n
    return torch.polar(torch.ones_like(angle), angle)


def oracle_compress(x: torch.Tensor, k_s: int, k_d: int) -> torch.Tensor:
    """Block of the unnormalised 2-D DFT: rows ops.block_rows, columns 0..k_d-1, (B, R, k_d, 2)."""
    S, D = x.shape[1], x.shape[2]
    rows = ops.block_rows(S, k_s)
    f_s = dft(S, -1.0)[rows]  # (R, S)
    f_d = dft(D, -1.0)[:, :k_d]  # (D, k_d)
    block = f_s @ x.to(torch.complex128) @ f_d
    return torch.view_as_real(block)


def oracle_decompress(block: torch.Tensor, S: int, D: int, k_s: int) -> torch.Tensor:
    """irfft2(s=(S, D)) of the zero-padded block: inverse DFT along S over the kept rows, then
    the real inverse along D, Re(sum_c w_c G_c e^{2 pi i c d / D}) / D with Hermitian weights w
    (1 for DC and Nyquist, 2 between), which ignores their imaginary parts as every C2R does."""
    k_d = block.shape[2]
    coef = torch.view_as_complex(block.to(torch.float64).contiguous())
    rows = ops.block_rows(S, k_s)
    g = dft(S, +1.0)[:, rows] @ coef / S  # (B, S, k_d)
    c = torch.arange(k_d)
    weight = torch.where((c == 0) | ((D % 2 == 0) & (c == D // 2)), 1.0, 2.0).to(torch.float64)
    e_d = dft(D, +1.0)[:k_d]  # (k_d, D)
    return ((g * weight) @ e_d).real / D


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.to(torch.float64), b.to(torch.float64)
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@st.composite
def geometries(draw, max_s: int = 12, max_d: int = 12):
    B = draw(st.integers(1, 3))
    S = draw(st.integers(1, max_s))
    D = draw(st.integers(1, max_d))
    k_s = draw(st.integers(1, S // 2 + 1))
    k_d = draw(st.integers(1, D // 2 + 1))
    return B, S, D, k_s, k_d


# ---------------------------------------------------------------- CPU: torch path vs oracle


@settings(max_examples=60, deadline=None)
@given(geometries(), st.integers(0, 2**31 - 1))
def test_compress_torch_equals_dft_oracle(geometry, seed):
    B, S, D, k_s, k_d = geometry
    x = torch.randn(B, S, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    got = ops.spectral_compress_torch(x, k_s, k_d)
    assert got.shape == (B, ops.n_block_rows(S, k_s), k_d, 2)
    assert got.dtype == torch.float32 and got.is_contiguous()
    want = oracle_compress(x.float().double(), k_s, k_d)  # the path computes in float32
    # float32 FFT error scales with the whole spectrum (norm sqrt(S D) |x|, Parseval), so a
    # block that cancels to almost nothing (a DC of zero-mean data) is held to that, not to 1e-5
    # of itself.
    spectrum = math.sqrt(S * D) * float(x.norm())
    assert float((got.double() - want).norm()) <= 1e-5 * float(want.norm()) + 1e-6 * spectrum


@settings(max_examples=60, deadline=None)
@given(geometries(), st.integers(0, 2**31 - 1))
def test_decompress_torch_equals_dft_oracle(geometry, seed):
    B, S, D, k_s, k_d = geometry
    gen = torch.Generator().manual_seed(seed)
    block = torch.randn(B, ops.n_block_rows(S, k_s), k_d, 2, generator=gen)  # any block
    got = ops.spectral_decompress_torch(block, S, D, k_s)
    assert got.shape == (B, S, D) and got.dtype == torch.float32
    want = oracle_decompress(block, S, D, k_s)
    assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize(
    "B,S,D,k_s,k_d",
    [
        (1, 1, 8, 1, 3),
        (2, 1, 7, 1, 4),
        (1, 7, 9, 3, 2),
        (2, 9, 5, 5, 3),
        (1, 16, 16, 9, 9),
        (3, 2, 2, 2, 2),
        (1, 13, 1, 4, 1),
    ],
)
def test_decompress_of_compress_is_projection(B, S, D, k_s, k_d):
    x = torch.randn(
        B, S, D, generator=torch.Generator().manual_seed(S * 100 + D), dtype=torch.float64
    )
    block = ops.spectral_compress_torch(x, k_s, k_d)
    want = oracle_decompress(block, S, D, k_s)
    y = ops.spectral_decompress_torch(block, S, D, k_s)
    assert rel_err(y, want) <= 1e-5
    # projection: compress(decompress(b)) == b, decompress(compress(y)) == y
    assert rel_err(ops.spectral_compress_torch(y, k_s, k_d), block) <= 1e-5
    assert (
        rel_err(
            ops.spectral_decompress_torch(ops.spectral_compress_torch(y, k_s, k_d), S, D, k_s), y
        )
        <= 1e-5
    )


@settings(max_examples=40, deadline=None)
@given(geometries(max_s=16, max_d=16), st.integers(0, 2**31 - 1))
def test_round_trip_is_idempotent(geometry, seed):
    B, S, D, k_s, k_d = geometry
    x = torch.randn(B, S, D, generator=torch.Generator().manual_seed(seed))
    y = ops.spectral_decompress(ops.spectral_compress(x, k_s, k_d), S, D, k_s)
    y2 = ops.spectral_decompress(ops.spectral_compress(y, k_s, k_d), S, D, k_s)
    # against |x|: y itself can be nearly zero (only the DC of zero-mean data kept)
    assert float((y2 - y).norm()) <= 1e-5 * float(x.norm())
    # a projection never adds energy
    assert y.norm() <= x.norm() * (1 + 1e-5)


def test_full_block_is_exact_inverse():
    x = torch.randn(2, 6, 10)
    y = ops.spectral_decompress(ops.spectral_compress(x, 4, 6), 6, 10, 4)
    assert rel_err(y, x) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_computed_in_float32(dtype):
    """A 16-bit input is transformed in float32: it matches the float64 oracle of the same
    (exactly representable) values to float32 precision, far tighter than 16-bit arithmetic."""
    x = torch.randn(2, 9, 12).to(dtype)
    got = ops.spectral_compress(x, 3, 4)
    assert got.dtype == torch.float32
    assert rel_err(got, oracle_compress(x.double(), 3, 4)) <= 1e-6
    back = ops.spectral_decompress(got, 9, 12, 3)
    assert back.dtype == torch.float32
    assert rel_err(back, oracle_decompress(got.double(), 9, 12, 3)) <= 1e-6


def test_dispatch_on_cpu_matches_the_oracle():
    """The public entry points on CPU tensors (whatever they dispatch to) equal the oracle."""
    x = torch.randn(2, 5, 8, dtype=torch.float64).float()
    block = ops.spectral_compress(x, 2, 3)
    assert block.device.type == "cpu"
    assert rel_err(block, oracle_compress(x.double(), 2, 3)) <= 1e-6
    y = ops.spectral_decompress(block, 5, 8, 2)
    assert rel_err(y, oracle_decompress(block.double(), 5, 8, 2)) <= 1e-6


def test_block_rows_order_and_count():
    assert ops.block_rows(8, 3).tolist() == [0, 1, 2, 6, 7]
    assert ops.block_rows(5, 3).tolist() == [0, 1, 2, 3, 4]
    assert ops.block_rows(1, 1).tolist() == [0]
    for S in range(1, 12):
        for k_s in range(1, S // 2 + 2):
            rows = ops.block_rows(S, k_s)
            assert len(rows) == ops.n_block_rows(S, k_s) == len(set(rows.tolist()))


@pytest.mark.parametrize("S,D,k_s,k_d", [(8, 8, 0, 1), (8, 8, 6, 1), (8, 8, 1, 0), (8, 8, 1, 6)])
def test_bad_geometry_raises_config_error(S, D, k_s, k_d):
    with pytest.raises(ConfigError):
        ops.spectral_compress(torch.zeros(1, S, D), k_s, k_d)


def test_extension_available_matches_the_import():
    """True exactly when fc_edge._C imports (and then the ops are registered with torch)."""
    import importlib.util

    built = importlib.util.find_spec("fc_edge._C") is not None
    assert ops.extension_available() is built
    assert hasattr(torch.ops.fc_edge, "spectral_compress") is built


# ---------------------------------------------------------------- CUDA: fused op vs torch path

HAVE_CUDA = torch.cuda.is_available()
cuda_only = [
    pytest.mark.cuda,
    pytest.mark.skipif(not HAVE_CUDA, reason="needs a CUDA GPU"),
    pytest.mark.skipif(
        HAVE_CUDA and not ops.extension_available(),
        reason="fc_edge._C is not built: run tools/build_ext.sh",
    ),
]


def needs_cuda_ext(fn):
    """Marks ``cuda`` and skips, with the reason, without a GPU or without fc_edge._C."""
    for mark in cuda_only:
        fn = mark(fn)
    return fn


CUDA_SHAPES = [  # (B, S, D, k_s, k_d): odd sizes, S == 1, R == S, full columns, S == 4096
    (1, 1, 2048, 1, 256),
    (3, 1, 7, 1, 4),
    (2, 7, 9, 3, 4),
    (2, 33, 65, 10, 20),
    (1, 127, 130, 64, 66),
    (4, 100, 96, 17, 49),
    (1, 2, 2, 2, 2),
    (2, 512, 2048, 64, 256),
    (1, 4096, 2048, 256, 128),
    (2, 4096, 257, 1, 1),
]


def _ids(shapes):
    return ["x".join(map(str, s)) for s in shapes]


@pytest.mark.parametrize("B,S,D,k_s,k_d", CUDA_SHAPES, ids=_ids(CUDA_SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@needs_cuda_ext
def test_cuda_compress_equals_torch(B, S, D, k_s, k_d, dtype):
    x = torch.randn(B, S, D, device="cuda").to(dtype)
    got = torch.ops.fc_edge.spectral_compress(x, k_s, k_d)
    want = ops.spectral_compress_torch(x, k_s, k_d)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("B,S,D,k_s,k_d", CUDA_SHAPES, ids=_ids(CUDA_SHAPES))
@needs_cuda_ext
def test_cuda_decompress_equals_torch(B, S, D, k_s, k_d):
    x = torch.randn(B, S, D, device="cuda")
    block = ops.spectral_compress_torch(x, k_s, k_d)
    got = torch.ops.fc_edge.spectral_decompress(block, S, D, k_s)
    want = ops.spectral_decompress_torch(block, S, D, k_s)
    assert got.shape == (B, S, D) and got.dtype == torch.float32
    assert rel_err(got, want) <= 1e-5


@needs_cuda_ext
def test_cuda_dispatch_uses_fused_op_and_matches():
    x = torch.randn(2, 40, 64, device="cuda")
    block = ops.spectral_compress(x, 5, 9)
    assert rel_err(block, ops.spectral_compress_torch(x, 5, 9)) <= 1e-5
    y = ops.spectral_decompress(block, 40, 64, 5)
    assert rel_err(y, ops.spectral_decompress_torch(block, 40, 64, 5)) <= 1e-5


@needs_cuda_ext
def test_cuda_misaligned_and_strided_inputs():
    B, S, D = 2, 17, 24
    flat = torch.randn(B * S * D + 1, device="cuda")
    x = flat[1:].view(B, S, D)  # 4-byte offset: not 16-byte aligned
    want = ops.spectral_compress_torch(x, 4, 7)
    assert rel_err(torch.ops.fc_edge.spectral_compress(x, 4, 7), want) <= 1e-5
    xt = torch.randn(B, D, S, device="cuda").transpose(1, 2)  # non-contiguous
    assert (
        rel_err(
            torch.ops.fc_edge.spectral_compress(xt, 4, 7), ops.spectral_compress_torch(xt, 4, 7)
        )
        <= 1e-5
    )


@needs_cuda_ext
def test_cuda_side_stream_and_plan_cache():
    x = torch.randn(2, 64, 128, device="cuda")
    want = ops.spectral_compress_torch(x, 8, 16)
    torch.ops.fc_edge.clear_plan_cache()
    torch.ops.fc_edge.spectral_compress(x, 8, 16)
    assert torch.ops.fc_edge.plan_cache_size() == 1
    torch.ops.fc_edge.spectral_compress(x, 8, 16)
    assert torch.ops.fc_edge.plan_cache_size() == 1  # same key: reused
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = torch.ops.fc_edge.spectral_compress(x, 8, 16)
    torch.cuda.current_stream().wait_stream(stream)
    assert rel_err(got, want) <= 1e-5
    assert torch.ops.fc_edge.plan_cache_size() == 1  # no stream in the key: one plan serves all
    try:
        torch.ops.fc_edge.set_plan_cache_capacity(2)
        for S in (10, 11, 12):
            torch.ops.fc_edge.spectral_compress(torch.randn(1, S, 16, device="cuda"), 2, 3)
        assert torch.ops.fc_edge.plan_cache_size() <= 2
    finally:
        torch.ops.fc_edge.set_plan_cache_capacity(16)


THREAD_SHAPES = [(2, 33, 65, 10, 20), (1, 64, 128, 8, 16), (3, 1, 7, 1, 4), (2, 100, 96, 17, 49)]


@needs_cuda_ext
def test_cuda_threads_share_and_evict_plans():
    """8 host threads at once, 4 shapes, plan cache capacity 2: threads share plans (same shape,
    on the default stream or each on its own) and evict plans other threads hold. cuFFT allows a
    plan in one thread at a time; every result must still equal the torch path."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    inputs = [torch.randn(B, S, D, device="cuda", generator=gen) for B, S, D, _, _ in THREAD_SHAPES]
    blocks = [ops.spectral_compress_torch(x, g[3], g[4]) for x, g in zip(inputs, THREAD_SHAPES)]
    recons = [
        ops.spectral_decompress_torch(b, g[1], g[2], g[3]) for b, g in zip(blocks, THREAD_SHAPES)
    ]
    torch.cuda.synchronize()
    n_threads, rounds = 8, 12
    results: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    errors: list[BaseException] = []
    start = threading.Barrier(n_threads)

    def work(t: int) -> None:
        try:
            stream = torch.cuda.Stream() if t % 2 else None  # None: the default stream
            with torch.cuda.stream(stream):
                start.wait()
                for i in range(rounds):
                    j = (t + i) % len(THREAD_SHAPES)
                    _, S, D, k_s, k_d = THREAD_SHAPES[j]
                    block = torch.ops.fc_edge.spectral_compress(inputs[j], k_s, k_d)
                    y = torch.ops.fc_edge.spectral_decompress(blocks[j], S, D, k_s)
                    results.append((j, block, y))
            torch.cuda.synchronize()
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    try:
        torch.ops.fc_edge.set_plan_cache_capacity(2)
        threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors[0]
        assert len(results) == n_threads * rounds
        assert torch.ops.fc_edge.plan_cache_size() <= 2
        for j, block, y in results:
            assert rel_err(block, blocks[j]) <= 1e-5, THREAD_SHAPES[j]
            assert rel_err(y, recons[j]) <= 1e-5, THREAD_SHAPES[j]
    finally:
        torch.ops.fc_edge.set_plan_cache_capacity(16)


@needs_cuda_ext
def test_cuda_graph_capture_after_warm_up():
    """Warm up on a side stream (torch's CUDA-graph recipe), capture compress + decompress,
    evict every unpinned plan and make others, then replay with new inputs: the graph's plans
    were pinned, and the replays equal the torch path."""
    B, S, D, k_s, k_d = 2, 48, 96, 6, 12  # a shape no other test uses
    static_x = torch.randn(B, S, D, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            block = torch.ops.fc_edge.spectral_compress(static_x, k_s, k_d)
            torch.ops.fc_edge.spectral_decompress(block, S, D, k_s)
    torch.cuda.current_stream().wait_stream(side)
    pinned = torch.ops.fc_edge.plan_cache_pinned()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_block = torch.ops.fc_edge.spectral_compress(static_x, k_s, k_d)
        static_y = torch.ops.fc_edge.spectral_decompress(static_block, S, D, k_s)
    assert torch.ops.fc_edge.plan_cache_pinned() == pinned + 2  # compress's and decompress's
    try:  # churn: destroy every unpinned plan, make and evict others
        torch.ops.fc_edge.set_plan_cache_capacity(0)
        for s in (20, 21, 22):
            torch.ops.fc_edge.spectral_compress(torch.randn(1, s, 96, device="cuda"), 3, 12)
    finally:
        torch.ops.fc_edge.set_plan_cache_capacity(16)
    gen = torch.Generator(device="cuda").manual_seed(1)
    for _ in range(3):
        x = torch.randn(B, S, D, device="cuda", generator=gen)
        static_x.copy_(x)
        graph.replay()
        torch.cuda.synchronize()
        want = ops.spectral_compress_torch(x, k_s, k_d)
        assert rel_err(static_block, want) <= 1e-5
        assert rel_err(static_y, ops.spectral_decompress_torch(static_block, S, D, k_s)) <= 1e-5


@needs_cuda_ext
def test_cuda_graph_capture_without_warm_up_refuses():
    """No plan can be made during capture: the op says to warm up instead of breaking it."""
    x = torch.randn(1, 50, 70, device="cuda")  # a shape no other test uses
    torch.ops.fc_edge.clear_plan_cache()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="Warm up"):
        with torch.cuda.graph(graph):
            torch.ops.fc_edge.spectral_compress(x, 3, 5)


@needs_cuda_ext
def test_cuda_work_area_comes_from_torchs_allocator():
    """cuFFT's work area is memory from torch's caching allocator, not a cudaMalloc of cuFFT's:
    with the device's free memory parked in torch's cache (allocated, then freed to the cache)
    and 256 MiB left, plans for a new shape are made and run, and torch's peak grows by more than
    the op's own buffers. D = 4099 is prime, so cuFFT uses Bluestein's algorithm, whose work area
    for these 8192 rows should be far above 256 MiB (not measured yet): a work area cuFFT
    allocated itself would then fail with CUFFT_ALLOC_FAILED."""
    B, S, D, k_s, k_d = 4, 2048, 4099, 4, 8
    x = torch.randn(B, S, D, device="cuda")
    want = ops.spectral_compress_torch(x, k_s, k_d)
    want_y = ops.spectral_decompress_torch(want, S, D, k_s)  # torch's own plans, made before
    torch.ops.fc_edge.clear_plan_cache()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    headroom = 256 << 20
    filler = []
    try:
        while True:
            free, _ = torch.cuda.mem_get_info()
            take = min(free - headroom, 1 << 30)
            if take < (8 << 20):
                break
            filler.append(torch.empty(take, dtype=torch.uint8, device="cuda"))
    except torch.OutOfMemoryError:
        pass
    try:
        filler.clear()  # freed to torch's cache: still reserved, not free on the device
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        got = torch.ops.fc_edge.spectral_compress(x, k_s, k_d)
        y = torch.ops.fc_edge.spectral_decompress(got, S, D, k_s)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        assert rel_err(got, want) <= 1e-5
        assert rel_err(y, want_y) <= 1e-5
        own = 4 * B * S * D + 8 * B * S * (D // 2 + 1) + 8 * S * B * k_d  # out(y) + Y + Z
        assert peak >= own + (1 << 20), (
            f"peak {peak} B: the op's buffers alone are {own} B, so no cuFFT work area came "
            "from torch (or cuFFT needed none for this size)"
        )
    finally:
        filler.clear()
        torch.cuda.empty_cache()


@needs_cuda_ext
def test_cuda_bad_arguments_raise():
    x = torch.randn(1, 8, 8, device="cuda")
    with pytest.raises(RuntimeError, match="k_s"):
        torch.ops.fc_edge.spectral_compress(x, 6, 2)
    with pytest.raises(RuntimeError, match="rows"):
        torch.ops.fc_edge.spectral_decompress(torch.zeros(1, 4, 2, 2, device="cuda"), 8, 8, 2)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.fc_edge.spectral_compress(x.double(), 2, 2)


@pytest.mark.parametrize("B,S,D,k_s,k_d", [(2, 7, 9, 3, 4), (1, 1, 16, 1, 5), (2, 64, 128, 8, 16)])
@needs_cuda_ext
def test_cuda_opcheck(B, S, D, k_s, k_d):
    x = torch.randn(B, S, D, device="cuda")
    torch.library.opcheck(torch.ops.fc_edge.spectral_compress.default, (x, k_s, k_d))
    block = ops.spectral_compress_torch(x, k_s, k_d)
    torch.library.opcheck(torch.ops.fc_edge.spectral_decompress.default, (block, S, D, k_s))


# ------------------------------------------------- backend order: extension, CuPy, torch


@pytest.mark.parametrize(
    "ext,cupy,device,D,want",
    [
        (True, True, "cuda", 64, "extension"),
        (True, False, "cuda", 64, "extension"),
        (False, True, "cuda", 64, "cupy"),
        (False, False, "cuda", 64, "torch"),
        (True, True, "cuda", 1, "torch"),  # no size-1 cuFFT plan
        (True, True, "cpu", 64, "torch"),
    ],
)
def test_backend_order(monkeypatch, ext, cupy, device, D, want):
    monkeypatch.setattr(ops, "extension_available", lambda: ext)
    monkeypatch.setattr(ops, "cupy_available", lambda: cupy)
    assert ops.backend_for(device, D) == want


def test_missing_cupy_falls_back_to_torch(monkeypatch):
    """With ``import cupy`` failing, CuPy is reported absent, CUDA tensors would take torch (or
    the extension), and the ops still compute (here on CPU) what the oracle says."""
    import sys

    monkeypatch.setitem(sys.modules, "cupy", None)  # makes `import cupy` raise ImportError
    ops._import_cupy.cache_clear()
    try:
        assert ops.cupy_available() is False
        monkeypatch.setattr(ops, "extension_available", lambda: False)
        assert ops.backend_for("cuda", 64) == "torch"
        x = torch.randn(1, 6, 8, dtype=torch.float64).float()
        assert ops.backend(x) == "torch"
        assert rel_err(ops.spectral_compress(x, 2, 3), oracle_compress(x.double(), 2, 3)) <= 1e-6
    finally:
        ops._import_cupy.cache_clear()


def test_cupy_import_and_without_cupy(monkeypatch):
    """A module named cupy that imports makes CuPy available; ``without_cupy`` switches it off
    for its context only."""
    import sys
    import types

    monkeypatch.setitem(sys.modules, "cupy", types.ModuleType("cupy"))
    ops._import_cupy.cache_clear()
    try:
        assert ops.cupy_available() is True
        with ops.without_cupy():
            assert ops.cupy_available() is False
        assert ops.cupy_available() is True
    finally:
        ops._import_cupy.cache_clear()


@pytest.mark.cupy
def test_cuda_backend_reports_the_order():
    x = torch.randn(1, 4, 16, device="cuda")
    assert ops.backend(x) == ("extension" if ops.extension_available() else "cupy")
    with ops.without_cupy():
        assert ops.backend(x) == ("extension" if ops.extension_available() else "torch")
    assert ops.backend(x[..., :1]) == "torch"


@pytest.mark.parametrize("B,S,D,k_s,k_d", CUDA_SHAPES, ids=_ids(CUDA_SHAPES))
@pytest.mark.cupy
def test_cupy_ops_equal_torch(B, S, D, k_s, k_d):
    x = torch.randn(B, S, D, device="cuda")
    block = ops.spectral_compress_cupy(x, k_s, k_d)
    want = ops.spectral_compress_torch(x, k_s, k_d)
    assert block.shape == want.shape and block.dtype == torch.float32 and block.is_cuda
    assert rel_err(block, want) <= 1e-5
    y = ops.spectral_decompress_cupy(want, S, D, k_s)
    assert y.shape == (B, S, D) and y.dtype == torch.float32
    assert rel_err(y, ops.spectral_decompress_torch(want, S, D, k_s)) <= 1e-5


@pytest.mark.cupy
def test_cupy_ops_on_a_side_stream_and_half_input():
    x = torch.randn(2, 64, 128, device="cuda").to(torch.bfloat16)
    want = ops.spectral_compress_torch(x, 8, 16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = ops.spectral_compress_cupy(x, 8, 16)
        back = ops.spectral_decompress_cupy(got, 64, 128, 8)
    torch.cuda.current_stream().wait_stream(stream)
    assert rel_err(got, want) <= 1e-5
    assert rel_err(back, ops.spectral_decompress_torch(want, 64, 128, 8)) <= 1e-5
