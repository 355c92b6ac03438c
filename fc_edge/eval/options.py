"""Command-line options that `fc-edge eval` and `fc-edge analyze` share: comma-separated lists
and the torch thread count."""

from __future__ import annotations

import argparse

from fc_edge.errors import ConfigError


def int_list(text: str, what: str) -> list[int]:
    """``"1,2, 4"`` -> [1, 2, 4]; ``what`` names the option in the error."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{what} must be comma-separated integers, got {text!r}") from None


def float_list(text: str | None, what: str) -> list[float] | None:
    """``"2,4.5"`` -> [2.0, 4.5]; None or "" -> None."""
    if not text:
        return None
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{what} must be comma-separated numbers, got {text!r}") from None


def add_threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice); 1 is much faster on a "
                   "machine whose cores are busy with other work")


def apply_threads(args: argparse.Namespace) -> None:
    if getattr(args, "threads", None) is not None:
        import torch

        if args.threads < 1:
            raise ConfigError("--threads must be >= 1")
        torch.set_num_threads(args.threads)
