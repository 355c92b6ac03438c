"""CLI verbs of the codec package: `fc-edge codecs` (list), `fc-edge bench` (speed table) and
`fc-edge calibrate` (fit the artifact the ``klt`` codec reads)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fc_edge.errors import ConfigError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("codecs", help="list the codecs and their parameters")
    p.set_defaults(func=_list)
    b = sub.add_parser("bench", help="codec encode/decode speed side by side (+ real-model error)")
    b.add_argument("--ratio", type=float, default=8.0, help="target ratio vs float32 (default 8)")
    b.add_argument(
        "--shapes",
        default="1x576,1x2048,128x2048,512x2048,2048x2048",
        help="comma-separated SxD shapes",
    )
    b.add_argument("--seconds", type=float, default=1.5, help="timing budget per shape")
    b.add_argument("--no-real", action="store_true", help="skip the real-model error table")
    b.set_defaults(func=_bench)
    c = sub.add_parser(
        "calibrate", help="fit the klt codec's calibration artifact on activations of text",
        description="Run the model on calibration text, fit the channel means, KLT bases, "
        "component variances, decode-step predictor and channel sensitivities of the activation "
        "after --split-layer, and write <out>/klt-<sha256>.safetensors and .json. Default text: "
        "the calibration documents of ../shared/texts/dev.txt (its last 600 lines), never the "
        "evaluation or tuning ones.")
    from fc_edge.cli import add_model_args
    from fc_edge.eval.options import add_threads_arg

    add_model_args(c)
    c.add_argument("--split-layer", type=int, default=1, help="split after layer L (default 1)")
    c.add_argument("--texts", type=Path, default=None, metavar="FILE",
                   help="one document per line (default: the calibration documents of "
                   "../shared/texts/dev.txt)")
    c.add_argument("--limit", type=int, default=None, help="the first N documents only")
    c.add_argument("--max-tokens", type=int, default=512, help="tokens per document")
    c.add_argument("--sensitivity", default="rmsnorm", choices=("rmsnorm", "fisher", "none"),
                   help="channel weights: downstream RMSNorm gains (default), diagonal Fisher "
                   "information of the output, or none")
    c.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="folder the artifact is written to")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_threads_arg(c)
    c.set_defaults(func=_calibrate)


def parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        try:
            s, d = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise ConfigError(f"bad shape {item!r}: write SxD, e.g. 128x2048") from None
        if s < 1 or d < 2:
            raise ConfigError(f"bad shape {item!r}: S >= 1 and D >= 2")
        shapes.append((s, d))
    return shapes


def _list(args: argparse.Namespace) -> int:
    import inspect

    from fc_edge.codecs import ALIASES, codec_class
    from fc_edge.codecs.base import _REGISTRY

    for name, cls in sorted(_REGISTRY.items()):
        params = [
            p for p in inspect.signature(cls.__init__).parameters.values() if p.name != "self"
        ]
        desc = ", ".join(f"{p.name}={p.default!r}" for p in params)
        mode = "row-wise" if cls.row_wise else "whole block"
        print(f"{name:10s} [{mode}] {desc}")
    for alias, (base, kw) in sorted(ALIASES.items()):
        codec_class(base)
        print(f"{alias:10s} = {base} {kw}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from fc_edge.codecs.bench import run

    print(
        run(
            ratio=args.ratio,
            shapes=parse_shapes(args.shapes),
            real=not args.no_real,
            budget_s=args.seconds,
        )
    )
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from fc_edge.codecs.calibration import calibration_texts, coding_gain_db, fit
    from fc_edge.eval.options import apply_threads
    from fc_edge.models.pretrained import load_model

    apply_threads(args)
    texts, source = calibration_texts(args.texts, args.limit)
    model, tokenizer = load_model(args.model)
    if tokenizer is None:
        raise ConfigError(f"model {args.model!r} has no tokenizer: calibration needs text")
    cal = fit(model, tokenizer, args.split_layer, texts, max_tokens=args.max_tokens,
              sensitivity=args.sensitivity, progress=not args.no_progress,
              meta={"model": args.model, "texts": source})
    path = cal.save(args.out)
    m = cal.meta
    gain_p, gain_d = coding_gain_db(cal.prefill_log_std), coding_gain_db(cal.decode_log_std)
    print(f"{path}\n  {m['rows']} rows of {m['documents']} documents; energy left after the "
          f"means {m['energy_after_mean']:.1%}, after the token predictor "
          f"{m['energy_after_prediction']:.1%}; KLT coding gain {gain_p:.1f} dB (prefill), "
          f"{gain_d:.1f} dB (decode)", file=sys.stdout)
    return 0
