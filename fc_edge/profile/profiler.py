"""`fc-edge profile`: measure the real runtime, apply the links, simulate many clients, report.

:func:`run_profile` is the one entry point (the CLI verb and ``tools/profile_latency.py`` are
thin fronts over it). It

1. starts the edge server in a child process and builds the device side here;
2. runs ``repeats`` (default 5) interleaved rounds, each one generation of ``new_tokens`` tokens
   per codec and prompt length (after one untimed warm-up per codec), and keeps every step's
   :class:`~fc_edge.runtime.timing.StepTiming` (with its round);
3. applies each analytic link to the measured bytes and sweeps the link rate;
4. simulates N clients per codec over ``sim_link`` with ``workers`` server workers;
5. runs N = 1, 2, 4, 8 real concurrent clients on loopback and compares their mean response
   time with the simulation of this host (clients and server sharing its CPU cores);
6. writes ``profile.json``, ``profile.md`` and PNGs to ``out``.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fc_edge.errors import ConfigError
from fc_edge.profile.driver import DeviceSide, ServerProcess, generate, make_codec, run_concurrent
from fc_edge.profile.link import PRESETS, LinkModel, parse_links
from fc_edge.profile.report import (
    DEFAULT_SWEEP_RATES,
    DEVICE_FIELDS,
    SERVER_FIELDS,
    on_link,
    rate_sweep,
    step_dict,
    summarize_steps,
    write_report,
)
from fc_edge.profile.simulate import (
    Empirical,
    StepDemand,
    Workload,
    saturation_clients,
    simulate_clients,
    sweep_clients,
)

DEFAULT_CODECS = "identity,int8,fourier"
DEFAULT_PROMPT_LENGTHS = "32,128"
DEFAULT_CHECK_CLIENTS = (1, 2, 4, 8)
DEFAULT_SIM_CLIENTS = (1, 2, 4, 8, 16, 32, 64)
CHECK_TOLERANCE = 0.20


@dataclass
class ProfileConfig:
    """What to profile. Times in seconds, sizes in tokens."""

    model: str = "smollm2-135m"
    split_layer: int | None = None
    codecs: list[str] = field(default_factory=lambda: DEFAULT_CODECS.split(","))
    codec_kwargs: dict[str, Any] = field(default_factory=dict)
    prompt_lengths: list[int] = field(default_factory=lambda: [32, 128])
    new_tokens: int = 8
    repeats: int = 5  # interleaved rounds; >= 5 so a prefill percentile has 5 samples
    links: list[LinkModel] = field(default_factory=lambda: list(PRESETS.values()))
    sim_link: str | None = None  # default: the first of links
    workers: int = 1
    # what-if: the simulated server is this many times faster than the measured one (a GPU
    # server profiled from a CPU run); the simulation only
    server_speedup: float = 1.0
    sim_clients: list[int] = field(default_factory=lambda: list(DEFAULT_SIM_CLIENTS))
    check_clients: list[int] = field(default_factory=lambda: list(DEFAULT_CHECK_CLIENTS))
    check_new_tokens: int = 6
    threads: int = 1
    device: str = "cpu"  # head (this process) and tail (the server child)
    dtype: str = "float32"
    seed: int = 0
    out: Path = Path("profile-out")
    # payload transfers over a tbf-shaped veth link vs the analytic model (root only; skipped
    # with the reason otherwise), at the rates of ``links`` up to this rate: above it, tbf with
    # a small burst cannot pace a veth pair on a small host (1 Gbit/s measured 50-77% slow on
    # this 2-core machine; 500 Mbit/s within 3%)
    shaped_check: bool = True
    shaped_max_rate_bps: float = 500e6
    shaped_sizes: list[int] = field(default_factory=lambda: [65_536, 262_144, 1_048_576])
    # the whole runtime over a shaped link at these rates (server and client in namespaces)
    shaped_links: list[LinkModel] = field(default_factory=list)

    def validate(self) -> None:
        if not self.codecs:
            raise ConfigError("no codec given: use e.g. --codecs identity,int8,fourier")
        if not self.prompt_lengths or min(self.prompt_lengths) < 1:
            raise ConfigError("--prompt-lengths must be integers >= 1, e.g. 32,128")
        if self.new_tokens < 2:
            raise ConfigError("--new-tokens must be >= 2 (one prefill and one decode step)")
        if self.repeats < 1 or self.threads < 1 or self.workers < 1:
            raise ConfigError("--repeats, --threads and --workers must be >= 1")
        if not self.server_speedup > 0:
            raise ConfigError("--server-speedup must be > 0 (1 = the measured server)")
        if any(n < 1 for n in [*self.sim_clients, *self.check_clients]):
            raise ConfigError("client counts must be >= 1")
        if self.sim_link is not None and self.sim_link not in [ln.name for ln in self.links]:
            self.links.append(parse_links(self.sim_link)[0])


def workload_from_steps(steps: Sequence[dict], new_tokens: int,
                        setup_s: Sequence[float] | None = None) -> Workload:
    """The simulation's demands, as empirical distributions of the measured steps.

    A step's device demand is everything the client spent on it that is neither the rpc nor the
    server's stages (head, encode, pack and the client's own bookkeeping), so that a step's
    demands add up to its measured total. ``setup_s``: per-generation time outside the steps.
    """
    def demand(phase: str) -> StepDemand:
        ss = [s for s in steps if s["phase"] == phase]
        if not ss:
            raise ConfigError(f"no {phase} steps were measured")
        return StepDemand(
            device_s=Empirical(max(sum(s[f] for f in DEVICE_FIELDS),
                                   s["total_s"] - s["network_s"]
                                   - sum(s[f] for f in SERVER_FIELDS)) for s in ss),
            server_s=Empirical(sum(s[f] for f in SERVER_FIELDS) for s in ss),
            bytes_up=Empirical(s["bytes_up"] for s in ss),
            bytes_down=Empirical(s["bytes_down"] for s in ss),
        )

    setup = Empirical(max(0.0, x) for x in setup_s) if setup_s else None
    return Workload(demand("prefill"), demand("decode"), decode_steps=new_tokens - 1,
                    setup_s=setup)


def loopback_link(steps: Sequence[dict]) -> LinkModel:
    """Loopback as a link: no rate limit to speak of, the measured rpc time as latency (half
    the median round trip each way)."""
    rpc = sorted(s["network_s"] for s in steps)
    return LinkModel("loopback", 1e12, latency_s=rpc[len(rpc) // 2] / 2, frame_overhead=0)


def run_profile(cfg: ProfileConfig, log: Callable[[str], None] | None = None) -> dict:
    """Run the whole profile (see the module docstring); returns the report dict and writes it."""
    cfg.validate()
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    t_start = time.perf_counter()
    codecs = {name: make_codec(name, cfg.codec_kwargs) for name in cfg.codecs}
    runs: list[dict] = []
    check: dict | None = None
    log(f"profile: starting the edge server ({cfg.model}) in a child process")
    with ServerProcess(cfg.model, cfg.split_layer, threads=cfg.threads, device=cfg.device,
                       dtype=cfg.dtype) as server:
        device = DeviceSide(cfg.model, server.split, threads=cfg.threads, device=cfg.device,
                            dtype=cfg.dtype)
        hidden = int(device.model.config.hidden_size)
        log(f"profile: server at {server.address}, split layer {server.split}, "
            f"hidden size {hidden}")
        # Codecs interleaved round by round (every round runs each codec and prompt length
        # once), so a burst of host load lands on all codecs instead of on one.
        clients = {name: device.client(server.address, codec) for name, codec in codecs.items()}
        cells: dict[tuple[str, int], dict[str, list]] = {
            (name, plen): {"steps": [], "setups": []}
            for name in codecs for plen in cfg.prompt_lengths}
        try:
            for client in clients.values():  # one untimed warm-up per codec
                generate(client, device.prompt(min(cfg.prompt_lengths), cfg.seed), 2)
            for rnd in range(cfg.repeats):
                for name, client in clients.items():
                    for plen in cfg.prompt_lengths:
                        prompt = device.prompt(plen, cfg.seed + plen)
                        t0 = time.perf_counter()
                        res = generate(client, prompt, cfg.new_tokens)
                        wall = time.perf_counter() - t0
                        cell = cells[(name, plen)]
                        cell["steps"] += [dict(step_dict(s), round=rnd) for s in res.steps]
                        cell["setups"].append(wall - sum(s.total_s for s in res.steps))
        finally:
            for client in clients.values():
                client.close()
        for (name, plen), cell in cells.items():
            summary = summarize_steps(cell["steps"], hidden)
            runs.append({"codec": name, "codec_config": _codec_config(codecs[name]),
                         "prompt_len": plen, "summary": summary, "repeats": cfg.repeats,
                         "setup_s": cell["setups"], "steps": cell["steps"]})
            log(f"profile: {name:>10} prompt {plen:>4}: TTFT "
                f"{summary['ttft']['median'] * 1e3:7.1f} ms, TPOT "
                f"{summary['tpot']['median'] * 1e3:6.1f} ms, "
                f"{summary['prefill']['bytes_up']:,.0f} B prefill, "
                f"{summary['decode']['bytes_up']:,.0f} B per decode step "
                f"({cfg.repeats} interleaved rounds)")
        if cfg.check_clients:
            check = multi_client_check(cfg, device, server.address, codecs[cfg.codecs[0]], log)
    for run in runs:
        run["links"] = [on_link(run["summary"], ln, cfg.new_tokens) for ln in cfg.links]
        run["rate_sweep"] = rate_sweep(run["summary"], cfg.new_tokens, DEFAULT_SWEEP_RATES)
    simulation = simulate_codecs(cfg, runs) if cfg.sim_clients else None
    shaped = shaped_payload_check(cfg, log) if cfg.shaped_check else None
    shaped_runtime = shaped_runtime_check(cfg, runs, server.split, hidden, log) \
        if cfg.shaped_links else None
    report = {
        "config": {**{k: v for k, v in asdict(cfg).items() if k not in ("links", "out")},
                   "links": [ln.name for ln in cfg.links],
                   "link_models": [ln.as_dict() for ln in cfg.links],
                   "split_layer": server.split, "out": str(cfg.out)},
        "environment": {"python": platform.python_version(), "cpu_count": os.cpu_count(),
                        "threads": cfg.threads, "device": str(device.head_device),
                        "hidden_size": hidden, "platform": platform.platform()},
        "preset_rates": {k: v.rate_bps for k, v in PRESETS.items()},
        "runs": runs,
        "simulation": simulation,
        "multi_client_check": check,
        "shaped_check": shaped,
        "shaped_runtime": shaped_runtime,
    }
    report["wall_s"] = time.perf_counter() - t_start
    paths = write_report(report, Path(cfg.out))
    log(f"profile: wrote {', '.join(str(p) for p in paths)} in {report['wall_s']:.0f} s")
    return report


def shaped_payload_check(cfg: ProfileConfig, log: Callable[[str], None]) -> dict:
    """Payload transfer times over the tbf-shaped veth link vs the analytic model, per rate."""
    from fc_edge.profile.shaped import (
        ShapedLinkUnavailable,
        compare_with_model,
        unavailable_reason,
    )

    reason = unavailable_reason()
    if reason:
        log(f"profile: shaped-link check skipped: {reason}")
        return {"skipped": reason}
    rates = sorted({ln.rate_bps for ln in cfg.links if ln.rate_bps <= cfg.shaped_max_rate_bps})
    out: dict[str, Any] = {"tolerance": 0.10, "sizes": cfg.shaped_sizes, "rates": []}
    for rate in rates:
        try:
            res = compare_with_model(rate, sizes=cfg.shaped_sizes, repeats=5)
        except ShapedLinkUnavailable as e:
            log(f"profile: shaped-link check at {rate:g} bit/s failed: {e}")
            return {"skipped": str(e)}
        for row in res["rows"]:
            row["within_tolerance"] = abs(row["rel_error"]) <= 0.10
        out["rates"].append(res)
        log(f"profile: shaped link {rate / 1e6:g} Mbit/s: model error " + ", ".join(
            f"{r['bytes'] // 1024} KiB {r['rel_error']:+.1%}" for r in res["rows"]))
    return out


def shaped_runtime_check(cfg: ProfileConfig, runs: list[dict], split_layer: int, hidden: int,
                         log: Callable[[str], None]) -> dict:
    """The runtime itself over a shaped link: server and client in their namespaces.

    Per shaped link and codec (largest prompt length), measured TTFT / TPOT against the
    prediction from the loopback measurement plus the analytic link at the shaped rate (the
    namespace pair adds no latency of its own).
    """
    from fc_edge.profile.driver import run_client_process
    from fc_edge.profile.shaped import shaped_link, unavailable_reason

    reason = unavailable_reason()
    if reason:
        log(f"profile: shaped-link runtime check skipped: {reason}")
        return {"skipped": reason}
    plen = max(cfg.prompt_lengths)
    rows = []
    for link in cfg.shaped_links:
        model_link = LinkModel(f"tbf@{link.name}", link.rate_bps)
        with shaped_link(link.rate_bps) as live, ServerProcess(
                cfg.model, split_layer, threads=cfg.threads, host=live.server_addr,
                prefix=live.exec_prefix(live.server_ns)) as server:
            for run in runs:
                if run["prompt_len"] != plen:
                    continue
                got = run_client_process(
                    live.exec_prefix(live.client_ns), server.address, cfg.model, split_layer,
                    run["codec"], cfg.codec_kwargs, plen, cfg.seed + plen, cfg.new_tokens,
                    cfg.repeats, cfg.threads)
                measured = summarize_steps(got["steps"], hidden)
                predicted = on_link(run["summary"], model_link, cfg.new_tokens)
                row = {"link": link.name, "rate_bps": link.rate_bps, "codec": run["codec"],
                       "prompt_len": plen,
                       "measured_ttft_s": measured["ttft"]["median"],
                       "predicted_ttft_s": predicted["ttft_s"],
                       "measured_tpot_s": measured["tpot"]["median"],
                       "predicted_tpot_s": predicted["tpot_s"],
                       "measured_rpc_prefill_s":
                           measured["prefill"]["stages"]["rpc"]["median"],
                       "predicted_net_prefill_s":
                           run["summary"]["prefill"]["stages"]["rpc"]["median"]
                           + predicted["prefill"]["stages"]["transfer"]
                           + predicted["prefill"]["stages"]["return"],
                       "measured_summary": measured}
                rows.append(row)
                log(f"profile: shaped {link.name} {run['codec']}: prefill network measured "
                    f"{row['measured_rpc_prefill_s'] * 1e3:.1f} ms vs predicted "
                    f"{row['predicted_net_prefill_s'] * 1e3:.1f} ms; TTFT "
                    f"{row['measured_ttft_s'] * 1e3:.0f} vs {row['predicted_ttft_s'] * 1e3:.0f}"
                    " ms")
    return {"prompt_len": plen, "rows": rows}


def _loadavg() -> list[float] | None:
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def _codec_config(codec: Any) -> dict:
    try:
        return {"name": codec.name, **codec.config()}
    except Exception:  # noqa: BLE001 - a label is enough for the report
        return {"name": getattr(codec, "name", str(codec))}


def simulate_codecs(cfg: ProfileConfig, runs: list[dict]) -> dict:
    """Figure 7: simulated response vs N per codec (largest prompt) over ``sim_link``."""
    link_name = cfg.sim_link or cfg.links[0].name
    link = next(ln for ln in cfg.links if ln.name == link_name)
    plen = max(cfg.prompt_lengths)
    out: dict[str, Any] = {"link": link.name, "workers": cfg.workers, "prompt_len": plen,
                           "server_speedup": cfg.server_speedup, "codecs": {}}
    for run in runs:
        if run["prompt_len"] != plen:
            continue
        w = workload_from_steps(run["steps"], cfg.new_tokens, run["setup_s"])
        if cfg.server_speedup != 1.0:
            for d in (w.prefill, w.decode):
                d.server_s = Empirical(x / cfg.server_speedup for x in d.server_s.samples)
        sweep = sweep_clients(w, link, cfg.sim_clients, workers=cfg.workers,
                              generations_per_client=10, seed=cfg.seed)
        out["codecs"][run["codec"]] = {
            "sweep": [r.summary() for r in sweep],
            "saturation": saturation_clients(w, link, workers=cfg.workers),
        }
    return out


def multi_client_check(cfg: ProfileConfig, device: DeviceSide, address: str, codec: Any,
                       log: Callable[[str], None]) -> dict:
    """Real N-client runs on loopback vs the simulation of this host.

    Clients are threads of this process and the server is one process, all on this host's
    cores. A Python process runs one thread's interpreter work at a time, and at this model size
    a step is mostly interpreter work (two threads stepping the tail together ran no faster than
    one, measured while writing this), so the simulation of this host has one device slot
    shared by all clients, one server worker, ``cpu_cores = os.cpu_count()`` cores under both,
    and loopback as a link whose latency is the measured rpc time. Service times come from the
    first (smallest) N's run.
    """
    plen = min(cfg.prompt_lengths)
    prompt = device.prompt(plen, cfg.seed + 7)
    cores = os.cpu_count() or 1
    gens = 2
    rows = []
    base: Workload | None = None
    lo: LinkModel | None = None
    for n in sorted(set(cfg.check_clients)):
        real = run_concurrent(device, address, codec, n, prompt, cfg.check_new_tokens, gens)
        walls = [w for ws in real["walls"] for w in ws]
        measured = sum(walls) / len(walls)
        if base is None:  # the first (smallest) N calibrates the model
            results = [r for rs in real["results"] for r in rs]
            steps = [step_dict(s) for r in results for s in r.steps]
            ws = [w for ws in real["walls"] for w in ws]
            setups = [w - sum(s.total_s for s in r.steps) for w, r in zip(ws, results, strict=True)]
            base = workload_from_steps(steps, cfg.check_new_tokens, setups)
            lo = loopback_link(steps)
        sim = simulate_clients(base, n, lo, workers=1, device_slots=1, cpu_cores=cores,
                               generations_per_client=max(gens, 20 // n), seed=cfg.seed)
        err = (sim.mean_s - measured) / measured
        rows.append({"n_clients": n, "measured_mean_s": measured, "simulated_mean_s": sim.mean_s,
                     "measured_samples_s": walls, "rel_error": err,
                     "within_tolerance": abs(err) <= CHECK_TOLERANCE,
                     "measured_throughput_gen_per_s": len(walls) / real["makespan_s"],
                     "simulated_throughput_gen_per_s": sim.throughput_per_s})
        log(f"profile: {n} concurrent client(s): measured {measured * 1e3:.0f} ms, simulated "
            f"{sim.mean_s * 1e3:.0f} ms per generation ({err:+.1%})")
    return {"codec": codec.name, "prompt_len": plen, "new_tokens": cfg.check_new_tokens,
            "generations_per_client": gens, "cpu_cores": cores, "device_slots": 1,
            "server_workers": 1, "load_average": _loadavg(), "tolerance": CHECK_TOLERANCE,
            "rows": rows, "all_within_tolerance": all(r["within_tolerance"] for r in rows)}
