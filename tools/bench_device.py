#!/usr/bin/env python
"""Device memory: peak RSS of `fc-edge generate --split-layer 1` from a model folder and from an
exported bundle, beside the full model's and beside a Python/torch baseline; and the bundle's
size beside the head's weights.

Every case is a separate process run one after the other against one loopback server (`fc-edge
serve`, another process); its peak resident set (``ru_maxrss`` of that child, from
``os.wait4``: anonymous and file-backed pages, so a memory-mapped weight counts once touched) is
read when it exits. This script imports nothing but the standard library: Linux starts a
child's peak at its parent's resident set when it forks, so the parent must stay small (about
10 MB here). Each case runs ``--rounds`` times, interleaved, and the largest peak is reported.

* baseline: ``python -c`` importing what ``fc-edge generate`` imports (torch, transformers'
  config and tokenizer classes, the codecs, gRPC, the client), reading no weight;
* folder: ``fc-edge generate --model FOLDER`` (the head's tensors read by name);
* bundle (onnxruntime, torch): ``fc-edge generate --engine DIR`` with each backend;
* folder or bundle (torch), worst case: the same through ``DeviceClient`` with every page of
  the head's mapped weights read first (a generation touches only the embedding rows of its
  tokens; a long one with many distinct tokens tends to this);
* full model: the same generation with the whole model loaded first (``load_model``), as
  ``generate`` did before it read only the head.

Targets (issue 20, SmolLM2-135M, split 1): every device case <= 1.3 x (head weight bytes +
baseline); the bundle <= 1.2 x (head weight bytes + its ONNX graph structure).

    python tools/bench_device.py                     # smollm2-135m, split 1, bundle in engines/
    python tools/bench_device.py --bundle engines/smollm2-135m-L1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

BUNDLE_WEIGHTS = "head.safetensors"  # fc_edge.models.checkpoint.BUNDLE_WEIGHTS (not imported)

REPO = Path(__file__).resolve().parents[1]

BASELINE = (
    "import torch, grpc, transformers; "
    "from transformers import AutoConfig, AutoTokenizer; "
    "import fc_edge.cli, fc_edge.runtime.commands, fc_edge.runtime.client, "
    "fc_edge.models.checkpoint, fc_edge.codecs"
)
WHOLE_HEAD = """
import sys
from fc_edge.runtime.client import DeviceClient
with DeviceClient(sys.argv[2], sys.argv[1], int(sys.argv[3]), "rotated") as client:
    for p in client.head.parameters():  # every page of the mapped weights resident
        float(p.float().sum())
    print(client.generate(sys.argv[4], int(sys.argv[5])).text)
"""
FULL_MODEL = """
import sys
from fc_edge.models.pretrained import load_model
from fc_edge.runtime.client import DeviceClient
model, tokenizer = load_model(sys.argv[1])
with DeviceClient(sys.argv[2], (model, tokenizer), int(sys.argv[3]), "rotated") as client:
    print(client.generate(sys.argv[4], int(sys.argv[5])).text)
"""


def self_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss(argv: list[str]) -> tuple[int, str]:
    """Run ``argv`` to its end; (its peak RSS in bytes, its stderr's last line)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        tail = err.read().decode(errors="replace").strip().splitlines()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:4])} ... failed ({proc.returncode}): "
                         + "\n".join(tail[-5:]))
    return usage.ru_maxrss * 1024, tail[-1] if tail else ""


INFO = """
import json, sys
from fc_edge.models.checkpoint import open_checkpoint
from fc_edge.engine.export import engine_name
c = open_checkpoint(sys.argv[1])
layer = int(sys.argv[2])
print(json.dumps({"folder": str(c.root), "head_bytes": c.head_bytes(layer),
                  "fingerprint": c.fingerprint(), "name": engine_name(sys.argv[1], layer, None)}))
"""


def run(argv: list[str]) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run(argv, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:5])} ... failed: {out.stderr.strip()[-2000:]}")
    return out.stdout


def fresh_bundle(folder: Path, fingerprint: str, layer: int) -> bool:
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        return False
    m = json.loads(manifest.read_text())
    return m.get("format") == "fc-edge-bundle/1" and m.get("split_layer") == layer \
        and m.get("model_fingerprint") == fingerprint


def serve(spec: str, layer: int) -> tuple[subprocess.Popen, str]:
    """`fc-edge serve` in its own process; (process, address from its banner)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "fc_edge.cli", "serve", "--model", spec,
                             "--split-layer", str(layer), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    assert proc.stdout is not None
    for line in proc.stdout:
        m = re.match(r"fc-edge serve: .* on (127\.0\.0\.1:\d+)", line)
        if m:
            return proc, m.group(1)
    proc.kill()
    raise SystemExit("the server did not start")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--split-layer", type=int, default=1)
    p.add_argument("--bundle", type=Path, default=None,
                   help="an exported bundle of the model (default: engines/<model>-L<L>, "
                   "exported when absent or stale)")
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)

    info = json.loads(run([sys.executable, "-c", INFO, args.model, str(args.split_layer)]))
    folder, head_bytes = Path(info["folder"]), int(info["head_bytes"])
    bundle = args.bundle or REPO / "engines" / info["name"]
    if not fresh_bundle(bundle, info["fingerprint"], args.split_layer):
        print(f"exporting the bundle to {bundle} ...", file=sys.stderr, flush=True)
        run([sys.executable, "-m", "fc_edge.cli", "export", "--model", args.model,
             "--split-layer", str(args.split_layer), "--out", str(bundle), "--no-tensorrt"])
    fc_edge = [sys.executable, "-m", "fc_edge.cli", "generate"]
    server, address = serve(args.model, args.split_layer)
    try:
        common = ["--server", address, "--prompt", args.prompt, "--max-new-tokens",
                  str(args.max_new_tokens)]
        cases = {
            "baseline (imports, no weights)": [sys.executable, "-c", BASELINE],
            "folder: generate --model DIR": [*fc_edge, "--model", str(folder),
                                             "--split-layer", str(args.split_layer), *common],
            "bundle: generate --engine DIR (onnxruntime)": [
                *fc_edge, "--engine", str(bundle), "--engine-backend", "onnxruntime", *common],
            "bundle: generate --engine DIR (torch)": [
                *fc_edge, "--engine", str(bundle), "--engine-backend", "torch", *common],
            "folder, every head page touched (worst case)": [
                sys.executable, "-c", WHOLE_HEAD, str(folder), address,
                str(args.split_layer), args.prompt, str(args.max_new_tokens)],
            "bundle (torch), every head page touched": [
                sys.executable, "-c", WHOLE_HEAD, str(bundle), address,
                str(args.split_layer), args.prompt, str(args.max_new_tokens)],
            "full model loaded (the old generate)": [
                sys.executable, "-c", FULL_MODEL, str(folder), address,
                str(args.split_layer), args.prompt, str(args.max_new_tokens)],
        }
        peaks: dict[str, int] = {name: 0 for name in cases}
        for _ in range(args.rounds):
            for name, argv_ in cases.items():
                peaks[name] = max(peaks[name], peak_rss(argv_)[0])
    finally:
        server.terminate()
        server.wait(30)

    mb = 1e6
    baseline = peaks["baseline (imports, no weights)"]
    budget = 1.3 * (head_bytes + baseline)
    print(f"fc-edge device memory: {args.model} split {args.split_layer} on {platform.node()} "
          f"({platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}); "
          f"peak RSS of each process, max of {args.rounds} rounds")
    print(f"head weights (embedding + layers[:{args.split_layer}], float32): "
          f"{head_bytes / mb:.1f} MB; target: peak <= 1.3 x (head + baseline) = "
          f"{budget / mb:.1f} MB")
    print(f"{'case':<46}{'peak MB':>9}{'- base':>9}{'/(head+base)':>14}  target")
    for name, peak in peaks.items():
        ratio = peak / (head_bytes + baseline)
        device = not name.startswith(("baseline", "full"))
        verdict = ("met" if ratio <= 1.3 else "NOT met") if device else "-"
        print(f"{name:<46}{peak / mb:>9.1f}{(peak - baseline) / mb:>9.1f}{ratio:>14.2f}  "
              f"{verdict}")

    files = {f.name: f.stat().st_size for f in bundle.iterdir() if f.is_file()}
    total = sum(files.values())
    graphs = sum(v for k, v in files.items() if k.endswith(".onnx"))
    weights = files.get(BUNDLE_WEIGHTS, 0)
    print(f"this process (the children's parent): peak {self_peak() / mb:.1f} MB")
    ratio = total / (head_bytes + graphs)
    print(f"\nbundle {bundle}: {total / mb:.1f} MB in {len(files)} files: {BUNDLE_WEIGHTS} "
          f"{weights / mb:.1f} MB, ONNX graph structure {graphs / mb:.2f} MB, the rest "
          f"(tokenizer, config, manifest) {(total - weights - graphs) / mb:.2f} MB")
    print(f"bundle / (head weights + graph structure) = {total / mb:.1f} / "
          f"{(head_bytes + graphs) / mb:.1f} = {ratio:.3f}; target <= 1.2: "
          + ("met" if ratio <= 1.2 else "NOT met"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
