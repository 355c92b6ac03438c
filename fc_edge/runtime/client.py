"""The device client: runs the head, compresses each activation and streams it to the server.

>>> client = DeviceClient("127.0.0.1:50051", "smollm2-135m", split_layer=1, codec="rotated")
>>> result = client.generate("The capital of France is", max_new_tokens=16)
>>> result.text, result.tpot_s, result.steps[0].bytes_up

Given a model spec, the client reads only what a device runs
(:mod:`fc_edge.models.checkpoint`): the config first, then the servers are asked for their
``Info`` (a server that cannot be reached, that splits elsewhere or serves another model fails
here, before any weight is read), then the embedding, layers[:L] and the tokenizer. The head is
anything with ``start(max_seq_len) -> session`` whose ``session.step(ids (S,) long)`` returns
the ``(S, D)`` activation (:class:`HeadRunner`): by default our
:class:`~fc_edge.models.head.Head`; an exported bundle's engine comes as a
:class:`~fc_edge.models.checkpoint.DeviceHead` (:func:`fc_edge.engine.open_bundle`).

A codec that cannot code a step as configured (it refuses the shape and the step goes as fp16,
or it clamps a parameter, or its payload is no smaller than fp16's) is reported once per
client through ``on_warning`` (default: a :class:`CodecFallbackWarning`); ``strict=True``
makes each of them an error instead.

Several servers (``"a:50051,b:50051"``) spread sessions: each :meth:`DeviceClient.generate` opens
its session on the next server of the list (from a random start). When a server goes away in the
middle of a session (UNAVAILABLE, a reset stream), the client opens a new session on the next
server and replays the prompt and the tokens generated so far as one prefill, then goes on; that
step is timed as phase ``recovered`` (docs/deploy.md, "When a server or replica dies").
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import queue
import random
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import grpc
import torch
from torch import Tensor

from fc_edge.codecs import Codec, get_codec, wire
from fc_edge.errors import BudgetError, ConfigError, FcEdgeError
from fc_edge.models.checkpoint import Checkpoint, DeviceHead, ModelCheckpoint, open_checkpoint
from fc_edge.models.defaults import DEFAULT_CODEC
from fc_edge.runtime.proto import pb2, pb2_grpc
from fc_edge.runtime.protocol import (
    FALLBACK_CODEC,
    activation_frame,
    close_frame,
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

# codecs whose payload is by design no smaller than float16's (no warning for that)
_UNCOMPRESSED = ("identity",)
# parameters a codec clips to the activation's shape, under the same name on the wire
_CLAMPED = {"fourier": ("k_s", "k_d"), "topk": ("k",), "svd": ("rank",), "qr": ("rank",),
            "rotated": ("keep",)}


class CodecFallbackWarning(UserWarning):
    """A step was not coded as the codec was configured: sent as fp16, a parameter clamped,
    or a payload no smaller than float16's."""

#: Sessions lost to a dead server that one generation may recover from, by default.
DEFAULT_MAX_RECOVERIES = 3
LB_POLICIES = ("pick_first", "round_robin")
# gRPC target schemes whose target may itself name several addresses (kept whole, not split)
GRPC_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:", "xds:")
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
        parts = [text] if text.startswith(GRPC_SCHEMES) else text.split(",")
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
    seconds), ``error`` the RPC error, ``opened`` whether the session had opened."""

    def __init__(self, error: grpc.RpcError, at: float, opened: bool = True) -> None:
        super().__init__(str(error))
        self.error = error
        self.at = at
        self.opened = opened


def _why(e: grpc.RpcError) -> str:
    """A short reason a server could not be reached (gRPC's details are a paragraph)."""
    details = (e.details() if hasattr(e, "details") else "") or ""
    for short in ("Connection refused", "Deadline Exceeded", "Name resolution failure",
                  "DNS resolution failed", "No route to host", "Network is unreachable"):
        if short.lower() in details.lower():
            return short.lower()
    code = _code(e)
    return details or (code.name if code is not None else "unknown")


def _code(e: grpc.RpcError) -> grpc.StatusCode | None:
    return e.code() if hasattr(e, "code") else None


def _warn(message: str) -> None:
    warnings.warn(message, CodecFallbackWarning, stacklevel=4)


def _is_model(x: Any) -> bool:
    return hasattr(x, "config") and hasattr(x, "state_dict")


class DeviceClient:
    """A device that runs ``model``'s layers[:split_layer] and talks to one or more servers.

    ``address`` is ``HOST:PORT``, several separated by commas (or a list), or one gRPC target
    such as ``dns:///edge.example:50051`` (see :func:`split_servers`). ``model_spec_or_model`` is
    a model spec (read lazily: see the module doc), a
    :class:`~fc_edge.models.checkpoint.DeviceHead` (an exported bundle), a model, or a
    ``(model, tokenizer)`` pair; it may be ``None`` when ``head`` and ``fingerprint`` are given.
    ``split_layer`` None is :data:`~fc_edge.models.split.DEFAULT_SPLIT_LAYER`. ``codec`` is a
    codec or a registry name / alias (the label shown in timings). ``token`` is the servers'
    bearer token; ``tls_ca`` a PEM file of the CA that signed their certificates (turns on TLS).
    ``max_recoveries`` bounds the sessions one generation may lose to a dead server and resume
    elsewhere (0: none); a server that refuses the first connection of a client is not retried
    (the next of the list is tried, and when none answers the error is immediate).
    ``lb_policy`` is gRPC's load-balancing policy of each channel (``round_robin`` spreads the
    sessions of one target over all the addresses its name resolves to). Sessions go round the
    list from server ``first_server`` (default: a random one). ``strict`` and ``on_warning``:
    see the module doc. ``calibration``: the codec's calibration artifact (a path or a loaded
    :class:`~fc_edge.codecs.calibration.Calibration`; ``klt`` needs one): every reachable
    server's ``Info`` must list its SHA-256 (checked before any weight is read), each ``Open``
    names it, and each decode step is encoded knowing its token, as the server decodes it
    (docs/protocol.md, "Calibration").
    """

    def __init__(
        self,
        address: str | Sequence[str],
        model_spec_or_model: Any,
        split_layer: int | None = None,
        codec: Codec | str = DEFAULT_CODEC,
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
        strict: bool = False,
        on_warning: Callable[[str], None] | None = None,
        calibration: str | Path | Any = None,
    ) -> None:
        self.servers = split_servers(address)
        if isinstance(max_recoveries, bool) or not isinstance(max_recoveries, int) \
                or max_recoveries < 0:
            raise ConfigError(f"max_recoveries must be an integer >= 0, got {max_recoveries!r}")
        if lb_policy is not None and lb_policy not in LB_POLICIES:
            raise ConfigError(f"lb_policy must be one of {', '.join(LB_POLICIES)}, "
                              f"got {lb_policy!r}")
        self.max_recoveries = max_recoveries
        self.strict = strict
        self.on_warning = on_warning or _warn
        self._warned: set[Any] = set()
        if isinstance(codec, str):
            self.codec_label = codec
            self.codec = get_codec(codec)  # a wrong name fails before anything is read
        else:
            self.codec = codec
            self.codec_label = codec.name
        # the calibration artifact (klt): loaded before anything else is read, named by its
        # SHA-256 in every Open; the servers must list it in their Info
        self.calibration = _calibration(calibration, self.codec)
        self.timeout_s = timeout_s
        self.address = ",".join(self.servers)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._open_channels(tls_ca, tls_server_name, lb_policy)
        # sessions go round the list from a random server, so that many devices that each
        # run one generation still spread over the servers
        if first_server is None:
            first_server = random.randrange(len(self.servers))
        self._turn = itertools.count(first_server)
        self._reached: set[int] = set()  # servers that opened a session for this client
        self._checked = False  # check_servers ran
        try:
            dh = self._device_head(model_spec_or_model, split_layer, tokenizer, head,
                                   fingerprint, device, dtype)
        except BaseException:
            self.close()
            raise
        if fingerprint is not None:  # what the device claims to hold (tests force others)
            dh = dataclasses.replace(dh, fingerprint=fingerprint)
        if self.calibration is not None and not self._checked:
            try:
                self.check_servers(dh.fingerprint, dh.split_layer)
            except BaseException:
                self.close()
                raise
        self.device_head = dh
        self.model = model_spec_or_model if _is_model(model_spec_or_model) else None
        if isinstance(model_spec_or_model, tuple):
            self.model = model_spec_or_model[0]
        self.tokenizer = dh.tokenizer
        self.split_layer = dh.split_layer
        self.head: HeadRunner = dh.head
        self.fingerprint = dh.fingerprint
        self.eos_token_ids = dh.eos_token_ids
        # Bind the codec to the model's channel weights (noise shaping for `rotated`) and the
        # calibration (klt); the server holds the same for the model it serves.
        try:
            self.codec.bind(self._codec_context(dh))
        except BaseException:
            self.close()
            raise
        self.fallback = get_codec(FALLBACK_CODEC)
        self._refused_rows: set[int] = set()
        self.device = _device_of(dh.head)

    def _device_head(self, source: Any, split_layer: int | None, tokenizer: Any,
                     head: HeadRunner | None, fingerprint: str | None, device: Any,
                     dtype: Any) -> DeviceHead:
        """The head and what the device agrees on with the server, from any accepted source;
        from files, the servers are checked before the weights are read."""
        from fc_edge.models.defaults import DEFAULT_SPLIT_LAYER

        if isinstance(source, DeviceHead):
            if head is not None or device is not None or dtype is not None:
                raise ConfigError("a DeviceHead comes with its head: drop head=, device=, dtype=")
            if split_layer not in (None, source.split_layer):
                raise ConfigError(f"split_layer {split_layer}, but the head was made for "
                                  f"layer {source.split_layer}")
            if tokenizer is not None:
                source.tokenizer = tokenizer
            return source
        if head is not None:
            if device is not None or dtype is not None:
                raise ConfigError("device= and dtype= place a head built from the model; an "
                                  "engine head runs where it was built")
            if source is None and fingerprint is None:
                raise ConfigError("DeviceClient needs a model, or both head= and fingerprint=")
            if split_layer is None:
                raise ConfigError("give split_layer when the head is not built from a model")
            ckpt = self._checkpoint(source, tokenizer) if source is not None else None
            weights = getattr(head, "channel_weights", None)
            if weights is None and ckpt is not None:
                weights = ckpt.channel_weights(split_layer)
            return DeviceHead(
                head=head, split_layer=split_layer,
                fingerprint=fingerprint or (ckpt.fingerprint() if ckpt else ""),
                hidden_size=int(getattr(head, "hidden_size", 0) or
                                (ckpt.hidden_size if ckpt else 0)),
                channel_weights=weights,
                tokenizer=tokenizer if tokenizer is not None
                else (ckpt.tokenizer() if ckpt else None),
                eos_token_ids=ckpt.eos_token_ids() if ckpt else [], source="head=")
        if source is None:
            raise ConfigError("DeviceClient needs a model, or both head= and fingerprint=")
        ckpt = self._checkpoint(source, tokenizer)
        layer = DEFAULT_SPLIT_LAYER if split_layer is None else split_layer
        if split_layer is None and hasattr(ckpt, "split_layer"):
            layer = ckpt.split_layer  # a bundle's own
        ckpt.check_split_layer(layer)
        ckpt.check_placement(device, dtype)
        if not isinstance(ckpt, ModelCheckpoint) or self.calibration is not None:
            # weights come from files (or the codec needs the servers' artifact): make sure a
            # server will take them before reading them
            self.check_servers(ckpt.fingerprint(), layer)
        return ckpt.device_head(layer, device, dtype)

    def _codec_context(self, dh: DeviceHead) -> Any:
        """The device's codec context: the channel weights and, with a calibration, the
        artifact and what its decode-step predictor reads (the head on each token alone, the
        embedding), computed here from the device's own head."""
        from fc_edge.codecs.context import ChannelWeights, CodecContext

        weights = None if dh.channel_weights is None else ChannelWeights.of(dh.channel_weights)
        cal = self.calibration
        if cal is None:
            return CodecContext(weights=weights)
        from fc_edge.codecs.calibration import check_artifact, head_features
        from fc_edge.codecs.klt import predictions

        check_artifact(cal, dh.fingerprint, dh.split_layer, dh.hidden_size or cal.hidden_size)
        head = dh.head
        if not hasattr(head, "empty_kv") or not hasattr(head, "embed_tokens"):
            backend = getattr(head, "backend", type(head).__name__)
            raise ConfigError(f"the {backend} engine cannot run codec {self.codec.name} (its "
                              "decode-step predictor runs the head on each token alone): use "
                              "--engine-backend torch, or another codec")
        if head.embed_tokens.weight.dtype != torch.float32:
            # the server's predictor runs its float32 model: a rounded head predicts a little
            # differently, and the server decodes the rows against its own prediction
            self._problem(("klt-dtype",),
                          f"{self.codec.name}: the decode-step predictor runs this device's "
                          f"{str(head.embed_tokens.weight.dtype).removeprefix('torch.')} head; "
                          "the server's runs in float32, so decode rows carry the difference "
                          "(use --dtype float32 for exact decode rows)")
        ctx = CodecContext(weights=weights, calibration=cal, features=head_features(head),
                           embedding=head.embed_tokens.weight.detach())
        predictions(ctx, cal, torch.zeros(1, dtype=torch.long))  # the table, once, now
        return ctx

    @staticmethod
    def _checkpoint(source: Any, tokenizer: Any) -> Checkpoint:
        if isinstance(source, Checkpoint):
            return source
        if isinstance(source, (str, Path)):
            return open_checkpoint(source)
        if isinstance(source, tuple):
            model, pair_tok = source
            return ModelCheckpoint(model, tokenizer if tokenizer is not None else pair_tok,
                                   type(model).__name__)
        return ModelCheckpoint(source, tokenizer, type(source).__name__)

    def _open_channels(self, tls_ca: str | Path | None, tls_server_name: str | None,
                       lb_policy: str | None) -> None:
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

    @property
    def calibration_hash(self) -> str:
        """``Open.calibration``: the SHA-256 of the artifact, "" without one."""
        return self.calibration.digest if self.calibration is not None else ""

    def check_servers(self, fingerprint: str | None = None,
                      split_layer: int | None = None) -> list[Any]:
        """Ask every server for its ``Info`` (one try each, no retry) and check that it serves
        ``fingerprint`` split at ``split_layer`` (when given). Servers that cannot be reached are
        reported through ``on_warning`` when another one answers; raises :class:`SessionError`
        (UNAVAILABLE) when none does, :class:`ConfigError` on a mismatch. Returns the answers
        (``ServerInfo``, or None for a server that did not answer or has no ``Info``)."""
        self._checked = True
        infos: list[Any] = []
        down: list[str] = []
        for i, address in enumerate(self.servers):
            try:
                info = self.stubs[i].Info(pb2.InfoRequest(), metadata=self.metadata,
                                          timeout=self.timeout_s or 10)
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                    infos.append(None)
                    continue
                err = _rpc_error(e)
                if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    down.append(f"{address} ({_why(e)})")
                    infos.append(None)
                    continue
                raise SessionError(err.code, f"{address}: {err.details}") from None
            if split_layer is not None and info.split_layer != split_layer:
                raise ConfigError(f"the server at {address} splits after layer "
                                  f"{info.split_layer}, not {split_layer}: give --split-layer "
                                  f"{info.split_layer} (or serve layer {split_layer})")
            if fingerprint and info.model_fingerprint and info.model_fingerprint != fingerprint:
                raise ConfigError(f"the server at {address} serves another model (fingerprint "
                                  f"{info.model_fingerprint}, this device's {fingerprint})")
            if self.calibration is not None and self.calibration_hash not in info.calibrations:
                raise ConfigError(f"the server at {address} has not loaded calibration "
                                  f"{self.calibration.name} (serve it with --calibration "
                                  f"{self.calibration.name}.safetensors)")
            infos.append(info)
        if len(down) == len(self.servers):
            raise SessionError(grpc.StatusCode.UNAVAILABLE,
                               "cannot reach " + ("the server " if len(down) == 1
                                                  else "any server: ") + ", ".join(down))
        for what in down:
            self._warn_once(("down", what), f"cannot reach the server {what}; using the others")
        return infos

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
        """EOS ids of the model's generation config (or its config, or its tokenizer)."""
        if self.eos_token_ids:
            return list(self.eos_token_ids)
        eos = getattr(self.tokenizer, "eos_token_id", None) if self.tokenizer else None
        return [] if eos is None else [int(eos)]

    def _encode(self, a: Tensor, tokens: Tensor | None = None) -> tuple[bytes, str, float, float]:
        """Payload bytes, codec label, encode seconds, pack seconds. ``tokens``: the rows'
        token ids at a decode step (the token the server sampled last), None at a prefill.
        Falls back to fp16 for a shape the session codec refuses (BudgetError), e.g. svd / qr
        on a one-row decode step, with one warning (an error when ``strict``)."""
        rows = a.shape[0]
        codec, label = self.codec, self.codec_label
        if rows in self._refused_rows:
            codec, label = self.fallback, FALLBACK_CODEC
        with stage("encode", self.device) as t_enc:
            try:
                ctx = self.codec.context
                enc = codec.encode(a, ctx if tokens is None else ctx.with_tokens(tokens))
            except BudgetError as e:
                if self.strict:
                    raise BudgetError(f"{e} (strict: no {FALLBACK_CODEC} fallback)") from None
                self._refused_rows.add(rows)
                self._warn_once(("fallback", rows == 1),
                                f"{label} cannot code a {rows}-row step ({e}); sending "
                                f"{'such steps' if rows == 1 else 'it'} as {FALLBACK_CODEC}")
                codec, label = self.fallback, FALLBACK_CODEC
                enc = codec.encode(a)
        with stage("pack", self.device) as t_pack:
            payload = wire.pack(enc)
        if codec is self.codec:
            self._check_coded(enc, len(payload), rows, a.shape[-1])
        return payload, label, t_enc.seconds, t_pack.seconds

    def _check_coded(self, enc: Any, n_bytes: int, rows: int, width: int) -> None:
        """Warn (or, when ``strict``, raise :class:`BudgetError`) when the codec clamped a
        configured parameter for this shape, or sent no fewer bytes than float16 would."""
        config = self.codec.config()
        for key in _CLAMPED.get(self.codec.name, ()):
            want, sent = config.get(key), enc.params.get(key)
            if isinstance(want, int) and not isinstance(want, bool) and sent is not None \
                    and want != sent:
                self._problem(("clamp", key, rows == 1),
                              f"{self.codec_label}: {key}={want} is clamped to {sent} for a "
                              f"({rows}, {width}) step (the activation's shape allows no more)")
        fp16 = rows * width * 2
        if n_bytes >= fp16 and self.codec.name not in _UNCOMPRESSED \
                and config.get("bits") != 16:
            self._problem(("size", rows == 1),
                          f"{self.codec_label} sends {n_bytes} bytes for a ({rows}, {width}) "
                          f"step, no fewer than float16's {fp16}: lower its parameters or "
                          "use fp16")

    def _problem(self, key: Any, message: str) -> None:
        if self.strict:
            raise BudgetError(f"{message} (strict)")
        self._warn_once(key, message)

    def _warn_once(self, key: Any, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            self.on_warning(message)

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
        refused: dict[int, str] = {}  # servers that refused a first connection: not retried
        while True:
            try:
                session_id = self._session(server, ids, max_new_tokens, sampling, eos, tokens,
                                           steps, lost_at, on_token)
                break
            except _Lost as e:
                if not e.opened and not tokens and server not in self._reached \
                        and _code(e.error) == grpc.StatusCode.UNAVAILABLE:
                    # never reached: a server that is not running is reported at once
                    refused[server] = f"{self.servers[server]} ({_why(e.error)})"
                    untried = [i for i in range(len(self.servers)) if i not in refused]
                    if not untried:
                        raise SessionError(grpc.StatusCode.UNAVAILABLE, "cannot reach " + (
                            "the server " if len(refused) == 1 else "any server: ")
                            + ", ".join(refused.values())) from None
                    server = min(untried, key=lambda i: (i - server) % len(self.servers))
                    continue
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
            top_p=sampling.top_p, seed=sampling.seed, calibration=self.calibration_hash)
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
            self._reached.add(server)
            hs = self.head.start(max_seq_len)
            step_ids = torch.cat([ids, torch.tensor(tokens, dtype=torch.long)]) if tokens \
                else ids
            for step in range(max_new_tokens - len(tokens)):
                # a recovered step's time runs from the moment the old session was lost
                t_start = lost_at if step == 0 and lost_at is not None else time.perf_counter()
                with stage("head", self.device) as t_head:
                    a = hs.step(step_ids)
                # a decode step's row is the head's output for the token the server sampled
                # last (step_ids): the codec may predict it from that, as the server will
                payload, label, enc_s, pack_s = self._encode(a.detach(),
                                                             step_ids if step else None)
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
                raise _Lost(e, time.perf_counter(), opened=bool(session_id)) from None
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


def _calibration(source: Any, codec: Codec) -> Any:
    """The :class:`~fc_edge.codecs.calibration.Calibration` of ``calibration=`` (a path or a
    loaded one) or of the codec itself (``klt``'s ``calibration=``); ConfigError when a
    calibrated codec has none, or the two differ."""
    from fc_edge.codecs.calibration import Calibration
    from fc_edge.codecs.calibration import load as load_calibration
    from fc_edge.runtime.protocol import CALIBRATED_CODECS

    cal = source if source is None or isinstance(source, Calibration) \
        else load_calibration(source)
    own = getattr(codec, "calibration", None)
    if cal is not None and own is not None and own.digest != cal.digest:
        raise ConfigError(f"the codec names calibration {own.name}, --calibration gives "
                          f"{cal.name}")
    cal = cal or own
    if cal is None and codec.name in CALIBRATED_CODECS:
        raise ConfigError(f"codec {codec.name} needs its calibration artifact: give "
                          "--calibration PATH (the one the server loaded; fc-edge calibrate "
                          "makes it)")
    return cal


def _device_of(head: Any) -> torch.device:
    params = getattr(head, "parameters", None)
    if callable(params):
        for p in params():
            return p.device
    return torch.device("cpu")
