"""Benchmark the fused spectral op against its baselines, side by side in one run.

For each S in {128, 512, 2048, 4096} x D = 2048 (B = 1, float32 by default) it times, with CUDA
events after warm-up, in the same process on the same input:

  fused      torch.ops.fc_edge.spectral_compress / spectral_decompress
  torch      fc_edge.ops.spectral_{compress,decompress}_torch (rfft, slice, fft on kept columns)
  unfused    rfft2 + slice the block / zero-pad + irfft2 (the naive torch way)
  topk       Top-k encode (torch.topk of |x|, values + indices) with the same element budget
  svd        torch.linalg.svd(x[0], full_matrices=False)
  copy       a device-to-device copy of the input (the memory-bandwidth floor)

and prints times (ms), ratios (baseline / fused) and the fused compress's achieved bandwidth
(input read + block written) against the copy's. Targets at (2048, 2048): fused >= 2x unfused,
fused >= 30x Top-k, fused compress >= 50% of the copy's bandwidth. ``--smoke`` runs the
script's own code on the CPU (torch path standing in for the fused op, tiny sizes, wall clock)
to check the script, not to measure. ``--json PATH`` writes every figure, the targets and the
run (commit, device, torch, CUDA); without a GPU the script says so in one line, writes
``"status": "skipped"`` there and exits 0.

  python tools/bench_cuda.py [--k-frac 0.125] [--dtype float32] [--iters 50] [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fc_edge import ops
from fc_edge.devices import device_name

SIZES_S = (128, 512, 2048, 4096)
D_MODEL = 2048
TARGET_UNFUSED = 2.0  # at (2048, 2048)
TARGET_TOPK = 30.0
TARGET_COPY_FRACTION = 0.5  # of a device-to-device copy's bandwidth


def run_info() -> dict[str, Any]:
    """What made a figure: the commit ($FC_EDGE_COMMIT, else git; "-dirty" with uncommitted
    changes), torch, CUDA, the GPU (or the CPU), the host and the time."""
    commit = os.environ.get("FC_EDGE_COMMIT")
    if not commit:
        root = Path(__file__).resolve().parents[1]
        try:
            git = ["git", "-C", str(root)]
            commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True,
                                    check=True, timeout=10).stdout.strip()
            dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            commit += "-dirty" if dirty else ""
        except (OSError, subprocess.SubprocessError):
            commit = "unknown"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return {
        "commit": commit,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": device_name(device),
        "host": platform.node(),
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def write_json(path: str | None, record: dict[str, Any]) -> None:
    """``record`` plus :func:`run_info` as JSON at ``path`` (nothing without one)."""
    if path:
        Path(path).write_text(json.dumps({**run_info(), **record}, indent=1) + "\n")


def time_ms(fn: Callable[[], object], iters: int, warmup: int, cuda: bool) -> float:
    """Median milliseconds per call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def unfused_compress(x: torch.Tensor, rows: torch.Tensor, k_d: int) -> torch.Tensor:
    spec = torch.fft.rfft2(x.float())  # (B, S, D/2+1): full C2C along S on every column
    return torch.view_as_real(spec[:, :, :k_d].index_select(1, rows).contiguous())


def unfused_decompress(block: torch.Tensor, rows: torch.Tensor, S: int, D: int) -> torch.Tensor:
    B, _, k_d, _ = block.shape
    full = torch.zeros(B, S, D // 2 + 1, dtype=torch.complex64, device=block.device)
    full[:, :, :k_d].index_copy_(1, rows, torch.view_as_complex(block))
    return torch.fft.irfft2(full, s=(S, D))


def topk_encode(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.reshape(x.shape[0], -1)
    idx = flat.abs().topk(k, dim=-1).indices
    return flat.gather(-1, idx), idx


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def bench_size(
    S: int,
    D: int,
    args: argparse.Namespace,
    fused_c,
    fused_d,
    device: torch.device,
    dtype: torch.dtype,
    cuda: bool,
) -> dict[str, Any]:
    """Prints one table row; returns its figures (ms per call, ratios baseline / fused, GB/s)."""
    run = {"iters": args.iters, "warmup": args.warmup, "cuda": cuda}
    elt = torch.empty((), dtype=dtype).element_size()
    k_s = max(1, int(args.k_frac * (S // 2)))
    k_d = max(1, int(args.k_frac * (D // 2)))
    x = torch.randn(args.batch, S, D, device=device).to(dtype)
    rows = ops.block_rows(S, k_s).to(device)
    block = fused_c(x, k_s, k_d)
    err = rel_err(block, ops.spectral_compress_torch(x, k_s, k_d))
    k_top = block.numel() // 2  # same count of sent numbers: k values + k indices

    t_fused = time_ms(lambda: fused_c(x, k_s, k_d), **run)
    t_torch = time_ms(lambda: ops.spectral_compress_torch(x, k_s, k_d), **run)
    t_unf = time_ms(lambda: unfused_compress(x, rows, k_d), **run)
    t_topk = time_ms(lambda: topk_encode(x, k_top), **run)
    xf = x[0].float()
    t_svd = time_ms(
        lambda: torch.linalg.svd(xf, full_matrices=False),
        iters=args.svd_iters,
        warmup=1,
        cuda=cuda,
    )
    t_dec = time_ms(lambda: fused_d(block, S, D, k_s), **run)
    t_unf_dec = time_ms(lambda: unfused_decompress(block, rows, S, D), **run)
    dst = torch.empty_like(x)
    t_copy = time_ms(lambda: dst.copy_(x), **run)

    moved = x.numel() * elt + block.numel() * 4  # bytes the fused compress must touch
    gbs = moved / (t_fused * 1e-3) / 1e9
    copy_gbs = 2 * x.numel() * elt / (t_copy * 1e-3) / 1e9
    print(
        f"{S:>5} {D:>5} {k_s:>4} {k_d:>4} | {t_fused:8.3f} {t_torch:8.3f} {t_unf:8.3f}"
        f" {t_unf / t_fused:6.2f} | {t_topk:8.3f} {t_topk / t_fused:7.1f} |"
        f" {t_svd:9.2f} {t_svd / t_fused:8.0f} | {t_dec:7.3f} {t_unf_dec:7.3f}"
        f" {t_unf_dec / t_dec:5.2f} | {gbs:6.0f} {copy_gbs:6.0f}"
        f" {100 * gbs / copy_gbs:5.0f} | {err:7.1e}"
    )
    return {
        "S": S, "D": D, "k_s": k_s, "k_d": k_d,
        "ms": {"fused": t_fused, "torch": t_torch, "unfused": t_unf, "topk": t_topk,
               "svd": t_svd, "fused_decompress": t_dec, "unfused_decompress": t_unf_dec,
               "copy": t_copy},
        "x_unfused": t_unf / t_fused, "x_topk": t_topk / t_fused, "x_svd": t_svd / t_fused,
        "x_unfused_decompress": t_unf_dec / t_dec,
        "fused_gb_s": gbs, "copy_gb_s": copy_gbs, "copy_fraction": gbs / copy_gbs,
        "rel_err_vs_torch": err,
    }


def targets(row: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The issue's targets at one size (2048, 2048): value, target, met."""
    pairs = {"fused_vs_unfused": (row["x_unfused"], TARGET_UNFUSED),
             "fused_vs_topk": (row["x_topk"], TARGET_TOPK),
             "copy_fraction": (row["copy_fraction"], TARGET_COPY_FRACTION)}
    return {k: {"value": v, "target": t, "met": v >= t} for k, (v, t) in pairs.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--k-frac",
        type=float,
        default=0.125,
        help="k_s = k-frac * S/2, k_d = k-frac * D/2 (at least 1)",
    )
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--svd-iters", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="CPU run of the script itself")
    p.add_argument("--json", metavar="PATH", help="write the figures and targets here")
    args = p.parse_args(argv)

    cuda = not args.smoke
    if cuda:
        if not torch.cuda.is_available():
            print("bench_cuda: no CUDA GPU here (torch.cuda.is_available() is False); nothing "
                  "to measure")
            write_json(args.json, {"status": "skipped", "reason": "no CUDA GPU"})
            return 0
        if not ops.extension_available():
            print("bench_cuda: fc_edge._C is not built; run tools/build_ext.sh first",
                  file=sys.stderr)
            write_json(args.json, {"status": "error", "reason": "fc_edge._C is not built"})
            return 2
        device = torch.device("cuda")
        fused_c = torch.ops.fc_edge.spectral_compress
        fused_d = torch.ops.fc_edge.spectral_decompress
        sizes, D = SIZES_S, D_MODEL
        print(
            f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
            f"CUDA {torch.version.cuda}"
        )
    else:
        device = torch.device("cpu")
        fused_c, fused_d = ops.spectral_compress_torch, ops.spectral_decompress_torch
        sizes, D = (16, 32), 64
        args.iters, args.warmup, args.svd_iters = 2, 1, 1
        print("bench_cuda --smoke: CPU, torch path as 'fused'; numbers mean nothing")

    dtype = getattr(torch, args.dtype)
    results: dict[int, dict[str, Any]] = {}
    header = (
        f"{'S':>5} {'D':>5} {'k_s':>4} {'k_d':>4} | {'fused':>8} {'torch':>8} {'unfused':>8}"
        f" {'x unf':>6} | {'topk':>8} {'x topk':>7} | {'svd':>9} {'x svd':>8} |"
        f" {'dec':>7} {'unf dec':>7} {'x':>5} | {'GB/s':>6} {'copy':>6} {'%copy':>5}"
        f" | {'err':>7}"
    )
    print(
        f"compress times in ms (median of {args.iters}), B={args.batch}, {args.dtype}; "
        "x = baseline / fused"
    )
    print(header)
    print("-" * len(header))
    for S in sizes:
        results[S] = bench_size(S, D, args, fused_c, fused_d, device, dtype, cuda)

    met = targets(results[2048]) if cuda and 2048 in results else {}
    for name, t in met.items():
        print(f"target {name} at (2048, {D}): {t['value']:.2f} vs >= {t['target']:g} "
              f"{'MET' if t['met'] else 'MISSED'}")
    write_json(args.json, {
        "status": "smoke" if args.smoke else "ok",
        "dtype": args.dtype, "batch": args.batch, "k_frac": args.k_frac, "iters": args.iters,
        "sizes": list(results.values()), "targets": met,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
