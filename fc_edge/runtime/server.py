"""The edge server: the tail of a split model behind one gRPC stream per generation session.

Two layers:

* :class:`EdgeService` is the transport-free core. It owns the :class:`BatchEngine` (one loop
  that runs every waiting decode step and prefill slice of every session as one packed
  forward), checks each ``Open`` (model fingerprint, split layer, codec, limits, per-peer caps)
  and each ``Activation`` (size, codec and configuration, shape, finite values at the tail's
  dtype), and answers with ``Token`` frames. Its coroutines take an async iterator of
  ``ClientFrame`` and raise :class:`SessionAbort` (a gRPC status) to end a session. The gRPC
  server below and the Ray Serve deployment (``fc_edge.runtime.fleet``) are thin adapters over
  it.
* :func:`start_server` runs it under ``grpc.aio`` on a background event loop, beside the
  standard ``grpc.health.v1.Health`` service (answered without a token), and optionally exports
  Prometheus metrics (``metrics_port``).

What one client can hold is bounded: a stream costs a coroutine, not a thread; one that sends no
valid ``Open`` within ``open_timeout_s`` is ended; streams and sessions are capped in all and per
client address; a session holds KV blocks only for the positions it has sent (taken as they
grow, preempted when the pool runs out); a session that is silent, or that stops reading its
``Token`` frames, is ended at the idle timeout. Protocol, limits and status codes:
docs/protocol.md.

>>> handle = start_server("smollm2-135m", split_layer=1, port=0)
>>> handle.address, handle.active_sessions()
('127.0.0.1:40123', 0)
>>> handle.stop()
"""

from __future__ import annotations

import asyncio
import atexit
import hmac
import json
import logging
import threading
import time
import uuid
import weakref
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import torch

from fc_edge.codecs import Codec, decode, get_codec, wire
from fc_edge.codecs.base import Encoded
from fc_edge.codecs.context import CodecContext
from fc_edge.devices import dtype_name, resolve_device, resolve_dtype
from fc_edge.errors import ConfigError, FcEdgeError, NonFiniteError, WireError
from fc_edge.models.tail import Tail
from fc_edge.runtime.engine import (
    DEFAULT_MAX_BATCH,
    DEFAULT_PREFILL_CHUNK,
    BatchEngine,
    EngineError,
    EngineStopped,
    TailError,
)
from fc_edge.runtime.metrics import ServerMetrics
from fc_edge.runtime.proto import pb2, pb2_grpc
from fc_edge.runtime.protocol import (
    CALIBRATED_CODECS,
    CALIBRATION_HASH,
    FALLBACK_CODEC,
    PROTOCOL_VERSION,
    SERVICE_NAME,
    default_split_layer,
    ready_frame,
    token_frame,
)
from fc_edge.runtime.sampling import SamplingConfig

log = logging.getLogger("fc_edge.server")

__all__ = ["EdgeService", "ServerHandle", "SessionAbort", "SessionCodecs", "start_server",
           "default_split_layer"]

DEFAULT_MAX_SEQ_LEN = 4096
#: The default KV pool holds this many sessions of ``max_seq_len`` positions.
DEFAULT_KV_SESSIONS = 16
DEFAULT_MAX_SESSIONS_PER_PEER = 32
DEFAULT_MAX_STREAMS_PER_PEER = 64
DEFAULT_IDLE_TIMEOUT_S = 60.0
DEFAULT_OPEN_TIMEOUT_S = 10.0
DEFAULT_MAX_STREAMS = 256
DEFAULT_DRAIN_S = 10.0
#: Room for the wire header (magic, dims, parameters, CRC) on top of the values of a payload.
WIRE_HEADER_ALLOWANCE = 4096
#: Payloads up to this size (a decode row of a hidden size up to ~4,000 as float32) are decoded
#: on the event loop; larger ones (prefills) on the decoder threads.
INLINE_DECODE_BYTES = 16 * 1024
#: ``Open.codec.config_json``: at most this many bytes, objects and lists nested this deep.
MAX_CONFIG_JSON_BYTES = 16 * 1024
MAX_CONFIG_DEPTH = 4


def default_prefill_chunk(device: torch.device) -> int:
    """Prefill rows per engine iteration when none is given: 64 on a CPU, where a prefill row
    costs several milliseconds and every row of a chunk delays the decode steps that share its
    iteration (tools/bench_server.py: p99 time per token 1.4x N = 1's at 64, 5x at 256);
    :data:`DEFAULT_PREFILL_CHUNK` (256) on a GPU, where rows are cheap next to the step's fixed
    cost."""
    return DEFAULT_PREFILL_CHUNK if device.type == "cuda" else 64


def default_max_payload_bytes(max_seq_len: int, hidden_size: int) -> int:
    """The largest honest payload: a whole ``max_seq_len`` x D prefill as float32 + a header."""
    return max_seq_len * hidden_size * 4 + WIRE_HEADER_ALLOWANCE


def load_server_model(model_spec_or_model: Any) -> Any:
    """A model object from a spec string, a ``(model, tokenizer)`` pair or a model."""
    if isinstance(model_spec_or_model, (str, Path)):
        from fc_edge.models.pretrained import load_model

        return load_model(str(model_spec_or_model))[0]
    if isinstance(model_spec_or_model, tuple):
        return model_spec_or_model[0]
    return model_spec_or_model


def peer_address(peer: str) -> str:
    """The client's address without its port, the key of the per-peer caps:
    ``ipv4:10.0.0.5:4242`` -> ``10.0.0.5``, ``ipv6:[::1]:4242`` -> ``::1``; other forms (a unix
    socket, Ray's proxy) as they are."""
    from urllib.parse import unquote

    kind, _, rest = unquote(peer).partition(":")
    if kind == "ipv4" and rest:
        return rest.rsplit(":", 1)[0]
    if kind == "ipv6" and rest.startswith("["):
        return rest[1:].split("]", 1)[0]
    return peer


class SessionAbort(FcEdgeError):
    """Ends a session (or refuses a call) with a gRPC status ``code`` and ``details``."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


@dataclass
class SessionCodecs:
    """How one session's payloads are decoded: the codec it opened with (bound to the model's
    codec context, with the calibration artifact its ``Open`` named) and the fp16 fallback.
    The one place a session's codec state lives: made once by
    :meth:`EdgeService.session_codecs` at ``Open``, asked for every payload of the session by
    :meth:`message_context` and :meth:`decode`.

    Per-session decode-side state: ``last_token``, the token the server sampled last for this
    session (:meth:`sampled` after each step). A decode step's row is the head's output for
    that token, so its payload is unpacked and decoded with the context naming it
    (``klt`` predicts the row from it, as the device did when it encoded it)."""

    label: str
    codecs: list[Codec]
    context: CodecContext
    last_token: int | None = None

    def message_context(self) -> CodecContext:
        """The context of the next payload: the session's, with the rows' token at a decode
        step (the last sampled one), none at the prefill."""
        if self.last_token is None:
            return self.context
        return self.context.with_tokens([self.last_token])

    def sampled(self, token: int) -> None:
        """The server sampled ``token``: the next step's row is the head's output for it."""
        self.last_token = int(token)

    def check(self, enc: Encoded) -> None:
        """Raise SessionAbort unless ``enc`` is of this session's codec and configuration."""
        if all(c.name != enc.codec for c in self.codecs):
            raise SessionAbort(grpc.StatusCode.INVALID_ARGUMENT,
                               f"payload codec {enc.codec!r} is not this session's codec "
                               f"({self.label}, or the {FALLBACK_CODEC} fallback)")
        reasons = [c.mismatch(enc) for c in self.codecs]
        if all(reasons):
            raise SessionAbort(grpc.StatusCode.INVALID_ARGUMENT,
                               f"the {enc.codec} payload is not of this session's "
                               f"configuration: {'; '.join(r for r in reasons if r)}")

    def decode(self, enc: Encoded, ctx: CodecContext) -> torch.Tensor:
        """The (S, D) activation of a checked payload, decoded with ``ctx`` (the
        :meth:`message_context` it was unpacked with); SessionAbort when it does not decode (a
        payload that decodes to NaN or Inf is a WireError of the codecs)."""
        try:
            return decode(enc, ctx)
        except (FcEdgeError, ValueError, RuntimeError) as e:
            raise SessionAbort(grpc.StatusCode.INVALID_ARGUMENT,
                               f"cannot decode the {enc.codec} payload: {e}") from None


@dataclass(eq=False)
class _Session:
    id: str
    peer: str
    key: str  # the client's address (per-peer caps)
    engine: Any  # EngineSession
    codecs: SessionCodecs
    max_new_tokens: int
    eos: frozenset[int]
    step: int = 0  # the next step's number = tokens generated so far
    bytes_in: int = 0
    done: bool = False
    opened_at: float = field(default_factory=time.monotonic)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    end_code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE
    end_reason: str = ""
    timer: asyncio.TimerHandle | None = None

    def end(self, code: grpc.StatusCode, reason: str) -> None:
        """End the session from outside its stream (drain, lifetime, engine death)."""
        if not self.ended.is_set():
            self.end_code, self.end_reason = code, reason
            self.ended.set()


_END = object()  # the client half-closed the stream


class EdgeService:
    """Sessions over one batching engine (see the module doc). :meth:`generate` and
    :meth:`stop` are coroutines of one event loop (the one that runs them first).

    Limits (keywords, docs/protocol.md): ``max_sessions`` (None: what the KV pool holds, one
    block each, at most ``max_streams``), ``max_sessions_per_peer``, ``max_streams``,
    ``max_streams_per_peer``, ``max_seq_len``, ``max_payload_bytes``, ``idle_timeout_s`` (also
    the deadline of every write to the client), ``open_timeout_s``, ``max_session_s`` (None: no
    limit), ``kv_cache_tokens`` (the KV pool's positions; None: ``DEFAULT_KV_SESSIONS`` sessions
    of ``max_seq_len``). Engine: ``device``, ``dtype``, ``max_batch``, ``prefill_chunk`` (None:
    :func:`default_prefill_chunk`), ``cuda_graphs``.
    """

    def __init__(
        self,
        model: Any,
        split_layer: int | None = None,
        *,
        token: str | None = None,
        max_sessions: int | None = None,
        max_sessions_per_peer: int = DEFAULT_MAX_SESSIONS_PER_PEER,
        max_seq_len: int = DEFAULT_MAX_SEQ_LEN,
        max_payload_bytes: int | None = None,
        idle_timeout_s: float | None = DEFAULT_IDLE_TIMEOUT_S,
        open_timeout_s: float = DEFAULT_OPEN_TIMEOUT_S,
        max_session_s: float | None = None,
        max_streams: int = DEFAULT_MAX_STREAMS,
        max_streams_per_peer: int = DEFAULT_MAX_STREAMS_PER_PEER,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        max_batch: int = DEFAULT_MAX_BATCH,
        prefill_chunk: int | None = None,
        kv_cache_tokens: int | None = None,
        cuda_graphs: bool = False,
        calibrations: Sequence[str | Path | Any] = (),
    ) -> None:
        from fc_edge.models.pretrained import model_fingerprint
        from fc_edge.models.split import check_split

        for name, value in (("max_seq_len", max_seq_len), ("max_streams", max_streams),
                            ("max_sessions_per_peer", max_sessions_per_peer),
                            ("max_streams_per_peer", max_streams_per_peer)):
            _check_positive_int(name, value)
        for name, value in (("max_sessions", max_sessions),
                            ("max_payload_bytes", max_payload_bytes),
                            ("kv_cache_tokens", kv_cache_tokens)):
            if value is not None:
                _check_positive_int(name, value)
        for name, value in (("idle_timeout_s", idle_timeout_s), ("max_session_s", max_session_s)):
            if value is not None and not value > 0:
                raise ConfigError(f"{name} must be > 0 (or None), got {value!r}")
        if not open_timeout_s > 0:
            raise ConfigError(f"open_timeout_s must be > 0, got {open_timeout_s!r}")
        if token is not None and not token:
            raise ConfigError("the bearer token must not be empty")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        if cuda_graphs and self.device.type != "cuda":
            raise ConfigError("--cuda-graphs needs --device cuda (CUDA graphs run on a GPU)")
        model = load_server_model(model)
        if split_layer is None:
            split_layer = default_split_layer(model)
        check_split(model, split_layer)
        self.split_layer = split_layer
        self.fingerprint = model_fingerprint(model)
        self.hidden_size = int(model.config.hidden_size)
        self.token = token
        self.max_seq_len = max_seq_len
        self.max_payload_bytes = max_payload_bytes or default_max_payload_bytes(
            max_seq_len, self.hidden_size)
        self.idle_timeout_s = idle_timeout_s
        self.open_timeout_s = open_timeout_s
        self.max_session_s = max_session_s
        self.max_streams = max_streams
        self.max_streams_per_peer = max_streams_per_peer
        self.max_sessions_per_peer = max_sessions_per_peer
        from fc_edge.codecs.calibration import model_context

        # this model and split's codec context (its channel weights, ...): session codecs are
        # bound to it and payloads unpacked and decoded with it, never with global state
        self.codec_context = model_context(model, split_layer)
        # the calibration artifacts sessions may name (Open.calibration), by SHA-256
        self.calibrations = self._load_calibrations(model, calibrations)
        tail = Tail.from_hf(model, split_layer, device=self.device, dtype=self.dtype)
        block = 16
        tokens = kv_cache_tokens or DEFAULT_KV_SESSIONS * -(-max_seq_len // block) * block
        self.metrics = ServerMetrics(self)
        self.engine = BatchEngine(tail, max_seq_len=max_seq_len, kv_blocks=-(-tokens // block),
                                  max_batch=max_batch,
                                  prefill_chunk=prefill_chunk or default_prefill_chunk(self.device),
                                  block_size=block, cuda_graphs=cuda_graphs,
                                  on_iteration=self.metrics.on_iteration)
        total_blocks = self.engine.cache.num_blocks - 1
        # a session that holds nothing yet holds no capacity: the cap follows the pool (every
        # running session needs one block at least), bounded by the streams that carry them
        self.max_sessions = max_sessions or min(max_streams, total_blocks)
        # payload checks and codec decoding off the event loop (a big prefill takes a while)
        self._decoder = ThreadPoolExecutor(max_workers=2, thread_name_prefix="fc-edge-decode")
        self._sessions: dict[str, _Session] = {}
        self._streams = 0
        self._peer_streams: Counter[str] = Counter()
        self._peer_sessions: Counter[str] = Counter()
        self.draining = False
        self._drain_cut = False
        self._failure_callbacks: list[Callable[[BaseException], Any]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self.engine.on_death(self._engine_died)

    def _load_calibrations(self, model: Any, sources: Sequence[Any]) -> dict[str, CodecContext]:
        """``{sha256: codec context}`` of each artifact (a path or a loaded
        :class:`~fc_edge.codecs.calibration.Calibration`), checked against the served model and
        split; each context's token-prediction table is computed now, not on a session's first
        decode step (seconds for a real vocabulary)."""
        from fc_edge.codecs.calibration import Calibration, check_artifact, model_context
        from fc_edge.codecs.calibration import load as load_calibration
        from fc_edge.codecs.klt import predictions

        out: dict[str, CodecContext] = {}
        if isinstance(sources, (str, Path, Calibration)):
            sources = [sources]
        for source in sources:
            cal = source if isinstance(source, Calibration) else load_calibration(source)
            check_artifact(cal, self.fingerprint, self.split_layer, self.hidden_size)
            ctx = model_context(model, self.split_layer, cal)
            predictions(ctx, cal, torch.zeros(1, dtype=torch.long))  # fill the table
            out[cal.digest] = ctx
        return out

    # --- bookkeeping --------------------------------------------------------------------------
    def open_sessions(self) -> int:
        return len(self._sessions)

    def open_streams(self) -> int:
        return self._streams

    def session_ids(self) -> list[str]:
        return list(self._sessions)

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """The event loop this service's coroutines run on (for callbacks from other threads)."""
        self._loop = loop

    def on_failure(self, callback: Callable[[BaseException], Any]) -> None:
        """Call ``callback(error)`` on the service's loop if the engine dies (a coroutine
        function's result is awaited)."""
        self._failure_callbacks.append(callback)

    def _refuse(self, code: grpc.StatusCode, details: str, reason: str) -> SessionAbort:
        self.metrics.refusals.labels(reason).inc()
        return SessionAbort(code, details)

    def authorize(self, metadata: Sequence[tuple[str, str]] | None) -> None:
        """Raise UNAUTHENTICATED unless ``metadata`` carries ``authorization: Bearer <token>``
        (RFC 6750: the scheme's name in any case, one or more spaces, the token), if the
        server has a token."""
        if self.token is None:
            return
        given = ""
        for key, value in metadata or ():
            if key.lower() == "authorization":
                scheme, _, credentials = str(value).strip().partition(" ")
                if scheme.lower() == "bearer":
                    given = credentials.strip()
        if not given or not hmac.compare_digest(given.encode(), self.token.encode()):
            raise self._refuse(grpc.StatusCode.UNAUTHENTICATED,
                               "missing or wrong bearer token (give the server's --token)",
                               "unauthenticated")

    def info(self, metadata: Sequence[tuple[str, str]] | None) -> Any:
        """The ``Info`` RPC: :meth:`status` for a caller whose ``metadata`` carries the token."""
        self.authorize(metadata)
        return self.status()

    def status(self) -> Any:
        """``ServerInfo``: what is served, the limits, and the load right now."""
        stats = self.engine.stats()
        return pb2.ServerInfo(
            model_fingerprint=self.fingerprint, split_layer=self.split_layer,
            hidden_size=self.hidden_size, max_sessions=self.max_sessions,
            max_seq_len=self.max_seq_len, max_payload_bytes=self.max_payload_bytes,
            active_sessions=len(self._sessions), token_required=self.token is not None,
            protocol_version=PROTOCOL_VERSION, open_streams=self._streams,
            queued_steps=stats.queued_steps, mean_decode_batch=stats.mean_decode_batch,
            max_batch=self.engine.max_batch, free_kv_blocks=stats.free_blocks,
            total_kv_blocks=stats.total_blocks, kv_block_size=self.engine.cache.block_size,
            device=str(self.device), dtype=dtype_name(self.dtype), draining=self.draining,
            max_sessions_per_peer=self.max_sessions_per_peer, max_streams=self.max_streams,
            max_streams_per_peer=self.max_streams_per_peer, preemptions=stats.preemptions,
            engine_alive=stats.alive, prefill_chunk=self.engine.prefill_chunk,
            max_session_s=self.max_session_s or 0.0, idle_timeout_s=self.idle_timeout_s or 0.0,
            calibrations=list(self.calibrations))

    # --- streams ------------------------------------------------------------------------------
    def acquire_stream(self, peer: str) -> str:
        """Count a new stream of ``peer`` (Generate or health Watch); raises RESOURCE_EXHAUSTED
        past ``max_streams`` in all or ``max_streams_per_peer`` for its address. Returns the
        key to give :meth:`release_stream`."""
        key = peer_address(peer)
        if self._streams >= self.max_streams:
            raise self._refuse(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"the server is at its limit of {self.max_streams} open streams; "
                               "retry later", "max_streams")
        if self._peer_streams[key] >= self.max_streams_per_peer:
            raise self._refuse(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"this client address has {self.max_streams_per_peer} streams "
                               "open, the server's limit per address; close some first",
                               "max_streams_per_peer")
        self._streams += 1
        self._peer_streams[key] += 1
        return key

    def release_stream(self, key: str) -> None:
        self._streams -= 1
        self._peer_streams[key] -= 1
        if self._peer_streams[key] <= 0:
            del self._peer_streams[key]

    # --- stopping -----------------------------------------------------------------------------
    async def stop(self, drain_s: float = 0.0) -> None:
        """Refuse new sessions; let open ones finish for up to ``drain_s`` seconds (cut short by
        :meth:`end_drain`), then end them with UNAVAILABLE; stop the engine."""
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, drain_s)
        while self._sessions and not self._drain_cut and loop.time() < deadline:
            await asyncio.sleep(0.02)
        for s in list(self._sessions.values()):
            s.end(grpc.StatusCode.UNAVAILABLE,
                  f"the server is shutting down (drained for {drain_s:g} s)")
        # each session's stream sees its end at once, unless it is blocked writing to a client
        # that does not read: the transport's stop cancels those
        deadline = loop.time() + 1.0
        while self._sessions and loop.time() < deadline:
            await asyncio.sleep(0.01)
        # a thread of its own, not the loop's executor (closed at interpreter exit, when the
        # atexit hook stops what is still running)
        stopper = threading.Thread(target=self.engine.stop, name="fc-edge-engine-stop")
        stopper.start()
        while stopper.is_alive():
            await asyncio.sleep(0.01)
        self._decoder.shutdown(wait=False, cancel_futures=True)
        self.metrics.close()

    def end_drain(self) -> None:
        """Cut a drain in progress short (a second SIGTERM): open sessions end now."""
        self.draining = True
        self._drain_cut = True

    def _engine_died(self, error: BaseException) -> None:
        """From the engine thread: every session ends, health and the process follow."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        loop.call_soon_threadsafe(self._after_engine_death, error)

    def _after_engine_death(self, error: BaseException) -> None:
        for s in list(self._sessions.values()):
            s.end(grpc.StatusCode.UNAVAILABLE, f"the server's engine died ({type(error).__name__});"
                  " open the session on another server")
        for callback in self._failure_callbacks:
            try:
                result = callback(error)
                if asyncio.iscoroutine(result):
                    asyncio.ensure_future(result)
            except Exception:  # noqa: BLE001
                log.exception("a failure callback failed")

    # --- a session ----------------------------------------------------------------------------
    async def generate(self, frames: AsyncIterator[Any], peer: str,
                       metadata: Sequence[tuple[str, str]] | None = None) -> AsyncIterator[Any]:
        """The ``Generate`` stream: ``ClientFrame`` in, ``ServerFrame`` out; raises
        :class:`SessionAbort` to end it with a status."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        self.authorize(metadata)
        if self.draining:
            raise self._refuse(grpc.StatusCode.UNAVAILABLE,
                               "the server is shutting down; open the session elsewhere",
                               "draining")
        key = self.acquire_stream(peer)
        session: _Session | None = None
        reason = "closed by the client"
        frames = aiter(frames)
        try:
            first = await self._next(frames, self.open_timeout_s, None, "no Open frame within")
            if first is _END:
                return
            if first.WhichOneof("kind") != "open":
                raise SessionAbort(grpc.StatusCode.INVALID_ARGUMENT,
                                   "the first frame of a session must be Open")
            session = self._open(first.open, peer, key)
            yield ready_frame(session.id, session.engine.max_seq_len, self.max_payload_bytes)
            while True:
                frame = await self._next(frames, self.idle_timeout_s, session,
                                         "session idle for more than")
                received = time.perf_counter()
                if frame is _END:
                    return
                kind = frame.WhichOneof("kind")
                if kind == "close":
                    return
                if kind != "activation":
                    raise SessionAbort(grpc.StatusCode.INVALID_ARGUMENT,
                                       f"expected an Activation frame, got {kind}")
                yield await self._step(session, frame.activation, received)
        except SessionAbort as e:
            reason = f"{e.code.name}: {e.details}"
            if session is not None:
                self.metrics.session_errors.labels(e.code.name).inc()
                log.warning("session %s aborted: %s (peer %s)", session.id, reason, peer)
            raise
        except (asyncio.CancelledError, GeneratorExit):
            reason = "cancelled (the client went away, or stopped reading)"
            raise
        finally:
            self.release_stream(key)
            if session is not None:
                self._close(session, reason)

    async def _next(self, frames: AsyncIterator[Any], timeout: float | None,
                    session: _Session | None, what: str) -> Any:
        """The next frame (or _END), waiting at most ``timeout`` seconds; the session's end
        (drain, lifetime) ends the wait with its status."""
        read = asyncio.ensure_future(anext(frames, _END))
        return await self._wait(read, timeout, session, f"{what} {timeout:g} s; "
                                "closed by the server" if timeout else what)

    async def _wait(self, fut: Any, timeout: float | None, session: _Session | None,
                    timeout_message: str) -> Any:
        waiters = {fut}
        ended = None
        if session is not None:
            ended = asyncio.ensure_future(session.ended.wait())
            waiters.add(ended)
        try:
            done, _ = await asyncio.wait(waiters, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            if ended is not None:
                ended.cancel()
        if fut in done:
            return fut.result()
        fut.cancel()
        if session is not None and session.ended.is_set():
            raise SessionAbort(session.end_code, session.end_reason)
        raise SessionAbort(grpc.StatusCode.DEADLINE_EXCEEDED, timeout_message)

    def session_codecs(self, spec: Any, calibration: str = "") -> SessionCodecs:
        """The codec state of a session opening with ``spec`` (``Open.codec``) and the
        calibration artifact ``calibration`` (``Open.calibration``, "" for none): the one place a
        session's codecs are made. Raises SessionAbort: INVALID_ARGUMENT for a ``config_json``
        that is not a small flat JSON object or names a ``calibration`` (a file on this server),
        or for a malformed hash; FAILED_PRECONDITION for a codec this server cannot build, an
        artifact it has not loaded, or a calibrated codec without one."""
        text = spec.config_json or "{}"
        if len(text.encode()) > MAX_CONFIG_JSON_BYTES:
            raise self._refuse(grpc.StatusCode.INVALID_ARGUMENT,
                               f"codec config_json is {len(text.encode())} bytes; at most "
                               f"{MAX_CONFIG_JSON_BYTES} are accepted", "bad_open")
        try:
            config = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise self._refuse(grpc.StatusCode.INVALID_ARGUMENT,
                               f"codec config_json is not JSON: {type(e).__name__}",
                               "bad_open") from None
        if not isinstance(config, dict) or _depth(config) > MAX_CONFIG_DEPTH:
            raise self._refuse(grpc.StatusCode.INVALID_ARGUMENT,
                               "codec config_json must be a JSON object nested at most "
                               f"{MAX_CONFIG_DEPTH} deep", "bad_open")
        if "calibration" in config:  # a path read on this server: never from a peer
            raise self._refuse(grpc.StatusCode.INVALID_ARGUMENT,
                               "codec config_json must not name a calibration: give the "
                               "artifact's SHA-256 in Open.calibration", "bad_open")
        context = self.codec_context
        if calibration:
            if not CALIBRATION_HASH.fullmatch(calibration):
                raise self._refuse(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"Open.calibration must be a SHA-256 of 64 lowercase hex "
                                   f"digits, got {calibration[:80]!r}", "bad_open")
            if calibration not in self.calibrations:
                held = ", ".join(h[:16] for h in self.calibrations) or "none"
                raise self._refuse(grpc.StatusCode.FAILED_PRECONDITION,
                                   f"calibration mismatch: this server has not loaded artifact "
                                   f"{calibration[:16]} (it holds: {held}); serve it with "
                                   "--calibration", "mismatch")
            context = self.calibrations[calibration]
        try:
            codec = get_codec(spec.name, **config)
            fallback = get_codec(FALLBACK_CODEC)
        except (ConfigError, ValueError, TypeError, RecursionError) as e:
            raise self._refuse(grpc.StatusCode.FAILED_PRECONDITION,
                               f"codec mismatch: the server cannot decode codec "
                               f"{spec.name!r}: {e}", "mismatch") from None
        if codec.name in CALIBRATED_CODECS and context.calibration is None:
            raise self._refuse(grpc.StatusCode.FAILED_PRECONDITION,
                               f"codec {spec.name!r} needs a calibration artifact: name its "
                               "SHA-256 in Open.calibration (fc-edge generate --calibration)",
                               "mismatch")
        try:
            codec.bind(context)
        except (ConfigError, ValueError, TypeError) as e:
            raise self._refuse(grpc.StatusCode.FAILED_PRECONDITION,
                               f"codec mismatch: the server cannot decode codec "
                               f"{spec.name!r}: {e}", "mismatch") from None
        return SessionCodecs(spec.name, [codec, fallback], context)

    def _open(self, req: Any, peer: str, key: str) -> _Session:
        if self.draining:  # a stream opened before the drain began gets no session
            raise self._refuse(grpc.StatusCode.UNAVAILABLE,
                               "the server is shutting down; open the session elsewhere",
                               "draining")
        if req.protocol_version != PROTOCOL_VERSION:
            raise self._refuse(grpc.StatusCode.FAILED_PRECONDITION,
                               f"protocol version {req.protocol_version} is not supported "
                               f"(server speaks {PROTOCOL_VERSION})", "mismatch")
        if req.model_fingerprint != self.fingerprint:
            raise self._refuse(grpc.StatusCode.FAILED_PRECONDITION,
                               f"model mismatch: the client's model fingerprint is "
                               f"{req.model_fingerprint or '(none)'}, the server serves "
                               f"{self.fingerprint}; load the same model on both ends",
                               "mismatch")
        if req.split_layer != self.split_layer:
            raise self._refuse(grpc.StatusCode.FAILED_PRECONDITION,
                               f"split mismatch: the client's head ends at layer "
                               f"{req.split_layer}, the server's tail starts at layer "
                               f"{self.split_layer}", "mismatch")
        codecs = self.session_codecs(req.codec, req.calibration)
        s = req.sampling
        try:
            sampling = SamplingConfig(
                temperature=float(s.temperature), top_k=int(s.top_k),
                top_p=float(s.top_p) if s.top_p > 0 else 1.0,
                seed=int(s.seed) if s.has_seed else None)
        except ConfigError as e:
            raise self._refuse(grpc.StatusCode.INVALID_ARGUMENT, str(e), "bad_open") from None
        max_seq_len = req.max_seq_len or self.max_seq_len
        if max_seq_len > self.max_seq_len:
            raise self._refuse(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"the session asks for {max_seq_len} positions; this server "
                               f"allows {self.max_seq_len} (shorten the prompt or "
                               "--max-new-tokens)", "too_long")
        if self._peer_sessions[key] >= self.max_sessions_per_peer:
            raise self._refuse(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"this client address has {self.max_sessions_per_peer} sessions "
                               "open, the server's limit per address; retry when one ends",
                               "max_sessions_per_peer")
        if len(self._sessions) >= self.max_sessions:
            raise self._refuse(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"the server is at its limit of {self.max_sessions} concurrent "
                               "sessions; retry later", "max_sessions")
        sid = uuid.uuid4().hex[:16]
        try:
            engine_session = self.engine.open(sid, max_seq_len, sampling)
        except EngineStopped as e:
            raise SessionAbort(grpc.StatusCode.UNAVAILABLE, str(e)) from None
        session = _Session(
            id=sid, peer=peer, key=key, engine=engine_session, codecs=codecs,
            max_new_tokens=req.max_new_tokens, eos=frozenset(int(t) for t in req.eos_token_ids))
        self._sessions[sid] = session
        self._peer_sessions[key] += 1
        if self.max_session_s is not None:
            session.timer = asyncio.get_running_loop().call_later(
                self.max_session_s, session.end, grpc.StatusCode.DEADLINE_EXCEEDED,
                f"the session reached the server's limit of {self.max_session_s:g} s "
                "(--max-session-s)")
        log.info("session %s opened: peer=%s codec=%s config=%s max_seq_len=%d", sid, peer,
                 codecs.label, req.codec.config_json or "{}", max_seq_len)
        return session

    def _close(self, session: _Session, reason: str) -> None:
        if self._sessions.pop(session.id, None) is None:
            return
        key = session.key
        self._peer_sessions[key] -= 1
        if self._peer_sessions[key] <= 0:
            del self._peer_sessions[key]
        if session.timer is not None:
            session.timer.cancel()
        self.engine.close(session.engine)
        log.info("session %s closed: peer=%s codec=%s tokens=%d bytes_in=%d seconds=%.2f "
                 "reason=%s", session.id, session.peer, session.codecs.label, session.step,
                 session.bytes_in, time.monotonic() - session.opened_at, reason)

    async def _step(self, session: _Session, act: Any, received: float) -> Any:
        if session.done:
            raise SessionAbort(grpc.StatusCode.FAILED_PRECONDITION,
                               "the session is done (EOS or max_new_tokens): send Close")
        if act.step != session.step:
            raise SessionAbort(grpc.StatusCode.INVALID_ARGUMENT,
                               f"activation for step {act.step}, expected step {session.step}")
        if len(act.payload) > self.max_payload_bytes:
            raise SessionAbort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"payload of {len(act.payload)} bytes exceeds the server's limit "
                               f"of {self.max_payload_bytes} bytes")
        session.bytes_in += len(act.payload)
        if len(act.payload) <= INLINE_DECODE_BYTES:
            # a decode row takes microseconds: a hop to a worker thread would cost more
            x, codec_name, t_unpack, t_decode = self._decode_payload(session, act.payload)
        else:
            loop = asyncio.get_running_loop()
            try:
                decoding = loop.run_in_executor(self._decoder, self._decode_payload, session,
                                                act.payload)
            except RuntimeError:  # the decoder threads are shut down: the server is stopping
                raise SessionAbort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; "
                                   "open the session elsewhere") from None
            x, codec_name, t_unpack, t_decode = await self._wait(decoding, None, session, "")
        t0 = time.perf_counter()
        try:
            future = self.engine.submit(session.engine, x)
        except EngineStopped as e:
            raise SessionAbort(grpc.StatusCode.UNAVAILABLE, str(e)) from None
        except ConfigError as e:
            raise SessionAbort(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        try:
            result = await self._wait(asyncio.wrap_future(future), None, session, "")
        except NonFiniteError as e:
            raise SessionAbort(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        except EngineStopped as e:
            raise SessionAbort(grpc.StatusCode.UNAVAILABLE, str(e)) from None
        except (TailError, EngineError) as e:
            raise SessionAbort(grpc.StatusCode.INTERNAL, str(e)) from None
        except asyncio.CancelledError:
            if future.cancelled():  # the engine dropped it (the session closed)
                raise SessionAbort(grpc.StatusCode.UNAVAILABLE, "the step was cancelled") \
                    from None
            raise
        compute_s = time.perf_counter() - t0
        session.step += 1
        token = result.token
        session.codecs.sampled(token)  # the next row is the head's output for this token
        session.done = token in session.eos or (
            session.max_new_tokens > 0 and session.step >= session.max_new_tokens)
        if session.done:
            session.engine.expected = False  # no next step: the engine need not wait for one
        total = time.perf_counter() - received
        self.metrics.step_seconds.labels("prefill" if x.shape[0] > 1 else "decode").observe(total)
        return token_frame(act.step, token, session.done, unpack_s=t_unpack, decode_s=t_decode,
                           compute_s=compute_s, total_s=total, codec=codec_name)

    def _decode_payload(self, session: _Session,
                        payload: bytes) -> tuple[torch.Tensor, str, float, float]:
        """Parse, check and decode one payload (on a worker thread): the (S, D) activation in
        the tail's dtype, codec name, unpack and decode seconds."""
        t0 = time.perf_counter()
        ctx = session.codecs.message_context()  # the session's artifact, the step's token
        try:
            enc = wire.unpack(payload, max_bytes=self.max_payload_bytes, ctx=ctx)
        except WireError as e:
            raise SessionAbort(grpc.StatusCode.INVALID_ARGUMENT,
                               f"bad activation payload: {e}") from None
        self.metrics.received_bytes.labels(enc.codec).inc(len(payload))
        session.codecs.check(enc)
        if len(enc.shape) != 2 or enc.shape[1] != self.hidden_size:
            raise SessionAbort(grpc.StatusCode.INVALID_ARGUMENT,
                               f"activation must be (S, {self.hidden_size}), got shape "
                               f"{enc.shape}")
        rows = enc.shape[0]
        if session.engine.length + rows > session.engine.max_seq_len:
            raise SessionAbort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"{rows} more positions exceed the session's "
                               f"{session.engine.max_seq_len}")
        t1 = time.perf_counter()
        x = session.codecs.decode(enc, ctx)
        try:  # finite at the tail's dtype, not only at the payload's
            x = self.engine.prepare(x)
        except (NonFiniteError, ConfigError) as e:
            raise SessionAbort(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        return x, enc.codec, t1 - t0, time.perf_counter() - t1


def _depth(value: Any) -> int:
    """Nesting depth of a JSON value (a scalar: 0)."""
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")


# --- gRPC ------------------------------------------------------------------------------------
class _GrpcServicer(pb2_grpc.SplitInferenceServicer):
    """The gRPC face of an :class:`EdgeService`: frames in, frames out (each write under the
    idle timeout), aborts as statuses."""

    def __init__(self, service: EdgeService) -> None:
        self.service = service

    async def Info(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return self.service.info(_metadata(context))
        except SessionAbort as e:
            await context.abort(e.code, e.details)

    async def Generate(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        timeout = self.service.idle_timeout_s
        frames = self.service.generate(request_iterator, context.peer(), _metadata(context))
        try:
            async for frame in frames:
                try:
                    # a client that stops reading (HTTP/2 flow control) blocks this write
                    await asyncio.wait_for(context.write(frame), timeout)
                except TimeoutError:
                    await frames.aclose()
                    self.service.metrics.session_errors.labels("DEADLINE_EXCEEDED").inc()
                    await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                        f"the client read nothing for {timeout:g} s; closed by "
                                        "the server")
        except SessionAbort as e:
            await context.abort(e.code, e.details)
        finally:  # a cancelled call (the client went away) closes its session now
            await frames.aclose()


def _counted_health(service: EdgeService) -> Any:
    """``grpc.health.v1.Health`` whose ``Watch`` streams count toward the stream caps."""
    from grpc_health.v1 import health

    class CountedHealth(health.aio.HealthServicer):
        async def Watch(self, request: Any, context: Any) -> None:  # noqa: N802 - gRPC name
            try:
                key = service.acquire_stream(context.peer())
            except SessionAbort as e:
                await context.abort(e.code, e.details)
            try:
                await super().Watch(request, context)
            finally:
                service.release_stream(key)

    return CountedHealth()


def _metadata(context: Any) -> list[tuple[str, str]]:
    return [(m[0], m[1]) for m in context.invocation_metadata() or ()]


_LOOP: asyncio.AbstractEventLoop | None = None
_LOOP_THREAD: threading.Thread | None = None
_LOOP_LOCK = threading.Lock()
_LIVE: weakref.WeakSet[ServerHandle] = weakref.WeakSet()


def _server_loop() -> asyncio.AbstractEventLoop:
    """The process's event loop for gRPC servers, on its own daemon thread (grpc.aio keeps one
    loop per process happiest), stopped at interpreter exit (:func:`_shutdown`)."""
    global _LOOP, _LOOP_THREAD
    with _LOOP_LOCK:
        if _LOOP is None:
            loop = asyncio.new_event_loop()
            _LOOP_THREAD = threading.Thread(target=loop.run_forever, name="fc-edge-aio",
                                            daemon=True)
            _LOOP_THREAD.start()
            _LOOP = loop
        return _LOOP


@atexit.register
def _shutdown() -> None:
    """Stop every live server and the shared loop before the interpreter finalises: a daemon
    thread still inside gRPC's C++ core when Python tears threads down aborts the process
    (``terminate called without an active exception``)."""
    global _LOOP, _LOOP_THREAD
    for handle in list(_LIVE):
        try:
            handle.stop(drain_s=0, timeout_s=10)
        except Exception:  # noqa: BLE001 - at exit, go on with the others
            log.exception("stopping a server at exit failed")
    with _LOOP_LOCK:
        loop, thread, _LOOP, _LOOP_THREAD = _LOOP, _LOOP_THREAD, None, None
    if loop is None:
        return

    async def finish() -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await loop.shutdown_asyncgens()

    try:
        asyncio.run_coroutine_threadsafe(finish(), loop).result(10)
    except Exception:  # noqa: BLE001
        pass
    loop.call_soon_threadsafe(loop.stop)
    if thread is not None:
        thread.join(10)
    if not loop.is_running():
        loop.close()


class ServerHandle:
    """A running server: ``.port``, ``.address``, ``.service``, ``.active_sessions()``,
    ``.stop(drain_s)``, ``.interrupt()``, ``.wait()``, ``.failed`` (set when its engine died),
    ``.metrics_port`` (None without metrics)."""

    def __init__(self, server: Any, service: EdgeService, health: Any, host: str, port: int,
                 tls: bool, loop: asyncio.AbstractEventLoop,
                 metrics_port: int | None = None) -> None:
        self.server = server
        self.service = service
        self.health = health
        self.host = host
        self.port = port
        self.tls = tls
        self.metrics_port = metrics_port
        self._loop = loop
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()
        self.failed = threading.Event()
        service.on_failure(self._engine_failed)
        _LIVE.add(self)

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def fingerprint(self) -> str:
        return self.service.fingerprint

    @property
    def split_layer(self) -> int:
        return self.service.split_layer

    def active_sessions(self) -> int:
        """Sessions open right now."""
        return self.service.open_sessions()

    def session_ids(self) -> list[str]:
        return self.service.session_ids()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server has stopped (True) or ``timeout`` seconds passed (False)."""
        return self._stopped.wait(timeout)

    def stop(self, drain_s: float | None = None, timeout_s: float | None = None) -> None:
        """Health NOT_SERVING and no new sessions; open sessions finish for up to ``drain_s``
        seconds (None: 0), then are ended with UNAVAILABLE; the port closes. A second call
        while the first drains waits for it (use :meth:`interrupt` to cut it short)."""
        with self._stop_lock:
            if self._stopped.is_set() or self._loop.is_closed():
                return
            asyncio.run_coroutine_threadsafe(self._stop(drain_s or 0.0),
                                             self._loop).result(timeout_s)
            self._stopped.set()
            _LIVE.discard(self)

    def interrupt(self) -> None:
        """End a drain in progress now (thread-safe): open sessions end with UNAVAILABLE."""
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.service.end_drain)

    async def _stop(self, drain_s: float) -> None:
        await self._set_health(False)
        await self.service.stop(drain_s)
        await self.server.stop(0.5)  # cancels what is left (a write blocked on a non-reader)

    async def _set_health(self, serving: bool) -> None:
        from grpc_health.v1 import health_pb2

        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def _engine_failed(self, error: BaseException) -> None:
        await self._set_health(False)
        self.failed.set()

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_server(
    model_spec_or_model: Any,
    split_layer: int | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    token: str | None = None,
    tls_cert: str | Path | None = None,
    tls_key: str | Path | None = None,
    metrics_port: int | None = None,
    metrics_host: str = "127.0.0.1",
    **limits: Any,
) -> ServerHandle:
    """Serve the tail of a model (spec string, model or (model, tokenizer)) at ``split_layer``.

    ``port=0`` picks a free port (read it from ``handle.port``). ``token`` requires
    ``authorization: Bearer <token>`` metadata on every call (not on the health service);
    ``tls_cert``/``tls_key`` (PEM files) serve TLS. ``metrics_port`` exports Prometheus metrics
    on ``http://metrics_host:metrics_port/metrics`` (0: a free port, read
    ``handle.metrics_port``). ``limits`` are :class:`EdgeService`'s keywords. Returns at once;
    the server runs on a background event loop.
    """
    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("TLS needs both --tls-cert and --tls-key")
    creds = None
    if tls_cert is not None:
        creds = grpc.ssl_server_credentials(
            [(_read(tls_key, "TLS key"), _read(tls_cert, "TLS certificate"))])
    service = EdgeService(model_spec_or_model, split_layer, token=token, **limits)
    return asyncio.run_coroutine_threadsafe(
        _start(service, host, port, creds, metrics_port, metrics_host),
        _server_loop()).result()


async def _start(service: EdgeService, host: str, port: int, creds: Any,
                 metrics_port: int | None, metrics_host: str) -> ServerHandle:
    from grpc_health.v1 import health_pb2_grpc

    service.attach(asyncio.get_running_loop())
    options = [
        ("grpc.max_receive_message_length", service.max_payload_bytes + 64 * 1024),
        ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ("grpc.so_reuseport", 0),
        # clients ping every 30 s to notice a dead server during a long step; allow it
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]
    server = grpc.aio.server(options=options)
    pb2_grpc.add_SplitInferenceServicer_to_server(_GrpcServicer(service), server)
    health_servicer = _counted_health(service)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = (server.add_secure_port(bind, creds) if creds is not None
                 else server.add_insecure_port(bind))
    except RuntimeError as e:
        await service.stop()
        raise ConfigError(f"cannot listen on {bind}: {e}") from None
    if not bound:
        await service.stop()
        raise ConfigError(f"cannot listen on {bind} (address in use or not local)")
    served_metrics = None
    if metrics_port is not None:
        try:
            served_metrics = service.metrics.serve(metrics_port, metrics_host)
        except OSError as e:
            await service.stop()
            raise ConfigError(f"cannot serve metrics on {metrics_host}:{metrics_port}: "
                              f"{e.strerror}") from None
    await server.start()
    handle = ServerHandle(server, service, health_servicer, host, bound, creds is not None,
                          asyncio.get_running_loop(), served_metrics)
    await handle._set_health(service.engine.alive())
    log.info("serving %s split at layer %d on %s:%d (device %s, %s, max batch %d)",
             service.fingerprint, service.split_layer, host, bound, service.device,
             dtype_name(service.dtype), service.engine.max_batch)
    return handle


def _read(path: str | Path | None, what: str) -> bytes:
    try:
        return Path(str(path)).expanduser().read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read the {what} {str(path)!r}: {e.strerror}") from None
