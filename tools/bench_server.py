#!/usr/bin/env python
"""Server throughput, step cost and fairness, measured side by side in one run.

Three parts (``--skip`` leaves some out), each printed with the device's name:

1. **Load** (``load``): for each N in ``--sessions``, N concurrent sessions of ``--tokens`` new
   tokens (EOS off, a ``--prompt-len``-row prefill each) against ``fc-edge serve`` processes,
   with batching (``--max-batch 32``) and one decode step at a time (``--max-batch 1``), the two
   servers alternating N by N. The load comes from protocol-level clients in this process (no
   head: fixed activations, fc_edge/runtime/loadgen.py). Printed per N and mode: aggregate
   tokens/s and its ratio to N = 1, p50 and p99 time per output token (every decode step of
   every session) and p99's ratio to N = 1.
2. **Step split** (``split``): one decode step of N = 1 and of N = ``--split-n`` sessions, in
   this process, over the same tail: milliseconds in attention (of which the paged part: key and
   value writes, the block gather, softmax), MLP, the LM head (final norm + lm_head), sampling,
   and the rest (layer norms, residuals, rotary, planning, Python), with the device's
   row-batching ceiling (N x time of a 1-row D -> 4D product / time of an N-row one).
3. **Newcomer** (``newcomer``): a session's time to first token (a ``--prompt-len``-row prompt)
   while a ``--long-rows``-row prefill runs, against its time alone and the time of one
   ``--prefill-chunk``-row chunk, on one batching server.

Targets: on a CPU, N = 16 >= 5x the tokens/s of N = 1 and p99 time per token at N = 16 <= 4x
N = 1's; a newcomer's first token beside the long prefill <= 2x its time alone + one chunk; on a
GPU, N = 32 >= 20x N = 1.

    python tools/bench_server.py                                    # SmolLM2-135M, CPU
    python tools/bench_server.py --sessions 1,16 --tokens 32 --skip newcomer
    python tools/bench_server.py --device cuda --dtype bfloat16 \\
        --model synthetic:llama-3.2-1b --sessions 1,8,32 [--cuda-graphs] --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from typing import Any


def start(args: argparse.Namespace, max_batch: int, max_seq_len: int) -> tuple[Any, str]:
    most = max([*args.sessions, 2])
    cmd = [sys.executable, "-m", "fc_edge.cli", "serve", "--model", args.model, "--port", "0",
           "--max-batch", str(max_batch), "--max-seq-len", str(max_seq_len),
           "--max-sessions-per-peer", str(most + 2), "--max-streams-per-peer", str(most + 4),
           "--device", args.device, "--dtype", args.dtype, "--log-level", "WARNING"]
    if args.prefill_chunk is not None:
        cmd += ["--prefill-chunk", str(args.prefill_chunk)]
    if args.split_layer is not None:
        cmd += ["--split-layer", str(args.split_layer)]
    if args.cuda_graphs:
        cmd += ["--cuda-graphs"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if " on " not in line:
        proc.kill()
        sys.exit(f"bench_server: the server did not start: {line}{proc.stderr.read()}")
    return proc, line.split(" on ")[1].split()[0]


def stop(procs: list[Any]) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


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
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.nn.functional.linear(x, w)
        _sync(device)
        out[n] = (time.perf_counter() - t0) / reps
    return {n: n * out[1] / out[n] for n in out}


def _sync(device: Any) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


# --- 1. load ------------------------------------------------------------------------------------
#: two-sided 95% Student t quantiles by degrees of freedom (1..10; beyond: 2.0)
T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26,
       10: 2.23}


def interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and 95% t-interval (mean, low, high) of ``values`` (a single value: itself)."""
    m = statistics.fmean(values)
    if len(values) < 2:
        return m, m, m
    half = T95.get(len(values) - 1, 2.0) * statistics.stdev(values) / len(values) ** 0.5
    return m, m - half, m + half


def bench_load(args: argparse.Namespace, info: Any, servers: dict[str, str]) -> dict:
    from fc_edge.runtime.loadgen import run_load

    for address in servers.values():  # warm-up: first forwards pay one-off costs
        run_load(address, info.model_fingerprint, info.split_layer, info.hidden_size, 2, 4,
                 args.prompt_len)
    # rounds: every N and mode once per round, so a round's ratios share the machine's load
    runs: dict[str, dict[int, list[Any]]] = {m: {n: [] for n in args.sessions} for m in servers}
    for r in range(args.repeats):
        for n in args.sessions:
            for mode, address in servers.items():
                res = run_load(address, info.model_fingerprint, info.split_layer,
                               info.hidden_size, n, args.tokens, args.prompt_len, seed=r)
                runs[mode][n].append(res)
                print(f"  round {r + 1} N={n:<3} {mode:<14} {res.tokens_per_s:8.1f} tok/s  p50 "
                      f"{res.tpot_p50_s * 1e3:7.1f} ms  p99 "
                      f"{res.tpot_percentile(99) * 1e3:7.1f} ms", flush=True)

    def median(mode: str, n: int, what: str) -> float:
        return statistics.median(_figure(x, what) for x in runs[mode][n])

    print()
    print(f"medians over {args.repeats} round(s):")
    header = (f"{'N':>3} | {'mode':<14} | {'tok/s':>8} | {'x N=1':>6} | {'p50 ms/tok':>10} | "
              f"{'p99 ms/tok':>10} | {'p99 x N=1':>9}")
    print(header)
    print("-" * len(header))
    base = args.sessions[0]
    for n in args.sessions:
        for mode in servers:
            tps, one = median(mode, n, "tps"), median(mode, base, "tps")
            p99, one99 = median(mode, n, "p99"), median(mode, base, "p99")
            print(f"{n:>3} | {mode:<14} | {tps:8.1f} | {tps / one:6.2f} | "
                  f"{median(mode, n, 'p50') * 1e3:10.1f} | {p99 * 1e3:10.1f} | "
                  f"{p99 / one99:9.2f}")
        if len(servers) == 2:
            ratio = median("batched", n, "tps") / median("one at a time", n, "tps")
            print(f"{n:>3} | {'batched / one':<14} | {ratio:8.2f} |")
    out: dict = {"runs": {m: {n: [{"tokens_per_s": x.tokens_per_s, "tpot_p50_s": x.tpot_p50_s,
                                   "tpot_p99_s": x.tpot_percentile(99)} for x in xs]
                              for n, xs in res.items()} for m, res in runs.items()}}
    if "batched" not in runs or base != 1:
        return out
    gpu = str(args.device).startswith("cuda")
    for target_n, throughput, p99, where in ((16, 5.0, 4.0, "CPU"), (32, 20.0, None, "GPU")):
        if target_n not in args.sessions or (where == "GPU") != gpu:
            continue
        pairs = list(zip(runs["batched"][target_n], runs["batched"][1]))
        ratios = [a.tokens_per_s / b.tokens_per_s for a, b in pairs]
        m, lo, hi = interval(ratios)
        line = (f"target ({where}) N={target_n} tokens/s >= {throughput:g}x N=1: {m:.2f}x "
                f"[95% {lo:.2f}, {hi:.2f}], n = {len(ratios)} rounds -> "
                f"{'met' if lo >= throughput else 'not met'}")
        out[f"n{target_n}_tokens_ratio"] = ratios
        if p99 is not None:
            q = [a.tpot_percentile(99) / b.tpot_percentile(99) for a, b in pairs]
            qm, qlo, qhi = interval(q)
            line += (f"; p99 time per token <= {p99:g}x N=1: {qm:.2f}x [95% {qlo:.2f}, "
                     f"{qhi:.2f}] -> {'met' if qhi <= p99 else 'not met'}")
            out[f"n{target_n}_p99_ratio"] = q
        print(line)
    return out


def _figure(result: Any, what: str) -> float:
    return {"tps": result.tokens_per_s, "p50": result.tpot_p50_s,
            "p99": result.tpot_percentile(99)}[what]


# --- 2. the step's time split -------------------------------------------------------------------
def bench_split(args: argparse.Namespace) -> dict:
    """Time one decode step of N sessions, by part (see the module doc)."""
    import torch

    from fc_edge.devices import resolve_device, resolve_dtype
    from fc_edge.models import tail as tail_module
    from fc_edge.models.pretrained import load_model
    from fc_edge.models.tail import Segment, Tail
    from fc_edge.runtime.protocol import default_split_layer
    from fc_edge.runtime.sampling import Sampler, SamplingConfig, sample_batch

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    model = load_model(args.model)[0]
    layer = args.split_layer if args.split_layer is not None else default_split_layer(model)
    tail = Tail.from_hf(model, layer, device=device, dtype=dtype)
    position = args.prompt_len + args.tokens // 2
    timers: dict[str, float] = {}

    def timed(name: str, fn: Any) -> Any:
        def wrapper(*a: Any, **kw: Any) -> Any:
            _sync(device)
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            _sync(device)
            timers[name] = timers.get(name, 0.0) + time.perf_counter() - t0
            return out
        return wrapper

    for layer_module in tail.layers:
        layer_module.self_attn.forward = timed("attention", layer_module.self_attn.forward)
        layer_module.mlp.forward = timed("mlp", layer_module.mlp.forward)
    real_attend = tail_module._PagedLayer.attend
    tail.norm.forward = timed("lm_head", tail.norm.forward)
    tail.lm_head.forward = timed("lm_head", tail.lm_head.forward)
    out: dict = {}
    print(f"{'N':>3} | {'step ms':>8} | {'attention':>9} | {'(paged)':>8} | {'MLP':>7} | "
          f"{'LM head':>7} | {'sampling':>8} | {'rest':>7} | ms per token")
    try:
        tail_module._PagedLayer.attend = timed("paged", real_attend)
        for n in (1, args.split_n):
            cache = tail.new_cache(n * tail_module.blocks_for(position + 1) + 2)
            blocks = [cache.allocate(cache.blocks_for(position + 1)) for _ in range(n)]
            samplers = [Sampler(SamplingConfig(), device) for _ in range(n)]
            g = torch.Generator().manual_seed(0)
            with torch.inference_mode():
                for b in blocks:
                    x = torch.randn(position, tail.hidden_size, generator=g)
                    tail.forward_packed(cache.stage(x.to(dtype)),
                                        cache.plan([Segment(0, position, b)]), cache)
                rows = torch.randn(n, tail.hidden_size, generator=g).to(dtype)

                def step(cache=cache, blocks=blocks, rows=rows, samplers=samplers) -> None:
                    segments = [Segment(position, 1, b) for b in blocks]
                    x = cache.stage(rows)
                    logits = tail.forward_packed(x, cache.plan(segments), cache)
                    timed("sampling", sample_batch)(logits, samplers)

                for _ in range(2):
                    step()
                timers.clear()
                reps = max(3, args.split_reps)
                _sync(device)
                t0 = time.perf_counter()
                for _ in range(reps):
                    step()
                _sync(device)
                total = (time.perf_counter() - t0) / reps * 1e3
            parts = {k: v / reps * 1e3 for k, v in timers.items()}
            rest = total - sum(parts.get(k, 0.0) for k in ("attention", "mlp", "lm_head",
                                                             "sampling"))
            out[n] = {"step_ms": total, **{f"{k}_ms": v for k, v in parts.items()},
                      "rest_ms": rest}
            print(f"{n:>3} | {total:8.1f} | {parts.get('attention', 0):9.1f} | "
                  f"{parts.get('paged', 0):8.1f} | {parts.get('mlp', 0):7.1f} | "
                  f"{parts.get('lm_head', 0):7.1f} | {parts.get('sampling', 0):8.2f} | "
                  f"{rest:7.1f} | {total / n:.2f}")
    finally:
        tail_module._PagedLayer.attend = real_attend
    one, many = out[1], out[args.split_n]
    print(f"N={args.split_n} step / N=1 step: {many['step_ms'] / one['step_ms']:.2f}x "
          f"(N x time of one row / time of N rows: "
          f"{args.split_n * one['step_ms'] / many['step_ms']:.2f}x); by part: " + ", ".join(
              f"{k} {many[f'{k}_ms'] / one[f'{k}_ms']:.2f}x"
              for k in ("attention", "mlp", "lm_head", "sampling", "rest")
              if one.get(f"{k}_ms", 0) > 0))
    print("(with the hooks' own cost; on CUDA every part synchronises, so parts add up to more "
          "than an unsynchronised step)")
    return out


# --- 3. a newcomer beside a long prefill --------------------------------------------------------
def bench_newcomer(args: argparse.Namespace, info: Any, address: str) -> dict:
    from fc_edge.runtime.loadgen import first_token_s

    def ttft(rows: int, seed: int = 0) -> float:
        return first_token_s(address, info.model_fingerprint, info.split_layer,
                             info.hidden_size, rows, seed)

    ttft(args.prompt_len)  # warm-up
    # alone and one chunk, half before and half after the long prefill (the machine's load moves)
    half = max(1, args.newcomer_reps // 2)
    alone = [ttft(args.prompt_len, i) for i in range(half)]
    chunk = [ttft(info.prefill_chunk, i) for i in range(2)]
    long_done = threading.Event()
    long_s: list[float] = []

    def long_prefill() -> None:
        long_s.append(ttft(args.long_rows, 99))
        long_done.set()

    thread = threading.Thread(target=long_prefill, daemon=True)
    thread.start()
    beside: list[float] = []
    time.sleep(statistics.median(chunk) * 1.5)  # the long prefill is under way
    while not long_done.is_set() and len(beside) < args.newcomer_reps:
        t = ttft(args.prompt_len, len(beside))
        if not long_done.is_set():  # only those that ran entirely beside the long prefill
            beside.append(t)
        time.sleep(statistics.median(chunk) * 0.37 * (1 + len(beside) % 3))  # vary the phase
    thread.join()
    alone += [ttft(args.prompt_len, i) for i in range(half, 2 * half)]
    chunk += [ttft(info.prefill_chunk, i) for i in range(2, 4)]
    a, c = statistics.median(alone), statistics.median(chunk)
    bound = 2 * a + c
    worst = max(beside) if beside else float("nan")
    print(f"newcomer ({args.prompt_len} rows) alone: median {a * 1e3:.0f} ms (n = {len(alone)}); "
          f"one {info.prefill_chunk}-row chunk: {c * 1e3:.0f} ms; the {args.long_rows}-row "
          f"prefill: {long_s[0]:.1f} s")
    print("newcomer beside it: " + ", ".join(f"{t * 1e3:.0f}" for t in beside)
          + f" ms (n = {len(beside)}); worst {worst * 1e3:.0f} ms")
    ratios = [t / bound for t in beside]
    m, lo, hi = interval(ratios) if ratios else (float("nan"),) * 3
    print(f"target: a newcomer <= 2 x alone + one chunk = {bound * 1e3:.0f} ms -> "
          f"{'met' if beside and worst <= bound else 'not met'} for every one (worst "
          f"{worst / bound:.2f}x of the bound); mean {m:.2f}x of the bound [95% {lo:.2f}, "
          f"{hi:.2f}], n = {len(beside)}")
    return {"alone_s": alone, "chunk_s": chunk, "long_s": long_s[0], "beside_s": beside,
            "bound_s": bound}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m",
                   help="load_model spec; a real-size one without weights: synthetic:llama-3.2-1b")
    p.add_argument("--split-layer", type=int, default=None)
    p.add_argument("--sessions", default="1,2,4,8,16,32",
                   help="comma-separated numbers of concurrent sessions")
    p.add_argument("--tokens", type=int, default=64, help="new tokens per session")
    p.add_argument("--prompt-len", type=int, default=32, help="prefill rows per session")
    p.add_argument("--prefill-chunk", type=int, default=None,
                   help="the servers' --prefill-chunk (prefill rows per engine iteration; "
                   "default: the server's, 64 on a CPU and 256 on a GPU)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--cuda-graphs", action="store_true", help="serve with --cuda-graphs")
    p.add_argument("--repeats", type=int, default=1,
                   help="load: rounds of every N and mode (the targets' intervals are over "
                   "rounds)")
    p.add_argument("--modes", default="batched,one",
                   help="load: 'batched' (--max-batch 32) and/or 'one' (--max-batch 1)")
    p.add_argument("--skip", default="", help="comma-separated parts to leave out: "
                   "load, split, newcomer")
    p.add_argument("--split-n", type=int, default=16, help="the N of the step split")
    p.add_argument("--split-reps", type=int, default=10, help="steps timed per N")
    p.add_argument("--long-rows", type=int, default=4000, help="the long prefill's rows")
    p.add_argument("--newcomer-reps", type=int, default=5,
                   help="newcomers timed alone and beside the long prefill")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    args = p.parse_args(argv)
    args.sessions = [int(n) for n in args.sessions.split(",")]
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}

    import os

    import grpc

    from fc_edge.devices import device_name, resolve_device
    from fc_edge.runtime.proto import pb2, pb2_grpc

    device = resolve_device(args.device)
    load_avg = os.getloadavg()
    print(f"bench_server: {args.model} on {device_name(device)} ({args.dtype}); load average "
          f"{load_avg[0]:.2f} at the start; torch threads in the servers: "
          f"{os.environ.get('OMP_NUM_THREADS', 'default')}", flush=True)
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    results: dict = {"model": args.model, "device": device_name(device), "dtype": args.dtype,
                     "commit": commit, "load_average_start": load_avg[0], "args": vars(args)}
    modes = {"batched": 32, "one at a time": 1}
    wanted = {m for m in args.modes.split(",")}
    modes = {m: b for m, b in modes.items() if m.split()[0] in wanted}
    procs: list[Any] = []
    try:
        servers = {}
        if "load" not in skip:
            for mode, batch in modes.items():
                proc, address = start(args, batch, args.prompt_len + args.tokens)
                procs.append(proc)
                servers[mode] = address
        newcomer_address = None
        if "newcomer" not in skip:
            proc, newcomer_address = start(args, 32, args.long_rows + args.prompt_len + 8)
            procs.append(proc)
        any_address = next(iter(servers.values()), newcomer_address)
        info = None
        if any_address is not None:
            info = pb2_grpc.SplitInferenceStub(grpc.insecure_channel(any_address)).Info(
                pb2.InfoRequest(), timeout=60)
            print(f"split at layer {info.split_layer}, hidden {info.hidden_size}, server "
                  f"{info.device} {info.dtype}; {args.tokens} new tokens per session after a "
                  f"{args.prompt_len}-row prefill, identity codec, loopback", flush=True)
            ceiling = gemm_ceiling(info.hidden_size, 4 * info.hidden_size,
                                   sorted({*args.sessions, args.split_n}), str(device))
            print("row-batching ceiling of this device (N x time of a 1-row D->4D product / "
                  "time of an N-row one): "
                  + ", ".join(f"N={n}: {c:.1f}x" for n, c in ceiling.items()), flush=True)
            results["ceiling"] = ceiling
        if "load" not in skip:
            print("\n== load")
            results["load"] = bench_load(args, info, servers)
        if "newcomer" not in skip:
            print("\n== newcomer beside a long prefill")
            results["newcomer"] = bench_newcomer(args, info, newcomer_address)
    finally:
        stop(procs)
    if "split" not in skip:
        print("\n== one decode step, by part (ms)")
        results["split"] = bench_split(args)
    results["load_average_end"] = os.getloadavg()[0]
    print(f"\nload average at the end: {results['load_average_end']:.2f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
