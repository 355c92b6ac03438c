"""Run the real runtime and collect its per-step stage timings.

The edge server runs in a child process (``python -m fc_edge.profile.driver serve``, a thin
wrapper over :func:`fc_edge.runtime.server.start_server` that prints the port it bound); the
device client runs in this process, one :class:`~fc_edge.runtime.client.DeviceClient` per codec
and, for the multi-client check, one per concurrent client thread. Over the shaped link both
run as children inside their network namespaces (``... driver client`` prints its timings).
Both processes use ``threads`` torch threads each (default 1), so that a stage's time is one
core's work: the same basis the multi-client model assumes.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fc_edge.errors import FcEdgeError


class ServerProcessError(FcEdgeError):
    """The edge server child process did not start or died."""


@dataclass
class ServerProcess:
    """A ``start_server`` in a child process, listening on ``127.0.0.1:port``."""

    model: str
    split_layer: int | None
    threads: int = 1
    max_sessions: int = 16
    device: str = "cpu"
    dtype: str = "float32"
    startup_timeout_s: float = 300.0
    host: str = "127.0.0.1"
    prefix: list[str] = field(default_factory=list)  # e.g. ["ip", "netns", "exec", NS]
    proc: subprocess.Popen | None = field(default=None, repr=False)
    port: int = 0
    split: int = 0

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def __enter__(self) -> ServerProcess:
        cmd = [*self.prefix, sys.executable, "-m", "fc_edge.profile.driver", "serve",
               "--model", self.model, "--host", self.host,
               "--threads", str(self.threads), "--max-sessions", str(self.max_sessions),
               "--device", self.device, "--dtype", self.dtype]
        if self.split_layer is not None:
            cmd += ["--split-layer", str(self.split_layer)]
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads)}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env)
        deadline = time.monotonic() + self.startup_timeout_s
        line = ""
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if line.startswith("listening"):
                _, port, split = line.split()
                self.port, self.split = int(port), int(split)
                return self
            if not line and self.proc.poll() is not None:
                break
        err = self.proc.stderr.read() if self.proc.poll() is not None else ""
        self.__exit__()
        tail = err.strip().splitlines()[-1] if err.strip() else "no output"
        raise ServerProcessError(f"the edge server did not start: {tail}")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def make_codec(name: str, kwargs: dict[str, Any]) -> Any:
    """``get_codec(name, **kwargs)`` with the keywords this codec does not take dropped, so one
    set of command-line codec flags can serve a list of different codecs."""
    from fc_edge.codecs import get_codec
    from fc_edge.codecs.base import ALIASES, codec_class

    base = ALIASES[name][0] if name in ALIASES else name
    cls = codec_class(base)  # ConfigError naming the available codecs
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    return get_codec(name, **{k: v for k, v in kwargs.items() if k in accepted})


class DeviceSide:
    """The device's model, split head and fingerprint, built once and shared by every client."""

    def __init__(self, model_spec: str, split_layer: int, threads: int = 1,
                 device: str = "cpu", dtype: str = "float32"):
        import torch

        from fc_edge.devices import resolve_device, resolve_dtype
        from fc_edge.models.pretrained import load_model, model_fingerprint
        from fc_edge.models.split import split

        torch.set_num_threads(threads)
        place = resolve_device(device)
        precision = resolve_dtype(dtype, place)
        self.model, self.tokenizer = load_model(model_spec)
        self.split_layer = split_layer
        self.head, _ = split(self.model, layer=split_layer)
        self.head.to_device(place, precision)
        self.fingerprint = model_fingerprint(self.model)
        self.vocab_size = int(self.model.config.vocab_size)
        self.head_device = str(next(self.head.parameters()).device) \
            if hasattr(self.head, "parameters") else "cpu"

    def client(self, address: str, codec: Any) -> Any:
        from fc_edge.runtime.client import DeviceClient

        return DeviceClient(address, self.model, self.split_layer, codec,
                            tokenizer=self.tokenizer, head=self.head,
                            fingerprint=self.fingerprint)

    def prompt(self, length: int, seed: int) -> list[int]:
        """``length`` token ids drawn with ``seed`` (the same prompt for every codec)."""
        rng = random.Random(seed)
        hi = min(self.vocab_size, 32_000) - 1
        return [rng.randint(10, hi) for _ in range(length)]


def generate(client: Any, prompt: list[int], new_tokens: int) -> Any:
    """One greedy generation of exactly ``new_tokens`` tokens (EOS ignored)."""
    from fc_edge.runtime.sampling import SamplingConfig

    return client.generate(prompt, max_new_tokens=new_tokens, sampling=SamplingConfig(),
                           eos_token_id=None)


def run_concurrent(device: DeviceSide, address: str, codec: Any, n_clients: int,
                   prompt: list[int], new_tokens: int, generations: int) -> dict:
    """``n_clients`` threads, each a client running ``generations`` generations back to back.

    Returns the wall time (s) of every generation and every step timing, per client.
    """
    barrier = threading.Barrier(n_clients)
    walls: list[list[float]] = [[] for _ in range(n_clients)]
    results: list[list[Any]] = [[] for _ in range(n_clients)]
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            client = device.client(address, codec)
            try:
                barrier.wait()
                for _ in range(generations):
                    t0 = time.perf_counter()
                    res = generate(client, prompt, new_tokens)
                    walls[i].append(time.perf_counter() - t0)
                    results[i].append(res)
            finally:
                client.close()
        except BaseException as e:  # noqa: B036 - reported to the caller below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n_clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    makespan = time.perf_counter() - t0
    real = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
    if real:
        raise real[0]
    return {"walls": walls, "results": results, "makespan_s": makespan}


def run_client_process(prefix: list[str], address: str, model: str, split_layer: int,
                       codec: str, codec_kwargs: dict[str, Any], prompt_len: int, seed: int,
                       new_tokens: int, repeats: int, threads: int = 1,
                       timeout_s: float = 600.0) -> dict:
    """Run generations from a client child process (e.g. inside a network namespace).

    Returns ``{"steps": [StepTiming dicts], "setup_s": [s per generation]}``; the first
    generation (a 2-token warm-up) is not included.
    """
    cmd = [*prefix, sys.executable, "-m", "fc_edge.profile.driver", "client",
           "--address", address, "--model", model, "--split-layer", str(split_layer),
           "--codec", codec, "--codec-kwargs", json.dumps(codec_kwargs),
           "--prompt-len", str(prompt_len), "--seed", str(seed), "--new-tokens", str(new_tokens),
           "--repeats", str(repeats), "--threads", str(threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    if p.returncode != 0:
        tail = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else "no output"
        raise ServerProcessError(f"the client process failed: {tail}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def _client(argv: Sequence[str]) -> None:
    p = argparse.ArgumentParser(description="device client child of the profiler (internal)")
    for flag in ("--address", "--model", "--codec"):
        p.add_argument(flag, required=True)
    p.add_argument("--codec-kwargs", default="{}")
    for flag in ("--split-layer", "--prompt-len", "--new-tokens", "--repeats"):
        p.add_argument(flag, type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    device = DeviceSide(a.model, a.split_layer, threads=a.threads)
    client = device.client(a.address, make_codec(a.codec, json.loads(a.codec_kwargs)))
    prompt = device.prompt(a.prompt_len, a.seed)
    steps: list[dict] = []
    setups: list[float] = []
    try:
        generate(client, prompt, 2)  # warm-up: connection, allocations
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            res = generate(client, prompt, a.new_tokens)
            wall = time.perf_counter() - t0
            steps += [s.as_dict() for s in res.steps]
            setups.append(wall - sum(s.total_s for s in res.steps))
    finally:
        client.close()
    print(json.dumps({"steps": steps, "setup_s": setups}), flush=True)


def _serve(argv: Sequence[str]) -> None:
    p = argparse.ArgumentParser(description="edge server child of the profiler (internal)")
    p.add_argument("--model", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--split-layer", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-sessions", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    from fc_edge.runtime.server import start_server

    handle = start_server(a.model, split_layer=a.split_layer, host=a.host, port=0,
                          device=a.device, dtype=a.dtype,
                          max_sessions=a.max_sessions, idle_timeout_s=600.0)
    print(f"listening {handle.port} {handle.split_layer}", flush=True)
    try:
        handle.wait()
    except KeyboardInterrupt:
        handle.stop()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        _serve(sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "client":
        _client(sys.argv[2:])
    else:
        sys.exit("usage: python -m fc_edge.profile.driver serve|client ... (internal)")
