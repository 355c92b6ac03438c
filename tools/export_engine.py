#!/usr/bin/env python
"""Export the device head to ONNX / TensorRT: the same as `fc-edge export` (see engines/README.md).

    python tools/export_engine.py --model smollm2-135m --split-layer 1 [--in-graph-fourier ...]
"""

from __future__ import annotations

import sys

from fc_edge.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
