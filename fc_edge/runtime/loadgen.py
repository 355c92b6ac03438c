"""A protocol-level load generator: N concurrent sessions against a server, timed per token.

Each session sends a ``prompt_len``-row prefill and then one row per decode step, as a device
would, but without running a head: the rows are fixed random activations encoded once with the
identity codec (the server's work is the same whatever the values). Used by
``tools/bench_server.py``; the server is best a separate process so that the clients' Python does
not share its interpreter lock.
"""

from __future__ import annotations

import queue
import statistics
import threading
import time
from dataclasses import dataclass

import grpc
import torch

from fc_edge.codecs import get_codec, wire
from fc_edge.errors import FcEdgeError
from fc_edge.runtime.proto import pb2_grpc
from fc_edge.runtime.protocol import activation_frame, close_frame, open_frame


@dataclass(frozen=True)
class LoadResult:
    """One run: ``sessions`` at once, ``tokens`` each; wall seconds of the whole run; the time
    per output token of every decode step of every session (seconds)."""

    sessions: int
    tokens: int
    wall_s: float
    tpot_s: list[float]

    @property
    def tokens_per_s(self) -> float:
        return self.sessions * self.tokens / self.wall_s

    def tpot_percentile(self, q: float) -> float:
        """The ``q``-th percentile (0..100) of the decode-step times, nearest rank."""
        data = sorted(self.tpot_s)
        rank = max(1, min(len(data), round(q / 100 * len(data) + 0.5)))
        return data[rank - 1]

    @property
    def tpot_p50_s(self) -> float:
        return statistics.median(self.tpot_s)


class LoadError(FcEdgeError):
    """A session of the load run failed."""


def run_load(address: str, fingerprint: str, split_layer: int, hidden_size: int, sessions: int,
             tokens: int, prompt_len: int = 32, seed: int = 0,
             token: str | None = None) -> LoadResult:
    """Run ``sessions`` concurrent sessions of ``tokens`` new tokens each (EOS off)."""
    g = torch.Generator().manual_seed(seed)
    identity = get_codec("identity")
    prefill = wire.pack(identity.encode(torch.randn(prompt_len, hidden_size, generator=g)))
    row = wire.pack(identity.encode(torch.randn(1, hidden_size, generator=g)))
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    channel = grpc.insecure_channel(address)
    stub = pb2_grpc.SplitInferenceStub(channel)
    times: list[list[float]] = [[] for _ in range(sessions)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(sessions + 1)

    def one(i: int) -> None:
        outbox: queue.SimpleQueue = queue.SimpleQueue()

        def frames():
            while (frame := outbox.get()) is not None:
                yield frame

        try:
            barrier.wait()
            outbox.put(open_frame(fingerprint, split_layer, "identity",
                                  max_seq_len=prompt_len + tokens, max_new_tokens=tokens))
            call = stub.Generate(frames(), metadata=metadata, timeout=3600)
            next(call)  # Ready
            last = None
            for step in range(tokens):
                outbox.put(activation_frame(step, prefill if step == 0 else row))
                frame = next(call)
                now = time.perf_counter()
                if last is not None:
                    times[i].append(now - last)
                last = now
                if frame.token.done:
                    break
            outbox.put(close_frame())
            outbox.put(None)
            for _ in call:
                pass
        except BaseException as e:  # noqa: BLE001 - reported below
            outbox.put(None)
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(sessions)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    channel.close()
    if errors:
        raise LoadError(f"{len(errors)} of {sessions} sessions failed: {errors[0]}")
    return LoadResult(sessions, tokens, wall, [t for ts in times for t in ts])


def first_token_s(address: str, fingerprint: str, split_layer: int, hidden_size: int,
                  rows: int, seed: int = 0, token: str | None = None) -> float:
    """Seconds from sending a ``rows``-row prefill to receiving its token (one session, EOS
    off; the session is opened before the clock starts)."""
    g = torch.Generator().manual_seed(seed)
    payload = wire.pack(get_codec("identity").encode(torch.randn(rows, hidden_size, generator=g)))
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    outbox: queue.SimpleQueue = queue.SimpleQueue()

    def frames():
        while (frame := outbox.get()) is not None:
            yield frame

    channel = grpc.insecure_channel(address, [("grpc.max_send_message_length", -1)])
    try:
        call = pb2_grpc.SplitInferenceStub(channel).Generate(frames(), metadata=metadata,
                                                              timeout=3600)
        outbox.put(open_frame(fingerprint, split_layer, "identity", max_seq_len=rows + 1,
                              max_new_tokens=1))
        next(call)  # Ready
        t0 = time.perf_counter()
        outbox.put(activation_frame(0, payload))
        next(call)
        seconds = time.perf_counter() - t0
        outbox.put(close_frame())
        outbox.put(None)
        for _ in call:
            pass
        return seconds
    except grpc.RpcError as e:
        outbox.put(None)
        raise LoadError(f"the session failed: {e.code().name}: {e.details()}") from None
    finally:
        channel.close()
