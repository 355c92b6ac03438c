#!/usr/bin/env python
"""Scale-out on Ray Serve: aggregate tokens/s at N concurrent sessions, and the cost of a recovery.

1. Throughput: ``--sessions`` concurrent sessions (one client thread each, started together, EOS
   off, ``--tokens`` new tokens each) against the plain server (one process, no Ray), then Ray
   Serve with 1 and with 2 replicas behind its gRPC proxy, in one run on one local Ray (one CPU
   and one torch thread per replica, and for the plain server). Aggregate
   tokens/s = all tokens / wall time from the start to the last token; ``--repeats`` runs per
   configuration (median, and every run). On a 2-core machine two replicas share the same two
   cores (and the clients' head compute), so their ratio to one replica is expected near 1: the
   benchmark shows the overhead of Ray's proxy and that the second replica costs nothing; the
   gain needs cores or GPUs per replica.
2. Recovery: with 2 replicas, one session per prompt length; after ``--kill-at`` tokens the
   replica hosting it is killed (its actor, as a crash would); the figure is the time from the
   kill to the next token (the client notices, opens a session on the other replica, replays
   prompt + tokens as one prefill). Beside it: the median decode step of the same session and
   the time to the first token of a fresh session of prompt + kill-at tokens (the replay's size),
   taken once the replacement replica is up.

    python tools/bench_fleet.py                               # SmolLM2-135M, 16 sessions
    python tools/bench_fleet.py --model synthetic:tiny-llama --tokens 16 --repeats 1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def prompt_ids(vocab: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g)


def aggregate(address: str, model: Any, layer: int, sessions: int, tokens: int,
              prompt_len: int) -> tuple[float, int]:
    """(tokens/s over all sessions, tokens generated)."""
    from fc_edge.runtime.client import DeviceClient

    vocab = int(model.config.vocab_size)
    jobs = [prompt_ids(vocab, prompt_len, seed) for seed in range(sessions)]
    counts = [0] * sessions
    errors: list[BaseException] = []
    start = threading.Barrier(sessions + 1)

    def run(i: int) -> None:
        try:
            with DeviceClient(address, model, layer, "identity", max_recoveries=0) as client:
                start.wait()
                counts[i] = len(client.generate(jobs[i], tokens, eos_token_id=None).token_ids)
        except BaseException as e:  # noqa: BLE001 - reported after the run
            errors.append(e)
            start.abort()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(sessions)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return sum(counts) / wall, sum(counts)


@contextlib.contextmanager
def plain_server(model: str, layer: int, limits: dict[str, int]) -> Iterator[str]:
    """``fc-edge serve`` in a subprocess with one torch thread; yields its address."""
    cmd = [sys.executable, "-m", "fc_edge.cli", "serve", "--model", model, "--split-layer",
           str(layer), "--port", "0", "--log-level", "WARNING"]
    for key, value in limits.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        lines = []
        for line in proc.stdout or ():
            lines.append(line)
            m = re.match(r"fc-edge serve: .* on (\S+:\d+)", line)
            if m:
                yield m.group(1)
                return
        raise RuntimeError("the plain server did not start:\n" + "".join(lines))
    finally:
        proc.terminate()
        proc.wait(60)


def throughput(args: argparse.Namespace, model: Any, layer: int) -> list[dict[str, Any]]:
    """The plain server, then 1 and 2 replicas on Ray Serve (all on ``args.port``)."""
    from fc_edge.runtime.fleet import start_fleet

    rows = []

    def measure(name: str, address: str) -> None:
        aggregate(address, model, layer, 2, 4, args.prompt_len)  # warm-up, both sides
        runs = [aggregate(address, model, layer, args.sessions, args.tokens,
                          args.prompt_len)[0] for _ in range(args.repeats)]
        rows.append({"config": name, "tokens_per_s": statistics.median(runs), "runs": runs})
        print(f"  {name}: {statistics.median(runs):.1f} tokens/s "
              f"(runs: {', '.join(f'{r:.1f}' for r in runs)})", flush=True)

    # a KV cache for these sessions only (the default, 16 x 4096 positions, is GBs per replica)
    limits = {"max_sessions": args.sessions, "max_seq_len": args.prompt_len + args.tokens + 16}
    # the plain server in its own process with one torch thread, as each Ray replica has (Ray
    # sets OMP_NUM_THREADS to the replica's one CPU): the same footing, and not in this
    # process, whose 16 client threads would share its interpreter
    with plain_server(args.model, layer, limits) as address:
        measure("plain server (no Ray)", address)
    for replicas in (1, 2):
        # Serve keeps the gRPC port it started with across deployments: always args.port
        fleet = start_fleet(args.model, layer, replicas=replicas, port=args.port,
                            replica_cpus=1, **limits)
        try:
            measure(f"Ray Serve, {replicas} replica(s)", fleet.address)
        finally:
            fleet.stop()
    return rows


def recovery(args: argparse.Namespace, model: Any, layer: int) -> list[dict[str, Any]]:
    """Kill the replica of one session after ``args.kill_at`` tokens, per prompt length."""
    import ray

    from fc_edge.runtime.client import DeviceClient
    from fc_edge.runtime.fleet import start_fleet

    vocab = int(model.config.vocab_size)
    k = args.kill_at
    rows = []
    fleet = start_fleet(args.model, layer, replicas=2, port=args.port, replica_cpus=0,
                        max_sessions=4, max_seq_len=max(args.lengths) + args.tokens + 8)
    try:
        with DeviceClient(fleet.address, model, layer, "identity") as client:
            client.generate(prompt_ids(vocab, 8, 0), 4, eos_token_id=None)  # warm-up
            for length in args.lengths:
                for rep in range(args.repeats):
                    fleet.wait_ready(2, timeout_s=120)  # the replacement of the last kill
                    ids = prompt_ids(vocab, length, 100 + rep)
                    arrived: dict[int, float] = {}
                    killed_at: list[float] = []

                    def on_token(i: int, token: int, session: str,
                                 arrived: dict[int, float] = arrived,
                                 killed_at: list[float] = killed_at) -> None:
                        arrived[i] = time.perf_counter()
                        if i == k - 1:
                            actor = fleet.replicas()[session.split("/")[0]]
                            killed_at.append(time.perf_counter())
                            ray.kill(actor, no_restart=True)  # as a crash would

                    result = client.generate(ids, args.tokens, eos_token_id=None,
                                             on_token=on_token)
                    assert result.recoveries == 1, "the session did not recover once"
                    fleet.wait_ready(2, timeout_s=120)  # not while a replacement loads
                    fresh = client.generate(torch.cat([ids, torch.tensor(
                        result.token_ids[:k])]), 1, eos_token_id=None)
                    row = {"prompt_len": length, "replayed_rows": result.steps[k].rows,
                           "recovery_s": arrived[k] - killed_at[0],
                           "decode_step_s": result.tpot_s, "fresh_ttft_s": fresh.ttft_s}
                    rows.append(row)
                    print(f"  prompt {length}: kill -> next token "
                          f"{row['recovery_s'] * 1e3:.0f} ms (replayed {row['replayed_rows']} "
                          f"rows; fresh prefill of that size {row['fresh_ttft_s'] * 1e3:.0f} "
                          f"ms; decode step {row['decode_step_s'] * 1e3:.1f} ms)", flush=True)
    finally:
        fleet.stop()
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--split-layer", type=int, default=None)
    p.add_argument("--sessions", type=int, default=16)
    p.add_argument("--tokens", type=int, default=32, help="new tokens per session")
    p.add_argument("--prompt-len", type=int, default=16, help="prompt tokens (throughput)")
    p.add_argument("--repeats", type=int, default=3, help="runs per configuration / length")
    p.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")],
                   default=[16, 128, 512], help="prompt lengths of the recovery runs")
    p.add_argument("--kill-at", type=int, default=8, help="tokens before the replica is killed")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    p.add_argument("--skip", choices=("throughput", "recovery"), default=None)
    args = p.parse_args(argv)
    args.port = free_port()

    import ray

    from fc_edge.models.pretrained import load_model
    from fc_edge.runtime.server import default_split_layer
    from fc_edge.runtime.timing import format_table

    torch.set_num_threads(1)  # the clients: one thread each, as on a device
    model = load_model(args.model)[0]
    layer = args.split_layer if args.split_layer is not None else default_split_layer(model)
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    cores = os.cpu_count()
    print(f"{args.model}, split {layer}, identity codec, {cores} CPU cores, Ray "
          f"{ray.__version__}", flush=True)
    out: dict[str, Any] = {"model": args.model, "split_layer": layer, "cores": cores,
                           "sessions": args.sessions, "tokens": args.tokens}
    try:
        if args.skip != "throughput":
            print(f"throughput: {args.sessions} sessions x {args.tokens} tokens", flush=True)
            out["throughput"] = throughput(args, model, layer)
        if args.skip != "recovery":
            print(f"recovery: kill the session's replica after {args.kill_at} tokens",
                  flush=True)
            out["recovery"] = recovery(args, model, layer)
    finally:
        ray.shutdown()

    if "throughput" in out:
        rows = out["throughput"]
        one = next(r["tokens_per_s"] for r in rows if r["config"].endswith("1 replica(s)"))
        print("\n" + format_table(
            ["configuration", "tokens/s (median)", "runs", "vs 1 replica"],
            [[r["config"], f"{r['tokens_per_s']:.1f}",
              " ".join(f"{x:.1f}" for x in r["runs"]), f"{r['tokens_per_s'] / one:.2f}x"]
             for r in rows]))
    if "recovery" in out:
        table = []
        for length in args.lengths:
            rs = [r for r in out["recovery"] if r["prompt_len"] == length]
            rec = sorted(r["recovery_s"] * 1e3 for r in rs)
            table.append([length, rs[0]["replayed_rows"], f"{statistics.median(rec):.0f}",
                          f"{rec[0]:.0f}..{rec[-1]:.0f}", len(rs),
                          f"{statistics.median(r['fresh_ttft_s'] for r in rs) * 1e3:.0f}",
                          f"{statistics.median(r['decode_step_s'] for r in rs) * 1e3:.1f}"])
        print("\n" + format_table(
            ["prompt", "replayed rows", "kill->token ms (median)", "range", "n",
             "fresh prefill ms", "decode step ms"], table))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
