"""Benchmark rotated's CuPy coder against its CPU coder and int8, side by side in one run.

For (S, D) in {128, 512, 2048} x {576, 2048} (a heavy-tailed float32 activation on the GPU) it
times, in the same process on the same input, wall clock around a synchronised call (the encode
returns to the host for rate control anyway):

  cupy       get_codec("rotated").encode / decode with CuPy (torch's transform on the GPU, the
             NVRTC kernels for the RMS, quantizer, bit writer and reader)
  cpu        the same calls inside ops.without_cupy(): torch's transform on the GPU, then the
             numba coder on the host (the path every CUDA tensor took before)
  int8       get_codec("int8") on the GPU (per-row absmax int8: the simple GPU baseline)

checks that the cupy and cpu payloads are byte-identical, and prints milliseconds and the ratios
cpu / cupy and cupy / int8 (ratios from this one run; compare them only within it).

  python tools/bench_cupy.py [--iters 20] [--bits 4]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from functools import partial

import torch

from fc_edge import ops
from fc_edge.codecs import get_codec
from fc_edge.codecs.base import Encoded

SIZES = [(S, D) for S in (128, 512, 2048) for D in (576, 2048)]


def time_ms(fn: Callable[[], object], iters: int, warmup: int = 3) -> float:
    """Median milliseconds per synchronised call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def activation(S: int, D: int, seed: int = 0) -> torch.Tensor:
    """(1, S, D) float32 on the GPU: Student-t values and a few outlier channels (an LLM's
    early-layer activation is heavy-tailed along D)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    t = torch.distributions.StudentT(3.0).sample((1, S, D))
    x = t * (0.5 + torch.rand(1, S, 1, generator=g))
    x[..., torch.randint(0, D, (max(1, D // 64),), generator=g)] *= 30
    return x.cuda()


def identical(a: Encoded, b: Encoded) -> bool:
    return a.params == b.params and all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--bits", type=int, default=4, help="rotated's packed bits per element")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_cupy: no CUDA GPU here (torch.cuda.is_available() is False); nothing to run")
        return 0
    if not ops.cupy_available():
        print("bench_cupy: CuPy is not installed (pip install -e .[gpu]); nothing to run")
        return 0
    rotated, int8 = get_codec("rotated", bits=args.bits), get_codec("int8")
    print(f"bench_cupy on {torch.cuda.get_device_name()} ({torch.__version__}), rotated bits="
          f"{args.bits}, median of {args.iters}; ms per call")
    header = (f"{'S x D':>11} | {'enc cupy':>8} {'enc cpu':>8} {'enc int8':>8} | "
              f"{'dec cupy':>8} {'dec cpu':>8} {'dec int8':>8} | {'cpu/cupy':>8} "
              f"{'cupy/int8':>9} (enc, dec) | same bytes")
    print(header)
    print("-" * len(header))
    all_same = True
    for S, D in SIZES:
        x = activation(S, D)
        enc = rotated.encode(x)
        with ops.without_cupy():
            enc_cpu = rotated.encode(x)
        same = identical(enc, enc_cpu)
        all_same &= same
        e8 = int8.encode(x)
        t = {
            "enc cupy": time_ms(partial(rotated.encode, x), args.iters),
            "dec cupy": time_ms(partial(rotated.decode, enc), args.iters),
            "enc int8": time_ms(partial(int8.encode, x), args.iters),
            "dec int8": time_ms(partial(int8.decode, e8), args.iters),
        }
        with ops.without_cupy():
            t["enc cpu"] = time_ms(partial(rotated.encode, x), args.iters)
            t["dec cpu"] = time_ms(partial(rotated.decode, enc_cpu), args.iters)
        cols = " ".join(f"{t[k]:8.3f}" for k in ("enc cupy", "enc cpu", "enc int8"))
        cols += " | " + " ".join(f"{t[k]:8.3f}" for k in ("dec cupy", "dec cpu", "dec int8"))
        speedup = f"{t['enc cpu'] / t['enc cupy']:4.1f},{t['dec cpu'] / t['dec cupy']:4.1f}"
        vs_int8 = f"{t['enc cupy'] / t['enc int8']:4.1f},{t['dec cupy'] / t['dec int8']:4.1f}"
        print(f"{S:>5} x {D:<4} | {cols} | {speedup:>9} {vs_int8:>9}{'':>11} | "
              f"{'yes' if same else 'NO'}")
    if not all_same:
        print("bench_cupy: the CuPy payload differs from the CPU coder's (a bug: see "
              "tests/codecs/test_cupy_rotated.py)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
