"""Tables (markdown, CSV) and plots (PNG) of :func:`fc_edge.eval.accuracy.evaluate` and
:func:`fc_edge.eval.perplexity.perplexity` results."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from fc_edge.eval.tasks import PAPER_ABBREV, PAPER_ORDER


def _task_order(tasks: list[str]) -> list[str]:
    known = [t for t in PAPER_ORDER if t in tasks]
    return known + [t for t in tasks if t not in known]


def accuracy_rows(res: dict[str, Any], metric: str = "acc") -> list[dict[str, Any]]:
    """One row per (layer, setting): the metric per task (percent) and the mean, plus agreement,
    KL and bytes means."""
    tasks = _task_order(res["tasks"])
    rows = []
    for layer, per in res["results"].items():
        base = per.get("none", {}).get("mean", {}).get(metric)
        for label, r in per.items():
            m = r["mean"]
            row: dict[str, Any] = {"layer": int(layer), "codec": label, "row_wise": r["row_wise"]}
            for t in tasks:
                row[t] = 100 * r["tasks"][t][metric]
                se = r["tasks"][t].get(f"{metric}_stderr")
                row[f"{t}_stderr"] = None if se is None else 100 * se
            row["mean"] = 100 * m[metric]
            row["delta"] = None if base is None else 100 * (m[metric] - base)
            st = r.get("stats", {}).get(metric)
            row["delta_lo"], row["delta_hi"] = (
                (100 * st["delta_ci95"][0], 100 * st["delta_ci95"][1]) if st else (None, None))
            row["mcnemar_p"] = st["mcnemar_p"] if st else None
            row["discordant"] = "/".join(str(v) for v in st["discordant"]) if st else ""
            # over all items (pooled), as its interval; the mean over tasks beside it
            row["agreement"] = 100 * (st["agreement"] if st else m["agreement"])
            row["agreement_task_mean"] = 100 * m["agreement"]
            row["agree_lo"], row["agree_hi"] = (
                (100 * st["agreement_ci95"][0], 100 * st["agreement_ci95"][1]) if st
                else (None, None))
            row["kl"] = m["kl"]
            row["bytes"] = m["bytes"]
            row["byte_ratio"] = m["byte_ratio_pooled"]
            row["fallbacks"] = sum(int(x["budget_fallbacks"]) for x in r["tasks"].values())
            rows.append(row)
    return rows


def accuracy_markdown(res: dict[str, Any], metric: str = "acc") -> str:
    tasks = _task_order(res["tasks"])
    """Markdown table: per-task metric (percent, ± lm-eval's standard error), the mean over
    tasks, Δ against ``none`` with
    its 95% bootstrap interval, the exact McNemar p (discordant items ref-right/codec-right),
    agreement with its Clopper-Pearson interval, KL, bytes."""
    tasks = _task_order(res["tasks"])
    head = (["L", "codec"] + [PAPER_ABBREV.get(t, t) for t in tasks]
            + ["mean", "Δ [95% CI]", "McNemar p (b/c)", "agree, all items [95% CI]", "KL",
               "bytes/seq", "×f32", "row-wise"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in accuracy_rows(res, metric):
        cells = [str(row["layer"]), f"`{row['codec']}`"] + [
            f"{row[t]:.1f}" + ("" if row[f"{t}_stderr"] is None else f" ±{row[f'{t}_stderr']:.1f}")
            for t in tasks]
        ci = "" if row["delta_lo"] is None else f" [{row['delta_lo']:+.1f}, {row['delta_hi']:+.1f}]"
        aci = "" if row["agree_lo"] is None else f" [{row['agree_lo']:.1f}, {row['agree_hi']:.1f}]"
        cells += [f"{row['mean']:.1f}",
                  "" if row["delta"] is None else f"{row['delta']:+.1f}{ci}",
                  "" if row["mcnemar_p"] is None
                  else f"{row['mcnemar_p']:.3g} ({row['discordant']})",
                  f"{row['agreement']:.1f}{aci}", f"{row['kl']:.4f}", f"{row['bytes']:.0f}",
                  f"{row['byte_ratio']:.1f}", "yes" if row["row_wise"] else "no"]
        if row["fallbacks"]:
            cells[-1] += f" ({row['fallbacks']} raw)"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def perplexity_markdown(res: dict[str, Any]) -> str:
    head = ["L", "codec", "ppl", "Δ ppl % [95% CI]", "top-1 agree",
            "bytes/token" if res.get("per_token") else "bytes/seq", "×f32", "rel. error",
            "row-wise"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ref = res["reference_ppl"]
    for layer, per in res["results"].items():
        for label, r in per.items():
            ci = r.get("delta_ci95")
            d = f"{100 * (r['ppl'] / ref - 1):+.2f}" + (
                f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "")
            cells = [layer, f"`{label}`", f"{r['ppl']:.2f}", d,
                     f"{100 * r['agreement']:.1f}", f"{r['bytes']:.0f}", f"{r['byte_ratio']:.1f}",
                     f"{r['rel_error']:.3f}", "yes" if r["row_wise"] else "no"]
            if r["budget_fallbacks"]:
                cells[-1] += f" ({r['budget_fallbacks']} raw)"
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    if not rows:
        return
    keys = list(rows[0])
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def perplexity_rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for layer, per in res["results"].items():
        for label, r in per.items():
            ci = r.get("delta_ci95") or [None, None]
            out.append({"layer": int(layer), "codec": label, "row_wise": r["row_wise"],
                        "ppl": r["ppl"], "delta_pct": 100 * (r["ppl"] / res["reference_ppl"] - 1),
                        "delta_lo": ci[0], "delta_hi": ci[1],
                        "agreement": r["agreement"], "bytes": r["bytes"],
                        "byte_ratio": r["byte_ratio"], "rel_error": r["rel_error"]})
    return out


def plot_layers(res: dict[str, Any], path: Path, metric: str = "acc") -> None:
    """Figure 4 style: mean accuracy (and per task) vs split layer, one line per codec."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = _task_order(res["tasks"])
    layers = sorted(int(L) for L in res["results"])
    labels = res["settings"]
    panels = tasks + (["mean"] if len(tasks) > 1 else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.2), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        for label in labels:
            ys = []
            for L in layers:
                r = res["results"][str(L)][label]
                ys.append(100 * (r["mean"][metric] if panel == "mean" else
                                 r["tasks"][panel][metric]))
            ax.plot(layers, ys, marker="o", label=label)
        ax.set_title(PAPER_ABBREV.get(panel, panel))
        ax.set_xlabel("split after layer")
        ax.set_xscale("log", base=2)
        ax.set_xticks(layers, [str(L) for L in layers])
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"{metric} (%)" if metric != "agreement" else
                          "agreement with uncompressed choice (%)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_frontier(points: list[dict[str, Any]], path: Path, reference: float | None = None,
                  ylabel: str = "mean acc (%)", title: str = "") -> None:
    """Bytes vs accuracy: one point per setting (``bytes_ratio`` x, ``value`` y, ``label``,
    optional ``yerr`` (below, above): the 95% interval of the paired change, drawn as an error
    bar); the Pareto frontier (fewest bytes for the accuracy) is drawn as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for p in points:
        ax.scatter(p["bits_per_element"], p["value"], s=28,
                   marker="o" if p.get("row_wise", True) else "x")
        if "yerr" in p:
            ax.errorbar(p["bits_per_element"], p["value"], yerr=[[p["yerr"][0]], [p["yerr"][1]]],
                        fmt="none", capsize=2, lw=0.8, color="gray")
        ax.annotate(p["label"], (p["bits_per_element"], p["value"]), fontsize=6,
                    xytext=(3, 2), textcoords="offset points")
    front = pareto(points)
    ax.plot([p["bits_per_element"] for p in front], [p["value"] for p in front], "k--", lw=1,
            label="frontier")
    if reference is not None:
        ax.axhline(reference, color="gray", lw=1, label="uncompressed")
        ax.axhline(reference - 0.5, color="gray", lw=1, ls=":", label="uncompressed - 0.5")
    ax.axvline(4.0, color="red", lw=0.8, ls=":", label="1/8 of float32 (4 bits/element)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("bits sent per activation element (log2; float32 = 32)")
    ax.set_ylabel(ylabel)
    ax.set_title(title or "bytes vs accuracy (o row-wise, x whole-block)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def delta_points(res: dict[str, Any], metric: str = "acc") -> list[dict[str, Any]]:
    """Per compressed (layer, setting): Δ against uncompressed and its 95% interval (accuracy:
    points of ``metric``; perplexity: percent)."""
    pts = []
    for layer, per in res["results"].items():
        for label, r in per.items():
            if res.get("kind") == "perplexity":
                ci = r.get("delta_ci95")
                d = r.get("delta")
            else:
                st = r.get("stats", {}).get(metric)
                ci = [100 * v for v in st["delta_ci95"]] if st else None
                d = 100 * st["delta"] if st else None
            if ci is None or d is None:
                continue
            pts.append({"label": f"L{layer} {label}", "delta": d, "lo": ci[0], "hi": ci[1]})
    return pts


def plot_delta(points: list[dict[str, Any]], path: Path, xlabel: str,
               goal: float | None = None) -> None:
    """Δ against uncompressed with 95% intervals as error bars, one row per setting; ``goal``
    draws the allowed loss (a dotted line) next to zero."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.45 * max(len(points), 2) + 1.2))
    ys = list(range(len(points)))
    for y, p in zip(ys, points, strict=True):
        ax.errorbar(p["delta"], y, xerr=[[p["delta"] - p["lo"]], [p["hi"] - p["delta"]]],
                    fmt="o", capsize=3, color="C0")
    ax.axvline(0.0, color="gray", lw=1)
    if goal is not None:
        ax.axvline(goal, color="red", lw=0.8, ls=":", label=f"goal ({goal:+g})")
        ax.legend(fontsize=7)
    ax.set_yticks(ys, [p["label"] for p in points], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title("vs uncompressed, 95% intervals", fontsize=9)
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pareto(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Points not dominated (no other has fewer or equal bits and a higher or equal value, one
    strictly), sorted by bits."""
    out = []
    for p in sorted(points, key=lambda q: (q["bits_per_element"], -q["value"])):
        if not out or p["value"] > out[-1]["value"]:
            out.append(p)
    return out


def frontier_points(res: dict[str, Any], metric: str = "acc", layer: str | None = None
                    ) -> list[dict[str, Any]]:
    """(bits per element, metric in percent) per setting at ``layer`` (default: the first);
    perplexity results give the top-1 agreement."""
    layer = layer or str(min(int(L) for L in res["results"]))
    pts = []
    for label, r in res["results"][layer].items():
        if res.get("kind") == "perplexity":
            value, ratio = r["agreement"], r["byte_ratio"]
        else:
            value, ratio = r["mean"][metric], r["mean"]["byte_ratio_pooled"]
        pt = {"label": label, "value": 100 * value, "row_wise": r["row_wise"],
              "bits_per_element": 32.0 / ratio}
        st = r.get("stats", {}).get(metric)
        if st:  # the Δ interval around this setting's value: error bars of the paired change
            d = 100 * st["delta"]
            pt["yerr"] = (d - 100 * st["delta_ci95"][0], 100 * st["delta_ci95"][1] - d)
        pts.append(pt)
    return pts


def merge_accuracy(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One accuracy result from runs over disjoint task sets with the same settings and layers
    (e.g. two processes, one per core); means over tasks are recomputed."""
    from fc_edge.eval.scoring import mean_over_tasks

    first = parts[0]
    out = {**first, "tasks": [t for p in parts for t in p["tasks"]], "results": {}}
    for layer in first["results"]:
        out["results"][layer] = {}
        for label, r in first["results"][layer].items():
            tasks = {t: m for p in parts for t, m in p["results"][layer][label]["tasks"].items()}
            out["results"][layer][label] = {**r, "tasks": tasks, "mean": mean_over_tasks(tasks)}
    items = sum(p["timing"]["items"] for p in parts)
    seconds = max(p["timing"]["seconds"] for p in parts)
    out["timing"] = {"tasks": {t: v for p in parts for t, v in p["timing"]["tasks"].items()},
                     "items": items, "seconds": seconds, "items_per_s": items / seconds,
                     "processes": len(parts)}
    return out
