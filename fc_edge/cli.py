"""`fc-edge` command line: one verb per job, each a thin front over a library function.

Every verb lives in the module that owns its logic and exposes ``add_parser(subparsers)``; this
file wires them together, holds the shared flags (model, codec) and turns an
:class:`~fc_edge.errors.FcEdgeError` into a one-line message and a non-zero exit.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

# OpenMP's worker threads sleep between parallel regions instead of spinning (GNU OpenMP spins
# for a while by default). It must be set before torch loads libgomp. On a machine whose cores
# are busy with other work, spinning threads take turns with the thread they wait for: `fc-edge
# eval --threads 2` scored 10 PIQA items in 24.9 s spinning vs 8.9 s passive (2 cores, load 5).
# A user's own OMP_WAIT_POLICY wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from fc_edge import __version__
from fc_edge.errors import ConfigError, FcEdgeError
from fc_edge.models.defaults import DEFAULT_CODEC, DEFAULT_MODEL

# verb modules and their verbs; a module that cannot be imported for want of an optional
# package gets stand-in verbs that say which extra to install.
VERB_MODULES = {
    "fc_edge.runtime.commands": ("serve", "generate", "demo"),
    "fc_edge.profile.commands": ("profile",),
    "fc_edge.analysis.commands": ("analyze",),
    "fc_edge.eval.commands": ("eval",),
    "fc_edge.engine.commands": ("export",),
    "fc_edge.codecs.commands": ("bench", "codecs"),
}

def _number(text: str) -> int | float:
    """An integer when written as one (``3``), else a float (``3.2``)."""
    return int(text) if text.strip().lstrip("+-").isdigit() else float(text)


_number.__name__ = "number"  # argparse names the type in its error: "invalid number value"

# Codec flags: `--codec NAME` plus one flag per codec keyword, named after it.
CODEC_FLAGS: dict[str, dict[str, Any]] = {
    "ratio": {"type": float, "help": "target compression ratio: packed bytes <= raw bytes / R"},
    "k_s": {"type": int, "help": "fourier: kept token frequencies (and their mirrors)"},
    "k_d": {"type": int, "help": "fourier: kept half-spectrum columns along the hidden axis"},
    "geometry": {"help": "fourier: block geometry rule for --ratio (balanced | energy)"},
    "value_dtype": {"help": "dtype of sent values: float32 | float16 | bfloat16"},
    "k": {"type": int, "help": "topk: kept values per activation"},
    "rank": {"type": int, "help": "svd/qr: kept rank"},
    "bits": {"type": _number,
             "help": "quant/rotated: bits per code (2-8; quant also 16); klt: bits per "
             "element (a number, e.g. 3.2)"},
    "group_size": {"type": int, "help": "quant/rotated: values per scale (0 = one per row)"},
    "transform": {"help": "rotated: dct | hadamard"},
    "keep": {"type": int, "help": "rotated: transformed coefficients kept per row (truncation)"},
    "seed": {"type": int, "help": "rotated: seed of the randomized Hadamard signs"},
    "entropy": {"help": "rotated: entropy coding of the codes: deflate | none"},
    "quantizer": {"help": "rotated: uniform (entropy-coded, --bits = budget) | absmax"},
}


#: Optional packages -> the extra of pyproject.toml that installs them (a missing one is named in
#: one line, never a traceback).
EXTRAS = {
    "onnx": "engine", "onnxruntime": "device", "onnxscript": "engine",
    "matplotlib": "plots", "simpy": "profile", "grpc_tools": "dev", "grpc_health": "server",
    "accelerate": "server", "lm_eval": "eval", "scipy": "eval", "statsmodels": "eval",
    "ray": "fleet", "cupy": "gpu",
}
MODEL_HELP = (f"{DEFAULT_MODEL} (embedded default), a local Hugging Face folder, a .gguf file, "
              "a hub id ORG/NAME from the local Hugging Face cache, or synthetic:NAME")


class HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default (unless it is unset, off, or the help already says it)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if "default" in text or default is None or default is False \
                or default is argparse.SUPPRESS or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def port_number(text: str) -> int:
    """argparse type: a TCP port, 0 (pick a free one) to 65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is outside 0..65535")
    return port


def check_address(target: str) -> str:
    """``target`` when it is ``HOST:PORT`` with a port in 1..65535 (``[v6]:PORT`` for IPv6), or a
    gRPC target with a scheme (``dns:///NAME:PORT``, ``ipv4:...``, ``unix:...``), which gRPC
    checks itself. :class:`ConfigError` otherwise (a missing port would go to :443)."""
    from fc_edge.runtime.client import GRPC_SCHEMES

    target = target.strip()
    if target.startswith(GRPC_SCHEMES):
        return target
    m = re.match(r"^(\[[0-9a-fA-F:.]+\]|[^:\[\]\s]+):(\d+)$", target)
    if not m:
        raise ConfigError(f"server address {target!r} is not HOST:PORT (e.g. 127.0.0.1:50051)")
    port = int(m.group(2))
    if not 1 <= port <= 65535:
        raise ConfigError(f"server address {target!r}: port {port} is outside 1..65535")
    return target


def server_list(text: str) -> str:
    """argparse type of ``--server``: every comma-separated address checked (see
    :func:`check_address`); a target with a scheme is one address."""
    from fc_edge.runtime.client import split_servers

    try:
        for target in split_servers(text):
            check_address(target)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def add_codec_args(
    parser: argparse.ArgumentParser, default: str | None = DEFAULT_CODEC, multiple: bool = False
) -> None:
    """Add ``--codec`` and the codec keyword flags to a verb's parser."""
    if multiple:
        parser.add_argument(
            "--codecs", default=default, help="comma-separated codec names (see `fc-edge codecs`)"
        )
    else:
        parser.add_argument("--codec", default=default, help="codec name (see `fc-edge codecs`)")
    group = parser.add_argument_group("codec parameters")
    for key, spec in CODEC_FLAGS.items():
        group.add_argument("--" + key.replace("_", "-"), dest=key, default=None, **spec)


def codec_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The codec keyword arguments given on the command line (unset ones omitted)."""
    return {k: getattr(args, k) for k in CODEC_FLAGS if getattr(args, k, None) is not None}


def codec_from_args(args: argparse.Namespace, name: str | None = None):
    from fc_edge.codecs import get_codec

    return get_codec(name or args.codec, **codec_kwargs(args))


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fc-edge", description="Split LLM inference with activation compression.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"fc-edge {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for mod_name, verbs in VERB_MODULES.items():
        try:
            importlib.import_module(mod_name).add_parser(sub)
        except ImportError as e:
            if e.name and e.name.startswith("fc_edge"):
                continue  # verb not built yet
            message = missing_extra(e)
            if message is None:
                raise
            # a verb whose module (or its parser) needs a package that is not installed: a
            # stand-in that says which extra to install, instead of a CLI that does not start
            for verb in verbs:
                sub.choices.pop(verb, None)
                sub._choices_actions = [a for a in sub._choices_actions if a.dest != verb]
                stub = sub.add_parser(verb, help=f"(not installed: {message})")
                stub.set_defaults(func=_refuse(message), stand_in=True)
    for verb_parser in sub.choices.values():
        verb_parser.formatter_class = HelpFormatter
    return parser


def _refuse(message: str) -> Any:
    def func(args: argparse.Namespace) -> int:
        raise ConfigError(message)

    return func


def missing_extra(e: ImportError) -> str | None:
    """The one-line message for an optional package that is not installed, or None when ``e``
    is not about one."""
    name = (getattr(e, "name", None) or "").split(".")[0]
    if name not in EXTRAS:
        return None
    return (f"this needs the {name} package, which is not installed: "
            f"pip install 'fc-edge[{EXTRAS[name]}]'")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "stand_in", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except FcEdgeError as e:
        print(f"fc-edge {args.verb}: error: {e}", file=sys.stderr)
        return 1
    except ImportError as e:
        message = missing_extra(e)
        if message is None:
            raise
        print(f"fc-edge {args.verb}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"fc-edge {args.verb}: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
