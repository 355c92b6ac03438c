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

Then the CPU cutoff (fc_edge/codecs/cupy_rotated.py: below MIN_GPU_VALUES values, N x K, the
numba coder runs even for CUDA tensors): N in 1..64 rows of K = 576 and 1..16 of K = 2048, each
coder forced, where the GPU coder starts to win, and how much slower than the faster coder the
default choice is at each size (the cutoff is confirmed when that is <= 1.25x everywhere).

``--json PATH`` writes every figure, the byte-identity target and the cutoff's verdict, with the
run (commit, device, torch, CUDA); without a GPU or CuPy the script says so in one line, writes
``"status": "skipped"`` there and exits 0.

  python tools/bench_cupy.py [--iters 20] [--bits 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from bench_cuda import write_json

from fc_edge import ops
from fc_edge.codecs import cupy_rotated, get_codec
from fc_edge.codecs.base import Codec, Encoded

SIZES = [(S, D) for S in (128, 512, 2048) for D in (576, 2048)]
CUTOFF_SHAPES = [(n, 576) for n in (1, 2, 4, 8, 16, 32, 64)] + [
    (n, 2048) for n in (1, 2, 4, 8, 16)]
#: The default choice may be this much slower than the faster coder at a size and still count
#: as confirmed (timing noise at 0.1 ms, and sizes right at the crossover).
CUTOFF_SLACK = 1.25


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


def coder_times(rotated: Codec, x: torch.Tensor, iters: int) -> dict[str, Any]:
    """Encode and decode ms of the GPU coder (forced: no cutoff) and the CPU coder on ``x``,
    and whether their payloads are byte-identical."""
    with cupy_rotated.gpu_cutoff(0):
        enc = rotated.encode(x)
        t = {"enc cupy": time_ms(partial(rotated.encode, x), iters),
             "dec cupy": time_ms(partial(rotated.decode, enc), iters)}
    with ops.without_cupy():
        enc_cpu = rotated.encode(x)
        t["enc cpu"] = time_ms(partial(rotated.encode, x), iters)
        t["dec cpu"] = time_ms(partial(rotated.decode, enc_cpu), iters)
    return {"ms": t, "same_bytes": identical(enc, enc_cpu)}


def cutoff_verdict(rows: list[dict[str, Any]], cutoff: int) -> dict[str, Any]:
    """Per K: the smallest N x K where the GPU coder encodes (decodes) at least as fast; at every
    size, the default choice's time over the faster coder's."""
    crossover: dict[str, dict[str, int | None]] = {}
    worst = 1.0
    for row in rows:
        n_values, ms = row["N"] * row["K"], row["ms"]
        for op in ("enc", "dec"):
            gpu, cpu = ms[f"{op} cupy"], ms[f"{op} cpu"]
            per_k = crossover.setdefault(op, {})
            if gpu <= cpu and per_k.get(str(row["K"])) is None:
                per_k[str(row["K"])] = n_values
            per_k.setdefault(str(row["K"]), None)
            chosen = gpu if n_values >= cutoff else cpu
            row[f"{op} default over best"] = chosen / min(gpu, cpu)
            worst = max(worst, row[f"{op} default over best"])
    return {"cutoff_values": cutoff, "crossover_values": crossover,
            "worst_default_over_best": worst, "slack": CUTOFF_SLACK,
            "confirmed": worst <= CUTOFF_SLACK}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--bits", type=int, default=4, help="rotated's packed bits per element")
    p.add_argument("--json", metavar="PATH", help="write the figures and verdicts here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_cupy: no CUDA GPU here (torch.cuda.is_available() is False); nothing to run")
        write_json(args.json, {"status": "skipped", "reason": "no CUDA GPU"})
        return 0
    if not ops.cupy_available():
        print("bench_cupy: CuPy is not installed (pip install -e .[gpu]); nothing to run")
        write_json(args.json, {"status": "skipped", "reason": "CuPy is not installed"})
        return 0
    rotated, int8 = get_codec("rotated", bits=args.bits), get_codec("int8")
    print(f"bench_cupy on {torch.cuda.get_device_name()} ({torch.__version__}), rotated bits="
          f"{args.bits}, median of {args.iters}; ms per call")
    header = (f"{'S x D':>11} | {'enc cupy':>8} {'enc cpu':>8} {'enc int8':>8} | "
              f"{'dec cupy':>8} {'dec cpu':>8} {'dec int8':>8} | {'cpu/cupy':>8} "
              f"{'cupy/int8':>9} (enc, dec) | same bytes")
    print(header)
    print("-" * len(header))
    sizes = []
    for S, D in SIZES:
        x = activation(S, D)
        row = {"N": S, "K": D, **coder_times(rotated, x, args.iters)}
        t = row["ms"]
        e8 = int8.encode(x)
        t["enc int8"] = time_ms(partial(int8.encode, x), args.iters)
        t["dec int8"] = time_ms(partial(int8.decode, e8), args.iters)
        sizes.append(row)
        cols = " ".join(f"{t[k]:8.3f}" for k in ("enc cupy", "enc cpu", "enc int8"))
        cols += " | " + " ".join(f"{t[k]:8.3f}" for k in ("dec cupy", "dec cpu", "dec int8"))
        speedup = f"{t['enc cpu'] / t['enc cupy']:4.1f},{t['dec cpu'] / t['dec cupy']:4.1f}"
        vs_int8 = f"{t['enc cupy'] / t['enc int8']:4.1f},{t['dec cupy'] / t['dec int8']:4.1f}"
        print(f"{S:>5} x {D:<4} | {cols} | {speedup:>9} {vs_int8:>9}{'':>11} | "
              f"{'yes' if row['same_bytes'] else 'NO'}", flush=True)

    cutoff = cupy_rotated.min_gpu_values()
    print(f"\nCPU cutoff: the numba coder below {cutoff} values (N x K); each coder forced, ms")
    print(f"{'N x K':>11} | {'values':>7} | {'enc cupy':>8} {'enc cpu':>8} | {'dec cupy':>8} "
          f"{'dec cpu':>8} | default runs | same bytes")
    sweep = []
    for N, K in CUTOFF_SHAPES:
        row = {"N": N, "K": K, **coder_times(rotated, activation(N, K, seed=N), args.iters)}
        sweep.append(row)
        t = row["ms"]
        print(f"{N:>5} x {K:<4} | {N * K:>7} | {t['enc cupy']:8.3f} {t['enc cpu']:8.3f} | "
              f"{t['dec cupy']:8.3f} {t['dec cpu']:8.3f} | "
              f"{'cupy' if N * K >= cutoff else 'cpu':<12} | "
              f"{'yes' if row['same_bytes'] else 'NO'}", flush=True)
    verdict = cutoff_verdict(sweep, cutoff)
    print(f"GPU coder at least as fast from N x K = {verdict['crossover_values']} (per K; None: "
          f"not in this range); the default is at worst {verdict['worst_default_over_best']:.2f}x"
          f" the faster coder -> cutoff {'confirmed' if verdict['confirmed'] else 'NOT confirmed'}"
          f" (<= {CUTOFF_SLACK}x)")
    all_same = all(r["same_bytes"] for r in sizes + sweep)
    print(f"target CuPy payloads byte-identical to the CPU coder: "
          f"{'MET' if all_same else 'MISSED'}")
    write_json(args.json, {
        "status": "ok", "bits": args.bits, "iters": args.iters, "sizes": sizes,
        "cutoff": {**verdict, "sizes": sweep},
        "targets": {"byte_identical": {"value": all_same, "target": True, "met": all_same}},
    })
    if not all_same:
        print("bench_cupy: the CuPy payload differs from the CPU coder's (a bug: see "
              "tests/codecs/test_cupy_rotated.py)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
