"""The serving engine: one loop owns the tail and batches the steps of every session.

Sessions submit steps (an ``(S, D)`` activation each) from any thread and get a future. Each
iteration the loop

1. takes the waiting one-row steps (decode steps) of up to ``max_batch`` sessions, oldest
   first, and shares the rest of a budget of ``prefill_chunk`` rows (at least a quarter of it)
   among the waiting prefills in **equal slices**, newcomers first (a prefill under way keeps a
   sixteenth of the chunk while a newcomer waits: a short prompt is not queued behind a long
   one);
2. gives each the KV blocks its new positions need, taken as positions grow (nothing is
   reserved at :meth:`BatchEngine.open`), **preempting** when the pool runs out (below);
3. runs all of it as **one packed forward** of the tail (decode rows and prefill chunks
   together; :meth:`fc_edge.models.tail.Tail.forward_packed`), or the decode-only step as a
   static-shape graph (``cuda_graphs``);
4. samples every finished step at once (one host synchronisation) with each session's own
   sampler.

**Failure isolation.** Whatever one session sends ends that session alone: an activation that is
not finite at the tail's dtype is refused (:meth:`BatchEngine.prepare`), logits that are not
finite fail that step with :class:`NonFiniteError`, sampling cannot raise for finite logits
(:mod:`fc_edge.runtime.sampling`), and a forward that raises is retried one session at a time so
that only the session that fails alone gets the error. Planning and settling never raise on a
session's state (a session in an unexpected state is dropped from the queue and logged). If
the loop thread dies anyway, every waiting step fails at once with :class:`EngineDead` and the
``on_death`` callbacks run (the server turns its health NOT_SERVING and ``fc-edge serve``
exits non-zero).

**Preemption.** When a session's next positions need blocks and none are free, the engine
frees the blocks of another session and recomputes its keys and values later from the
activations it keeps (the rows each session sent; a few percent of the KV they stand for):
first a session idle for more than :data:`IDLE_EVICT_S` (waiting on its client; the longest idle
first), else the newest session that holds blocks and is newer than the one asking (vLLM's
recompute policy). The oldest session therefore always progresses; a preempted session's next
step replays its rows as a prefill, with the same sampler state, so its tokens are the ones it
would have had. ``max_batch=1`` serves one decode step per iteration: the one-at-a-time baseline
of ``tools/bench_server.py``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fc_edge.errors import ConfigError, FcEdgeError, NonFiniteError
from fc_edge.models.tail import DecodeGraphs, PagedKVCache, Segment, Tail
from fc_edge.runtime.sampling import Sampler, SamplingConfig, sample_batch

log = logging.getLogger("fc_edge.engine")

DEFAULT_MAX_BATCH = 32
DEFAULT_PREFILL_CHUNK = 256
#: A session without a step waiting for this long (its client is silent or slow) is the first to
#: lose its KV blocks when the pool runs out.
IDLE_EVICT_S = 1.0
#: Before an iteration, wait for the sessions that just got a token to send their next step: as
#: long as one arrives every BATCH_GAP_S, up to this fraction of the last iteration's time and
#: at most MAX_BATCH_WAIT_S (see BatchEngine._gather_batch).
BATCH_WAIT = 0.3
BATCH_GAP_S = 0.015
MAX_BATCH_WAIT_S = 0.1


class EngineError(FcEdgeError):
    """A step the engine could not run (the subclass says why)."""


class TailError(EngineError):
    """The tail's forward raised for this session (a bug or an out-of-memory: logged)."""


class EngineStopped(EngineError):
    """The engine is stopping or stopped."""


class EngineDead(EngineStopped):
    """The engine loop died; nothing more runs in this process."""


@dataclass(frozen=True)
class StepResult:
    """A step's outcome: the sampled token and the seconds its forward(s) took (shared by the
    batch), with the rows of its last forward's decode batch."""

    token: int
    compute_s: float
    batch: int


@dataclass(eq=False)
class _Step:
    x: Tensor  # (S, D) on the host, the tail's dtype
    future: Future
    done_rows: int = 0
    compute_s: float = 0.0


@dataclass(eq=False)
class EngineSession:
    """A sequence on the engine: its KV blocks, positions, activations kept for recomputation,
    sampler and the step in flight."""

    id: str
    max_seq_len: int
    sampler: Sampler
    order: int  # admission number: lower is older
    blocks: list[int] = field(default_factory=list)
    position: int = 0  # positions whose keys and values are in ``blocks``
    length: int = 0  # positions sent so far (processed or waiting)
    rows: list[Tensor] = field(default_factory=list)  # the activations of positions 0..position-1
    replay: Tensor | None = None  # rows to recompute before the next step (after a preemption)
    step: _Step | None = None
    running: bool = False  # its step is in the loop's current iteration
    closed: bool = False
    tokens: int = 0
    preemptions: int = 0
    last_active: float = field(default_factory=time.monotonic)
    expected: bool = True  # a next step will follow its token (the server clears it when done)


@dataclass(frozen=True)
class EngineStats:
    """What :meth:`BatchEngine.stats` reports: sessions, steps waiting (not yet started), KV
    blocks free / in all, the mean rows of the last 64 decode batches, iterations, preemptions,
    tokens sampled, whether the loop runs."""

    sessions: int
    queued_steps: int
    free_blocks: int
    total_blocks: int
    mean_decode_batch: float
    iterations: int
    preemptions: int
    tokens: int
    alive: bool


@dataclass
class _Planned:
    session: EngineSession
    rows: int
    x: Tensor  # the rows this iteration processes, host
    finishes: bool  # the step's last rows: sample a token


class BatchEngine:
    """Continuous batching over one :class:`Tail` (see the module doc). Thread-safe.

    ``kv_blocks`` blocks of ``block_size`` positions make the KV pool (at least one
    ``max_seq_len`` session's worth). ``on_iteration(decode_rows, prefill_rows, seconds)`` and
    ``on_preempt()`` are called from the loop thread (metrics); ``on_death(error)`` once if the
    loop dies. ``cuda_graphs`` runs decode-only steps as static-shape CUDA graphs on a GPU (the
    padded eager step elsewhere; :class:`~fc_edge.models.tail.DecodeGraphs`).
    """

    def __init__(self, tail: Tail, *, max_seq_len: int, kv_blocks: int,
                 max_batch: int = DEFAULT_MAX_BATCH, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                 block_size: int = 16, cuda_graphs: bool = False,
                 on_iteration: Callable[[int, int, float], None] | None = None,
                 on_preempt: Callable[[], None] | None = None) -> None:
        for name, value in (("max_batch", max_batch), ("prefill_chunk", prefill_chunk),
                            ("max_seq_len", max_seq_len), ("kv_blocks", kv_blocks)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        need = -(-max_seq_len // block_size)
        if kv_blocks < need:
            raise ConfigError(f"a KV pool of {kv_blocks} blocks of {block_size} positions cannot "
                              f"hold one session of max_seq_len {max_seq_len} ({need} blocks)")
        self.tail = tail
        self.max_seq_len = max_seq_len
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.cache: PagedKVCache = tail.new_cache(kv_blocks + 1, block_size)
        self.graphs = DecodeGraphs(tail, self.cache, max_blocks=need) if cuda_graphs else None
        self.on_iteration = on_iteration
        self.on_preempt = on_preempt
        self._death_callbacks: list[Callable[[BaseException], None]] = []
        self._sessions: set[EngineSession] = set()
        self._waiting: dict[EngineSession, None] = {}  # sessions with a step waiting, FIFO
        self._cv = threading.Condition()
        self._stopping = False
        self._dead: BaseException | None = None
        self._batches: deque[int] = deque(maxlen=64)
        self._iterations = 0
        self._preemptions = 0
        self._tokens = 0
        self._admitted = 0
        self._fresh: list[int] = []  # blocks handed out by this iteration's plan, to zero
        self._expected: set[EngineSession] = set()  # sessions whose next step is on its way
        self._last_iteration_s = 0.0
        self._thread = threading.Thread(target=self._run_loop, name="fc-edge-engine",
                                         daemon=True)
        self._thread.start()

    # --- sessions -----------------------------------------------------------------------------
    def open(self, session_id: str, max_seq_len: int, sampling: SamplingConfig) -> EngineSession:
        """A session of up to ``max_seq_len`` positions. It holds no KV block until its first
        step runs; raises ConfigError (over the engine's ``max_seq_len``) or EngineStopped."""
        if not 1 <= max_seq_len <= self.max_seq_len:
            raise ConfigError(f"a session may hold 1..{self.max_seq_len} positions, "
                              f"asked for {max_seq_len}")
        sampler = Sampler(sampling, self.tail.device)
        with self._cv:
            self._check_running()
            self._admitted += 1
            session = EngineSession(session_id, max_seq_len, sampler, self._admitted)
            self._sessions.add(session)
        return session

    def close(self, session: EngineSession) -> None:
        """Free the session's blocks now, or after its step in flight."""
        with self._cv:
            session.closed = True
            if session.running:
                return  # the loop frees it after this iteration
            self._waiting.pop(session, None)
            if session.step is not None:
                session.step.future.cancel()
                session.step = None
            self._free(session)

    def _free(self, session: EngineSession) -> None:
        if session in self._sessions:
            self._sessions.discard(session)
            self.cache.release(session.blocks)
            session.blocks = []
            session.rows = []
            session.replay = None

    def prepare(self, x: Tensor) -> Tensor:
        """An activation ``x`` (S, D) as the engine keeps it: on the host in the tail's dtype.
        Raises ConfigError for a wrong shape and :class:`NonFiniteError` for values that are not
        finite **at the tail's dtype** (a float32 3.4e38 is infinite in bfloat16). Call it off
        the event loop (a prefill takes a while)."""
        d = self.tail.hidden_size
        if x.ndim != 2 or x.shape[1] != d or x.shape[0] < 1:
            raise ConfigError(f"a step takes an (S >= 1, {d}) activation, got {tuple(x.shape)}")
        x = x.detach().to(device="cpu", dtype=self.tail.dtype)
        if not bool(torch.isfinite(x).all()):
            raise NonFiniteError(f"the activation is not finite at the tail's dtype "
                                 f"({str(self.tail.dtype).removeprefix('torch.')})")
        return x

    def submit(self, session: EngineSession, x: Tensor) -> Future:
        """Queue the next step of ``session``: ``x`` (S, D), from :meth:`prepare`, for positions
        ``length .. length + S - 1``. The future resolves to a :class:`StepResult` or raises an
        :class:`EngineError` (or ConfigError for a closed session)."""
        if x.ndim != 2 or x.shape[1] != self.tail.hidden_size or x.shape[0] < 1:
            raise ConfigError(f"a step takes an (S >= 1, {self.tail.hidden_size}) activation, "
                              f"got {tuple(x.shape)}")
        future: Future = Future()
        with self._cv:
            self._check_running()
            if session.closed:
                raise ConfigError("the session is closed")
            if session.step is not None:
                raise ConfigError("the session has a step in flight")
            rows = x.shape[0]
            if session.length + rows > session.max_seq_len:
                raise ConfigError(f"{rows} more positions exceed the session's "
                                  f"{session.max_seq_len}")
            if session.replay is not None:  # preempted while idle: recompute first
                x = torch.cat([session.replay, x])
                session.replay = None
            session.length += rows
            session.step = _Step(x, future)
            session.last_active = time.monotonic()
            self._waiting[session] = None
            self._cv.notify()
        return future

    def on_death(self, callback: Callable[[BaseException], None]) -> None:
        """Call ``callback(error)`` (from the loop thread) if the loop dies; at once if it has."""
        with self._cv:
            dead = self._dead
            if dead is None:
                self._death_callbacks.append(callback)
        if dead is not None:
            callback(dead)

    def alive(self) -> bool:
        """Whether the loop thread runs."""
        return self._thread.is_alive() and self._dead is None

    def stats(self) -> EngineStats:
        with self._cv:
            batches = list(self._batches)
            return EngineStats(
                sessions=len(self._sessions), queued_steps=len(self._waiting),
                free_blocks=self.cache.free_blocks, total_blocks=self.cache.num_blocks - 1,
                mean_decode_batch=sum(batches) / len(batches) if batches else 0.0,
                iterations=self._iterations, preemptions=self._preemptions,
                tokens=self._tokens, alive=self.alive())

    def stop(self) -> None:
        """Stop the loop; waiting steps fail with :class:`EngineStopped`."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)

    def _check_running(self) -> None:
        if self._dead is not None:
            raise EngineDead(f"the engine loop died ({type(self._dead).__name__}: "
                             f"{self._dead}); open the session on another server")
        if self._stopping:
            raise EngineStopped("the server is shutting down")

    # --- planning (under the lock; never raises on a session's state) --------------------------
    def _plan(self) -> list[_Planned]:
        """This iteration's work: decode rows (oldest first, up to max_batch) and prefill slices,
        each with its KV blocks; the planned sessions leave the queue."""
        decode: list[EngineSession] = []
        prefill: list[EngineSession] = []
        for s in list(self._waiting):
            step = s.step
            if step is None or s.closed or s.running:
                log.error("session %s was queued without a step to run; dropped", s.id)
                self._waiting.pop(s, None)
                continue
            left = step.x.shape[0] - step.done_rows
            if left == 1:
                if len(decode) < self.max_batch:
                    decode.append(s)
            elif left > 1:
                prefill.append(s)
        takes = {s: 1 for s in decode}
        if prefill:
            # the iteration's rows: decode rows first, prefill rows fill the rest of the chunk
            # (at least a quarter of it, so prefills always progress; Sarathi-Serve's budget)
            budget = max(self.prefill_chunk - len(decode), self.prefill_chunk // 4, 1)
            # no slice is smaller than a sixteenth of the chunk: a peer sending two-row steps
            # must not throttle a long prompt to two rows per iteration
            floor = max(1, self.prefill_chunk // 16)
            fresh = [s for s in prefill if s.step.done_rows == 0]
            if fresh and len(fresh) < len(prefill):
                # newcomers beside prefills under way: those under way keep the floor, the
                # newcomers share the rest (a newcomer's first token then waits for the
                # iteration under way and one about its own size, not for a long prompt)
                for s in prefill:
                    if s not in fresh and budget > 0:
                        takes[s] = min(floor, s.step.x.shape[0] - s.step.done_rows, budget)
                        budget -= takes[s]
                prefill = fresh
            # equal slices: as many rows as the shortest has left, at most an equal share
            share = max(1, budget // len(prefill))
            shortest = min(s.step.x.shape[0] - s.step.done_rows for s in prefill)
            quantum = min(share, max(shortest, floor))
            for s in prefill:
                if budget <= 0:
                    break
                take = min(quantum, s.step.x.shape[0] - s.step.done_rows, budget)
                takes[s] = take
                budget -= take
        planned: list[_Planned] = []
        granted: set[EngineSession] = set()
        for s in sorted(takes, key=lambda s: s.order):  # KV: the oldest first
            rows = takes[s]
            if not self._grow(s, s.position + rows, granted):
                continue  # not this iteration: the pool is held by older, busy sessions
            granted.add(s)
            step = s.step
            x = step.x[step.done_rows : step.done_rows + rows]
            planned.append(_Planned(s, rows, x, step.done_rows + rows == step.x.shape[0]))
        for p in planned:
            self._waiting.pop(p.session, None)
            p.session.running = True
        # decode rows first (one attention group), then the prefill slices
        planned.sort(key=lambda p: p.rows != 1)
        return planned

    def _grow(self, s: EngineSession, positions: int, granted: set[EngineSession]) -> bool:
        """Give ``s`` the blocks of ``positions`` positions, preempting others if need be."""
        need = self.cache.blocks_for(positions) - len(s.blocks)
        if need <= 0:
            return True
        while self.cache.free_blocks < need:
            victim = self._victim(s, granted)
            if victim is None:
                return False
            self._preempt(victim)
        s.blocks.extend(self.cache.allocate(need, zero=False))
        self._fresh.extend(s.blocks[-need:])
        return True

    def _victim(self, s: EngineSession, granted: set[EngineSession]) -> EngineSession | None:
        now = time.monotonic()
        holders = [v for v in self._sessions
                   if v.blocks and v is not s and v not in granted and not v.running]
        idle = [v for v in holders if v.step is None and now - v.last_active > IDLE_EVICT_S]
        if idle:
            return min(idle, key=lambda v: v.last_active)
        newer = [v for v in holders if v.order > s.order]
        return max(newer, key=lambda v: v.order) if newer else None

    def _preempt(self, v: EngineSession) -> None:
        """Free ``v``'s blocks; its kept rows are recomputed before its next token."""
        self.cache.release(v.blocks)
        v.blocks = []
        held = v.position
        rows, v.rows, v.position = v.rows, [], 0
        if v.step is not None:
            rest = v.step.x[v.step.done_rows :]
            v.step.x = torch.cat([*rows, rest]) if rows else rest
            v.step.done_rows = 0
        elif rows:
            v.replay = torch.cat(rows)
        v.preemptions += 1
        self._preemptions += 1
        log.info("session %s preempted (KV pool full): %d positions to recompute", v.id, held)
        if self.on_preempt is not None:
            try:
                self.on_preempt()
            except Exception:  # noqa: BLE001 - metrics never stop the engine
                log.exception("on_preempt failed")

    # --- the loop -----------------------------------------------------------------------------
    def _run_loop(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # noqa: BLE001 - the loop's death is reported, not raised
            self._die(e)

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cv:
                while not self._waiting and not self._stopping:
                    self._cv.wait()
                self._gather_batch()
                if self._stopping:
                    self._fail_waiting(EngineStopped("the server is shutting down"))
                    return
                self._fresh = []
                planned = self._plan()
                if not planned:
                    # every waiting step needs blocks held by older, busy sessions: wait for one
                    self._cv.wait(0.005)
                    continue
                self._iterations += 1
                decode_rows = sum(p.rows == 1 for p in planned)
                if decode_rows:
                    self._batches.append(decode_rows)
            t0 = time.perf_counter()
            outcomes = self._execute(planned)
            seconds = time.perf_counter() - t0
            self._last_iteration_s = seconds
            self._settle(planned, outcomes, seconds)
            if self.on_iteration is not None:
                try:
                    self.on_iteration(decode_rows, sum(p.rows for p in planned) - decode_rows,
                                      seconds)
                except Exception:  # noqa: BLE001 - metrics never stop the engine
                    log.exception("on_iteration failed")

    def _gather_batch(self) -> None:
        """Under the lock, with a step waiting: give the sessions that just got their token a
        moment to send their next step, so that a round of decode steps runs as one batch instead
        of splitting into the early and the late (a forward costs nearly as much for 2 rows as
        for 16 on a CPU). The wait ends when they are all back, when none has come for
        :data:`BATCH_GAP_S`, or after :data:`BATCH_WAIT` of the last iteration's time (never
        more than :data:`MAX_BATCH_WAIT_S`)."""
        if not self._expected:
            return
        now = time.monotonic()
        deadline = now + min(BATCH_WAIT * self._last_iteration_s, MAX_BATCH_WAIT_S)
        arrived = len(self._waiting)
        while not self._stopping:
            self._expected = {s for s in self._expected
                              if s.step is None and not s.closed and s.expected}
            left = deadline - time.monotonic()
            if not self._expected or len(self._waiting) >= self.max_batch or left <= 0:
                break
            self._cv.wait(min(left, BATCH_GAP_S))
            if len(self._waiting) == arrived:
                break  # nobody came within the gap: the rest are slow
            arrived = len(self._waiting)
        self._expected = set()

    def _execute(self, planned: list[_Planned]) -> dict[EngineSession, int | BaseException]:
        """Run ``planned`` as one forward and sample; on a failure, each session alone."""
        with torch.inference_mode():
            self.cache.zero(self._fresh)
            try:
                return self._forward(planned)
            except Exception as e:  # noqa: BLE001 - isolate below
                if len(planned) == 1:
                    log.exception("the tail failed for session %s", planned[0].session.id)
                    return {planned[0].session: TailError(f"the tail failed: {e}")}
                log.warning("a batch of %d sessions failed (%s: %s); running each alone",
                            len(planned), type(e).__name__, e)
            outcomes: dict[EngineSession, int | BaseException] = {}
            for p in planned:
                try:
                    outcomes.update(self._forward([p]))
                except Exception as e:  # noqa: BLE001 - this session alone fails
                    log.exception("the tail failed for session %s", p.session.id)
                    outcomes[p.session] = TailError(f"the tail failed: {e}")
            return outcomes

    def _forward(self, planned: list[_Planned]) -> dict[EngineSession, int | BaseException]:
        segments = [Segment(p.session.position, p.rows, p.session.blocks) for p in planned]
        x = torch.cat([p.x for p in planned]) if len(planned) > 1 else planned[0].x
        x = self.cache.stage(x)
        logits = None
        if self.graphs is not None and all(p.rows == 1 for p in planned):
            logits = self.graphs.run(x, segments)
        if logits is None:
            logits = self.tail.forward_packed(x, self.cache.plan(segments), self.cache)
        finishing = [i for i, p in enumerate(planned) if p.finishes]
        outcomes: dict[EngineSession, int | BaseException] = {p.session: -1 for p in planned}
        if finishing:
            rows = logits if len(finishing) == len(planned) else logits[finishing]
            tokens = sample_batch(rows, [planned[i].session.sampler for i in finishing])
            for i, token in zip(finishing, tokens):
                outcomes[planned[i].session] = token if token is not None else NonFiniteError(
                    "the tail's output is not finite: the activation overflows the tail's "
                    f"dtype ({str(self.tail.dtype).removeprefix('torch.')})")
        return outcomes

    def _settle(self, planned: list[_Planned], outcomes: dict[EngineSession, int | BaseException],
                seconds: float) -> None:
        """Advance each planned session, resolve finished steps, requeue unfinished ones."""
        resolved: list[tuple[Future, StepResult | BaseException]] = []
        decode_rows = sum(p.rows == 1 for p in planned)
        with self._cv:
            for p in planned:
                s = p.session
                try:
                    step = s.step
                    s.running = False
                    if step is None:
                        continue
                    outcome = outcomes.get(s, EngineError("the step was lost"))
                    if isinstance(outcome, BaseException):
                        s.step = None
                        s.length -= step.x.shape[0] - step.done_rows  # never processed
                        resolved.append((step.future, outcome))
                    else:
                        s.position += p.rows
                        s.rows.append(p.x)
                        step.done_rows += p.rows
                        step.compute_s += seconds
                        if p.finishes:
                            s.step = None
                            s.tokens += 1
                            self._tokens += 1
                            s.last_active = time.monotonic()
                            if s.expected:
                                self._expected.add(s)  # its next step is on its way
                            resolved.append((step.future, StepResult(
                                outcome, step.compute_s, decode_rows if p.rows == 1 else 1)))
                        elif not s.closed:
                            self._waiting[s] = None
                    if s.closed:
                        self._waiting.pop(s, None)
                        if s.step is not None:
                            s.step.future.cancel()
                            s.step = None
                        self._free(s)
                except Exception:  # noqa: BLE001 - one session's state never stops the loop
                    log.exception("settling session %s failed; it is dropped", s.id)
                    self._waiting.pop(s, None)
                    if s.step is not None:
                        resolved.append((s.step.future, EngineError("internal error")))
                        s.step = None
        for future, outcome in resolved:
            if not future.set_running_or_notify_cancel():
                continue
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

    def _fail_waiting(self, error: BaseException) -> None:
        """Under the lock: fail every step waiting or in flight."""
        for s in list(self._sessions):
            step, s.step = s.step, None
            if step is not None and step.future.set_running_or_notify_cancel():
                step.future.set_exception(error)
        self._waiting.clear()

    def _die(self, error: BaseException) -> None:
        log.critical("the engine loop died: %s: %s", type(error).__name__, error,
                     exc_info=error)
        dead = EngineDead(f"the engine loop died ({type(error).__name__}: {error}); open the "
                          "session on another server")
        with self._cv:
            self._dead = error
            self._fail_waiting(dead)
            callbacks, self._death_callbacks = self._death_callbacks, []
        for callback in callbacks:
            try:
                callback(error)
            except Exception:  # noqa: BLE001
                log.exception("an on_death callback failed")
