"""Markdown for docs/results.md §0 from the full-set run's JSON (docs/results/full_run.sh).

    .venv/bin/python docs/results/render_full.py [docs/results/full] > /tmp/section0.md

Accuracy runs are read from their records (``*.jsonl``), so items of an unfinished stage count
too: every task contributes its first k scored items. Prints, per accuracy run, how many items
of each task are scored against the task's size, the
table with intervals (acc and acc_norm), and the goal verdicts from the intervals; then the
per-token perplexity table, with the interval on the first 40 documents as well (the documents
of docs/results.md §7). Also writes full.json (every run's JSON in one file) beside the runs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fc_edge.eval import report, stats
from fc_edge.eval.tasks import default_data_dir, task_file

GOAL_ACC = 0.5     # points: the upper end of the loss interval must be <= this
GOAL_PPL = 1.0     # percent
GOAL_BITS = 4.0    # bits per element (1/8 of float32)


def verdict(least: float, most: float, goal: float) -> str:
    """The goal "at most ``goal``" judged by an interval [least, most] of the loss: met when
    all of it is within, missed when none of it is, otherwise not established."""
    if stats.within(most, goal):
        return "yes"
    if not stats.within(least, goal):
        return "no (the whole interval is beyond it)"
    return "not established"


def task_sizes(tasks: list[str]) -> dict[str, int]:
    out = {}
    for t in tasks:
        with open(task_file(default_data_dir(), t), encoding="utf-8") as f:
            out[t] = sum(1 for line in f if line.strip())
    return out


def from_records(path: Path) -> dict:
    """An accuracy result (as ``fc-edge eval --json`` writes it) from a records file: every
    task's items 0..k-1 that are all scored (a run stopped mid-stage leaves a prefix)."""
    from fc_edge.eval.settings import build_settings
    from fc_edge.eval.summary import summarize

    lines = path.read_text(encoding="utf-8").splitlines()
    run = json.loads(lines[0])["run"]
    by_task: dict[str, dict[int, dict]] = {}
    for line in lines[1:]:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            break  # the line being written
        if "idx" in rec:  # not a session line
            by_task.setdefault(rec["task"], {})[int(rec["idx"])] = rec
    records = {}
    for task in sorted(by_task):
        got, k = by_task[task], 0
        while k in got:
            k += 1
        records[task] = [got[i] for i in range(k)]
    settings = build_settings(",".join(run["settings"]))
    layers = run["split_layers"]
    return {"kind": "accuracy", "tasks": list(records), "split_layers": layers,
            "settings": run["settings"], "results": summarize(records, layers, settings),
            "timing": {"tasks": {t: {"items": len(r)} for t, r in records.items()},
                       "items": sum(len(r) for r in records.values())},
            "from_records": str(path.name)}


def accuracy_section(name: str, res: dict) -> list[str]:
    sizes = task_sizes(res["tasks"])
    done = {t: v["items"] for t, v in res["timing"]["tasks"].items()}
    total, have = sum(sizes.values()), sum(done.values())
    lines = [f"**Run `{name}`**: {have:,} of {total:,} items scored "
             f"({100 * have / total:.0f}%; per task the first "
             + ", ".join(f"{done[t]}/{sizes[t]} {t}" for t in res["tasks"]) + ").", ""]
    lines += ["acc:", "", report.accuracy_markdown(res, "acc"), "",
              "acc_norm (by characters):", "", report.accuracy_markdown(res, "acc_norm"), ""]
    for label, r in res["results"]["1"].items():
        if "stats" not in r:
            continue
        lo, hi = r["delta_ci95"]
        bits = 32.0 / r["mean"]["byte_ratio_pooled"]
        loss_hi = -lo
        lines.append(f"- `{label}`: Δacc {r['delta']:+.2f} points, 95% interval [{lo:+.2f}, "
                     f"{hi:+.2f}] (n = {r['stats']['acc']['n']:,}); McNemar p "
                     f"{r['mcnemar_p']:.3g} on {sum(r['stats']['acc']['discordant'])} "
                     f"discordant items; agreement {100 * r['stats']['acc']['agreement']:.1f}% "
                     f"[{r['agreement_ci95'][0]:.1f}, {r['agreement_ci95'][1]:.1f}]; "
                     f"{bits:.2f} bits per element. Within 0.5 points by the interval: "
                     f"**{verdict(-hi, loss_hi, GOAL_ACC)}** (largest loss the interval "
                     f"allows: {loss_hi:.2f} points).")
    return lines


def perplexity_section(res: dict) -> list[str]:
    lines = [f"**Per-token perplexity**: {res['documents']} documents of "
             f"`../shared/texts/dev.txt` (the first {res['documents']} lines), "
             f"{res['tokens']:,} scored tokens, at most {res['max_tokens']} tokens each; one "
             "message per token, as at decode steps.", "", report.perplexity_markdown(res), ""]
    tokens, ref = res["doc_tokens"], res["doc_ref_nll"]
    for label, r in res["results"]["1"].items():
        if "delta_ci95" not in r:
            continue
        lo, hi = r["delta_ci95"]
        n40 = min(40, len(tokens))
        lo40, hi40 = (100 * v for v in stats.delta_ppl_ci(ref[:n40], r["doc_nll"][:n40],
                                                           tokens[:n40]))
        lines.append(f"- `{label}`: Δppl {r['delta']:+.2f}%, 95% interval [{lo:+.2f}%, "
                     f"{hi:+.2f}%] over {len(tokens)} documents (documents resampled in "
                     f"pairs). Within +1% by the interval: **{verdict(lo, hi, GOAL_PPL)}"
                     f"**. On the first {n40} documents alone: [{lo40:+.2f}%, {hi40:+.2f}%].")
    return lines


def main() -> None:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/results/full")
    out, bundle = [], {}
    for name in ("main", "others"):
        path = folder / f"{name}.jsonl"
        if path.is_file():
            res = from_records(path)  # all items scored so far, not only finished stages
            (folder / f"{name}.json").write_text(json.dumps(res, indent=1))
            bundle[name] = res
            out += accuracy_section(name, res) + [""]
    path = folder / "ppl_per_token.json"
    if path.is_file():
        res = json.loads(path.read_text())
        bundle["perplexity_per_token"] = res
        out += perplexity_section(res)
    (folder.parent / "full.json").write_text(json.dumps(bundle, indent=1))
    print("\n".join(out))


if __name__ == "__main__":
    main()
