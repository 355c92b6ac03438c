"""The edge server: the tail of a split model behind one gRPC stream per generation session.

Two layers:

* :class:`EdgeService` is the transport-free core. It owns the :class:`BatchEngine` (one loop
  that runs every waiting decode step of every session as one batched forward, and prefills in
  chunks), checks each ``Open`` (model fingerprint, split layer, codec, limits) and each
  ``Activation`` (size, codec and configuration, shape, finite values), and answers with
  ``Token`` frames. Its coroutines take an async iterator of ``ClientFrame`` and raise
  :class:`SessionAbort` (a gRPC status) to end a session. The gRPC server below and the Ray
  Serve deployment (``fc_edge.runtime.fleet``) are thin adapters over it.
* :func:`start_server` runs it under ``grpc.aio`` on a background event loop, beside the
  standard ``grpc.health.v1.Health`` service (answered without a token).

A stream costs a coroutine, not a thread: one that sends no valid ``Open`` within
``open_timeout_s`` is ended (DEADLINE_EXCEEDED); streams beyond ``max_streams`` are refused at
once (RESOURCE_EXHAUSTED), so silent peers cannot starve the others. Protocol and status codes:
docs/protocol.md.

>>> handle = start_server("smollm2-135m", split_layer=1, port=0)
>>> handle.address, handle.active_sessions()
('127.0.0.1:40123', 0)
>>> handle.stop()
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import torch

from fc_edge.codecs import decode, get_codec, wire
from fc_edge.devices import dtype_name, resolve_device, resolve_dtype
from fc_edge.errors import ConfigError, FcEdgeError, ModelError, WireError
from fc_edge.models.tail import CacheFullError, Tail
from fc_edge.runtime.engine import DEFAULT_MAX_BATCH, DEFAULT_PREFILL_CHUNK, BatchEngine
from fc_edge.runtime.proto import pb2, pb2_grpc
from fc_edge.runtime.protocol import FALLBACK_CODEC, PROTOCOL_VERSION, SERVICE_NAME
from fc_edge.runtime.sampling import SamplingConfig

log = logging.getLogger("fc_edge.server")

DEFAULT_MAX_SESSIONS = 16
DEFAULT_MAX_SEQ_LEN = 4096
DEFAULT_IDLE_TIMEOUT_S = 60.0
DEFAULT_OPEN_TIMEOUT_S = 10.0
DEFAULT_MAX_STREAMS = 256
DEFAULT_DRAIN_S = 10.0
#: Room for the wire header (magic, dims, parameters, CRC) on top of the values of a payload.
WIRE_HEADER_ALLOWANCE = 4096


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


def default_split_layer(model: Any) -> int:
    """The split layer used when none is given (:data:`fc_edge.models.defaults.DEFAULT_SPLIT_LAYER`,
    the device's too)."""
    del model
    from fc_edge.models.defaults import DEFAULT_SPLIT_LAYER

    return DEFAULT_SPLIT_LAYER


class SessionAbort(FcEdgeError):
    """Ends a session (or refuses a call) with a gRPC status ``code`` and ``details``."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


@dataclass
class _Session:
    id: str
    peer: str
    engine: Any  # EngineSession
    codecs: list[Any]  # the session codec and the fallback: a payload must match one
    max_new_tokens: int
    eos: frozenset[int]
    label: str
    step: int = 0  # the next step's number = tokens generated so far
    bytes_in: int = 0
    done: bool = False
    opened_at: float = field(default_factory=time.monotonic)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    cancel_reason: str = ""


_END = object()  # the client half-closed the stream


class EdgeService:
    """Sessions over one batching engine (see the module doc). Create it inside a running
    event loop; :meth:`generate` and :meth:`stop` are coroutines of that loop."""

    def __init__(
        self,
        model: Any,
        split_layer: int | None = None,
        *,
        token: str | None = None,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        max_seq_len: int = DEFAULT_MAX_SEQ_LEN,
        max_payload_bytes: int | None = None,
        idle_timeout_s: float | None = DEFAULT_IDLE_TIMEOUT_S,
        open_timeout_s: float = DEFAULT_OPEN_TIMEOUT_S,
        max_streams: int = DEFAULT_MAX_STREAMS,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        max_batch: int = DEFAULT_MAX_BATCH,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        kv_cache_tokens: int | None = None,
    ) -> None:
        from fc_edge.models.pretrained import model_fingerprint
        from fc_edge.models.split import check_split

        for name, value in (("max_sessions", max_sessions), ("max_seq_len", max_seq_len),
                            ("max_streams", max_streams)):
            _check_positive_int(name, value)
        if max_payload_bytes is not None:
            _check_positive_int("max_payload_bytes", max_payload_bytes)
        if idle_timeout_s is not None and not idle_timeout_s > 0:
            raise ConfigError(f"idle_timeout_s must be > 0 (or None), got {idle_timeout_s!r}")
        if not open_timeout_s > 0:
            raise ConfigError(f"open_timeout_s must be > 0, got {open_timeout_s!r}")
        if token is not None and not token:
            raise ConfigError("the bearer token must not be empty")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        model = load_server_model(model)
        if split_layer is None:
            split_layer = default_split_layer(model)
        check_split(model, split_layer)
        self.split_layer = split_layer
        self.fingerprint = model_fingerprint(model)
        self.hidden_size = int(model.config.hidden_size)
        self.token = token
        self.max_sessions = max_sessions
        self.max_seq_len = max_seq_len
        self.max_payload_bytes = max_payload_bytes or default_max_payload_bytes(
            max_seq_len, self.hidden_size)
        self.idle_timeout_s = idle_timeout_s
        self.open_timeout_s = open_timeout_s
        self.max_streams = max_streams
        from fc_edge.codecs.calibration import model_context

        # this model and split's codec context (its channel weights, ...): session codecs are
        # bound to it and payloads unpacked and decoded with it, never with global state
        self.codec_context = model_context(model, split_layer)
        tail = Tail.from_hf(model, split_layer, device=self.device, dtype=self.dtype)
        block = 16
        # default: room for max_sessions sessions of max_seq_len positions, block-rounded
        tokens = kv_cache_tokens or max_sessions * -(-max_seq_len // block) * block
        _check_positive_int("kv_cache_tokens", tokens)
        self.engine = BatchEngine(tail, max_seq_len=max_seq_len, kv_blocks=-(-tokens // block),
                                  max_batch=max_batch, prefill_chunk=prefill_chunk,
                                  block_size=block)
        # payload checks and codec decoding off the event loop (a big prefill takes a while)
        self._decoder = ThreadPoolExecutor(max_workers=2, thread_name_prefix="fc-edge-decode")
        self._sessions: dict[str, _Session] = {}
        self._streams = 0
        self.draining = False

    # --- bookkeeping --------------------------------------------------------------------------
    def open_sessions(self) -> int:
        return len(self._sessions)

    def session_ids(self) -> list[str]:
        return list(self._sessions)

    def authorize(self, metadata: Sequence[tuple[str, str]] | None) -> None:
        """Raise UNAUTHENTICATED unless ``metadata`` carries the bearer token (if one is set)."""
        if self.token is None:
            return
        given = ""
        for key, value in metadata or ():
            if key == "authorization":
                given = str(value).removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            raise SessionAbort(grpc.StatusCode.UNAUTHENTICATED,
                               "missing or wrong bearer token (give the server's --token)")

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
            device=str(self.device), dtype=dtype_name(self.dtype), draining=self.draining)

    async def stop(self, drain_s: float = 0.0) -> None:
        """Refuse new sessions; let open ones finish for up to ``drain_s`` seconds, then end
        them with UNAVAILABLE; stop the engine."""
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, drain_s)
        while self._sessions and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for s in list(self._sessions.values()):
            s.cancel_reason = f"the server is shutting down (drained for {drain_s:g} s)"
            s.cancelled.set()
        deadline = loop.time() + 5.0
        while self._sessions and loop.time() < deadline:
            await asyncio.sleep(0.02)
        await loop.run_in_executor(None, self.engine.stop)
        self._decoder.shutdown(wait=False, cancel_futures=True)

    # --- a session ----------------------------------------------------------------------------
    async def generate(self, frames: AsyncIterator[Any], peer: str,
                       metadata: Sequence[tuple[str, str]] | None = None) -> AsyncIterator[Any]:
        """The ``Generate`` stream: ``ClientFrame`` in, ``ServerFrame`` out; raises
        :class:`SessionAbort` to end it with a status."""
        self.authorize(metadata)
        if self.draining:
            raise SessionAbort(grpc.StatusCode.UNAVAILABLE,
                               "the server is shutting down; open the session elsewhere")
        if self._streams >= self.max_streams:
            raise SessionAbort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"the server is at its limit of {self.max_streams} open streams; "
                               "retry later")
        self._streams += 1
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
            session = self._open(first.open, peer)
            yield pb2.ServerFrame(ready=pb2.Ready(
                session_id=session.id, max_seq_len=session.engine.max_seq_len,
                max_payload_bytes=self.max_payload_bytes, fallback_codec=FALLBACK_CODEC))
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
                log.warning("session %s aborted: %s (peer %s)", session.id, reason, peer)
            raise
        except asyncio.CancelledError:
            reason = "cancelled (the client went away)"
            raise
        finally:
            self._streams -= 1
            if session is not None:
                self._close(session, reason)

    async def _next(self, frames: AsyncIterator[Any], timeout: float | None,
                    session: _Session | None, what: str) -> Any:
        """The next frame (or _END), waiting at most ``timeout`` seconds; the session's
        cancellation (drain) ends the wait with UNAVAILABLE."""
        read = asyncio.ensure_future(anext(frames, _END))
        return await self._wait(read, timeout, session, f"{what} {timeout:g} s; "
                                "closed by the server" if timeout else what)

    async def _wait(self, fut: Any, timeout: float | None, session: _Session | None,
                    timeout_message: str) -> Any:
        waiters = {fut}
        cancel = None
        if session is not None:
            cancel = asyncio.ensure_future(session.cancelled.wait())
            waiters.add(cancel)
        try:
            done, _ = await asyncio.wait(waiters, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            if cancel is not None:
                cancel.cancel()
        if fut in done:
            return fut.result()
        fut.cancel()
        if session is not None and session.cancelled.is_set():
            raise SessionAbort(grpc.StatusCode.UNAVAILABLE, session.cancel_reason)
        raise SessionAbort(grpc.StatusCode.DEADLINE_EXCEEDED, timeout_message)

    def _open(self, req: Any, peer: str) -> _Session:
        if req.protocol_version != PROTOCOL_VERSION:
            raise SessionAbort(grpc.StatusCode.FAILED_PRECONDITION,
                               f"protocol version {req.protocol_version} is not supported "
                               f"(server speaks {PROTOCOL_VERSION})")
        if req.model_fingerprint != self.fingerprint:
            raise SessionAbort(grpc.StatusCode.FAILED_PRECONDITION,
                               f"model mismatch: the client's model fingerprint is "
                               f"{req.model_fingerprint or '(none)'}, the server serves "
                               f"{self.fingerprint}; load the same model on both ends")
        if req.split_layer != self.split_layer:
            raise SessionAbort(grpc.StatusCode.FAILED_PRECONDITION,
                               f"split mismatch: the client's head ends at layer "
                               f"{req.split_layer}, the server's tail starts at layer "
                               f"{self.split_layer}")
        try:
            config = json.loads(req.codec.config_json or "{}")
            if not isinstance(config, dict):
                raise ConfigError("codec config_json must be a JSON object")
            codec = get_codec(req.codec.name, **config).bind(self.codec_context)
            fallback = get_codec(FALLBACK_CODEC)
        except (ConfigError, ValueError, TypeError) as e:
            raise SessionAbort(grpc.StatusCode.FAILED_PRECONDITION,
                               f"codec mismatch: the server cannot decode codec "
                               f"{req.codec.name!r}: {e}") from None
        s = req.sampling
        try:
            sampling = SamplingConfig(
                temperature=float(s.temperature), top_k=int(s.top_k),
                top_p=float(s.top_p) if s.top_p > 0 else 1.0,
                seed=int(s.seed) if s.has_seed else None)
        except ConfigError as e:
            raise SessionAbort(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        max_seq_len = req.max_seq_len or self.max_seq_len
        if max_seq_len > self.max_seq_len:
            raise SessionAbort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"the session asks for {max_seq_len} positions; this server "
                               f"allows {self.max_seq_len} (shorten the prompt or "
                               "--max-new-tokens)")
        if len(self._sessions) >= self.max_sessions:
            raise SessionAbort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"the server is at its limit of {self.max_sessions} concurrent "
                               "sessions; retry later")
        sid = uuid.uuid4().hex[:16]
        try:
            engine_session = self.engine.open(sid, max_seq_len, sampling)
        except CacheFullError as e:
            raise SessionAbort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"{e}; retry later or ask for fewer positions") from None
        session = _Session(
            id=sid, peer=peer, engine=engine_session,
            codecs=[codec, fallback],
            max_new_tokens=req.max_new_tokens, eos=frozenset(int(t) for t in req.eos_token_ids),
            label=req.codec.name)
        self._sessions[sid] = session
        log.info("session %s opened: peer=%s codec=%s config=%s max_seq_len=%d", sid, peer,
                 codec.name, req.codec.config_json or "{}", max_seq_len)
        return session

    def _close(self, session: _Session, reason: str) -> None:
        if self._sessions.pop(session.id, None) is None:
            return
        self.engine.close(session.engine)
        log.info("session %s closed: peer=%s codec=%s tokens=%d bytes_in=%d seconds=%.2f "
                 "reason=%s", session.id, session.peer, session.label, session.step,
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
        loop = asyncio.get_running_loop()
        x, codec_name, t_unpack, t_decode = await loop.run_in_executor(
            self._decoder, self._decode_payload, session, act.payload)
        t0 = time.perf_counter()
        try:
            future = self.engine.submit(session.engine, x)
        except ConfigError as e:
            raise SessionAbort(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        try:
            result = await self._wait(asyncio.wrap_future(future), None, session, "")
        except (RuntimeError, ModelError) as e:
            raise SessionAbort(grpc.StatusCode.INTERNAL, f"the tail failed: {e}") from None
        except ConfigError as e:
            raise SessionAbort(grpc.StatusCode.UNAVAILABLE, str(e)) from None
        compute_s = time.perf_counter() - t0
        session.step += 1
        token = result.token
        session.done = token in session.eos or (
            session.max_new_tokens > 0 and session.step >= session.max_new_tokens)
        return pb2.ServerFrame(token=pb2.Token(
            step=act.step, id=token, done=session.done,
            timings=pb2.ServerTimings(unpack_s=t_unpack, decode_s=t_decode, compute_s=compute_s,
                                      total_s=time.perf_counter() - received,
                                      codec=codec_name)))

    def _decode_payload(self, session: _Session,
                        payload: bytes) -> tuple[torch.Tensor, str, float, float]:
        """Parse, check and decode one payload (on a worker thread): (S, D) activation, codec
        name, unpack and decode seconds."""
        t0 = time.perf_counter()
        try:
            enc = wire.unpack(payload, max_bytes=self.max_payload_bytes,
                              ctx=self.codec_context)
        except WireError as e:
            raise SessionAbort(grpc.StatusCode.INVALID_ARGUMENT,
                               f"bad activation payload: {e}") from None
        if all(c.name != enc.codec for c in session.codecs):
            raise SessionAbort(grpc.StatusCode.INVALID_ARGUMENT,
                               f"payload codec {enc.codec!r} is not this session's codec "
                               f"({session.label}, or the {FALLBACK_CODEC} fallback)")
        reasons = [c.mismatch(enc) for c in session.codecs]
        if all(reasons):
            raise SessionAbort(grpc.StatusCode.INVALID_ARGUMENT,
                               f"the {enc.codec} payload is not of this session's "
                               f"configuration: {'; '.join(r for r in reasons if r)}")
        if len(enc.shape) != 2 or enc.shape[1] != self.hidden_size:
            raise SessionAbort(grpc.StatusCode.INVALID_ARGUMENT,
                               f"activation must be (S, {self.hidden_size}), got shape "
                               f"{enc.shape}")
        rows = enc.shape[0]
        # the engine's position: the session's previous step is done (one in flight)
        if session.engine.position + rows > session.engine.max_seq_len:
            raise SessionAbort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"{rows} more positions exceed the session's "
                               f"{session.engine.max_seq_len}")
        t1 = time.perf_counter()
        try:  # a payload that decodes to NaN or Inf is a WireError (checked in the codecs)
            x = decode(enc, self.codec_context)
        except (FcEdgeError, ValueError, RuntimeError) as e:
            raise SessionAbort(grpc.StatusCode.INVALID_ARGUMENT,
                               f"cannot decode the {enc.codec} payload: {e}") from None
        return x, enc.codec, t1 - t0, time.perf_counter() - t1


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")


# --- gRPC ------------------------------------------------------------------------------------
class _GrpcServicer(pb2_grpc.SplitInferenceServicer):
    """The gRPC face of an :class:`EdgeService`: frames in, frames out, aborts as statuses."""

    def __init__(self, service: EdgeService) -> None:
        self.service = service

    async def Info(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return self.service.info(_metadata(context))
        except SessionAbort as e:
            await context.abort(e.code, e.details)

    async def Generate(self, request_iterator: Any,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for frame in self.service.generate(request_iterator, context.peer(),
                                                     _metadata(context)):
                yield frame
        except SessionAbort as e:
            await context.abort(e.code, e.details)


def _metadata(context: Any) -> list[tuple[str, str]]:
    return [(m[0], m[1]) for m in context.invocation_metadata() or ()]


_LOOP: asyncio.AbstractEventLoop | None = None
_LOOP_LOCK = threading.Lock()


def _server_loop() -> asyncio.AbstractEventLoop:
    """The process's event loop for gRPC servers, on its own daemon thread (grpc.aio keeps one
    loop per process happiest)."""
    global _LOOP
    with _LOOP_LOCK:
        if _LOOP is None:
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="fc-edge-aio", daemon=True).start()
            _LOOP = loop
        return _LOOP


class ServerHandle:
    """A running server: ``.port``, ``.address``, ``.service``, ``.active_sessions()``,
    ``.stop(drain_s)``, ``.wait()``."""

    def __init__(self, server: Any, service: EdgeService, health: Any, host: str, port: int,
                 tls: bool, loop: asyncio.AbstractEventLoop) -> None:
        self.server = server
        self.service = service
        self.health = health
        self.host = host
        self.port = port
        self.tls = tls
        self._loop = loop
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()

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
        """Sessions holding KV blocks right now."""
        return self.service.open_sessions()

    def session_ids(self) -> list[str]:
        return self.service.session_ids()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server has stopped (True) or ``timeout`` seconds passed (False)."""
        return self._stopped.wait(timeout)

    def stop(self, drain_s: float | None = None) -> None:
        """Health NOT_SERVING and no new sessions; open sessions finish for up to ``drain_s``
        seconds (None: 0), then are ended with UNAVAILABLE; the port closes."""
        with self._stop_lock:
            if self._stopped.is_set():
                return
            asyncio.run_coroutine_threadsafe(self._stop(drain_s or 0.0), self._loop).result()
            self._stopped.set()

    async def _stop(self, drain_s: float) -> None:
        from grpc_health.v1 import health_pb2

        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.service.stop(drain_s)
        await self.server.stop(1.0)

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
    **limits: Any,
) -> ServerHandle:
    """Serve the tail of a model (spec string, model or (model, tokenizer)) at ``split_layer``.

    ``port=0`` picks a free port (read it from ``handle.port``). ``token`` requires
    ``authorization: Bearer <token>`` metadata on every call (not on the health service);
    ``tls_cert``/``tls_key`` (PEM files) serve TLS. ``limits`` are :class:`EdgeService`'s
    keywords: ``max_sessions``, ``max_seq_len``, ``max_payload_bytes``, ``idle_timeout_s``,
    ``open_timeout_s``, ``max_streams``, ``device``, ``dtype``, ``max_batch``,
    ``prefill_chunk``, ``kv_cache_tokens``. Returns at once; the server runs on a background
    event loop.
    """
    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("TLS needs both --tls-cert and --tls-key")
    creds = None
    if tls_cert is not None:
        creds = grpc.ssl_server_credentials(
            [(_read(tls_key, "TLS key"), _read(tls_cert, "TLS certificate"))])
    service = EdgeService(model_spec_or_model, split_layer, token=token, **limits)
    return asyncio.run_coroutine_threadsafe(_start(service, host, port, creds),
                                            _server_loop()).result()


async def _start(service: EdgeService, host: str, port: int, creds: Any) -> ServerHandle:
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

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
    health_servicer = health.aio.HealthServicer()
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
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("serving %s split at layer %d on %s:%d (device %s, %s, max batch %d)",
             service.fingerprint, service.split_layer, host, bound, service.device,
             dtype_name(service.dtype), service.engine.max_batch)
    return ServerHandle(server, service, health_servicer, host, bound, creds is not None,
                        asyncio.get_running_loop())


def _read(path: str | Path | None, what: str) -> bytes:
    try:
        return Path(str(path)).expanduser().read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read the {what} {str(path)!r}: {e.strerror}") from None
