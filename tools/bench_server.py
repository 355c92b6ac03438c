#!/usr/bin/env python
"""Server throughput: continuous batching vs one decode step at a time, side by side.

For each N in ``--sessions``, N concurrent sessions of ``--tokens`` new tokens (EOS off, a
``--prompt-len``-row prefill each) run against an ``fc-edge serve`` process, once with batching
(``--max-batch 32``) and once one at a time (``--max-batch 1``), the two servers alternating
N by N. The load comes from protocol-level clients in this process (no head: the rows are fixed
activations, see fc_edge/runtime/loadgen.py), so the server process has the machine's cores.

Printed per N and mode: aggregate tokens/s, its ratio to N = 1 of the same mode, p50 and p99 time
per output token (decode steps of all sessions) and p99's ratio to N = 1; then the targets.

    python tools/bench_server.py                       # SmolLM2-135M, CPU
    python tools/bench_server.py --device cuda --dtype bfloat16
    python tools/bench_server.py --model synthetic:tiny-llama --sessions 1,4,16 --tokens 16

Targets: with batching, on a 2-core CPU N = 16 gives >= 6x the tokens/s of N = 1 and p99 time
per token at N = 16 <= 3x N = 1's; on a GPU, N = 32 >= 20x N = 1.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time


def start(args: argparse.Namespace, max_batch: int) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "fc_edge.cli", "serve", "--model", args.model, "--port", "0",
           "--max-batch", str(max_batch), "--max-sessions", str(max(args.sessions)),
           "--max-seq-len", str(args.prompt_len + args.tokens), "--device", args.device,
           "--prefill-chunk", str(args.prefill_chunk),
           "--dtype", args.dtype, "--log-level", "WARNING"]
    if args.split_layer is not None:
        cmd += ["--split-layer", str(args.split_layer)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if " on " not in line:
        proc.kill()
        sys.exit(f"bench_server: the server did not start: {line}{proc.stderr.read()}")
    return proc, line.split(" on ")[1].split()[0]


def gemm_ceiling(hidden: int, intermediate: int, sessions: list[int], device: str) -> dict:
    """How much cheaper a row gets in a batch on this device: N x time(1 row) / time(N rows) of
    the MLP's up projection (D -> I), the bulk of a decode step's work. Batching decode steps
    cannot beat this ratio where the forward is compute-bound."""
    import torch

    w = torch.randn(intermediate, hidden, device=device)
    out = {}
    for n in sorted({1, *sessions}):
        x = torch.randn(n, hidden, device=device)
        for _ in range(3):
            torch.nn.functional.linear(x, w)
        reps = 50
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.nn.functional.linear(x, w)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        out[n] = (time.perf_counter() - t0) / reps
    return {n: n * out[1] / out[n] for n in out}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--split-layer", type=int, default=None)
    p.add_argument("--sessions", default="1,2,4,8,16,32",
                   help="comma-separated numbers of concurrent sessions")
    p.add_argument("--tokens", type=int, default=64, help="new tokens per session")
    p.add_argument("--prompt-len", type=int, default=32, help="prefill rows per session")
    p.add_argument("--prefill-chunk", type=int, default=256,
                   help="the servers' --prefill-chunk (prefill rows per engine iteration)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    args = p.parse_args(argv)
    args.sessions = [int(n) for n in args.sessions.split(",")]

    import grpc

    from fc_edge.devices import device_name, resolve_device
    from fc_edge.runtime.loadgen import run_load
    from fc_edge.runtime.proto import pb2, pb2_grpc

    modes = {"batched": 32, "one at a time": 1}
    servers = {m: start(args, b) for m, b in modes.items()}
    try:
        info = pb2_grpc.SplitInferenceStub(grpc.insecure_channel(
            servers["batched"][1])).Info(pb2.InfoRequest(), timeout=30)
        print(f"bench_server: {args.model} split at layer {info.split_layer}, server on "
              f"{device_name(resolve_device(args.device))} ({info.device}, {info.dtype}); "
              f"{args.tokens} new tokens per session after a {args.prompt_len}-row prefill, "
              "identity codec, loopback")
        ceiling = gemm_ceiling(info.hidden_size, 4 * info.hidden_size, args.sessions,
                               str(resolve_device(args.device)))
        print("row-batching ceiling of this device (N x time of a 1-row D->4D product / time of "
              "an N-row one): " + ", ".join(f"N={n}: {c:.1f}x" for n, c in ceiling.items()))
        for m in modes:  # warm-up: first forwards pay one-off costs
            run_load(servers[m][1], info.model_fingerprint, info.split_layer, info.hidden_size,
                     2, 4, args.prompt_len)
        results = {m: {} for m in modes}
        for n in args.sessions:
            for m in modes:
                results[m][n] = run_load(servers[m][1], info.model_fingerprint, info.split_layer,
                                         info.hidden_size, n, args.tokens, args.prompt_len)
                r = results[m][n]
                print(f"  N={n:<3} {m:<14} {r.tokens_per_s:8.1f} tok/s  p50 "
                      f"{r.tpot_p50_s * 1e3:7.1f} ms  p99 {r.tpot_percentile(99) * 1e3:7.1f} ms",
                      flush=True)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
        for proc, _ in servers.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

    print()
    header = (f"{'N':>3} | {'mode':<14} | {'tok/s':>8} | {'x N=1':>6} | {'p50 ms/tok':>10} | "
              f"{'p99 ms/tok':>10} | {'p99 x N=1':>9}")
    print(header)
    print("-" * len(header))
    for n in args.sessions:
        for m in modes:
            r, one = results[m][n], results[m][args.sessions[0]]
            print(f"{n:>3} | {m:<14} | {r.tokens_per_s:8.1f} | "
                  f"{r.tokens_per_s / one.tokens_per_s:6.2f} | {r.tpot_p50_s * 1e3:10.1f} | "
                  f"{r.tpot_percentile(99) * 1e3:10.1f} | "
                  f"{r.tpot_percentile(99) / one.tpot_percentile(99):9.2f}")
        r, o = results["batched"][n], results["one at a time"][n]
        print(f"{n:>3} | {'batched / one':<14} | {r.tokens_per_s / o.tokens_per_s:8.2f} |")
    base = args.sessions[0]
    for target_n, throughput, p99 in ((16, 6.0, 3.0), (32, 20.0, None)):
        if target_n not in args.sessions or base != 1:
            continue
        r, one = results["batched"][target_n], results["batched"][1]
        got = r.tokens_per_s / one.tokens_per_s
        where = "GPU" if target_n == 32 else "2-core CPU"
        line = (f"target ({where}) N={target_n} tokens/s >= {throughput:g}x N=1: {got:.2f}x "
                f"-> {'met' if got >= throughput else 'not met'}")
        if p99 is not None:
            q = r.tpot_percentile(99) / one.tpot_percentile(99)
            line += (f"; p99 time per token <= {p99:g}x N=1: {q:.2f}x -> "
                     f"{'met' if q <= p99 else 'not met'}")
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
