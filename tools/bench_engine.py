#!/usr/bin/env python
"""Export (or reuse) an engine and time it against the torch head in the same run, on the CPU.

    python tools/bench_engine.py --model smollm2-135m --split-layer 1 [--engine DIR]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--split-layer", type=int, default=1)
    p.add_argument("--engine", default=None, help="an exported bundle folder (default: export)")
    p.add_argument("--out", default=None, help="where to export it (default: engines/<name>)")
    p.add_argument("--exporter", default="dynamo", choices=("dynamo", "torchscript"))
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch and onnxruntime threads (0: all)")
    args = p.parse_args()

    from fc_edge.engine.bench import format_latency, head_latency
    from fc_edge.engine.export import export_engine
    from fc_edge.engine.runner import EngineHead
    from fc_edge.models.pretrained import load_model
    from fc_edge.models.split import split

    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = load_model(args.model)
    head, _ = split(model, args.split_layer)
    folder = args.engine
    if folder is None:
        t0 = time.perf_counter()
        result = export_engine(model, args.split_layer, args.out, model_spec=args.model,
                               exporter=args.exporter, tensorrt=False)
        folder = result.folder
        print(f"export ({args.exporter}): {time.perf_counter() - t0:.1f} s "
              f"(graphs {result.seconds['export']:.1f} s, verify {result.seconds['verify']:.1f} s)")
    engine = EngineHead(folder, providers=["CPUExecutionProvider"], threads=args.threads)
    print(f"{args.model} head L={args.split_layer}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads) vs onnxruntime CPU, median of {args.rounds} rounds")
    r = head_latency(engine, head, args.prompt_len, args.decode_steps, args.rounds)
    print(format_latency(r, args.prompt_len))
    return 0


if __name__ == "__main__":
    sys.exit(main())
