"""The serving engine: one loop owns the tail and batches the steps of every session.

Sessions submit steps (an ``(S, D)`` activation each) from any thread and get a future. Each
iteration the loop

1. runs the waiting one-row steps (decode steps) of up to ``max_batch`` sessions as **one**
   batched forward of the tail: rows of different lengths, each over its own blocks of the
   paged KV cache, at its own position;
2. advances waiting prefills by chunks, at most ``prefill_chunk`` rows in all per iteration (the
   oldest first), so a long prompt delays the decode steps of the others by one chunk, not by
   the whole prompt;
3. samples each finished step's token with the session's own sampler (settings and seed).

A session's positions are reserved at :meth:`BatchEngine.open` (its ``max_seq_len`` in KV
blocks), so a running session never meets a full cache; an open that does not fit raises
:class:`~fc_edge.models.tail.CacheFullError`. ``max_batch=1`` serves one decode step per
iteration: the one-at-a-time baseline of ``tools/bench_server.py``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fc_edge.errors import ConfigError
from fc_edge.models.tail import PagedKVCache, Tail
from fc_edge.runtime.sampling import Sampler, SamplingConfig

log = logging.getLogger("fc_edge.engine")

DEFAULT_MAX_BATCH = 32
DEFAULT_PREFILL_CHUNK = 256


@dataclass(frozen=True)
class StepResult:
    """A step's outcome: the sampled token and the seconds its forward(s) took (shared by the
    batch), with the batch size of its last forward."""

    token: int
    compute_s: float
    batch: int


@dataclass
class _Step:
    x: Tensor  # (S, D) on the tail's device and dtype
    future: Future
    done_rows: int = 0
    compute_s: float = 0.0


@dataclass
class EngineSession:
    """A sequence on the engine: its KV blocks, next position and sampler."""

    id: str
    max_seq_len: int
    sampler: Sampler
    blocks: list[int]
    position: int = 0
    step: _Step | None = None
    running: bool = False  # its step is in the loop's current iteration
    closed: bool = False
    tokens: int = 0
    opened_at: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class EngineStats:
    """What :meth:`BatchEngine.stats` reports: sessions holding KV blocks, steps waiting (not
    yet started), free KV blocks, the mean rows of the last 64 decode batches, iterations."""

    sessions: int
    queued_steps: int
    free_blocks: int
    total_blocks: int
    mean_decode_batch: float
    iterations: int


class BatchEngine:
    """Continuous batching over one :class:`Tail` (see the module doc). Thread-safe."""

    def __init__(self, tail: Tail, *, max_seq_len: int, kv_blocks: int,
                 max_batch: int = DEFAULT_MAX_BATCH, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                 block_size: int = 16) -> None:
        for name, value in (("max_batch", max_batch), ("prefill_chunk", prefill_chunk),
                            ("max_seq_len", max_seq_len), ("kv_blocks", kv_blocks)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        self.tail = tail
        self.max_seq_len = max_seq_len
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.cache: PagedKVCache = tail.new_cache(kv_blocks + 1, block_size)
        self._sessions: dict[str, EngineSession] = {}
        self._queue: deque[EngineSession] = deque()  # sessions with a step waiting, FIFO
        self._cv = threading.Condition()
        self._stopping = False
        self._batches: deque[int] = deque(maxlen=64)
        self._iterations = 0
        self._thread = threading.Thread(target=self._loop, name="fc-edge-engine", daemon=True)
        self._thread.start()

    # --- sessions -----------------------------------------------------------------------------
    def open(self, session_id: str, max_seq_len: int, sampling: SamplingConfig) -> EngineSession:
        """Reserve KV blocks for ``max_seq_len`` positions; raises CacheFullError or
        ConfigError (over the engine's ``max_seq_len``)."""
        if not 1 <= max_seq_len <= self.max_seq_len:
            raise ConfigError(f"a session may hold 1..{self.max_seq_len} positions, "
                              f"asked for {max_seq_len}")
        sampler = Sampler(sampling)
        with self._cv:
            blocks = self.cache.allocate(self.cache.blocks_for(max_seq_len))
            session = EngineSession(session_id, max_seq_len, sampler, blocks)
            self._sessions[session_id] = session
        return session

    def close(self, session: EngineSession) -> None:
        """Free the session's blocks now, or after its step in flight."""
        with self._cv:
            session.closed = True
            if session.running:
                return  # the loop frees it after this iteration
            if session.step is not None:
                self._queue.remove(session)
                session.step.future.cancel()
                session.step = None
            self._free(session)

    def _free(self, session: EngineSession) -> None:
        if self._sessions.pop(session.id, None) is not None:
            self.cache.release(session.blocks)
            session.blocks = []

    def submit(self, session: EngineSession, x: Tensor) -> Future:
        """Queue the next step of ``session``: ``x`` (S, D) for positions position..+S-1. The
        future resolves to a :class:`StepResult` (or an exception)."""
        if x.ndim != 2 or x.shape[1] != self.tail.hidden_size or x.shape[0] < 1:
            raise ConfigError(f"a step takes an (S >= 1, {self.tail.hidden_size}) activation, "
                              f"got {tuple(x.shape)}")
        future: Future = Future()
        with self._cv:
            if session.closed:
                raise ConfigError("the session is closed")
            if session.step is not None:
                raise ConfigError("the session has a step in flight")
            if session.position + x.shape[0] > session.max_seq_len:
                raise ConfigError(f"{x.shape[0]} more positions exceed the session's "
                                  f"{session.max_seq_len}")
            if self._stopping:
                raise ConfigError("the engine is stopped")
            x = x.to(device=self.tail.device, dtype=self.tail.dtype)
            session.step = _Step(x, future)
            self._queue.append(session)
            self._cv.notify()
        return future

    def alive(self) -> bool:
        """Whether the loop thread runs."""
        return self._thread.is_alive()

    def stats(self) -> EngineStats:
        with self._cv:
            batches = list(self._batches)
            return EngineStats(
                sessions=len(self._sessions), queued_steps=len(self._queue),
                free_blocks=self.cache.free_blocks, total_blocks=self.cache.num_blocks - 1,
                mean_decode_batch=sum(batches) / len(batches) if batches else 0.0,
                iterations=self._iterations)

    def stop(self) -> None:
        """Stop the loop; waiting steps fail with ConfigError."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout=30)

    # --- the loop -----------------------------------------------------------------------------
    def _plan(self) -> tuple[list[EngineSession], list[tuple[EngineSession, int]]]:
        """Under the lock: take this iteration's decode batch and prefill chunks off the queue."""
        decode: list[EngineSession] = []
        prefill: list[tuple[EngineSession, int]] = []
        budget = self.prefill_chunk
        for s in self._queue:
            rows = s.step.x.shape[0] - s.step.done_rows
            if s.step.x.shape[0] == 1:
                if len(decode) < self.max_batch:
                    decode.append(s)
            elif budget > 0:
                take = min(rows, budget)
                prefill.append((s, take))
                budget -= take
        for s in [*decode, *(p for p, _ in prefill)]:
            self._queue.remove(s)
            s.running = True
        return decode, prefill

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cv:
                while not self._queue and not self._stopping:
                    self._cv.wait()
                if self._stopping:
                    for s in self._queue:
                        s.step.future.set_exception(ConfigError("the server is shutting down"))
                    self._queue.clear()
                    return
                decode, prefill = self._plan()
                self._iterations += 1
                if decode:
                    self._batches.append(len(decode))
            try:
                with torch.inference_mode():
                    if decode:
                        self._run_decode(decode)
                    for session, rows in prefill:
                        self._run_prefill(session, rows)
            except Exception as e:  # a tail failure ends the steps it touched, not the loop
                log.exception("the tail failed")
                for s in [*decode, *(p for p, _ in prefill)]:
                    self._finish(s, error=e)
            with self._cv:
                # unfinished prefills go back to the front, in their order (a finished one's
                # session may already have queued its next step: leave that alone)
                for s, _ in reversed(prefill):
                    if s.step is None or not s.running:
                        continue
                    s.running = False
                    if s.closed:
                        s.step.future.cancel()
                        s.step = None
                        self._free(s)
                    else:
                        self._queue.appendleft(s)

    def _run_decode(self, batch: list[EngineSession]) -> None:
        t0 = time.perf_counter()
        x = torch.cat([s.step.x for s in batch])[:, None]  # (B, 1, D)
        positions = torch.tensor([[s.position] for s in batch])
        n_blocks = self.cache.blocks_for(max(s.position for s in batch) + 1)
        table = self.cache.table([s.blocks for s in batch], n_blocks)
        logits = self.tail.forward_paged(x, positions, self.cache, table, last_only=True)
        seconds = time.perf_counter() - t0
        for i, s in enumerate(batch):
            s.position += 1
            s.step.compute_s += seconds
            self._finish(s, logits=logits[i], batch=len(batch))

    def _run_prefill(self, session: EngineSession, rows: int) -> None:
        step = session.step
        t0 = time.perf_counter()
        start = step.done_rows
        x = step.x[start : start + rows][None]
        positions = torch.arange(session.position, session.position + rows)[None]
        table = self.cache.table([session.blocks],
                                 self.cache.blocks_for(session.position + rows))
        logits = self.tail.forward_paged(x, positions, self.cache, table, last_only=True)
        session.position += rows
        step.done_rows += rows
        step.compute_s += time.perf_counter() - t0
        if step.done_rows == step.x.shape[0]:
            self._finish(session, logits=logits[0], batch=1)

    def _finish(self, session: EngineSession, logits: Tensor | None = None, batch: int = 0,
                error: Exception | None = None) -> None:
        step = session.step
        if step is None:
            return
        if error is None:
            t0 = time.perf_counter()
            token = session.sampler(logits)
            result = StepResult(token, step.compute_s + time.perf_counter() - t0, batch)
        with self._cv:
            session.step = None
            session.running = False
            session.tokens += error is None
            if session.closed:
                self._free(session)
        if not step.future.set_running_or_notify_cancel():
            return
        if error is None:
            step.future.set_result(result)
        else:
            step.future.set_exception(error)
