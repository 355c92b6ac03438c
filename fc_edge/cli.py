"""`fc-edge` command line: one verb per job, each a thin front over a library function.

Every verb lives in the module that owns its logic and exposes ``add_parser(subparsers)``; this
file wires them together, holds the shared flags (model, codec) and turns an
:class:`~fc_edge.errors.FcEdgeError` into a one-line message and a non-zero exit.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Any

from fc_edge.errors import FcEdgeError

# verb modules, imported lazily so `fc-edge --help` stays fast and a missing optional
# dependency only breaks its own verb.
VERB_MODULES = [
    "fc_edge.runtime.commands",  # serve, generate, demo
    "fc_edge.profile.commands",  # profile
    "fc_edge.analysis.commands",  # analyze
    "fc_edge.eval.commands",  # eval
    "fc_edge.engine.commands",  # export
    "fc_edge.codecs.commands",  # bench, codecs
]

# Codec flags: `--codec NAME` plus one flag per codec keyword, named after it.
CODEC_FLAGS: dict[str, dict[str, Any]] = {
    "ratio": {"type": float, "help": "target compression ratio: packed bytes <= raw bytes / R"},
    "k_s": {"type": int, "help": "fourier: kept token frequencies (and their mirrors)"},
    "k_d": {"type": int, "help": "fourier: kept half-spectrum columns along the hidden axis"},
    "geometry": {"help": "fourier: block geometry rule for --ratio (balanced | energy)"},
    "value_dtype": {"help": "dtype of sent values: float32 | float16 | bfloat16"},
    "k": {"type": int, "help": "topk: kept values per activation"},
    "rank": {"type": int, "help": "svd/qr: kept rank"},
    "bits": {"type": int, "help": "quant/rotated: bits per code (2-8; quant also 16)"},
    "group_size": {"type": int, "help": "quant/rotated: values per scale (0 = one per row)"},
    "transform": {"help": "rotated: dct | hadamard"},
    "keep": {"type": int, "help": "rotated: transformed coefficients kept per row (truncation)"},
    "seed": {"type": int, "help": "rotated: seed of the randomized Hadamard signs"},
    "entropy": {"help": "rotated: entropy coding of the codes: deflate | none"},
    "quantizer": {"help": "rotated: uniform (entropy-coded, --bits = budget) | absmax"},
}


def add_codec_args(
    parser: argparse.ArgumentParser, default: str | None = "fourier", multiple: bool = False
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
    parser.add_argument(
        "--model",
        default="smollm2-135m",
        help="smollm2-135m (embedded default), a local Hugging Face folder, a .gguf file, "
        "or synthetic:NAME",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fc-edge", description="Split LLM inference with activation compression."
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for mod_name in VERB_MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ImportError as e:
            if e.name and e.name.startswith("fc_edge"):
                continue  # verb not built yet
            raise
        mod.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except FcEdgeError as e:
        print(f"fc-edge {args.verb}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"fc-edge {args.verb}: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
