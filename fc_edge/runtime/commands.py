"""CLI verbs of the runtime: ``serve``, ``info``, ``generate`` and ``demo`` (thin fronts over
:func:`~fc_edge.runtime.server.start_server` and :class:`~fc_edge.runtime.client.DeviceClient`)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from typing import Any

from fc_edge.cli import (
    MODEL_HELP,
    add_codec_args,
    add_model_args,
    codec_kwargs,
    port_number,
    server_list,
)
from fc_edge.errors import ConfigError
from fc_edge.models.defaults import DEFAULT_CODEC, DEFAULT_MODEL, DEFAULT_SPLIT_LAYER

ENGINE_BACKENDS = ("auto", "onnxruntime", "tensorrt", "torch")

DEMO_CODECS = "identity,fourier,int8,rotated"
DEMO_PROMPT = "Explain in two sentences why the sky is blue."


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "serve", help="serve the tail of a split model (one gRPC session per generation)",
        description="Serve layers[L:] + norm + lm_head of a model to device clients.")
    add_model_args(p)
    _add_split_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all)")
    p.add_argument("--port", type=port_number, default=50051, help="port (0: pick a free one)")
    p.add_argument("--tls-cert", help="PEM certificate chain: serve TLS (with --tls-key)")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")
    p.add_argument("--token", default=os.environ.get("FC_EDGE_TOKEN"),
                   help="require this bearer token (default: $FC_EDGE_TOKEN)")
    _add_device_args(p, "the tail")
    p.add_argument("--max-sessions", type=int, default=None,
                   help="concurrent sessions (default: what the KV cache holds at one block "
                   "each, at most --max-streams; a session holds blocks only as it grows)")
    p.add_argument("--max-sessions-per-peer", type=int, default=32,
                   help="concurrent sessions of one client address")
    p.add_argument("--max-seq-len", type=int, default=4096, help="positions per session")
    p.add_argument("--max-payload-bytes", type=int, default=None,
                   help="largest activation frame accepted, bytes (default: a whole "
                   "--max-seq-len prefill as float32 + 4 KiB)")
    p.add_argument("--idle-timeout", type=float, default=60.0,
                   help="end a session silent for this many seconds, or one that has not read "
                   "its frames for as long")
    p.add_argument("--open-timeout", type=float, default=10.0,
                   help="close a stream that sends no valid Open within this many seconds")
    p.add_argument("--max-session-s", type=float, default=None,
                   help="end any session this many seconds after its Open (default: no limit)")
    p.add_argument("--max-streams", type=int, default=256,
                   help="open streams at most, Generate and health Watch (more are refused at "
                   "once)")
    p.add_argument("--max-streams-per-peer", type=int, default=64,
                   help="open streams of one client address")
    p.add_argument("--max-batch", type=int, default=32,
                   help="decode steps per batched forward (1: one at a time)")
    p.add_argument("--prefill-chunk", type=int, default=None,
                   help="prefill rows per engine iteration, shared by the waiting prefills "
                   "(default: 64 on a CPU, 256 on a GPU)")
    p.add_argument("--kv-cache-tokens", type=int, default=None,
                   help="positions of the paged KV cache (default: 16 x --max-seq-len)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="run decode steps as CUDA graphs captured at padded batch sizes "
                   "(1, 2, 4, 8, 16, 32; needs --device cuda)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics on http://--metrics-host:PORT/metrics "
                   "(0: a free port; default: no metrics endpoint)")
    p.add_argument("--metrics-host", default="127.0.0.1",
                   help="address of the metrics endpoint (0.0.0.0: all interfaces)")
    p.add_argument("--calibration", action="append", default=[], metavar="PATH",
                   help="a calibration artifact (fc-edge calibrate; klt-*.safetensors) sessions "
                   "may name in their Open; checked against the model and split; repeatable")
    p.add_argument("--drain-s", type=float, default=10.0,
                   help="on SIGTERM / Ctrl-C, let open sessions finish this long, then end them "
                   "(a second signal ends them at once)")
    p.add_argument("--log-level", default="INFO",
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="session open / close / abort lines go to stderr at INFO")
    from fc_edge.runtime.fleet import add_fleet_args

    add_fleet_args(p)
    p.set_defaults(func=cmd_serve)

    i = subparsers.add_parser(
        "info", help="print a server's Info: what it serves, its limits, its load",
        description="Ask `fc-edge serve` (or a Ray Serve fleet's proxy) for its ServerInfo.")
    i.add_argument("server", metavar="HOST:PORT", help="the server (or a gRPC target)")
    i.add_argument("--token", default=os.environ.get("FC_EDGE_TOKEN"),
                   help="the server's bearer token (default: $FC_EDGE_TOKEN)")
    i.add_argument("--tls-ca", help="PEM CA certificate of the server: connect with TLS")
    i.add_argument("--tls-server-name", help="expected name in the server's certificate")
    i.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the answer")
    i.add_argument("--json", action="store_true", help="print JSON instead of aligned lines")
    i.set_defaults(func=cmd_info)

    g = subparsers.add_parser(
        "generate", help="generate with the head here and the tail on a server",
        description="Run layers[:L] here, compress each activation, finish on `fc-edge serve`. "
        "Only the embedding, layers[:L] and the tokenizer are read (or an exported bundle); the "
        "server is asked first, so a wrong address, split or model fails before any weight "
        "loads. The text goes to stdout as tokens arrive; the stage table to stderr.")
    g.add_argument("--model", default=None,
                   help=f"{MODEL_HELP} (default: {DEFAULT_MODEL}; not with --engine)")
    _add_split_arg(g)
    g.add_argument("--engine", default=None, metavar="DIR",
                   help="run the head from an exported bundle (`fc-edge export`) alone: its "
                   "weights, graphs, tokenizer and manifest")
    g.add_argument("--engine-backend", choices=ENGINE_BACKENDS, default="auto",
                   help="what runs --engine: its TensorRT plans, its ONNX graphs with "
                   "onnxruntime, or its weights with torch (auto: the plans where tensorrt and a "
                   "CUDA GPU are, else onnxruntime where installed, else torch)")
    g.add_argument("--server", required=True, type=server_list,
                   help="HOST:PORT of `fc-edge serve`; several as A,B,C spread sessions and "
                   "recover onto each other; or one gRPC target (dns:///NAME:PORT)")
    g.add_argument("--device", default=None,
                   help="where the head runs: cpu, cuda or cuda:N (default: cpu; an engine runs "
                   "where its backend does)")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="precision of the head (default: float32)")
    g.add_argument("--max-recoveries", type=int, default=3,
                   help="sessions lost to a dead server that are resumed on the next one by "
                   "replaying the tokens so far (0: fail at once)")
    g.add_argument("--lb-policy", choices=("pick_first", "round_robin"), default=None,
                   help="gRPC load balancing of each target (round_robin: over all the "
                   "addresses a DNS name resolves to)")
    g.add_argument("--prompt", required=True, help="prompt text (tokenized as is)")
    g.add_argument("--chat", action="store_true", help="apply the model's chat template")
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most")
    _add_sampling_args(g)
    g.add_argument("--token", default=os.environ.get("FC_EDGE_TOKEN"),
                   help="the server's bearer token (default: $FC_EDGE_TOKEN)")
    g.add_argument("--tls-ca", help="PEM CA certificate of the server: connect with TLS")
    g.add_argument("--tls-server-name", help="expected name in the server's certificate")
    g.add_argument("--calibration", default=None, metavar="PATH",
                   help="the codec's calibration artifact (klt; fc-edge calibrate), the one the "
                   "server loaded: its SHA-256 goes in the Open, the server's Info must list it")
    g.add_argument("--strict", action="store_true",
                   help="fail instead of warning when the codec cannot code a step as set "
                   "(a fallback to fp16, a clamped parameter, a payload no smaller than fp16)")
    add_codec_args(g, default=DEFAULT_CODEC)
    g.set_defaults(func=cmd_generate)

    d = subparsers.add_parser(
        "demo", help="split generation on loopback with several codecs, compared in one table",
        description="Start a server on 127.0.0.1, generate the same prompt with each codec, "
        "print each text and one comparison table.")
    add_model_args(d)
    _add_split_arg(d)
    _add_device_args(d, "the head and the tail")
    d.add_argument("--prompt", default=DEMO_PROMPT, help="the prompt of every codec")
    d.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                   help="apply the model's chat template when it has one (default: yes)")
    d.add_argument("--max-new-tokens", type=int, default=32, help="tokens per codec at most")
    d.add_argument("--codecs", default=DEMO_CODECS,
                   help=f"comma-separated codec names (default: {DEMO_CODECS}); codec "
                   "parameters are each codec's defaults")
    d.set_defaults(func=cmd_demo)


def _add_split_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--split-layer", type=int, default=None,
                   help=f"L: the device runs layers[:L] (default: {DEFAULT_SPLIT_LAYER}; a "
                   "bundle's own)")


def _add_device_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--device", default="cpu", help=f"where {what} runs: cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help=f"precision of {what}")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    s = p.add_argument_group("sampling (on the server)")
    s.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    s.add_argument("--top-k", type=int, default=0, help="0: off")
    s.add_argument("--top-p", type=float, default=1.0, help="1: off")
    s.add_argument("--sample-seed", type=int, default=None, help="seed of the sampler")


def _check_tokens(n: int) -> None:
    if n < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1, got {n}")


# --- serve ------------------------------------------------------------------------------------
#: `fc-edge serve` exit statuses: 0 after a drain, 1 a user error (one line), 70 (EX_SOFTWARE)
#: the engine loop died (the orchestrator should restart the server), 130 a second SIGTERM or
#: Ctrl-C ended the drain early.
EXIT_ENGINE_DIED = 70
EXIT_INTERRUPTED = 130


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    from fc_edge.runtime.fleet import cmd_serve_fleet, wants_fleet
    from fc_edge.runtime.server import start_server

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s")
    if wants_fleet(args):
        return cmd_serve_fleet(args)
    handle = start_server(
        args.model, args.split_layer, host=args.host, port=args.port, token=args.token,
        tls_cert=args.tls_cert, tls_key=args.tls_key, metrics_port=args.metrics_port,
        metrics_host=args.metrics_host, max_sessions=args.max_sessions,
        max_sessions_per_peer=args.max_sessions_per_peer, max_seq_len=args.max_seq_len,
        max_payload_bytes=args.max_payload_bytes, idle_timeout_s=args.idle_timeout,
        open_timeout_s=args.open_timeout, max_session_s=args.max_session_s,
        max_streams=args.max_streams, max_streams_per_peer=args.max_streams_per_peer,
        device=args.device, dtype=args.dtype, max_batch=args.max_batch,
        prefill_chunk=args.prefill_chunk, kv_cache_tokens=args.kv_cache_tokens,
        cuda_graphs=args.cuda_graphs, calibrations=args.calibration)
    extras = [x for x, on in (("TLS", handle.tls), ("token required", args.token),
                              ("CUDA graphs", args.cuda_graphs)) if on]
    extras += [f"calibration {ctx.calibration.name} ({digest})"
               for digest, ctx in handle.service.calibrations.items()]
    if handle.metrics_port is not None:
        extras.append(f"metrics on {args.metrics_host}:{handle.metrics_port}")
    print(f"fc-edge serve: {args.model} split at layer {handle.split_layer} "
          f"(fingerprint {handle.fingerprint}) on {handle.address} "
          f"[{handle.service.device}, {args.dtype}, max batch {args.max_batch}"
          + (f", {', '.join(extras)}" if extras else "") + "]", flush=True)
    return _serve_until_signalled(handle, args.drain_s)


def _serve_until_signalled(handle: Any, drain_s: float) -> int:
    """Serve until SIGTERM / Ctrl-C (then drain for ``drain_s``; a second signal ends the drain
    at once) or until the engine dies. Returns the exit status."""
    signals: list[int] = []
    wake = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        signals.append(signum)
        wake.set()
        if len(signals) > 1:
            handle.interrupt()

    if threading.current_thread() is threading.main_thread():
        # SIGTERM (docker stop, systemd, Kubernetes) drains as Ctrl-C does: health turns
        # NOT_SERVING, no new sessions, open ones finish for up to --drain-s
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    while not wake.wait(0.2) and not handle.failed.is_set():
        pass
    if handle.failed.is_set() and not signals:
        print("fc-edge serve: the engine loop died (see the log); stopping, exit status "
              f"{EXIT_ENGINE_DIED}", file=sys.stderr, flush=True)
        handle.stop(drain_s=0)
        return EXIT_ENGINE_DIED
    print(f"fc-edge serve: stopping (draining open sessions for up to {drain_s:g} s; "
          "a second signal ends them now)", flush=True)
    stopper = threading.Thread(target=handle.stop, kwargs={"drain_s": drain_s},
                               name="fc-edge-stop", daemon=True)
    stopper.start()
    while stopper.is_alive():
        stopper.join(0.2)  # wakes for signals (a second one interrupts the drain)
    if len(signals) > 1:
        print("fc-edge serve: stopped without draining (second signal), exit status "
              f"{EXIT_INTERRUPTED}", flush=True)
        return EXIT_INTERRUPTED
    return EXIT_ENGINE_DIED if handle.failed.is_set() else 0


# --- info -------------------------------------------------------------------------------------
def cmd_info(args: argparse.Namespace) -> int:
    info = fetch_info(args.server, token=args.token, tls_ca=args.tls_ca,
                      tls_server_name=args.tls_server_name, timeout_s=args.timeout)
    if args.json:
        import json

        from google.protobuf.json_format import MessageToDict

        print(json.dumps(MessageToDict(info, preserving_proto_field_name=True,
                                       always_print_fields_with_no_presence=True), indent=2))
    else:
        print(format_info(info))
    return 0


def fetch_info(address: str, token: str | None = None, tls_ca: str | None = None,
               tls_server_name: str | None = None, timeout_s: float = 10.0) -> Any:
    """The ``ServerInfo`` of the server at ``address`` (HOST:PORT or a gRPC target)."""
    import grpc

    from fc_edge.runtime.proto import pb2, pb2_grpc

    options = []
    if tls_ca is not None:
        try:
            with open(tls_ca, "rb") as f:
                ca = f.read()
        except OSError as e:
            raise ConfigError(f"cannot read the TLS CA file {tls_ca!r}: {e.strerror}") from None
        if tls_server_name:
            options.append(("grpc.ssl_target_name_override", tls_server_name))
        channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(ca), options)
    else:
        channel = grpc.insecure_channel(address, options)
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    try:
        return pb2_grpc.SplitInferenceStub(channel).Info(pb2.InfoRequest(), metadata=metadata,
                                                        timeout=timeout_s)
    except grpc.RpcError as e:
        raise ConfigError(f"no Info from {address}: {e.code().name}: {e.details()}") from None
    finally:
        channel.close()


def format_info(info: Any) -> str:
    """``ServerInfo`` as aligned ``field  value`` lines, in the message's field order."""
    fields = info.DESCRIPTOR.fields
    width = max(len(f.name) for f in fields)
    lines = []
    for f in fields:
        value = getattr(info, f.name)
        if f.is_repeated:
            value = ", ".join(str(v) for v in value) or "none"
        elif isinstance(value, float):
            value = f"{value:g}"
        elif isinstance(value, bool):
            value = "yes" if value else "no"
        lines.append(f"{f.name:<{width}}  {value}")
    return "\n".join(lines)


# --- generate ---------------------------------------------------------------------------------
def cmd_generate(args: argparse.Namespace) -> int:
    import sys

    from fc_edge.codecs import get_codec
    from fc_edge.runtime.client import DeviceClient
    from fc_edge.runtime.sampling import SamplingConfig
    from fc_edge.runtime.timing import stage_table

    _check_tokens(args.max_new_tokens)
    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              seed=args.sample_seed)
    codec = get_codec(args.codec, **codec_kwargs(args))  # a wrong codec fails before anything
    label = args.codec if not codec_kwargs(args) else codec.name
    source: Any
    if args.engine:
        if args.model is not None:
            raise ConfigError("--engine runs an exported bundle: drop --model")
        from fc_edge.engine import open_bundle

        source = open_bundle(args.engine, backend=args.engine_backend)
    else:
        if args.engine_backend != "auto":
            raise ConfigError("--engine-backend chooses what runs --engine: give --engine DIR")
        source = args.model or DEFAULT_MODEL

    def warn(message: str) -> None:
        print(f"fc-edge generate: warning: {message}", file=sys.stderr, flush=True)

    with DeviceClient(args.server, source, args.split_layer, codec,
                      token=args.token, tls_ca=args.tls_ca,
                      tls_server_name=args.tls_server_name, device=args.device,
                      dtype=args.dtype, max_recoveries=args.max_recoveries,
                      lb_policy=args.lb_policy, strict=args.strict, on_warning=warn,
                      calibration=args.calibration) as client:
        client.codec_label = label
        printer = TokenPrinter(client.tokenizer)
        result = client.generate(args.prompt, args.max_new_tokens, sampling=sampling,
                                 chat=args.chat, on_token=printer)
        printer.finish()
    print(stage_table(result), file=sys.stderr)
    print(f"\n{len(result.token_ids)} tokens, time to first token {result.ttft_s * 1e3:.1f} ms, "
          f"time per output token {result.tpot_s * 1e3:.2f} ms (median), "
          f"{result.bytes_up} bytes up, {result.bytes_down} bytes down, "
          f"session {result.session_id}"
          + (f", {result.recoveries} recovered" if result.recoveries else ""), file=sys.stderr)
    return 0


class TokenPrinter:
    """``on_token`` for :meth:`DeviceClient.generate`: writes the text to ``out`` as tokens
    arrive (the whole generation decoded each time, so tokens that merge into one character
    print together; an unfinished UTF-8 sequence waits), or the ids without a tokenizer."""

    def __init__(self, tokenizer: Any, out: Any = None) -> None:
        import sys

        self.tokenizer, self.out = tokenizer, out or sys.stdout
        self.tokens: list[int] = []
        self.printed = ""

    def __call__(self, index: int, token_id: int, session_id: str) -> None:
        self.tokens.append(token_id)
        if self.tokenizer is None:
            self.out.write(("" if index == 0 else " ") + str(token_id))
        else:
            text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
            if text.endswith("\ufffd") or not text.startswith(self.printed):
                return
            self.out.write(text[len(self.printed):])
            self.printed = text
        self.out.flush()

    def finish(self) -> None:
        if self.tokenizer is not None:
            text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
            if text.startswith(self.printed):
                self.out.write(text[len(self.printed):])
        self.out.write("\n")
        self.out.flush()


# --- demo -------------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    from fc_edge.codecs import get_codec
    from fc_edge.devices import resolve_device, resolve_dtype
    from fc_edge.models.pretrained import load_model

    _check_tokens(args.max_new_tokens)
    resolve_dtype(args.dtype, resolve_device(args.device))  # fail before loading anything
    names = [c.strip() for c in args.codecs.split(",") if c.strip()]
    if not names:
        raise ConfigError("--codecs is empty: give codec names, e.g. identity,fourier")
    for name in names:
        get_codec(name)  # fail on a wrong name before loading anything
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model)
    print(f"loaded {args.model} in {time.perf_counter() - t0:.1f} s")
    results = run_demo(model, tokenizer, names, args.prompt, args.max_new_tokens,
                       split_layer=args.split_layer, chat=args.chat, device=args.device,
                       dtype=args.dtype)
    print(demo_table(results, model.config.hidden_size))
    return 0


def run_demo(model: Any, tokenizer: Any, codecs: list[str], prompt: str | list[int],
             max_new_tokens: int, split_layer: int | None = None, chat: bool = True,
             echo: bool = True, device: str = "cpu", dtype: str = "float32") -> dict[str, Any]:
    """Serve ``model`` on loopback and generate ``prompt`` once per codec, head and tail on
    ``device`` in ``dtype``.

    Returns ``{codec name: GenerationResult}`` in the order given.
    """
    from fc_edge.runtime.client import DeviceClient
    from fc_edge.runtime.server import start_server

    layer = split_layer if split_layer is not None else DEFAULT_SPLIT_LAYER
    chat = chat and isinstance(prompt, str) and tokenizer is not None \
        and bool(getattr(tokenizer, "chat_template", None))
    results: dict[str, Any] = {}
    on = {"device": device, "dtype": dtype}
    with start_server(model, layer, host="127.0.0.1", port=0, **on) as handle:
        if echo:
            n = model.config.num_hidden_layers
            print(f"server on {handle.address}: layers {layer}..{n - 1} (tail); "
                  f"device head: layers 0..{layer - 1}")
            print(f"prompt{' (chat template)' if chat else ''}: {prompt!r}\n")
        # one untimed generation first: the first forward pays one-off costs (allocator,
        # kernel selection) that would otherwise land in the first codec's prefill time
        with DeviceClient(handle.address, (model, tokenizer), layer, "identity", **on) as client:
            client.generate(prompt, 2, chat=chat)
        for name in codecs:
            with DeviceClient(handle.address, (model, tokenizer), layer, name, **on) as client:
                result = client.generate(prompt, max_new_tokens, chat=chat)
            results[name] = result
            if echo:
                text = result.text if result.text is not None else str(result.token_ids)
                print(f"[{name}] {text.strip()}\n", flush=True)
    return results


def demo_table(results: dict[str, Any], hidden_size: int) -> str:
    """One comparison row per codec: bytes, ratio vs float16, stage medians, agreement."""
    from fc_edge.runtime.timing import format_table, ms

    ref = results.get("identity")
    rows = []
    for name, r in results.items():
        pre = r.prefill
        dec = r.decode_steps
        pre_b = pre.bytes_up if pre else 0
        dec_b = int(r.median("bytes_up")) if dec else 0
        pre_fp16 = pre.rows * hidden_size * 2 if pre else 0
        used = "/".join([",".join(r.codecs_used("prefill")) or "-",
                         ",".join(r.codecs_used("decode")) or "-"])
        if ref is not None and ref.token_ids:
            n = len(ref.token_ids)
            same = sum(a == b for a, b in zip(ref.token_ids, r.token_ids, strict=False))
            prefix = next((i for i, (a, b) in enumerate(zip(ref.token_ids, r.token_ids,
                                                           strict=False)) if a != b),
                          min(n, len(r.token_ids)))
            agree = f"{same}/{n} ({prefix})"
        else:
            agree = "-"
        rows.append([
            name, used, pre_b, dec_b or "-",
            f"{pre_fp16 / pre_b:.2f}x" if pre_b else "-",
            f"{hidden_size * 2 / dec_b:.2f}x" if dec_b else "-",
            ms(r.ttft_s), ms(r.tpot_s),
            ms(r.median("device_compute_s")),
            ms(r.median("encode_s") + r.median("pack_s")),
            ms(r.median("network_s")),
            ms(r.median("server_unpack_s") + r.median("server_decode_s")),
            ms(r.median("server_compute_s")),
            agree,
        ])
    headers = ["codec", "used pre/dec", "B/prefill", "B/decode", "vs fp16 pre", "vs fp16 dec",
               "ttft ms", "tpot ms", "head", "enc+pack", "net", "unpack+dec", "tail",
               "agree (prefix)"]
    note = ("stage columns: median ms per decode step; vs fp16: float16 activation bytes / "
            "payload bytes; agree: tokens equal to identity's at the same position (length of "
            "the common prefix); a codec that refuses a shape (BudgetError) sends it as fp16")
    return format_table(headers, rows) + "\n" + note
