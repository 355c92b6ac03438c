"""The edge server: the tail of a split model behind one gRPC stream per generation session.

A session is opened by an ``Open`` frame (checked against the server's model fingerprint, split
layer and the codecs it can decode), owns one Hugging Face KV cache and a sampler, answers each
``Activation`` frame with one ``Token`` frame, and is freed when the stream ends for any reason:
close, error, client disconnect or idle timeout. Protocol and status codes: docs/protocol.md.

>>> handle = start_server("smollm2-135m", split_layer=8, port=0)
>>> handle.address, handle.active_sessions()
('127.0.0.1:40123', 0)
>>> handle.stop()
"""

from __future__ import annotations

import hmac
import json
import logging
import queue
import threading
import time
import uuid
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from fc_edge import wire
from fc_edge.codecs import decode, get_codec
from fc_edge.errors import ConfigError, FcEdgeError, ModelError, WireError
from fc_edge.runtime.proto import pb2, pb2_grpc
from fc_edge.runtime.sampling import Sampler, SamplingConfig

log = logging.getLogger("fc_edge.server")

PROTOCOL_VERSION = 1
#: Codec accepted for any step the session codec refuses for its shape (BudgetError).
FALLBACK_CODEC = "fp16"
DEFAULT_MAX_SESSIONS = 16
DEFAULT_MAX_SEQ_LEN = 4096
DEFAULT_MAX_PAYLOAD_BYTES = 64 * 1024 * 1024
DEFAULT_IDLE_TIMEOUT_S = 60.0
# Frames a session buffers ahead of the tail (flow control against a client that floods).
_INBOX_FRAMES = 4


def load_server_model(model_spec_or_model: Any) -> Any:
    """A model object from a spec string, a ``(model, tokenizer)`` pair or a model."""
    if isinstance(model_spec_or_model, (str, Path)):
        from fc_edge.models.pretrained import load_model

        return load_model(str(model_spec_or_model))[0]
    if isinstance(model_spec_or_model, tuple):
        return model_spec_or_model[0]
    return model_spec_or_model


def make_tail(model: Any, layer: int) -> Any:
    """The tail of ``model`` at ``layer`` (the checks of ``split`` without copying a head)."""
    from fc_edge.models.split import check_supported
    from fc_edge.models.tail import Tail

    check_supported(model)
    n = model.config.num_hidden_layers
    if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer <= n - 1:
        raise ConfigError(
            f"split layer must be an integer in 1..{n - 1} for this model, got {layer!r}"
        )
    return Tail(model, layer)


def default_split_layer(model: Any) -> int:
    """The split layer used when none is given: after the first decoder layer (the paper's split,
    the one docs/results.md measures)."""
    del model
    return 1


class _Abort(Exception):
    """Ends a session with a gRPC status."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


_END = object()  # the client half-closed the stream


class _Inbox:
    """Reads the request stream on its own thread so the session can wait with a timeout."""

    def __init__(self, requests: Any) -> None:
        self._q: queue.Queue[Any] = queue.Queue(maxsize=_INBOX_FRAMES)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(requests,), daemon=True,
                                        name="fc-edge-inbox")
        self._thread.start()

    def _put(self, item: Any) -> None:
        while not self._closed.is_set():
            try:
                self._q.put(item, timeout=0.25)
                return
            except queue.Full:
                continue

    def _run(self, requests: Any) -> None:
        try:
            for frame in requests:
                self._put(frame)
                if self._closed.is_set():
                    return
            self._put(_END)
        except Exception as e:  # the RPC was cancelled / the client went away
            self._put(e)

    def get(self, timeout: float | None) -> Any:
        try:
            return self._q.get(timeout=timeout)
        except queue.Empty:
            raise _Abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                         f"session idle for more than {timeout:g} s; closed by the server",
                         ) from None

    def close(self) -> None:
        self._closed.set()


@dataclass
class _Session:
    id: str
    peer: str
    tail: Any  # TailSession
    sampler: Sampler
    codecs: frozenset[str]  # codec names accepted in payloads
    max_seq_len: int
    max_new_tokens: int
    eos: frozenset[int]
    opened_at: float
    step: int = 0
    generated: int = 0
    done: bool = False


class SplitInferenceServicer(pb2_grpc.SplitInferenceServicer):
    """Sessions over one shared tail. Thread-safe: each stream runs on its own worker thread."""

    def __init__(self, model: Any, split_layer: int, token: str | None, max_sessions: int,
                 max_seq_len: int, max_payload_bytes: int, idle_timeout_s: float | None) -> None:
        from fc_edge.models.pretrained import model_fingerprint

        self.model = model
        self.tail = make_tail(model, split_layer)
        self.split_layer = split_layer
        self.fingerprint = model_fingerprint(model)
        self.token = token
        self.max_sessions = max_sessions
        self.max_seq_len = max_seq_len
        self.max_payload_bytes = max_payload_bytes
        self.idle_timeout_s = idle_timeout_s
        self.hidden_size = int(model.config.hidden_size)
        self._sessions: dict[str, _Session] = {}
        self._lock = threading.Lock()

    # --- bookkeeping --------------------------------------------------------------------------
    def active_sessions(self) -> list[str]:
        with self._lock:
            return list(self._sessions)

    def _release(self, session_id: str) -> None:
        with self._lock:
            session = self._sessions.pop(session_id, None)
        if session is not None:
            session.tail = None  # drop the KV cache now, not when the stream object is collected
            log.info("session %s closed after %d tokens", session_id, session.generated)

    def _authorize(self, context: grpc.ServicerContext) -> None:
        if self.token is None:
            return
        given = ""
        for key, value in context.invocation_metadata():
            if key == "authorization":
                given = value.removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            raise _Abort(grpc.StatusCode.UNAUTHENTICATED,
                         "missing or wrong bearer token (give the server's --token)")

    # --- RPCs ---------------------------------------------------------------------------------
    def Info(self, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            self._authorize(context)
        except _Abort as e:
            context.abort(e.code, e.details)
        return pb2.ServerInfo(
            model_fingerprint=self.fingerprint, split_layer=self.split_layer,
            hidden_size=self.hidden_size, max_sessions=self.max_sessions,
            max_seq_len=self.max_seq_len, max_payload_bytes=self.max_payload_bytes,
            active_sessions=len(self.active_sessions()), token_required=self.token is not None,
            protocol_version=PROTOCOL_VERSION,
        )

    def Generate(self, request_iterator: Any, context: grpc.ServicerContext) -> Any:
        inbox: _Inbox | None = None
        session: _Session | None = None
        try:
            self._authorize(context)
            inbox = _Inbox(request_iterator)
            first = inbox.get(self.idle_timeout_s)
            if first is _END or isinstance(first, Exception):
                return
            if first.WhichOneof("kind") != "open":
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                             "the first frame of a session must be Open")
            session = self._open(first.open, context.peer())
            sid = session.id
            context.add_callback(lambda: self._release(sid))
            yield pb2.ServerFrame(ready=pb2.Ready(
                session_id=session.id, max_seq_len=session.max_seq_len,
                max_payload_bytes=self.max_payload_bytes, fallback_codec=FALLBACK_CODEC))
            while True:
                frame = inbox.get(self.idle_timeout_s)
                received = time.perf_counter()
                if frame is _END or isinstance(frame, Exception):
                    return  # client closed or went away
                kind = frame.WhichOneof("kind")
                if kind == "close":
                    return
                if kind != "activation":
                    raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                                 f"expected an Activation frame, got {kind}")
                yield self._step(session, frame.activation, received)
        except _Abort as e:
            if session is not None:
                log.info("session %s ended: %s: %s", session.id, e.code.name, e.details)
            context.abort(e.code, e.details)
        finally:
            if inbox is not None:
                inbox.close()
            if session is not None:
                self._release(session.id)

    # --- session steps ------------------------------------------------------------------------
    def _open(self, req: Any, peer: str) -> _Session:
        if req.protocol_version != PROTOCOL_VERSION:
            raise _Abort(grpc.StatusCode.FAILED_PRECONDITION,
                         f"protocol version {req.protocol_version} is not supported "
                         f"(server speaks {PROTOCOL_VERSION})")
        if req.model_fingerprint != self.fingerprint:
            raise _Abort(grpc.StatusCode.FAILED_PRECONDITION,
                         f"model mismatch: the client's model fingerprint is "
                         f"{req.model_fingerprint or '(none)'}, the server serves "
                         f"{self.fingerprint}; load the same model on both ends")
        if req.split_layer != self.split_layer:
            raise _Abort(grpc.StatusCode.FAILED_PRECONDITION,
                         f"split mismatch: the client's head ends at layer {req.split_layer}, "
                         f"the server's tail starts at layer {self.split_layer}")
        try:
            config = json.loads(req.codec.config_json or "{}")
            if not isinstance(config, dict):
                raise ConfigError("codec config_json must be a JSON object")
            codec = get_codec(req.codec.name, **config)
            fallback = get_codec(FALLBACK_CODEC)
        except (ConfigError, ValueError) as e:
            raise _Abort(grpc.StatusCode.FAILED_PRECONDITION,
                         f"codec mismatch: the server cannot decode codec "
                         f"{req.codec.name!r}: {e}") from None
        s = req.sampling
        try:
            sampling = SamplingConfig(
                temperature=float(s.temperature), top_k=int(s.top_k),
                top_p=float(s.top_p) if s.top_p > 0 else 1.0,
                seed=int(s.seed) if s.has_seed else None)
        except ConfigError as e:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        max_seq_len = req.max_seq_len or self.max_seq_len
        if max_seq_len > self.max_seq_len:
            raise _Abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                         f"the session asks for {max_seq_len} positions; this server allows "
                         f"{self.max_seq_len} (shorten the prompt or --max-new-tokens)")
        session = _Session(
            id=uuid.uuid4().hex[:16], peer=peer, tail=None, sampler=Sampler(sampling),
            codecs=frozenset({codec.name, fallback.name}), max_seq_len=max_seq_len,
            max_new_tokens=req.max_new_tokens, eos=frozenset(int(t) for t in req.eos_token_ids),
            opened_at=time.time())
        with self._lock:
            if len(self._sessions) >= self.max_sessions:
                full = True
            else:
                full = False
                self._sessions[session.id] = session
        if full:
            raise _Abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                         f"the server is at its limit of {self.max_sessions} concurrent sessions; "
                         "retry later")
        session.tail = self.tail.start()
        log.info("session %s opened from %s (codec %s)", session.id, peer, req.codec.name)
        return session

    def _step(self, session: _Session, act: Any, received: float) -> Any:
        if session.done:
            raise _Abort(grpc.StatusCode.FAILED_PRECONDITION,
                         "the session is done (EOS or max_new_tokens): send Close")
        if act.step != session.step:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                         f"activation for step {act.step}, expected step {session.step}")
        if len(act.payload) > self.max_payload_bytes:
            raise _Abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                         f"payload of {len(act.payload)} bytes exceeds the server's limit of "
                         f"{self.max_payload_bytes} bytes")
        t0 = time.perf_counter()
        cap = max(self.max_payload_bytes, session.max_seq_len * self.hidden_size * 4)
        try:
            enc = wire.unpack(act.payload, max_bytes=cap)
        except WireError as e:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad activation payload: {e}") from None
        if enc.codec not in session.codecs:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                         f"payload codec {enc.codec!r} is not this session's codec "
                         f"({', '.join(sorted(session.codecs))})")
        if len(enc.shape) != 2 or enc.shape[1] != self.hidden_size:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                         f"activation must be (S, {self.hidden_size}), got shape {enc.shape}")
        rows = enc.shape[0]
        if session.tail.position + rows > session.max_seq_len:
            raise _Abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                         f"{rows} more positions exceed the session's {session.max_seq_len}")
        t1 = time.perf_counter()
        try:
            x = decode(enc)
        except (FcEdgeError, ValueError, RuntimeError) as e:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                         f"cannot decode the {enc.codec} payload: {e}") from None
        t2 = time.perf_counter()
        try:
            logits = session.tail.step(x)
            token = session.sampler(logits[-1])
        except ConfigError as e:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        except (RuntimeError, ModelError) as e:
            log.exception("tail failed in session %s", session.id)
            raise _Abort(grpc.StatusCode.INTERNAL, f"the tail failed: {e}") from None
        t3 = time.perf_counter()
        session.step += 1
        session.generated += 1
        session.done = token in session.eos or (
            session.max_new_tokens > 0 and session.generated >= session.max_new_tokens)
        return pb2.ServerFrame(token=pb2.Token(
            step=act.step, id=token, done=session.done,
            timings=pb2.ServerTimings(unpack_s=t1 - t0, decode_s=t2 - t1, compute_s=t3 - t2,
                                      total_s=time.perf_counter() - received, codec=enc.codec)))


class ServerHandle:
    """A running server: ``.port``, ``.address``, ``.active_sessions()``, ``.stop()``."""

    def __init__(self, server: grpc.Server, servicer: SplitInferenceServicer, host: str,
                 port: int, tls: bool) -> None:
        self.server = server
        self.servicer = servicer
        self.host = host
        self.port = port
        self.tls = tls

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def fingerprint(self) -> str:
        return self.servicer.fingerprint

    def active_sessions(self) -> int:
        """Sessions holding a KV cache right now."""
        return len(self.servicer.active_sessions())

    def session_ids(self) -> list[str]:
        return self.servicer.active_sessions()

    def wait(self) -> None:
        """Block until the server stops."""
        self.server.wait_for_termination()

    def stop(self, grace: float | None = None) -> None:
        """Stop serving; open sessions are cancelled after ``grace`` seconds."""
        self.server.stop(grace).wait()

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
    max_sessions: int = DEFAULT_MAX_SESSIONS,
    max_seq_len: int = DEFAULT_MAX_SEQ_LEN,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    idle_timeout_s: float | None = DEFAULT_IDLE_TIMEOUT_S,
) -> ServerHandle:
    """Serve the tail of a model (spec string, model or (model, tokenizer)) at ``split_layer``.

    ``port=0`` picks a free port (read it from ``handle.port``). ``token`` requires
    ``authorization: Bearer <token>`` metadata on every call; ``tls_cert``/``tls_key`` (PEM
    files) serve TLS. Limits: ``max_sessions`` concurrent sessions, ``max_seq_len`` positions per
    session, ``max_payload_bytes`` per activation frame, ``idle_timeout_s`` (None: none) between
    frames. Returns at once; the server runs on its own threads.
    """
    for name, value in (("max_sessions", max_sessions), ("max_seq_len", max_seq_len),
                        ("max_payload_bytes", max_payload_bytes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    if idle_timeout_s is not None and not idle_timeout_s > 0:
        raise ConfigError(f"idle_timeout_s must be > 0 (or None), got {idle_timeout_s!r}")
    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("TLS needs both --tls-cert and --tls-key")
    if token is not None and not token:
        raise ConfigError("the bearer token must not be empty")
    model = load_server_model(model_spec_or_model)
    if split_layer is None:
        split_layer = default_split_layer(model)
    from fc_edge.codecs.transform import register_channel_weights
    from fc_edge.models.split import channel_weights

    register_channel_weights(channel_weights(model, split_layer))  # decodes shaped payloads
    servicer = SplitInferenceServicer(model, split_layer, token, max_sessions, max_seq_len,
                                      max_payload_bytes, idle_timeout_s)
    options = [
        ("grpc.max_receive_message_length", max_payload_bytes + 64 * 1024),
        ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ("grpc.so_reuseport", 0),
        # clients ping every 30 s to notice a dead server during a long step; allow it
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]
    # one worker per session plus room to answer Info and to refuse sessions over the limit
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_sessions + 4,
                                                    thread_name_prefix="fc-edge-rpc"),
                         options=options)
    pb2_grpc.add_SplitInferenceServicer_to_server(servicer, server)
    bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        if tls_cert is not None:
            creds = grpc.ssl_server_credentials(
                [(_read(tls_key, "TLS key"), _read(tls_cert, "TLS certificate"))])
            bound = server.add_secure_port(bind, creds)
        else:
            bound = server.add_insecure_port(bind)
    except RuntimeError as e:
        raise ConfigError(f"cannot listen on {bind}: {e}") from None
    if not bound:
        raise ConfigError(f"cannot listen on {bind} (address in use or not local)")
    server.start()
    return ServerHandle(server, servicer, host, bound, tls_cert is not None)


def _read(path: str | Path | None, what: str) -> bytes:
    try:
        return Path(str(path)).expanduser().read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read the {what} {str(path)!r}: {e.strerror}") from None
