"""CLI verb ``export``: a thin front over :func:`fc_edge.engine.export.export_engine`."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from fc_edge.cli import add_model_args


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "export",
        help="write a device bundle: the head's weights, ONNX graphs (and TensorRT plans), "
        "tokenizer, manifest",
        description="Write everything a device needs to run embed + layers[:L] and nothing "
        "else: the head's weights (head.safetensors), ONNX opset 18 prefill and decode graphs "
        "sharing them (verified with onnxruntime on the CPU against the torch head), TensorRT "
        "plans where TensorRT is installed, the tokenizer and manifest.json. Run it with "
        "`fc-edge generate --engine DIR`. Progress goes to stderr.",
    )
    add_export_args(p)
    p.set_defaults(func=cmd_export)


def add_export_args(p: argparse.ArgumentParser) -> None:
    """The ``export`` flags (shared with tools/export_engine.py)."""
    add_model_args(p)
    p.add_argument("--split-layer", type=int, required=True, help="L: export layers[:L]")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="the bundle's folder, replaced if it holds a bundle (default: "
                   "engines/<model>-L<L>[-fourier-ks..-kd..])")
    f = p.add_argument_group("in-graph fourier block (optional)")
    f.add_argument("--in-graph-fourier", action="store_true",
                   help="add a fourier_block output: the codec's truncated 2-D DFT as matmuls")
    f.add_argument("--k-s", type=int, default=None, help="kept token frequencies (and mirrors)")
    f.add_argument("--k-d", type=int, default=None, help="kept half-spectrum columns along D")
    f.add_argument("--ratio", type=float, default=None,
                   help="choose k_s, k_d as FourierCodec(ratio) does for --ratio-seq-len tokens")
    f.add_argument("--ratio-seq-len", type=int, default=128,
                   help="prefill length the --ratio geometry is chosen for (default 128)")
    p.add_argument("--tensorrt", action=argparse.BooleanOptionalAction, default=None,
                   help="build TensorRT plans, fp16 where the installed TensorRT can (default: "
                   "where the tensorrt package and a CUDA GPU are; --tensorrt requires them, "
                   "--no-tensorrt skips them; the manifest says what was built)")
    p.add_argument("--float16", action="store_true",
                   help="also write float16 copies of the graphs (prefill.float16.onnx, ...), "
                   "verified on the CPU; --tensorrt does it when its TensorRT needs them")
    p.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo",
                   help="torch.onnx exporter (default dynamo; torchscript is faster, deprecated)")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest relative error vs the torch head accepted (default 1e-4)")


def cmd_export(args: argparse.Namespace) -> int:
    from fc_edge.engine.export import (
        check_target,
        export_engine,
        fourier_geometry,
        stderr_log,
    )
    from fc_edge.errors import ConfigError
    from fc_edge.models.pretrained import load_model

    geometry_flags = (args.k_s, args.k_d, args.ratio)
    if not args.in_graph_fourier and any(x is not None for x in geometry_flags):
        raise ConfigError("--k-s, --k-d and --ratio need --in-graph-fourier")
    if args.tensorrt:
        from fc_edge.engine.tensorrt import require_tensorrt

        require_tensorrt()  # before the minutes of loading and exporting
    if args.out is not None:
        check_target(Path(args.out))  # before loading anything
    t0 = time.perf_counter()
    stderr_log(f"loading {args.model} ...")
    model, tokenizer = load_model(args.model)
    fourier = None
    if args.in_graph_fourier:
        if all(x is None for x in geometry_flags):
            raise ConfigError("--in-graph-fourier needs --k-s and --k-d, or --ratio")
        fourier = fourier_geometry(
            model.config.hidden_size, args.k_s, args.k_d, args.ratio, args.ratio_seq_len
        )
    result = export_engine(
        model, args.split_layer, args.out, model_spec=args.model, tokenizer=tokenizer,
        fourier=fourier, tensorrt=args.tensorrt, float16=args.float16,
        exporter=args.exporter, tolerance=args.tolerance, log=stderr_log)
    m = result.manifest
    total = sum(f["bytes"] for f in m["files"].values())
    print(f"wrote {result.folder}/ ({', '.join(m['files'])}; {total / 1e6:.1f} MB) in "
          f"{time.perf_counter() - t0:.1f} s (export {result.seconds['export']:.1f} s); "
          f"fingerprint {m['model_fingerprint']}, split layer {m['split_layer']}"
          + (f", fourier k_s={fourier[0]} k_d={fourier[1]}" if fourier else ""))
    return 0
