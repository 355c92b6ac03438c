"""The report of tools/gpu_check.sh: one JSON of every stage and the issue's targets, and a table.

Reads the run's work folder: ``stages.tsv`` (name, status, exit code, seconds, limit, note per
stage, as the script wrote them), ``logs/<stage>.log``, ``machine.json`` (setup), ``tests.xml``
(pytest's JUnit XML), ``bench_cuda_f32.json``, ``bench_cuda_bf16.json``, ``bench_cupy.json``
(the benchmarks' ``--json``) and ``bench_server.json`` if the server benchmark writes one, else
its printed table. Writes ``--json`` and prints a table, the last thing a caller sees.

Targets (issue 23): fused compress >= 2x the unfused torch path and >= 30x Top-k at
(2048, 2048), >= 50% of a device-to-device copy's bandwidth (float32 and bfloat16); CuPy
rotated payloads byte-identical to the CPU coder (and the CPU cutoff confirmed); the server at
N = 32 >= 20x the tokens/s of N = 1 (batched, bfloat16, synthetic real-size model); the CUDA and
CuPy tests pass. A target whose stage did not run is ``"met": null`` with the reason.

  python tools/gpu_check_report.py --work /tmp/gpu_check --json $OUT/gpu_check.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

SERVER_TARGET = 20.0  # N = 32 tokens/s over N = 1's
LOG_TAIL_LINES = 30


def read_stages(work: Path) -> dict[str, dict[str, Any]]:
    """stages.tsv -> {name: {status, rc, seconds, limit_s, note, log_tail}} in run order."""
    stages: dict[str, dict[str, Any]] = {}
    tsv = work / "stages.tsv"
    for line in tsv.read_text().splitlines() if tsv.exists() else []:
        name, status, rc, seconds, limit, note = (line.split("\t") + [""] * 6)[:6]
        log = work / "logs" / f"{name}.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        tail = text.splitlines()[-LOG_TAIL_LINES:]
        stages[name] = {"status": status, "rc": int(rc) if rc else None,
                        "seconds": float(seconds or 0), "limit_s": int(limit or 0),
                        "note": note, "log_tail": tail}
    return stages


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_junit(path: Path) -> dict[str, Any] | None:
    """Counts of a pytest JUnit XML and the ids of the tests that failed or errored."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites)
              for k in ("tests", "failures", "errors", "skipped")}
    bad = [f"{case.get('classname', '')}::{case.get('name', '')}"
           for case in root.iter("testcase")
           if case.find("failure") is not None or case.find("error") is not None]
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "failed": bad[:50]}


_SERVER_ROW = re.compile(r"^\s*(\d+)\s*\|\s*(batched|one at a time)\s*\|\s*([\d.]+)\s*\|")


def server_rates(log: str) -> dict[str, dict[int, float]]:
    """tokens/s per mode and N from bench_server.py's table (``"  32 | batched  | 812.3 |"``)."""
    rates: dict[str, dict[int, float]] = {}
    for line in log.splitlines():
        m = _SERVER_ROW.match(line)
        if m:
            rates.setdefault(m.group(2), {})[int(m.group(1))] = float(m.group(3))
    return rates


def _absent(stages: dict[str, dict[str, Any]], stage: str) -> dict[str, Any]:
    got = stages.get(stage)
    why = f"stage {stage} did not run" if got is None else f"stage {stage}: {got['status']}"
    return {"met": None, "why": why}


def targets(work: Path, stages: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for dtype in ("f32", "bf16"):
        stage = f"bench_cuda_{dtype}"
        bench = read_json(work / f"{stage}.json")
        for name in ("fused_vs_unfused", "fused_vs_topk", "copy_fraction"):
            key = f"{name}_2048_{dtype}"
            got = (bench or {}).get("targets", {}).get(name)
            out[key] = {**got, "met": bool(got["met"])} if got else _absent(stages, stage)
    cupy = read_json(work / "bench_cupy.json")
    same = (cupy or {}).get("targets", {}).get("byte_identical")
    out["cupy_byte_identical"] = same if same else _absent(stages, "bench_cupy")
    cutoff = (cupy or {}).get("cutoff")
    out["cupy_cutoff_confirmed"] = (
        {"value": cutoff["worst_default_over_best"], "target": cutoff["slack"],
         "met": cutoff["confirmed"], "cutoff_values": cutoff["cutoff_values"],
         "crossover_values": cutoff["crossover_values"]}
        if cutoff else _absent(stages, "bench_cupy"))
    server = read_json(work / "bench_server.json")
    log = work / "logs" / "bench_server.log"
    rates = server_rates(log.read_text(errors="replace")) if log.exists() else {}
    batched = rates.get("batched", {})
    if 1 in batched and 32 in batched and batched[1] > 0:
        ratio = batched[32] / batched[1]
        out["server_n32_vs_n1"] = {"value": ratio, "target": SERVER_TARGET,
                                   "met": ratio >= SERVER_TARGET, "tokens_per_s": batched}
    else:
        out["server_n32_vs_n1"] = _absent(stages, "bench_server")
    if server is not None:
        out["server_n32_vs_n1"]["bench_server_json"] = server
    junit = read_junit(work / "tests.xml")
    if junit is not None:
        ok = junit["failures"] == 0 and junit["errors"] == 0 and junit["passed"] > 0
        out["cuda_tests_pass"] = {"value": f"{junit['passed']} passed, {junit['failures']} "
                                           f"failed, {junit['errors']} errors, "
                                           f"{junit['skipped']} skipped",
                                  "met": ok, "failed": junit["failed"]}
    else:
        out["cuda_tests_pass"] = _absent(stages, "tests")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True, help="gpu_check.sh's work folder")
    p.add_argument("--json", type=Path, required=True, help="where the report goes")
    p.add_argument("--budget", type=int, default=0, help="the run's budget, seconds")
    p.add_argument("--elapsed", type=int, default=0, help="seconds the run took")
    args = p.parse_args(argv)
    stages = read_stages(args.work)
    report = {
        "script": "tools/gpu_check.sh",
        "commit": os.environ.get("FC_EDGE_COMMIT", "unknown"),
        "budget_s": args.budget, "elapsed_s": args.elapsed,
        "machine": read_json(args.work / "machine.json"),
        "stages": stages,
        "results": {name: read_json(args.work / f"{name}.json")
                    for name in ("bench_cuda_f32", "bench_cuda_bf16", "bench_cupy")},
        "targets": targets(args.work, stages),
    }
    report["status"] = "ok" if stages and all(
        s["status"] == "ok" for s in stages.values()) else "incomplete"
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")

    gpu = (report["machine"] or {}).get("gpu") or {}
    print(f"\ngpu_check on {gpu.get('name', 'no GPU')}, commit {report['commit']}: "
          f"{args.elapsed}s of {args.budget}s")
    for name, s in stages.items():
        print(f"  {name:<16} {s['status']:<8} {s['seconds']:7.1f}s / {s['limit_s']:>3}s"
              f"  {s['note'] or (s['log_tail'][-1][:70] if s['log_tail'] else '')}")
    for name, t in report["targets"].items():
        verdict = {True: "MET", False: "MISSED", None: "not run"}[t["met"]]
        value = t.get("value", t.get("why", ""))
        value = f"{value:.3g}" if isinstance(value, float) else value
        target = f" (target {t['target']})" if "target" in t else ""
        print(f"  {name:<28} {verdict:<7} {value}{target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
