#!/usr/bin/env python
"""Codec speed and real-activation error, side by side (`make bench`); = `fc-edge bench`."""

import sys

from fc_edge.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
