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
        "JSON of every number; recommend (layer, codec, parameters) under a budget. With "
        "--privacy instead: how many prompt tokens a server recovers from the activation it "
        "receives (linear and MLP inverters fitted on calibration documents of dev.txt, scored "
        "on evaluation documents).")
    add_model_args(p)
    p.add_argument("--layers", default=None,
                   help="comma-separated split layers (default 1,2,4,8,16 and N-1 that exist)")
    p.add_argument("--texts", type=Path, default=None,
                   help="documents, one per line (default ../shared/texts/dev.txt)")
    p.add_argument("--limit", type=int, default=8, help="documents to use (default 8)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="tokens per document (default 128; 64 with --privacy)")
    p.add_argument("--ratios", default="2,4,8,16", help="ratios for fourier/topk/svd/qr")
    p.add_argument("--codecs", default=None,
                   help="ratio-budget codecs to sweep over --ratios (default fourier,topk,svd,qr);"
                   " with --privacy, codec specs as `fc-edge eval --codecs` takes them (default "
                   "'none,int8,rotated,fourier[ratio=8],topk[ratio=8]')")
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
    priv = p.add_argument_group("privacy (--privacy)")
    priv.add_argument("--privacy", action="store_true",
                      help="measure prompt-token recovery from what the server receives "
                      "(writes OUT/privacy.json, privacy.md, privacy.png)")
    priv.add_argument("--max-docs", type=int, default=300,
                      help="calibration documents to fit on and evaluation documents to score "
                      "(each at most; default 300)")
    priv.add_argument("--accuracy", type=Path, default=None,
                      help="an `fc-edge eval --json` accuracy result (or a file of several, e.g. "
                      "docs/results/full.json): show each codec's Δaccuracy beside it")
    priv.add_argument("--hidden", type=int, default=1024, help="MLP inverter hidden units")
    priv.add_argument("--epochs", type=int, default=4, help="MLP inverter training epochs")
    priv.add_argument("--seed", type=int, default=0, help="MLP inverter seed")
    priv.add_argument("--from-json", type=Path, default=None,
                      help="re-render privacy.md/png from an earlier privacy.json (no model run), "
                      "e.g. with a newer --accuracy")
    from fc_edge.eval.options import add_threads_arg

    add_threads_arg(p)
    p.set_defaults(func=run)


def log(msg: str) -> None:
    """A progress line on stderr (the tables go to stdout)."""
    print(msg, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    if args.privacy:
        return run_privacy(args)
    from fc_edge.analysis.analyze import analyze, markdown_table, plot_all, recommend
    from fc_edge.eval.options import apply_threads, float_list, int_list
    from fc_edge.eval.perplexity import read_documents
    from fc_edge.models.pretrained import load_model

    apply_threads(args)
    if args.max_tokens is None:
        args.max_tokens = 128
    if args.codecs is None:
        args.codecs = "fourier,topk,svd,qr"
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


def run_privacy(args: argparse.Namespace) -> int:
    """`fc-edge analyze --privacy`: see :mod:`fc_edge.analysis.privacy`."""
    from fc_edge.analysis.privacy import (
        DEFAULT_CODECS,
        DEFAULT_LAYERS,
        MAX_TOKENS,
        MIN_DOCUMENTS,
        accuracy_deltas,
        privacy_analysis,
        token_windows,
    )
    from fc_edge.eval.forward import LayerStack
    from fc_edge.eval.options import apply_threads, int_list
    from fc_edge.eval.records import provenance
    from fc_edge.eval.settings import build_settings
    from fc_edge.models.pretrained import load_model
    from fc_edge.paths import read_texts, shared_dir, split_documents

    apply_threads(args)
    accuracy = accuracy_deltas(args.accuracy) if args.accuracy is not None else None
    if args.from_json is not None:
        try:
            res = json.loads(Path(args.from_json).read_text())
            if not isinstance(res, dict) or "results" not in res or "layers" not in res:
                raise ValueError("not a privacy.json of `fc-edge analyze --privacy`")
            return write_privacy(args, res, accuracy)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"--from-json {str(args.from_json)!r}: not a privacy.json of "
                              f"`fc-edge analyze --privacy` ({type(e).__name__}: {e})") from None
    max_tokens = MAX_TOKENS if args.max_tokens is None else args.max_tokens
    if max_tokens < 2:
        raise ConfigError("--max-tokens must be >= 2")
    if args.max_docs < MIN_DOCUMENTS:
        raise ConfigError(f"--max-docs must be >= {MIN_DOCUMENTS}")
    if args.hidden < 1 or args.epochs < 1:
        raise ConfigError("--hidden and --epochs must be >= 1")
    settings = build_settings(args.codecs or DEFAULT_CODECS)  # unknown codec: one-line error
    path = args.texts if args.texts is not None else shared_dir() / "texts" / "dev.txt"
    if not Path(path).is_file():
        raise ConfigError(f"--texts {str(path)!r}: no such file (one document per line)")
    try:
        parts = split_documents(read_texts(Path(path)))
    except ValueError as e:
        raise ConfigError(f"{path}: {e} (--privacy needs the layout of texts/dev.txt)") from None
    model, tokenizer = load_model(args.model)
    if tokenizer is None:
        raise ConfigError(f"model {args.model!r} has no tokenizer: give a model with one")
    stack = LayerStack(model)
    layers = stack.split_layers(int_list(args.layers, "--layers") if args.layers
                                else [L for L in DEFAULT_LAYERS if L < stack.num_layers])
    evaluation = token_windows(tokenizer, parts["evaluation"], max_tokens)[: args.max_docs]
    calibration = token_windows(tokenizer, parts["calibration"], max_tokens)[: args.max_docs]

    log(f"privacy: layers {layers}, codecs {[s.label for s in settings]}, "
        f"{len(calibration)} calibration / {len(evaluation)} evaluation documents, "
        f"first {max_tokens} tokens each")
    res = privacy_analysis(model, calibration, evaluation, layers, settings, hidden=args.hidden,
                           epochs=args.epochs, seed=args.seed, log=log,
                           progress=sys.stderr.isatty())
    res["model"] = args.model
    res["max_tokens"] = max_tokens
    res["texts"] = str(path)
    res["provenance"] = provenance([Path(path)])
    return write_privacy(args, res, accuracy)


def write_privacy(args: argparse.Namespace, res: dict, accuracy: dict | None) -> int:
    """privacy.json (with the accuracy it is shown beside), privacy.md and privacy.png."""
    from fc_edge.analysis.privacy import markdown_report, plot_recovery
    from fc_edge.eval.records import file_sha256

    note = ""
    if accuracy is not None:
        res["accuracy"] = {"file": str(args.accuracy), "sha256": file_sha256(args.accuracy),
                           "delta": accuracy}
        note = (f"Δacc: from {args.accuracy} (mean over its tasks, points, paired 95% CI), as "
                "that run measured it (its provenance names its commit and wire version)")
        note += (f"; added later by `fc-edge analyze --privacy --from-json {args.from_json} "
                 f"--accuracy {args.accuracy}` (the recovery figures are the run's below)."
                 if getattr(args, "from_json", None) else ".")
    text = markdown_report(res, accuracy, note)  # before anything is written
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out_json = args.json or args.out_dir / "privacy.json"
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(res, indent=1) + "\n")
    md = args.out_dir / "privacy.md"
    md.write_text(text)
    png = plot_recovery(res, args.out_dir / "privacy.png")
    print(text)
    log(f"wrote {out_json}, {md}, {png}")
    return 0
