#!/usr/bin/env python
"""Latency profile of fc-edge: the same as `fc-edge profile` (flags: --help)."""

import argparse
import sys

from fc_edge.errors import FcEdgeError
from fc_edge.profile.commands import add_arguments, run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="profile_latency.py", description=__doc__)
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except FcEdgeError as e:
        print(f"profile_latency.py: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
