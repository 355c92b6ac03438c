"""Statistics over step timings, the link-applied view, and the report files (JSON, markdown, PNG).

Stages, in data-path order (seconds). Measured on the real runtime over loopback:

    head     device compute (embed + layers[:L])     encode   codec encode on the device
    pack     wire format                             rpc      loopback round trip minus the
    unpack   server wire unpack                               server's time (gRPC, copies)
    decode   server codec decode                     tail     server layers[L:] + sampling

With a link applied, the link's own time is added: ``transfer`` (the activation up) and
``return`` (the token down), each ``latency + framed bytes / rate`` (:mod:`.link`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from fc_edge.profile.link import LinkModel, format_rate, with_rate
from fc_edge.profile.simulate import quantile

# (StepTiming field, label) of the measured stages.
MEASURED_STAGES: tuple[tuple[str, str], ...] = (
    ("device_compute_s", "head"),
    ("encode_s", "encode"),
    ("pack_s", "pack"),
    ("network_s", "rpc"),
    ("server_unpack_s", "unpack"),
    ("server_decode_s", "decode"),
    ("server_compute_s", "tail"),
)
LINK_STAGES = ("head", "encode", "pack", "rpc", "transfer", "unpack", "decode", "tail", "return")
DEVICE_FIELDS = ("device_compute_s", "encode_s", "pack_s")
SERVER_FIELDS = ("server_unpack_s", "server_decode_s", "server_compute_s")


def step_dict(step: Any) -> dict[str, Any]:
    """A StepTiming (or a dict of its fields) as a plain dict."""
    return dict(step) if isinstance(step, dict) else step.as_dict()


def dist(values: Iterable[float]) -> dict[str, float]:
    xs = [float(v) for v in values]
    return {"median": quantile(xs, 0.5), "p90": quantile(xs, 0.9), "n": len(xs)}


def summarize_steps(steps: Sequence[dict], hidden_size: int, act_bytes: int = 4) -> dict:
    """Per phase: median/p90 of every stage and of the step total, bytes, ratios; TTFT/TPOT."""
    out: dict[str, Any] = {}
    for phase in ("prefill", "decode"):
        ss = [s for s in steps if s["phase"] == phase]
        if not ss:
            continue
        stages = {label: dist(s[f] for s in ss) for f, label in MEASURED_STAGES}
        raw = quantile([s["rows"] * hidden_size * act_bytes for s in ss], 0.5)
        up = quantile([s["bytes_up"] for s in ss], 0.5)
        out[phase] = {
            "steps": len(ss),
            "rows": quantile([s["rows"] for s in ss], 0.5),
            "codecs_used": sorted({s["codec"] for s in ss}),
            "stages": stages,
            "total": dist(s["total_s"] for s in ss),
            "bytes_up": up,
            "bytes_down": quantile([s["bytes_down"] for s in ss], 0.5),
            "raw_bytes": raw,
            "byte_ratio": raw / up if up else float("nan"),
        }
    out["ttft"] = out["prefill"]["total"] if "prefill" in out else dist([])
    out["tpot"] = out["decode"]["total"] if "decode" in out else dist([])
    return out


def on_link(summary: dict, link: LinkModel, new_tokens: int) -> dict:
    """The medians of ``summary`` with ``link`` in the path: per-stage medians (s) per phase,
    TTFT, TPOT and the whole generation's response time."""
    out: dict[str, Any] = {"link": link.name, "link_desc": link.describe()}
    for phase in ("prefill", "decode"):
        if phase not in summary:
            continue
        p = summary[phase]
        st = {label: p["stages"][label]["median"] for _, label in MEASURED_STAGES}
        st["transfer"] = link.transfer_s(int(p["bytes_up"]))
        st["return"] = link.transfer_s(int(p["bytes_down"]))
        out[phase] = {"stages": {k: st[k] for k in LINK_STAGES},
                      "total_s": p["total"]["median"] + st["transfer"] + st["return"]}
    ttft = out["prefill"]["total_s"] if "prefill" in out else 0.0
    tpot = out["decode"]["total_s"] if "decode" in out else 0.0
    out["ttft_s"] = ttft
    out["tpot_s"] = tpot
    out["response_s"] = ttft + max(0, new_tokens - 1) * tpot
    return out


def rate_sweep(summary: dict, new_tokens: int, rates: Sequence[float]) -> list[dict]:
    """Response time (s) of one generation vs link rate (latency 0): the rate's own effect."""
    base = LinkModel("sweep", 1e9)
    rows = []
    for r in rates:
        v = on_link(summary, with_rate(base, r), new_tokens)
        rows.append({"rate_bps": r, "ttft_s": v["ttft_s"], "tpot_s": v["tpot_s"],
                     "response_s": v["response_s"]})
    return rows


DEFAULT_SWEEP_RATES = tuple(10 ** (6 + i / 4) for i in range(17))  # 1 Mbit/s .. 10 Gbit/s


# --- output files --------------------------------------------------------------------------


def _ms(x: float) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x * 1e3:.2f}"


def _bytes(x: float) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{int(round(x)):,}"


def _load(la: list[float] | None) -> str:
    return "unknown" if not la else " / ".join(f"{x:.1f}" for x in la)


def _table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def markdown(report: dict) -> str:
    cfg = report["config"]
    env = report["environment"]
    out = [
        "# fc-edge latency profile", "",
        f"Model `{cfg['model']}` split at layer {cfg['split_layer']} (hidden size "
        f"{env['hidden_size']}), {cfg['new_tokens']} new tokens, {cfg['repeats']} repeats, "
        f"{env['threads']} torch thread(s) per process on {env['cpu_count']} CPU core(s), "
        f"device `{env['device']}`. Times in ms (median / p90 over steps), bytes per step.", "",
        "## Measured stages (loopback)", "",
    ]
    labels = [label for _, label in MEASURED_STAGES]
    for phase in ("prefill", "decode"):
        rows = []
        for run in report["runs"]:
            p = run["summary"].get(phase)
            if not p:
                continue
            rows.append([f"{run['codec']}", str(run["prompt_len"]),
                         *[f"{_ms(p['stages'][k]['median'])} / {_ms(p['stages'][k]['p90'])}"
                           for k in labels],
                         f"{_ms(p['total']['median'])} / {_ms(p['total']['p90'])}",
                         _bytes(p["bytes_up"]), f"{p['byte_ratio']:.1f}x"])
        out += [f"### {phase}" + (" (one step per prompt; = TTFT)" if phase == "prefill"
                                   else " (per token; = TPOT)"), "",
                _table(["codec", "prompt", *labels, "total", "bytes up", "ratio"], rows), ""]
    out += ["## On each link (medians, ms)", "",
            "`transfer` / `return` = link latency + framed bytes / rate, added to the measured "
            "stages; response = TTFT + (new tokens - 1) x TPOT.", ""]
    links = [(v["link"], v["link_desc"]) for v in report["runs"][0]["links"]]
    heads = [f"{name} ({desc})" for name, desc in links]
    for title, cell in (
        ("TTFT / TPOT / response",
         lambda v: f"{_ms(v['ttft_s'])} / {_ms(v['tpot_s'])} / {_ms(v['response_s'])}"),
        ("transfer of the activation: prefill / decode step",
         lambda v: f"{_ms(v['prefill']['stages']['transfer']) if 'prefill' in v else '-'} / "
                   f"{_ms(v['decode']['stages']['transfer']) if 'decode' in v else '-'}"),
    ):
        rows = [[run["codec"], str(run["prompt_len"]), *[cell(v) for v in run["links"]]]
                for run in report["runs"]]
        out += [f"**{title}**", "", _table(["codec", "prompt", *heads], rows), ""]
    sim = report.get("simulation")
    if sim:
        out += ["## Multi-client simulation", "",
                f"{sim['workers']} server worker(s)"
                + (f" {sim['server_speedup']:g}x faster than measured"
                   if sim.get("server_speedup", 1.0) != 1.0 else "")
                + f", link `{sim['link']}`, prompt "
                f"{sim['prompt_len']}, devices with their own compute; response = one whole "
                "generation (ms). N* = saturation point (response alone / bottleneck demand).",
                ""]
        ns = [r["n_clients"] for r in next(iter(sim["codecs"].values()))["sweep"]]
        rows = []
        for codec, s in sim["codecs"].items():
            rows.append([codec, f"{s['saturation']['n_star']:.1f}", s["saturation"]["bottleneck"],
                         *[f"{_ms(r['mean_response_s'])} / {_ms(r['p90_response_s'])}"
                           for r in s["sweep"]]])
        out += [_table(["codec", "N*", "bottleneck", *[f"N={n} mean / p90" for n in ns]], rows),
                ""]
    check = report.get("multi_client_check")
    if check:
        out += ["## Multi-client check (real loopback runs vs simulation)", "",
                f"codec `{check['codec']}`, prompt {check['prompt_len']}, "
                f"{check['new_tokens']} new tokens, {check['generations_per_client']} generations "
                "per client; simulation with service times from the N=1 run, one device slot "
                "shared by the client threads (one Python process), one server worker, "
                f"{check['cpu_cores']} CPU core(s) under both. Tolerance "
                f"{check['tolerance']:.0%}; host load average during the check: "
                f"{_load(check.get('load_average'))}.", ""]
        rows = [[str(r["n_clients"]), _ms(r["measured_mean_s"]), _ms(r["simulated_mean_s"]),
                 f"{r['rel_error']:+.1%}", "ok" if r["within_tolerance"] else "OUT"]
                for r in check["rows"]]
        out += [_table(["N", "measured mean", "simulated mean", "error", ""], rows), ""]
    shaped = report.get("shaped_check")
    if shaped:
        out += ["## Analytic link vs a tbf-shaped link", ""]
        if "skipped" in shaped:
            out += [f"Skipped: {shaped['skipped']}.", ""]
        else:
            out += ["One TCP connection between two network namespaces over a veth pair, each "
                    "direction shaped by `tc tbf` at the rate; per payload the time of "
                    "`up(8 + n) + down(1)` (fastest of 5: the host only adds delay; the median "
                    "shows how much), against the analytic link at that rate with the pair's "
                    "measured base latency. Tolerance 10%.", ""]
            rows = []
            for res in shaped["rates"]:
                for r in res["rows"]:
                    rows.append([format_rate(res["rate_bps"]), f"{r['bytes']:,}",
                                 _ms(r["measured_s"]), _ms(r.get("measured_median_s")),
                                 _ms(r["model_s"]),
                                 f"{r['rel_error']:+.1%}",
                                 "ok" if r["within_tolerance"] else "OUT"])
            out += [_table(["rate", "payload bytes", "measured ms", "median ms", "model ms",
                            "error", ""], rows), ""]
    shaped_rt = report.get("shaped_runtime")
    if shaped_rt:
        out += ["## The runtime over a shaped link", ""]
        if "skipped" in shaped_rt:
            out += [f"Skipped: {shaped_rt['skipped']}.", ""]
        else:
            out += ["Server and client in their own namespaces over the tbf-shaped veth pair "
                    "(no added latency); predicted = loopback measurement + analytic link at "
                    "the same rate. Network = the client's rpc stage (round trip minus server "
                    "time).", ""]
            rows = [[r["link"], r["codec"], str(r["prompt_len"]),
                     _ms(r["measured_rpc_prefill_s"]), _ms(r["predicted_net_prefill_s"]),
                     _ms(r["measured_ttft_s"]), _ms(r["predicted_ttft_s"]),
                     _ms(r["measured_tpot_s"]), _ms(r["predicted_tpot_s"])]
                    for r in shaped_rt["rows"]]
            out += [_table(["link", "codec", "prompt", "prefill net measured",
                            "prefill net predicted", "TTFT measured", "TTFT predicted",
                            "TPOT measured", "TPOT predicted"], rows), ""]
    out += ["Files: `profile.json` (everything above, plus p90s and raw steps), "
            "`stages_<link>.png`, `rate_sweep.png`, `clients.png`.", ""]
    return "\n".join(out)


def write_json(report: dict, path: Path) -> None:
    path.write_text(json.dumps(report, indent=1, default=float))


def plot_stages(report: dict, link_name: str, path: Path) -> None:
    """Stacked bars per codec (largest prompt): prefill (TTFT) and decode (TPOT) stages."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = _largest_prompt_runs(report)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = plt.get_cmap("tab10").colors
    for ax, phase, title in ((axes[0], "prefill", "prefill (TTFT)"),
                             (axes[1], "decode", "decode step (TPOT)")):
        names = []
        bottoms = [0.0] * len(runs)
        for i, stage in enumerate(LINK_STAGES):
            vals = []
            for run in runs:
                v = next(x for x in run["links"] if x["link"] == link_name)
                vals.append(v[phase]["stages"][stage] * 1e3 if phase in v else 0.0)
            ax.bar(range(len(runs)), vals, bottom=bottoms, color=colors[i % 10], label=stage)
            bottoms = [b + v for b, v in zip(bottoms, vals, strict=True)]
        names = [run["codec"] for run in runs]
        ax.set_xticks(range(len(runs)), names)
        ax.set_ylabel("ms")
        ax.set_title(title)
    axes[1].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    link = next(x for x in runs[0]["links"] if x["link"] == link_name)
    fig.suptitle(f"median stage times, link {link_name} ({link['link_desc']}), "
                 f"prompt {runs[0]['prompt_len']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_rate_sweep(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = _largest_prompt_runs(report)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for run in runs:
        rates = [r["rate_bps"] for r in run["rate_sweep"]]
        axes[0].plot(rates, [r["ttft_s"] * 1e3 for r in run["rate_sweep"]], marker=".",
                     label=run["codec"])
        axes[1].plot(rates, [r["response_s"] * 1e3 for r in run["rate_sweep"]], marker=".",
                     label=run["codec"])
    for ax, t in ((axes[0], "TTFT"), (axes[1], f"response ({report['config']['new_tokens']} "
                                                 "tokens)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("link rate (bit/s), latency 0")
        ax.set_ylabel("ms")
        ax.set_title(t)
        ax.grid(True, which="both", alpha=0.3)
        for name, rate in report.get("preset_rates", {}).items():
            ax.axvline(rate, color="grey", lw=0.6, ls=":")
            ax.text(rate, ax.get_ylim()[1], name, rotation=90, va="top", ha="right", fontsize=7)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"response time vs link rate, prompt {runs[0]['prompt_len']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_clients(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sim = report["simulation"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (codec, s) in enumerate(sim["codecs"].items()):
        ns = [r["n_clients"] for r in s["sweep"]]
        c = plt.get_cmap("tab10").colors[i % 10]
        axes[0].plot(ns, [r["mean_response_s"] for r in s["sweep"]], marker="o", color=c,
                     label=f"{codec} mean")
        axes[0].plot(ns, [r["p90_response_s"] for r in s["sweep"]], ls="--", color=c,
                     label=f"{codec} p90")
        axes[0].axvline(s["saturation"]["n_star"], color=c, lw=0.8, ls=":")
        axes[1].plot(ns, [r["throughput_gen_per_s"] for r in s["sweep"]], marker="o", color=c,
                     label=codec)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("response time per generation (s)")
    axes[0].set_title("simulated response vs clients (dotted: N*)")
    axes[1].set_ylabel("generations / s")
    axes[1].set_title("simulated throughput")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("clients N")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    check = report.get("multi_client_check")
    if check:
        fig.text(0.01, 0.01, "loopback check: " + ", ".join(
            f"N={r['n_clients']} {r['rel_error']:+.0%}" for r in check["rows"]), fontsize=7)
    speed = sim.get("server_speedup", 1.0)
    fig.suptitle(f"{sim['workers']} worker(s)" + (f" x{speed:g} speed" if speed != 1.0 else "")
                 + f", link {sim['link']}, prompt {sim['prompt_len']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _largest_prompt_runs(report: dict) -> list[dict]:
    p = max(run["prompt_len"] for run in report["runs"])
    return [run for run in report["runs"] if run["prompt_len"] == p]


def write_report(report: dict, out_dir: Path) -> list[Path]:
    """Write profile.json, profile.md and the PNGs into ``out_dir``; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "profile.json", out_dir / "profile.md"]
    write_json(report, paths[0])
    paths[1].write_text(markdown(report))
    for link in report["config"]["links"]:
        p = out_dir / f"stages_{link}.png"
        plot_stages(report, link, p)
        paths.append(p)
    p = out_dir / "rate_sweep.png"
    plot_rate_sweep(report, p)
    paths.append(p)
    if report.get("simulation"):
        p = out_dir / "clients.png"
        plot_clients(report, p)
        paths.append(p)
    return paths


__all__ = ["format_rate", "summarize_steps", "on_link", "rate_sweep", "write_report", "markdown"]
