"""`fc-edge analyze`: where to split and what each codec costs, per layer."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from fc_edge.errors import ConfigError


def add_parser(sub: Any) -> None:
    from fc_edge.cli import add_model_args

    p = sub.add_parser(
        "analyze", help="per-layer spectra, codec error vs ratio, and a split/codec recommendation",
        description="Run the model over a few documents and, after each layer, measure the "
        "low-frequency energy share along the token and hidden axes and every codec's relative "
        "reconstruction error and byte ratio (through the wire format); write PNG plots and a "
        "JSON of every number; recommend (layer, codec, parameters) under a budget.")
    add_model_args(p)
    p.add_argument("--layers", default=None,
                   help="comma-separated split layers (default 1,2,4,8,16 and N-1 that exist)")
    p.add_argument("--texts", type=Path, default=None,
                   help="documents, one per line (default ../shared/texts/dev.txt)")
    p.add_argument("--limit", type=int, default=8, help="documents to use (default 8)")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens per document")
    p.add_argument("--ratios", default="2,4,8,16", help="ratios for fourier/topk/svd/qr")
    p.add_argument("--codecs", default="fourier,topk,svd,qr",
                   help="ratio-budget codecs to sweep over --ratios")
    p.add_argument("--fixed", default="int8,int4,rotated",
                   help="fixed-rate codecs measured once each")
    p.add_argument("--fraction", type=float, default=0.125,
                   help="'low frequencies' = this fraction of frequencies nearest zero")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--max-error", type=float, default=None,
                        help="recommend the most compression with mean relative error <= this")
    budget.add_argument("--min-ratio", type=float, default=None,
                        help="recommend the least error at byte ratio >= this (default 8)")
    p.add_argument("--row-wise", action="store_true",
                   help="recommend only row-wise codecs (they also code decode steps)")
    p.add_argument("--out-dir", type=Path, default=Path("analysis"),
                   help="where the PNG plots and analysis.json go (default ./analysis)")
    p.add_argument("--json", type=Path, default=None, help="JSON path (default OUT/analysis.json)")
    from fc_edge.eval.options import add_threads_arg

    add_threads_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fc_edge.analysis.analyze import analyze, markdown_table, plot_all, recommend
    from fc_edge.eval.options import apply_threads, float_list, int_list
    from fc_edge.eval.perplexity import read_documents
    from fc_edge.models.pretrained import load_model

    apply_threads(args)
    if args.limit < 1 or args.max_tokens < 2:
        raise ConfigError("--limit must be >= 1 and --max-tokens >= 2")
    ratios = float_list(args.ratios, "--ratios") or []
    docs = read_documents(args.texts, "all", args.limit)
    model, tokenizer = load_model(args.model)
    if tokenizer is None:
        raise ConfigError(f"model {args.model!r} has no tokenizer: give a model with one")
    n = model.config.num_hidden_layers
    if args.layers:
        layers = int_list(args.layers, "--layers")
    else:
        layers = [L for L in (1, 2, 4, 8, 16, n - 1) if 1 <= L <= n - 1]
    ids = [list(tokenizer(d, add_special_tokens=False)["input_ids"])[: args.max_tokens]
           for d in docs]
    ids = [x for x in ids if len(x) >= 2]

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    codecs = [c for c in args.codecs.split(",") if c.strip()]
    fixed = [c for c in args.fixed.split(",") if c.strip()]
    res = analyze(model, ids, layers, ratios, codecs, fixed, args.fraction, log)
    paths = plot_all(res, args.out_dir)
    min_ratio = args.min_ratio if args.max_error is None and args.min_ratio is not None else (
        8.0 if args.max_error is None else None)
    rec = recommend(res, args.max_error, min_ratio, args.row_wise)
    res.pop("_activations")
    res["model"] = args.model
    res["recommendation"] = {"max_error": args.max_error, "min_ratio": min_ratio,
                             "row_wise_only": args.row_wise, "choice": rec}
    print(markdown_table(res))
    if rec is None:
        print("\nno (layer, codec) meets the budget")
    else:
        print(f"\nrecommendation: split after layer {rec['layer']}, codec {rec['setting']} "
              f"({rec['config']}): mean relative error {rec['rel_error']:.4f} at "
              f"{rec['byte_ratio']:.1f}x fewer bytes than float32"
              + ("" if rec["row_wise"] else " (needs the whole prefill block; not row-wise)"))
    out_json = args.json or args.out_dir / "analysis.json"
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(res, indent=1))
    log("wrote " + ", ".join(str(p) for p in [*paths, out_json]))
    return 0
