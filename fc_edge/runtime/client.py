"""The device client: runs the head, compresses each activation and streams it to the server.

>>> client = DeviceClient("127.0.0.1:50051", "smollm2-135m", split_layer=8, codec="fourier")
>>> result = client.generate("The capital of France is", max_new_tokens=16)
>>> result.text, result.tpot_s, result.steps[0].bytes_up

The head is anything with ``start(max_seq_len) -> session`` whose ``session.step(ids (S,) long)``
returns the ``(S, D)`` activation (:class:`HeadRunner`): by default our
:class:`~fc_edge.models.head.Head`, and an exported engine can be dropped in with ``head=``.

Several servers (``"a:50051,b:50051"``) spread sessions: each :meth:`DeviceClient.generate` opens
its session on the next server of the list (from a random start). When a server goes away in the
middle of a session (UNAVAILABLE, a reset stream), the client opens a new session on the next
server and replays the prompt and the tokens generated so far as one prefill, then goes on; that
step is timed as phase ``recovered`` (docs/deploy.md, "When a server or replica dies").
"""

from __future__ import annotations

import itertools
import json
import queue
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import grpc
import torch
from torch import Tensor

from fc_edge.codecs import Codec, get_codec, wire
from fc_edge.errors import BudgetError, ConfigError, FcEdgeError
from fc_edge.runtime.proto import pb2, pb2_grpc
from fc_edge.runtime.protocol import (
    FALLBACK_CODEC,
    activation_frame,
    close_frame,
    default_split_layer,
    open_frame,
)
from fc_edge.runtime.sampling import SamplingConfig
from fc_edge.runtime.timing import GenerationResult, StepTiming, stage


class SessionError(FcEdgeError):
    """The server refused or ended a session; ``code`` is the gRPC status code."""

    def __init__(self, code: grpc.StatusCode | None, details: str) -> None:
        name = code.name if code is not None else "UNKNOWN"
        super().__init__(f"server: {name}: {details}")
        self.code = code
        self.details = details


class HeadSessionLike(Protocol):
    def step(self, input_ids: Tensor) -> Tensor: ...


class HeadRunner(Protocol):
    """What the client needs of a device head (our Head, or an engine runner)."""

    def start(self, max_seq_len: int) -> HeadSessionLike: ...


_USE_MODEL = object()  # eos_token_id default: the model's own

#: Sessions lost to a dead server that one generation may recover from, by default.
DEFAULT_MAX_RECOVERIES = 3
LB_POLICIES = ("pick_first", "round_robin")
# gRPC target schemes whose target may itself name several addresses (kept whole, not split)
_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:", "xds:")
# what a server that went away looks like when it is not reported as UNAVAILABLE: a stream reset
# by a dying peer, or Ray Serve's gRPC proxy reporting that the replica's actor died (INTERNAL)
_GONE_MARKS = ("RST_STREAM", "Stream removed", "Socket closed", "Connection reset",
               "actor died unexpectedly", "The actor is dead")


def _rpc_error(e: grpc.RpcError) -> SessionError:
    code = e.code() if hasattr(e, "code") else None
    details = e.details() if hasattr(e, "details") else str(e)
    if code == grpc.StatusCode.UNAVAILABLE:
        details = f"cannot reach the server ({details})"
    return SessionError(code, details or "(no details)")


def split_servers(address: str | Sequence[str]) -> list[str]:
    """The server targets of ``address``: ``"a:1,b:2"`` or a list gives several; a target with
    a gRPC scheme (``dns:///edge:50051``, ``ipv4:10.0.0.1:50051,10.0.0.2:50051``) is one target
    (its channel resolves and balances the addresses itself)."""
    if isinstance(address, str):
        text = address.strip()
        parts = [text] if text.startswith(_SCHEMES) else text.split(",")
    else:
        parts = list(address)
    servers = [p.strip() for p in parts if p.strip()]
    if not servers:
        raise ConfigError(f"no server address in {address!r} (give HOST:PORT[,HOST:PORT...])")
    return servers


def _recoverable(e: grpc.RpcError) -> bool:
    """Whether the server (not the session) failed: the session can go on elsewhere."""
    code = e.code() if hasattr(e, "code") else None
    if code == grpc.StatusCode.UNAVAILABLE:
        return True
    details = (e.details() if hasattr(e, "details") else "") or ""
    return code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN) \
        and any(mark in details for mark in _GONE_MARKS)


class _Lost(Exception):
    """A session ended by its server going away; ``at`` is when the client noticed (perf_counter
    seconds), ``error`` the RPC error."""

    def __init__(self, error: grpc.RpcError, at: float) -> None:
        super().__init__(str(error))
        self.error = error
        self.at = at


class DeviceClient:
    """A device that runs ``model``'s layers[:split_layer] and talks to one or more servers.

    ``address`` is ``HOST:PORT``, several separated by commas (or a list), or one gRPC target
    such as ``dns:///edge.example:50051`` (see :func:`split_servers`). ``model_spec_or_model``
    is a spec for ``load_model``, a model, or a ``(model, tokenizer)`` pair; it may be ``None``
    when ``head`` and ``fingerprint`` are given. ``codec`` is a codec or a registry name / alias
    (the label shown in timings). ``token`` is the servers' bearer token; ``tls_ca`` a PEM file
    of the CA that signed their certificates (turns on TLS). ``max_recoveries`` bounds the
    sessions one generation may lose to a dead server and resume elsewhere (0: none);
    ``lb_policy`` is gRPC's load-balancing policy of each channel (``round_robin`` spreads the
    sessions of one target over all the addresses its name resolves to). Sessions go round the
    list from server ``first_server`` (default: a random one).
    """

    def __init__(
        self,
        address: str | Sequence[str],
        model_spec_or_model: Any,
        split_layer: int | None,
        codec: Codec | str = "identity",
        token: str | None = None,
        tls_ca: str | Path | None = None,
        *,
        tokenizer: Any = None,
        head: HeadRunner | None = None,
        fingerprint: str | None = None,
        tls_server_name: str | None = None,
        timeout_s: float | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        max_recoveries: int = DEFAULT_MAX_RECOVERIES,
        lb_policy: str | None = None,
        first_server: int | None = None,
    ) -> None:
        self.servers = split_servers(address)
        if isinstance(max_recoveries, bool) or not isinstance(max_recoveries, int) \
                or max_recoveries < 0:
            raise ConfigError(f"max_recoveries must be an integer >= 0, got {max_recoveries!r}")
        if lb_policy is not None and lb_policy not in LB_POLICIES:
            raise ConfigError(f"lb_policy must be one of {', '.join(LB_POLICIES)}, "
                              f"got {lb_policy!r}")
        self.max_recoveries = max_recoveries
        model = model_spec_or_model
        if isinstance(model, (str, Path)):
            from fc_edge.models.pretrained import load_model

            model, loaded_tok = load_model(str(model))
            tokenizer = tokenizer if tokenizer is not None else loaded_tok
        elif isinstance(model, tuple):
            model, pair_tok = model
            tokenizer = tokenizer if tokenizer is not None else pair_tok
        if model is None and (head is None or fingerprint is None):
            raise ConfigError("DeviceClient needs a model, or both head= and fingerprint=")
        self.model = model
        self.tokenizer = tokenizer
        if split_layer is None:
            if model is None:
                raise ConfigError("give split_layer when the head is not built from a model")
            split_layer = default_split_layer(model)
        self.split_layer = split_layer
        if head is None:
            from fc_edge.models.split import split

            head, _ = split(model, layer=split_layer)
            if device is not None or dtype is not None:
                from fc_edge.devices import resolve_device, resolve_dtype

                place = resolve_device(device)
                head = head.to_device(place, resolve_dtype(dtype, place))
        elif device is not None or dtype is not None:
            raise ConfigError("device= and dtype= place a head built from the model; an engine "
                              "head runs where it was built")
        self.head: HeadRunner = head
        if fingerprint is None:
            from fc_edge.models.pretrained import model_fingerprint

            fingerprint = model_fingerprint(model)
        self.fingerprint = fingerprint
        if isinstance(codec, str):
            self.codec_label = codec
            self.codec = get_codec(codec)
        else:
            self.codec = codec
            self.codec_label = codec.name
        # Bind the codec to the model's channel weights (noise shaping for `rotated`); the
        # server registers the same vector for the model it serves.
        weights = getattr(head, "channel_weights", None)
        if weights is None and model is not None:
            from fc_edge.models.split import channel_weights

            weights = channel_weights(model, split_layer)
        self.codec.bind(weights)
        self.fallback = get_codec(FALLBACK_CODEC)
        self._refused_rows: set[int] = set()
        self.device = _device_of(head, model)
        self.timeout_s = timeout_s
        self.address = ",".join(self.servers)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        options = [("grpc.max_send_message_length", -1),
                   ("grpc.max_receive_message_length", 16 * 1024 * 1024),
                   # notice a server that vanished (no FIN) within ~50 s instead of never
                   ("grpc.keepalive_time_ms", 30_000), ("grpc.keepalive_timeout_ms", 20_000)]
        if lb_policy is not None:
            options.append(("grpc.lb_policy_name", lb_policy))
        creds = None
        if tls_ca is not None:
            try:
                ca = Path(str(tls_ca)).expanduser().read_bytes()
            except OSError as e:
                raise ConfigError(f"cannot read the TLS CA file {str(tls_ca)!r}: {e.strerror}") \
                    from None
            if tls_server_name:
                options.append(("grpc.ssl_target_name_override", tls_server_name))
            creds = grpc.ssl_channel_credentials(ca)
        # one channel per server (channels connect lazily, on their first call)
        self.channels = [grpc.secure_channel(a, creds, options) if creds is not None
                         else grpc.insecure_channel(a, options) for a in self.servers]
        self.stubs = [pb2_grpc.SplitInferenceStub(c) for c in self.channels]
        self.channel, self.stub = self.channels[0], self.stubs[0]
        # sessions go round the list from a random server, so that many devices that each
        # run one generation still spread over the servers
        if first_server is None:
            first_server = random.randrange(len(self.servers))
        self._turn = itertools.count(first_server)

    # --- plumbing -----------------------------------------------------------------------------
    def close(self) -> None:
        for channel in self.channels:
            channel.close()

    def __enter__(self) -> DeviceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def info(self, server: int = 0) -> Any:
        """``ServerInfo`` (fingerprint, split layer, limits, active sessions) of the
        ``server``-th server of the list."""
        try:
            return self.stubs[server].Info(pb2.InfoRequest(), metadata=self.metadata,
                                  timeout=self.timeout_s or 30)
        except grpc.RpcError as e:
            raise _rpc_error(e) from None

    def prompt_ids(self, prompt: str | Sequence[int] | Tensor, chat: bool = False) -> Tensor:
        """Token ids (S,) long of a text prompt (as is, or through the chat template) or ids."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ConfigError("this model has no tokenizer: give the prompt as token ids")
            if chat:
                if not getattr(self.tokenizer, "chat_template", None):
                    raise ConfigError("this model's tokenizer has no chat template; drop --chat")
                ids = self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": prompt}], add_generation_prompt=True,
                    tokenize=True, return_dict=False)
                if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                    ids = ids["input_ids"]
            else:
                ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
            out = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
        else:
            out = torch.as_tensor(prompt, dtype=torch.long).reshape(-1)
        if out.numel() == 0:
            raise ConfigError("the prompt is empty")
        return out

    def default_eos(self) -> list[int]:
        """EOS ids of the model's generation config (or its tokenizer)."""
        eos = None
        gen = getattr(self.model, "generation_config", None)
        if gen is not None:
            eos = gen.eos_token_id
        if eos is None and self.tokenizer is not None:
            eos = self.tokenizer.eos_token_id
        if eos is None:
            return []
        return [int(eos)] if isinstance(eos, int) else [int(t) for t in eos]

    def _encode(self, a: Tensor) -> tuple[bytes, str, float, float]:
        """Payload bytes, codec label, encode seconds, pack seconds. Falls back to fp16 for a
        shape the session codec refuses (BudgetError), e.g. svd / qr on a one-row decode step."""
        rows = a.shape[0]
        codec, label = self.codec, self.codec_label
        if rows in self._refused_rows:
            codec, label = self.fallback, FALLBACK_CODEC
        with stage("encode", self.device) as t_enc:
            try:
                enc = codec.encode(a)
            except BudgetError:
                self._refused_rows.add(rows)
                codec, label = self.fallback, FALLBACK_CODEC
                enc = codec.encode(a)
        with stage("pack", self.device) as t_pack:
            payload = wire.pack(enc)
        return payload, label, t_enc.seconds, t_pack.seconds

    # --- generation ---------------------------------------------------------------------------
    def generate(
        self,
        prompt: str | Sequence[int] | Tensor,
        max_new_tokens: int = 32,
        sampling: SamplingConfig | None = None,
        eos_token_id: Any = _USE_MODEL,
        chat: bool = False,
        on_token: Callable[[int, int, str], None] | None = None,
    ) -> GenerationResult:
        """Generate up to ``max_new_tokens`` after ``prompt`` (text or ids), stopping after an
        EOS token (the model's by default; ``None`` or ``[]`` for none). ``on_token(i, id,
        session_id)`` is called as the ``i``-th token arrives.

        The session opens on the next server of the list. If that server goes away before the
        last token (UNAVAILABLE, a reset stream), a new session opens on the next server and the
        prompt plus the tokens so far are replayed as one prefill (a step of phase
        ``recovered``), up to ``max_recoveries`` times. Greedy decoding with a codec that encodes
        each row on its own (identity) gives the tokens of an uninterrupted run; sampling draws
        from a fresh generator after a recovery.

        Raises :class:`SessionError` when the server refuses or ends the session, or when the
        recoveries are spent.
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
                or max_new_tokens < 0:
            raise ConfigError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        sampling = sampling or SamplingConfig()
        ids = self.prompt_ids(prompt, chat=chat)
        if eos_token_id is _USE_MODEL:
            eos = self.default_eos()
        elif eos_token_id is None:
            eos = []
        elif isinstance(eos_token_id, int):
            eos = [eos_token_id]
        else:
            eos = [int(t) for t in eos_token_id]
        if max_new_tokens == 0:
            return GenerationResult([], self._text([]), [], "")
        tokens: list[int] = []
        steps: list[StepTiming] = []
        session_id = ""
        server = next(self._turn) % len(self.servers)
        lost_at: float | None = None
        lost = 0
        while True:
            try:
                session_id = self._session(server, ids, max_new_tokens, sampling, eos, tokens,
                                           steps, lost_at, on_token)
                break
            except _Lost as e:
                if lost >= self.max_recoveries:
                    err = _rpc_error(e.error)
                    raise SessionError(err.code, f"{err.details}; gave up after {lost} "
                                       "recoveries (--max-recoveries)") from None
                lost += 1
                lost_at = e.at
                server = (server + 1) % len(self.servers)
                if lost >= len(self.servers):
                    # every server of the list failed once: give a restarting one time
                    time.sleep(min(0.25 * 2 ** (lost // len(self.servers) - 1), 2.0))
        return GenerationResult(tokens, self._text(tokens), steps, session_id)

    def _session(self, server: int, ids: Tensor, max_new_tokens: int,
                 sampling: SamplingConfig, eos: list[int], tokens: list[int],
                 steps: list[StepTiming], lost_at: float | None,
                 on_token: Callable[[int, int, str], None] | None) -> str:
        """Run one session on ``self.servers[server]`` until the generation is complete,
        appending to ``tokens`` and ``steps``; returns its session id. With tokens already
        generated (a recovery) its first step replays prompt + tokens. Raises :class:`_Lost`
        when the server goes away, :class:`SessionError` for anything else."""
        max_seq_len = ids.numel() + max_new_tokens
        opening = open_frame(
            self.fingerprint, self.split_layer, self.codec.name, json.dumps(self.codec.config()),
            max_seq_len=max_seq_len, max_new_tokens=max_new_tokens - len(tokens),
            eos_token_ids=eos, temperature=sampling.temperature, top_k=sampling.top_k,
            top_p=sampling.top_p, seed=sampling.seed)
        outbox: queue.SimpleQueue[Any] = queue.SimpleQueue()

        def requests() -> Any:
            while True:
                frame = outbox.get()
                if frame is None:
                    return
                yield frame

        call = self.stubs[server].Generate(requests(), metadata=self.metadata,
                                           timeout=self.timeout_s)
        session_id = ""
        done = False
        try:
            outbox.put(opening)
            ready = next(call)
            session_id = ready.ready.session_id
            hs = self.head.start(max_seq_len)
            step_ids = torch.cat([ids, torch.tensor(tokens, dtype=torch.long)]) if tokens \
                else ids
            for step in range(max_new_tokens - len(tokens)):
                # a recovered step's time runs from the moment the old session was lost
                t_start = lost_at if step == 0 and lost_at is not None else time.perf_counter()
                with stage("head", self.device) as t_head:
                    a = hs.step(step_ids)
                payload, label, enc_s, pack_s = self._encode(a.detach())
                t_send = time.perf_counter()
                outbox.put(activation_frame(step, payload))
                frame = next(call)
                t_recv = time.perf_counter()
                tok = frame.token
                srv = tok.timings
                tokens.append(int(tok.id))
                phase = "decode" if step else ("recovered" if lost_at is not None else "prefill")
                steps.append(StepTiming(
                    phase=phase, rows=int(a.shape[0]),
                    codec=label, device_compute_s=t_head.seconds, encode_s=enc_s, pack_s=pack_s,
                    network_s=max(0.0, (t_recv - t_send) - srv.total_s),
                    server_unpack_s=srv.unpack_s, server_decode_s=srv.decode_s,
                    server_compute_s=srv.compute_s, bytes_up=len(payload),
                    bytes_down=frame.ByteSize(), total_s=t_recv - t_start, token_id=int(tok.id)))
                if on_token is not None:
                    on_token(len(tokens) - 1, int(tok.id), session_id)
                if tok.done:
                    break
                step_ids = torch.tensor([int(tok.id)], dtype=torch.long)
            done = True
            outbox.put(close_frame())
            outbox.put(None)
            for _ in call:  # drain to the server's OK status
                pass
        except grpc.RpcError as e:
            if done and _recoverable(e):
                return session_id  # every token is in; the server went away while closing
            if _recoverable(e) or (not session_id and len(self.servers) > 1
                                   and e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED):
                raise _Lost(e, time.perf_counter()) from None
            raise _rpc_error(e) from None
        except StopIteration:
            raise SessionError(None, "the server ended the stream early") from None
        finally:
            outbox.put(None)
            call.cancel()  # no-op after a clean end; frees the stream on any error
        return session_id

    def _text(self, tokens: list[int]) -> str | None:
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode(tokens, skip_special_tokens=True)


def _device_of(head: Any, model: Any) -> torch.device:
    for obj in (head, model):
        params = getattr(obj, "parameters", None)
        if callable(params):
            for p in params():
                return p.device
    return torch.device("cpu")
