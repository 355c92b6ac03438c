"""CLI verbs of the codec package: `fc-edge codecs` (list) and `fc-edge bench` (speed table)."""

from __future__ import annotations

import argparse

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
