"""`fc-edge eval` as a user runs it: an old commit's CLI vs this tree's, as separate processes.

Each side is ``python -m fc_edge.cli eval`` with ``PYTHONPATH`` set to that side's checkout (the
same interpreter and packages for both), on the same items and flags (``--tasks``, ``--limit``,
``--codecs``, ``--threads``, ``--split-layer``, ``--data-dir``). Per task the two sides run in
alternating order (old first for even-numbered tasks, new first for odd ones), so a load drift
hits both; ``--one-process`` runs all the tasks in one eval process per side instead. The wall
time of every process is recorded (start to exit: imports, model load, scoring, summaries), and
the scoring time the process reports for each task.

To compare scores, each process runs the CLI's ``main`` with ``evaluate(record_items=True)``
(a one-line wrapper, ``SHIM`` below: the per-item log-likelihoods land in the ``--json`` output;
nothing else changes). Per task and setting it checks that both sides pick the same choice for
every item and that every choice's log-likelihood agrees within ``--tolerance`` nats; where the
two commits build different prompts for a task (the prompt texts are compared first), the
log-likelihoods are not comparable and the table says so instead.

    python tools/bench_eval_cli.py --old /work/old-3880099 --limit 10 --json out.json
    python tools/bench_eval_cli.py --old /work/old-3880099 --limit 10 --one-process
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("arc_challenge,arc_easy,commonsenseqa,cosmosqa,logiqa,openbookqa,piqa,qasc,siqa,"
         "winogrande")

# Runs `fc-edge eval` (sys.argv[1:]) with evaluate(record_items=True). fc_edge.cli is imported
# first, so whatever it does before torch loads (environment defaults) still happens first.
SHIM = """
import functools, importlib, sys
import fc_edge.cli as cli
print("fc_edge from", cli.__file__, file=sys.stderr)
for name in ("fc_edge.eval.accuracy", "fc_edge.eval.runner"):
    try:
        mod = importlib.import_module(name)
    except ImportError:
        continue
    if hasattr(mod, "evaluate"):
        mod.evaluate = functools.partial(mod.evaluate, record_items=True)
        break
sys.exit(cli.main())
"""

# Prints {task: sha256 of every item's contexts and continuations} with the side's own task code.
PROMPTS = """
import hashlib, json, sys
from fc_edge.eval.tasks import load_task
data, limit = sys.argv[1], int(sys.argv[2])
out = {}
for task in sys.argv[3].split(","):
    h = hashlib.sha256()
    for item in load_task(task, data, limit):
        h.update(json.dumps([item.contexts, item.continuations]).encode())
    out[task] = h.hexdigest()
print(json.dumps(out))
"""


def commit_of(path: Path) -> str:
    """The checkout's commit, with ``+dirty`` when it has uncommitted changes under fc_edge/."""
    rev = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True,
                         text=True, check=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(path), "status", "--porcelain", "--", "fc_edge"],
                           capture_output=True, text=True, check=True).stdout.strip()
    return rev[:12] + ("+dirty" if dirty else "")


def side_env(path: Path, policy: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(path))
    if policy != "cli":
        env["OMP_WAIT_POLICY"] = policy
    return env


def run_eval(python: str, path: Path, policy: str, tasks: str, args: argparse.Namespace,
             out: Path) -> tuple[float, dict]:
    """One eval process; returns (its wall seconds, its --json)."""
    cmd = [python, "-c", SHIM, "eval", "--tasks", tasks, "--limit", str(args.limit),
           "--codecs", args.codecs, "--threads", str(args.threads),
           "--split-layer", str(args.split_layer), "--data-dir", str(args.data_dir),
           "--no-progress", "--json", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=side_env(path, policy), capture_output=True, text=True,
                          cwd=path)  # cwd: `python -c` puts it first on sys.path
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"eval failed in {path} (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    if f"fc_edge from {path}/" not in proc.stderr:
        sys.exit(f"the {path} side imported fc_edge from elsewhere:\n{proc.stderr[:500]}")
    return wall, json.loads(out.read_text())


def prompt_hashes(python: str, path: Path, args: argparse.Namespace, tasks: list[str]) -> dict:
    proc = subprocess.run([python, "-c", PROMPTS, str(args.data_dir), str(args.limit),
                           ",".join(tasks)], env=side_env(path, "cli"), capture_output=True,
                          text=True, check=True, cwd=path)
    return json.loads(proc.stdout)


def compare(old: dict, new: dict, task: str, tol: float) -> dict:
    """Per setting: items whose acc decision differs, the largest |Δ log-likelihood|, and
    whether every choice is within ``tol``."""
    out = {}
    for label in new["settings"]:
        a = old["results"][str(old["split_layers"][0])][label]["items"][task]
        b = new["results"][str(new["split_layers"][0])][label]["items"][task]
        if len(a) != len(b):
            out[label] = {"error": f"{len(a)} vs {len(b)} items"}
            continue
        diff = max((abs(x - y) for la, lb in zip(a, b, strict=True)
                    for x, y in zip(la, lb, strict=True)), default=0.0)
        flips = sum(max(range(len(la)), key=la.__getitem__)
                    != max(range(len(lb)), key=lb.__getitem__) for la, lb in zip(a, b))
        out[label] = {"max_abs_diff": diff, "decisions_differ": flips, "within_tol": diff <= tol}
    return out


def report(rows: list[dict], commits: dict, args: argparse.Namespace, old_total: float,
           new_total: float) -> None:
    """Prints the per-task table (markdown) and the all-task process ratio."""
    tasks = [r["task"] for r in rows]
    print(f"old {commits['old']} vs new {commits['new']}: {len(tasks)} tasks x {args.limit} "
          f"items, --codecs {args.codecs}, --threads {args.threads}, "
          f"{'one process' if args.one_process else 'one process per task'}, "
          f"OMP_WAIT_POLICY {args.omp_wait_policy}")
    walls = "" if args.one_process else "old process s | new process s | ratio | "
    print(f"| task | {walls}old scoring s | new scoring s | scoring ratio | scores |")
    print("|---|" + "---|" * (walls.count("|") + 4))
    for r in rows:
        if not r["same_prompts"]:
            verdict = "prompts differ between commits: not compared"
        else:
            verdict = "; ".join(
                f"{lb}: {v['decisions_differ']} decisions differ, max |Δll| {v['max_abs_diff']:.1e}"
                if "error" not in v else f"{lb}: {v['error']}"
                for lb, v in r["agreement"].items())
        walls = ("" if args.one_process else f"{r['old_process_s']:.1f} | "
                 f"{r['new_process_s']:.1f} | {r['old_process_s'] / r['new_process_s']:.2f} | ")
        print(f"| {r['task']} | {walls}{r['old_scoring_s']:.1f} | {r['new_scoring_s']:.1f} | "
              f"{r['old_scoring_s'] / r['new_scoring_s']:.2f} | {verdict} |")
    so = sum(r["old_scoring_s"] for r in rows)
    sn = sum(r["new_scoring_s"] for r in rows)
    walls = "" if args.one_process else "| | | "
    print(f"| scoring total | {walls}{so:.1f} | {sn:.1f} | {so / sn:.2f} | |")
    print(f"process wall, all tasks: old {old_total:.1f} s, new {new_total:.1f} s: "
          f"**{old_total / new_total:.2f}x**")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", type=Path, required=True, help="checkout of the old commit")
    ap.add_argument("--new", type=Path, default=ROOT, help="checkout of the new side (this tree)")
    ap.add_argument("--python", default=sys.executable, help="interpreter for both sides")
    ap.add_argument("--tasks", default=TASKS)
    ap.add_argument("--limit", type=int, default=10, help="items per task")
    ap.add_argument("--codecs", default="none,rotated")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--split-layer", type=int, default=1)
    ap.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "datasets")
    ap.add_argument("--one-process", action="store_true",
                    help="all tasks in one eval process per side (default: one per task)")
    ap.add_argument("--omp-wait-policy", default="cli", choices=("cli", "PASSIVE", "ACTIVE"),
                    help="OMP_WAIT_POLICY for both sides; cli: leave it to each commit")
    ap.add_argument("--tolerance", type=float, default=1e-4,
                    help="log-likelihood agreement, nats per choice")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if not args.data_dir.is_dir():
        print(f"skipped: {args.data_dir} is absent")
        return
    tasks = [t for t in args.tasks.split(",") if t]
    sides = {"old": args.old.resolve(), "new": args.new.resolve()}
    commits = {k: commit_of(p) for k, p in sides.items()}
    hashes = {k: prompt_hashes(args.python, p, args, tasks) for k, p in sides.items()}
    groups = [",".join(tasks)] if args.one_process else tasks
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, group in enumerate(groups):
            order = ("old", "new") if i % 2 == 0 else ("new", "old")
            got = {}
            for side in order:
                wall, res = run_eval(args.python, sides[side], args.omp_wait_policy, group, args,
                                     Path(tmp) / f"{side}.json")
                got[side] = (wall, res)
                print(f"{group} {side}: {wall:.1f} s", file=sys.stderr, flush=True)
            for task in group.split(","):
                same = hashes["old"][task] == hashes["new"][task]
                row = {"task": task, "same_prompts": same,
                       "old_scoring_s": got["old"][1]["timing"]["tasks"][task]["seconds"],
                       "new_scoring_s": got["new"][1]["timing"]["tasks"][task]["seconds"],
                       "acc": {side: {lb: got[side][1]["results"][str(args.split_layer)][lb]
                                      ["tasks"][task]["acc"]
                                      for lb in got[side][1]["settings"]}
                               for side in ("old", "new")}}
                if same:
                    row["agreement"] = compare(got["old"][1], got["new"][1], task,
                                               args.tolerance)
                if not args.one_process:
                    row["old_process_s"], row["new_process_s"] = got["old"][0], got["new"][0]
                rows.append(row)
            if args.one_process:
                one = {"old_process_s": got["old"][0], "new_process_s": got["new"][0]}
    old_total = (sum(r["old_process_s"] for r in rows) if not args.one_process
                 else one["old_process_s"])
    new_total = (sum(r["new_process_s"] for r in rows) if not args.one_process
                 else one["new_process_s"])
    report(rows, commits, args, old_total, new_total)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "commits": commits, "paths": {k: str(v) for k, v in sides.items()},
            "argv": sys.argv, "tasks": tasks, "limit": args.limit, "codecs": args.codecs,
            "threads": args.threads, "one_process": args.one_process,
            "omp_wait_policy": args.omp_wait_policy, "tolerance": args.tolerance,
            "load_avg": os.getloadavg(), "rows": rows,
            "total": {"old_s": old_total, "new_s": new_total, "ratio": old_total / new_total,
                      "old_scoring_s": sum(r["old_scoring_s"] for r in rows),
                      "new_scoring_s": sum(r["new_scoring_s"] for r in rows)}}, indent=1))


if __name__ == "__main__":
    main()
