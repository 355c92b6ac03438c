#!/usr/bin/env python
"""The rate-fidelity frontier (docs/results.md §9) from `fc-edge eval` JSON files: a markdown
table of every codec setting (bits per element with headers, Δppl per token and per block,
Δacc, each with its 95% interval and n, and the goal's verdict) and a PNG.

    .venv/bin/python tools/frontier.py --decode docs/results/frontier/decode_*.json \
        --prefill docs/results/frontier/prefill.json \
        --accuracy docs/results/frontier/accuracy_*.json docs/results/full.json \
        --png docs/results/frontier/frontier.png > table.md
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

PPL_GOAL, ACC_GOAL = 1.0, 0.5  # +1% perplexity, -0.5 points, each by the interval's worst end
FULL_ITEMS = 8939  # the ten tasks' complete dev sets


def short(label: str) -> str:
    """A setting's label without the calibration path (the artifact is named in the text)."""
    return re.sub(r",?calibration=[^,\]]*", "", label).replace("[]", "")


def from_records(path: Path) -> dict:
    """A perplexity run's summary (the eval JSON's shape: Δppl, its document-pair interval,
    bytes) from its records file alone, for a run stopped part-way (its n documents)."""
    import math

    from fc_edge.eval import stats

    lines = [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]
    recs = [r for r in lines if "ref" in r]
    ref, tokens = [r["ref"] for r in recs], [r["tokens"] for r in recs]
    n_tok = sum(tokens)
    results = {}
    for key in recs[0]["s"]:
        nll = [r["s"][key]["nll"] for r in recs]
        sent = sum(r["s"][key]["bytes"] for r in recs)
        raw = sum(r["s"][key]["raw"] for r in recs)
        delta = 100 * (math.exp((sum(nll) - sum(ref)) / n_tok) - 1)
        e = {"delta": delta, "byte_ratio": raw / sent}
        if key != "1:none":
            e["delta_ci95"] = [100 * v for v in stats.delta_ppl_ci(ref, nll, tokens)]
        results[key.split(":", 1)[1]] = e
    return {"kind": "perplexity", "documents": len(recs), "tokens": n_tok,
            "results": {"1": results}}


def _entries(paths: list[Path], kind: str) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for p in paths:
        data = (from_records(p) if str(p).endswith(".jsonl")
                else json.loads(Path(p).read_text()))
        runs = data.get("runs", [data]) if isinstance(data, dict) else data
        for run in runs:
            if run.get("kind") != kind:
                continue
            for label, e in run["results"]["1"].items():
                if label != "none":
                    out[short(label)] = {**e, "_n": run.get("documents")
                                         or run.get("timing", {}).get("items"),
                                         "_tokens": run.get("tokens")}
    return out


def _fmt_ci(e: dict | None, unit: str = "") -> str:
    if not e or "delta_ci95" not in e:
        return "–"
    lo, hi = e["delta_ci95"]
    return f"{e['delta']:+.2f}{unit} [{lo:+.2f}, {hi:+.2f}]"


def build(decode: list[Path], prefill: list[Path], accuracy: list[Path]) -> tuple[str, list]:
    dec = _entries(decode, "perplexity")
    pre = _entries(prefill, "perplexity")
    acc = _entries(accuracy, "accuracy")
    names = list(dict.fromkeys([*dec, *pre, *acc]))
    rows, points = [], []
    for name in names:
        d, p, a = dec.get(name), pre.get(name), acc.get(name)
        bits_d = 32 / d["byte_ratio"] if d else None
        bits_p = 32 / p["byte_ratio"] if p else None
        pooled = (a or {}).get("mean", {}).get("byte_ratio_pooled")
        bits_a = 32 / pooled if pooled else None
        bits_p = bits_p or bits_a
        ppl_ok = d is not None and "delta_ci95" in d and d["delta_ci95"][1] <= PPL_GOAL
        acc_ok = a is not None and "delta_ci95" in a and a["delta_ci95"][0] >= -ACC_GOAL
        if d is None or a is None:
            verdict = ("ppl yes" if ppl_ok else "ppl no" if d else "") + \
                      ("; acc yes" if acc_ok else "; acc no" if a else "; acc not measured")
        else:
            verdict = "**yes**" if ppl_ok and acc_ok else "no"
        n_acc = a.get("_n") if a else None
        if a is not None and n_acc and n_acc < FULL_ITEMS:
            verdict += f" (accuracy on {n_acc:,} of the {FULL_ITEMS:,} items)"

        def bits(b: float | None) -> str:
            return f"{b:.2f}" if b else "–"

        n_d, n_p = (d or {}).get("_n") or "–", (p or {}).get("_n") or "–"
        rows.append(f"| `{name}` | {bits(bits_d)} | {_fmt_ci(d, '%')} | {n_d} | "
                    f"{bits(bits_p)} | {_fmt_ci(p, '%')} | {n_p} | "
                    f"{_fmt_ci(a)} | {n_acc or '–'} | {verdict.strip('; ')} |")
        points.append((name, bits_d, d, bits_p, p, bits_a, a))
    head = ("| setting | decode bits/el. | Δppl per token % [95% CI] | docs | prefill bits/el. "
            "| Δppl per block % [95% CI] | docs | Δacc points [95% CI] | items | meets both |\n"
            "|---|---:|---|---:|---:|---|---:|---|---:|---|")
    return head + "\n" + "\n".join(rows), points


def heldout(records: Path, data_dir: Path | None = None, limit: int | None = None
            ) -> list[str]:
    """Δacc of every setting in an accuracy records file over the items whose context is not
    one of the calibration documents (CosmosQA and LogiQA items share dev.txt's documents), with
    its 95% interval, and how many items were left out."""
    from fc_edge.eval import stats
    from fc_edge.eval.scoring import ItemScore
    from fc_edge.paths import read_texts, shared_dir, split_documents

    calibration = set(split_documents(read_texts())["calibration"])
    recs: dict[str, dict[int, dict]] = {}
    import lzma

    opener = lzma.open if Path(records).suffix == ".xz" else open
    with opener(records, "rt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if "task" in r and (limit is None or int(r["idx"]) < limit):
                recs.setdefault(r["task"], {})[int(r["idx"])] = r
    keep: dict[str, list[dict]] = {}
    left_out = 0
    for task, by_idx in recs.items():
        path = (data_dir or shared_dir() / "datasets") / task / "dev.jsonl"
        with open(path, encoding="utf-8") as f:  # the raw records: CosmosQA's and LogiQA's
            contexts = [str(json.loads(line).get("context", "")).strip() for line in f]
        for idx, r in sorted(by_idx.items()):
            if contexts[idx] and contexts[idx] in calibration:
                left_out += 1
                continue
            keep.setdefault(task, []).append(r)
    labels = sorted({k for rs in keep.values() for r in rs for k in r["s"]} - {"1:none"})

    def decisions(ll: list[float], r: dict) -> dict:
        sc = ItemScore(ll, r["chars"], r["label"])
        return {"acc": sc.acc, "pred": sc.pred}

    out = []
    for key in labels:
        ref = {t: [decisions(r["ref"], r) for r in rs] for t, rs in keep.items()}
        mine = {t: [decisions(r["s"][key]["ll"], r) for r in rs] for t, rs in keep.items()}
        c = stats.accuracy_comparison(ref, mine, "acc")
        lo, hi = (100 * v for v in c["delta_ci95"])
        n = sum(len(v) for v in keep.values())
        out.append(f"- `{short(key.split(':', 1)[1])}` on the {n:,} items whose context is not a "
                   f"calibration document ({left_out} left out): Δacc {100 * c['delta']:+.2f} "
                   f"points [{lo:+.2f}, {hi:+.2f}]")
    return out


def _errorbars(ax, pts: list, label: str) -> None:
    """(bits, entry) points of one codec family, with their 95% intervals as error bars."""
    if not pts:
        return
    pts = sorted(pts, key=lambda t: t[0])
    ax.errorbar([b for b, _ in pts], [e["delta"] for _, e in pts],
                yerr=[[e["delta"] - e["delta_ci95"][0] for _, e in pts],
                      [e["delta_ci95"][1] - e["delta"] for _, e in pts]],
                marker="o", capsize=3, label=label)


def plot(points: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    families: dict[str, list] = {}
    for name, bd, d, bp, p, _, a in points:
        fam = name.split("[")[0] + (" (fixed step, capped)" if "step=" in name else "")
        families.setdefault(fam, []).append((name, bd, d, bp, p, a))
    for fam, pts in families.items():
        _errorbars(ax1, [(bd, d) for _, bd, d, _, _, _ in pts if d and "delta_ci95" in d], fam)
        _errorbars(ax2, [(bp, a) for _, _, _, bp, _, a in pts
                         if a and "delta_ci95" in a and bp], fam)
    ax1.axhline(PPL_GOAL, color="k", ls="--", lw=0.8)
    ax1.set_yscale("symlog", linthresh=1)
    ax1.set_xlabel("bits per element, headers included (decode rows, one message per token)")
    ax1.set_ylabel("Δ perplexity per token, % (95% CI)")
    ax1.set_title("Decode rows, evaluation documents (n per point in the table)")
    ax2.axhline(-ACC_GOAL, color="k", ls="--", lw=0.8)
    ax2.set_xlabel("bits per element, headers included (prefill blocks)")
    ax2.set_ylabel("Δ accuracy, points (95% CI)")
    ax2.set_title("Prefill: ten tasks' dev sets")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--decode", nargs="*", type=Path, default=[])
    ap.add_argument("--prefill", nargs="*", type=Path, default=[])
    ap.add_argument("--accuracy", nargs="*", type=Path, default=[])
    ap.add_argument("--png", type=Path, default=None)
    ap.add_argument("--heldout", nargs="*", type=Path, default=[],
                    help="accuracy records files: Δacc without the calibration documents' items")
    ap.add_argument("--heldout-limit", type=int, default=None,
                    help="only the first N items of every task (the --accuracy run's --limit)")
    args = ap.parse_args()
    table, points = build(args.decode, args.prefill, args.accuracy)
    print(table)
    if args.png:
        plot(points, args.png)
    for path in args.heldout:
        print("\n".join(heldout(path, limit=args.heldout_limit)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
