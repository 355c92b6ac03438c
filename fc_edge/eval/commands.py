"""`fc-edge eval`: multiple-choice accuracy or perplexity with codecs at the split."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from fc_edge.errors import ConfigError
from fc_edge.eval.options import add_threads_arg, apply_threads, float_list, int_list


def add_parser(sub: Any) -> None:
    from fc_edge.cli import add_codec_args, add_model_args
    from fc_edge.eval.tasks import TASKS
    from fc_edge.paths import shared_dir

    p = sub.add_parser(
        "eval", help="accuracy on multiple-choice tasks (or perplexity) with a codec at the split",
        description="Score multiple-choice tasks the lm-evaluation-harness way (acc, acc_norm; "
        "partial scoring for WinoGrande) or teacher-forced perplexity (--perplexity FILE), with "
        "each codec applied to the activation at the split. All codecs (--codecs a,b[k=v],c) "
        "and split layers (--split-layer 1,4) run in one pass next to the uncompressed model.")
    add_model_args(p)
    p.add_argument("--tasks", default=",".join(TASKS),
                   help="comma-separated task folders under --data-dir (default: all ten)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="folder with one sub-folder per task holding one .jsonl file "
                   "(default ../shared/datasets)")
    p.add_argument("--split-layer", default="1",
                   help="split after layer L (comma-separated list for a layer sweep)")
    add_codec_args(p, default=None)
    p.add_argument("--codecs", default=None,
                   help="comma-separated codec specs for a sweep, e.g. "
                   "none,fourier,topk,int8,rotated[group_size=32] (default: none + --codec)")
    p.add_argument("--ratios", default=None,
                   help="comma-separated ratios for the ratio-budget codecs (fourier, topk, svd, "
                   "qr); overrides --ratio")
    p.add_argument("--limit", type=int, default=None, help="first N items per task (N documents "
                   "with --perplexity)")
    p.add_argument("--perplexity", type=Path, default=None, metavar="FILE", nargs="?",
                   const=shared_dir() / "texts" / "dev.txt",
                   help="teacher-forced perplexity on FILE (one document per line; default "
                   "../shared/texts/dev.txt) instead")
    p.add_argument("--documents", default="all", choices=("all", "evaluation", "tuning",
                                                          "calibration"),
                   help="perplexity: which documents of FILE: all, or one part of the split of "
                   "texts/dev.txt (evaluation = the first 400, the published figures' documents; "
                   "calibration = the last 600, what calibrated codecs are fit on)")
    p.add_argument("--per-token", action="store_true",
                   help="perplexity: code every token row as its own (1, D) message, exactly "
                   "what decode steps send (default: one message per document, the prefill)")
    p.add_argument("--max-tokens", type=int, default=512,
                   help="perplexity: tokens per document (the rest is cut)")
    p.add_argument("--json", type=Path, default=None, metavar="FILE",
                   help="write every number to FILE")
    p.add_argument("--records", type=Path, default=None, metavar="FILE",
                   help="append every item (document) to FILE as JSON lines as it is scored; "
                   "the same command with the same FILE resumes after the ones already there")
    p.add_argument("--reuse", type=Path, default=None, metavar="FILE",
                   help="accuracy: take the --reuse-settings' scores of every item from FILE (the "
                   "records of an earlier run of the same tasks) and score only the other "
                   "settings; `none` among them reuses the uncompressed model's scores")
    p.add_argument("--reuse-settings", default="", metavar="LIST",
                   help="accuracy: the settings taken from --reuse FILE, e.g. none or "
                   "none,fourier[ratio=8]")
    p.add_argument("--out-dir", type=Path, default=None,
                   help="also write markdown + CSV tables and PNG plots here")
    p.add_argument("--batch-items", type=int, default=32,
                   help="accuracy: items scored together (their forwards share batches)")
    p.add_argument("--batch-tokens", type=int, default=256,
                   help="accuracy: padded rows per forward batch (256 was the fastest on a CPU "
                   "core here; a GPU wants thousands)")
    p.add_argument("--device", default="cpu",
                   help="where the model runs: cpu, cuda or cuda:N (float32 everywhere: the "
                   "scores are the reference the codecs are judged against)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_threads_arg(p)
    p.set_defaults(func=run)


def settings_from_args(args: argparse.Namespace) -> list[Any]:
    from fc_edge.cli import codec_kwargs
    from fc_edge.eval.settings import build_settings

    specs = args.codecs or ("none," + args.codec if args.codec else "none")
    if args.codecs and args.codec:
        raise ConfigError("give --codec or --codecs, not both")
    if args.codec and args.codec.startswith("none"):
        specs = "none"
    return build_settings(specs, codec_kwargs(args), float_list(args.ratios, "--ratios"))


def run(args: argparse.Namespace) -> int:
    from fc_edge.eval import report
    from fc_edge.eval.accuracy import evaluate
    from fc_edge.eval.perplexity import perplexity
    from fc_edge.eval.settings import split_specs

    apply_threads(args)
    settings = settings_from_args(args)
    layers = int_list(args.split_layer, "--split-layer")
    if args.limit is not None and args.limit < 1:
        raise ConfigError("--limit must be >= 1")
    from fc_edge.devices import device_name, resolve_device
    from fc_edge.models.pretrained import load_model

    device = resolve_device(args.device)  # before the weights load: a bad device is one line
    model, tokenizer = load_model(args.model)
    model.to(device)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    progress = not args.no_progress
    if args.perplexity is not None:
        res = perplexity(model, tokenizer, args.perplexity, settings, layers, args.limit,
                         args.max_tokens, progress, log, args.per_token, args.records,
                         args.documents)
        table = report.perplexity_markdown(res)
        rows = report.perplexity_rows(res)
    else:
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        res = evaluate(model, tokenizer, tasks, settings, layers, args.limit, args.data_dir,
                       progress=progress, log=log, records=args.records,
                       batch_items=args.batch_items, batch_tokens=args.batch_tokens,
                       reuse=args.reuse, reuse_settings=split_specs(args.reuse_settings))
        table = report.accuracy_markdown(res)
        rows = report.accuracy_rows(res)
        t = res["timing"]
        log(f"{t['items']} items in {t['seconds']:.1f} s: {t['items_per_s']:.2f} items/s "
            f"({len(settings)} settings x {len(res['split_layers'])} layers)")
    res["model"] = args.model
    res["device"] = device_name(device)
    print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1))
    if args.out_dir:
        out = args.out_dir
        out.mkdir(parents=True, exist_ok=True)
        stem = "perplexity" if args.perplexity is not None else "accuracy"
        (out / f"{stem}.md").write_text(table + "\n")
        report.write_csv(rows, out / f"{stem}.csv")
        if args.perplexity is not None:
            report.plot_delta(report.delta_points(res), out / "delta.png",
                              "Δ perplexity (%)", goal=1.0)
            report.plot_frontier(report.frontier_points(res), out / "frontier.png",
                                 ylabel="next-token top-1 agreement with uncompressed (%)",
                                 title="bytes vs decode fidelity (o row-wise, x whole-block)")
        else:
            (out / "accuracy_norm.md").write_text(report.accuracy_markdown(res, "acc_norm") + "\n")
            report.plot_delta(report.delta_points(res), out / "delta.png",
                              "Δ mean accuracy (points)", goal=-0.5)
            if len(res["split_layers"]) > 1:
                report.plot_layers(res, out / "layers.png")
                report.plot_layers(res, out / "layers_agreement.png", "agreement")
            ref = res["results"][str(res["split_layers"][0])].get("none")
            report.plot_frontier(report.frontier_points(res), out / "frontier.png",
                                 None if ref is None else 100 * ref["mean"]["acc"])
    return 0
