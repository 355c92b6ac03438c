"""Markdown for docs/results.md §0 from the full-set runs (docs/results/full_run.sh).

    .venv/bin/python docs/results/render_full.py [docs/results/full]          # print it
    .venv/bin/python docs/results/render_full.py --write [docs/results/full]  # into results.md

Accuracy runs are read from their records (``*.jsonl``, or ``*.jsonl.xz`` as committed), so
items of an unfinished stage count too: every task contributes its first k scored items; the
provenance (commit, wire-format version, data hashes, what was reused from which file) is
taken from the run's JSON, which ``fc-edge eval --json`` writes. Prints, per accuracy run, how
many items of each task are scored against the task's size, the table with intervals (acc and
acc_norm) and the goal verdicts from the intervals; then the per-token perplexity table; then
the verdict on the fidelity goal. ``--write`` replaces the text between the FULL-RESULTS
markers of docs/results.md. Also writes full.json (every run's JSON in one file).
"""

from __future__ import annotations

import json
import lzma
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

    text = (lzma.open(path, "rt", encoding="utf-8").read() if path.suffix == ".xz"
            else path.read_text(encoding="utf-8"))
    lines = text.splitlines()
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


def provenance_line(res: dict) -> str:
    """Which code made a run's figures: commit(s), wire-format version, what was reused."""
    prov = res.get("provenance") or {}
    sessions = res.get("sessions") or [prov]
    commits = sorted({s_["commit"][:7] for s_ in sessions if s_.get("commit")})
    wires = sorted({s_.get("wire_version") for s_ in sessions if s_.get("wire_version")})
    text = (f"Records: commit {', '.join(f'`{c}`' for c in commits) or 'not recorded'}, "
            f"wire format version {', '.join(map(str, wires)) or 'not recorded'}")
    reused = prov.get("reused")
    if reused:
        text += (f"; the scores of {', '.join(f'`{x}`' for x in reused['settings'])} reused "
                 f"from `{reused['file']}` (sha256 {reused['sha256'][:12]}…)")
    return text + "."


def perplexity_section(res: dict) -> list[str]:
    part = res.get("documents_part", "all")
    which = ("the evaluation part (the first 400 documents; nothing is calibrated or tuned on "
             "them)" if part == "evaluation" else f"part `{part}`")
    lines = [f"**Per-token perplexity**: {res['documents']} documents of "
             f"`../shared/texts/dev.txt` (de-duplicated; {which}; "
             f"{res.get('distinct_texts') or 'unrecorded'} distinct texts by their hashes), "
             f"{res['tokens']:,} scored tokens, at most {res['max_tokens']} tokens each; one "
             "message per token, as at decode steps. " + provenance_line(res), "",
             report.perplexity_markdown(res), ""]
    for label, r in res["results"]["1"].items():
        if "delta_ci95" not in r:
            continue
        lo, hi = r["delta_ci95"]
        lines.append(f"- `{label}`: Δppl {r['delta']:+.2f}%, 95% interval [{lo:+.2f}%, "
                     f"{hi:+.2f}%] over {res['documents']} documents (resampled in pairs, "
                     f"copies of one text as one cluster); {32 / r['byte_ratio']:.2f} bits per "
                     f"element. Within +1% by the interval: "
                     f"**{verdict(lo, hi, GOAL_PPL)}**.")
    return lines


def verdict_section(main: dict | None, ppl: dict | None) -> list[str]:
    """The fidelity goal for ``rotated`` (defaults) at split 1, from the intervals."""
    if main is None or ppl is None or "rotated" not in main["results"]["1"] \
            or "rotated" not in ppl["results"]["1"]:
        return []
    acc, per = main["results"]["1"]["rotated"], ppl["results"]["1"]["rotated"]
    a_lo, a_hi = acc["delta_ci95"]
    p_lo, p_hi = per["delta_ci95"]
    bits = 32.0 / acc["mean"]["byte_ratio_pooled"]
    acc_v, ppl_v = verdict(-a_hi, -a_lo, GOAL_ACC), verdict(p_lo, p_hi, GOAL_PPL)
    whole = "met" if acc_v == ppl_v == "yes" else (
        "not met" if any(v.startswith("no ") for v in (acc_v, ppl_v)) else "not established")
    return ["**Verdict on the fidelity goal** for `rotated` (defaults), split after layer 1, "
            "judged by the intervals:", "",
            f"- **Bytes** (≤ 1/8 of float32): **{'met' if bits <= GOAL_BITS else 'not met'}**: "
            f"{bits:.2f} bits per element over all sequences, and at most 4 on every message "
            f"by construction ({per['bytes']:.0f} bytes per 576-value decode row).",
            f"- **Accuracy within 0.5 points** (ten-task mean, complete dev sets): "
            f"**{acc_v}**: Δacc {acc['delta']:+.2f} points [{a_lo:+.2f}, {a_hi:+.2f}] "
            f"(n = {acc['stats']['acc']['n']:,}).",
            f"- **Perplexity within 1%** (per token, as at decode steps): **{ppl_v}**: "
            f"Δppl {per['delta']:+.2f}% [{p_lo:+.2f}%, {p_hi:+.2f}%] "
            f"({ppl['documents']} documents).",
            f"- The goal as a whole: **{whole}**.", ""]


def load_run(folder: Path, name: str) -> dict | None:
    """Run ``name``'s accuracy result from its records, with the provenance of its JSON."""
    path = next((p for p in (folder / f"{name}.jsonl", folder / f"{name}.jsonl.xz")
                 if p.is_file()), None)
    if path is None:
        return None
    res = from_records(path)  # all items scored so far, not only finished stages
    js = folder / f"{name}.json"
    if js.is_file():
        old = json.loads(js.read_text(encoding="utf-8"))
        for key in ("provenance", "sessions", "model", "device"):
            if key in old:
                res[key] = old[key]
    return res


def distinct_texts(path: Path) -> int | None:
    """How many distinct texts a perplexity run's records scored (each record names its text by
    a hash), or None without records."""
    if not path.is_file():
        return None
    texts = {json.loads(line).get("text") for line in lzma.open(path, "rt", encoding="utf-8")
             if line.startswith('{"idx"')}
    return len(texts - {None}) or None


MARKERS = ("<!-- FULL-RESULTS -->", "<!-- /FULL-RESULTS -->")


def main() -> None:
    args = [a for a in sys.argv[1:] if a != "--write"]
    folder = Path(args[0] if args else "docs/results/full")
    out, bundle = [], {}
    for name in ("main", "others"):
        res = load_run(folder, name)
        if res is not None:
            (folder / f"{name}.json").write_text(json.dumps(res, indent=1))
            bundle[name] = res
            out += accuracy_section(name, res) + [provenance_line(res), ""]
    path = folder / "ppl_per_token.json"
    if path.is_file():
        res = json.loads(path.read_text())
        res["distinct_texts"] = distinct_texts(folder / "ppl_per_token.jsonl.xz")
        bundle["perplexity_per_token"] = res
        out += perplexity_section(res) + [""]
    out += verdict_section(bundle.get("main"), bundle.get("perplexity_per_token"))
    (folder.parent / "full.json").write_text(json.dumps(bundle, indent=1))
    text = "\n".join(out)
    if "--write" not in sys.argv[1:]:
        print(text)
        return
    doc = Path("docs/results.md")
    md = doc.read_text(encoding="utf-8")
    start, end = md.index(MARKERS[0]) + len(MARKERS[0]), md.index(MARKERS[1])
    doc.write_text(md[:start] + "\n" + text.rstrip() + "\n" + md[end:], encoding="utf-8")


if __name__ == "__main__":
    main()
