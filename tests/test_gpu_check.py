"""tools/gpu_check.sh, its report and the GPU benchmarks' JSON, on a machine without a GPU.

- bench_cuda.py / bench_cupy.py without a GPU: one line, exit 0, a JSON saying "skipped" with the
  commit and the machine;
- bench_cupy's cutoff verdict and gpu_check_report's targets on hand-made figures (the expected
  crossovers, ratios and verdicts are worked out by hand below);
- gpu_check.sh itself: a Python-version mismatch of the wheels fails the setup stage loudly and
  the run goes on; a stage without time left is skipped and says so; what comes back is three
  files (the device tool takes at most 8, 2 folders deep).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools"


@pytest.fixture
def tools_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """tools/ importable (the benchmarks import each other as scripts do)."""
    monkeypatch.syspath_prepend(str(TOOLS))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("tool", ["bench_cuda", "bench_cupy"])
def test_benchmark_without_a_gpu_says_so_and_exits_0(tools_path, tool, tmp_path, capsys,
                                                     monkeypatch):
    monkeypatch.setenv("FC_EDGE_COMMIT", "abc123")
    module = __import__(tool)
    out = tmp_path / "out.json"
    assert module.main(["--json", str(out)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and "no CUDA GPU" in printed[0]
    record = json.loads(out.read_text())
    assert record["status"] == "skipped" and record["reason"] == "no CUDA GPU"
    assert record["commit"] == "abc123" and record["cuda"] is None and record["device"]


def test_cupy_cutoff_verdict_by_hand(tools_path):
    from bench_cupy import cutoff_verdict

    def row(n: int, k: int, enc_gpu: float, enc_cpu: float) -> dict:
        return {"N": n, "K": k, "ms": {"enc cupy": enc_gpu, "enc cpu": enc_cpu,
                                       "dec cupy": 1.0, "dec cpu": 2.0}}

    rows = [row(1, 576, 0.5, 0.1), row(8, 576, 0.5, 0.4), row(16, 576, 0.5, 0.8),
            row(1, 2048, 0.5, 0.3), row(4, 2048, 0.5, 0.6)]
    v = cutoff_verdict([dict(r) for r in rows], 8192)
    # the GPU encodes at least as fast from 16 x 576 = 9216 and 4 x 2048 = 8192 values; decodes
    # faster at every size (1 x 576, 1 x 2048 are the first)
    assert v["crossover_values"] == {"enc": {"576": 9216, "2048": 8192},
                                     "dec": {"576": 576, "2048": 2048}}
    # the default (GPU from 8192 values) picks the faster encoder everywhere; the slower decoder
    # (CPU, 2.0 ms against 1.0) below 8192 values: 2x
    assert v["worst_default_over_best"] == 2.0 and not v["confirmed"]
    # decode timed like encode: the default picks the faster coder both ways
    same = [dict(r, ms={**r["ms"], "dec cupy": r["ms"]["enc cupy"],
                        "dec cpu": r["ms"]["enc cpu"]}) for r in rows]
    v = cutoff_verdict([dict(r) for r in same], 8192)
    assert v["worst_default_over_best"] == 1.0 and v["confirmed"]
    assert v["crossover_values"]["dec"] == {"576": 9216, "2048": 8192}
    # a decoder the GPU never beats here: crossover None for both K
    slow = [dict(r, ms={**r["ms"], "dec cupy": 3.0}) for r in rows]
    assert cutoff_verdict(slow, 8192)["crossover_values"]["dec"] == {"576": None, "2048": None}
    v = cutoff_verdict([dict(r) for r in same], 100)  # everything to the GPU: 0.5 vs 0.1
    assert v["worst_default_over_best"] == pytest.approx(5.0) and not v["confirmed"]


SERVER_LOG = """bench_server: synthetic:llama-3.2-1b split at layer 1 ...
  N=1   batched            40.0 tok/s  p50    25.0 ms  p99    30.0 ms

  N | mode           |    tok/s |  x N=1 | p50 ms/tok | p99 ms/tok | p99 x N=1
---------------------------------------------------------------------------
  1 | batched        |     40.0 |   1.00 |       25.0 |       30.0 |      1.00
  1 | one at a time  |     41.0 |   1.00 |       24.4 |       29.0 |      1.00
  1 | batched / one  |     0.98 |
  8 | batched        |    300.0 |   7.50 |       26.7 |       35.0 |      1.17
  8 | one at a time  |     42.0 |   1.02 |      190.0 |      200.0 |      6.90
 32 | batched        |    900.0 |  22.50 |       35.6 |       50.0 |      1.67
 32 | one at a time  |     41.5 |   1.01 |      770.0 |      800.0 |     27.59
"""


def _bench_cuda_json(x_unfused: float, x_topk: float, copy_fraction: float) -> dict:
    return {"status": "ok", "targets": {
        "fused_vs_unfused": {"value": x_unfused, "target": 2.0, "met": x_unfused >= 2.0},
        "fused_vs_topk": {"value": x_topk, "target": 30.0, "met": x_topk >= 30.0},
        "copy_fraction": {"value": copy_fraction, "target": 0.5, "met": copy_fraction >= 0.5}}}


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="0"
failures="1" skipped="2" tests="10"><testcase classname="tests.test_ops" name="test_a"/>
<testcase classname="tests.test_ops" name="test_b"><failure message="boom"/></testcase>
</testsuite></testsuites>"""


def test_report_targets_by_hand(tools_path, tmp_path, capsys):
    from gpu_check_report import main

    work = tmp_path / "work"
    (work / "logs").mkdir(parents=True)
    (work / "stages.tsv").write_text(
        "setup\tok\t0\t5.5\t60\t\n"
        "build\tok\t0\t70.1\t240\t\n"
        "tests\tfailed\t1\t80.0\t180\t\n"
        "bench_cuda_f32\tok\t0\t20.0\t90\t\n"
        "bench_cuda_bf16\ttimeout\t124\t90.0\t90\t\n"
        "bench_cupy\tskipped\t\t0\t12\tout of time: 12s left of the 450s budget\n"
        "bench_server\tok\t0\t100.0\t180\t\n")
    (work / "logs" / "bench_server.log").write_text(SERVER_LOG)
    (work / "logs" / "tests.log").write_text("line\n" * 40 + "1 failed, 7 passed\n")
    (work / "bench_cuda_f32.json").write_text(json.dumps(_bench_cuda_json(2.5, 29.0, 0.61)))
    (work / "tests.xml").write_text(JUNIT)
    (work / "machine.json").write_text(json.dumps({"gpu": {"name": "NVIDIA H200"}}))
    out = tmp_path / "out" / "gpu_check.json"
    assert main(["--work", str(work), "--json", str(out), "--budget", "450",
                 "--elapsed", "400"]) == 0
    report = json.loads(out.read_text())
    t = report["targets"]
    assert t["fused_vs_unfused_2048_f32"]["met"] is True
    assert t["fused_vs_topk_2048_f32"] == {"value": 29.0, "target": 30.0, "met": False}
    assert t["copy_fraction_2048_f32"]["met"] is True
    assert t["fused_vs_unfused_2048_bf16"] == {"met": None, "why": "stage bench_cuda_bf16: timeout"}
    assert t["cupy_byte_identical"] == {"met": None, "why": "stage bench_cupy: skipped"}
    assert t["server_n32_vs_n1"]["value"] == pytest.approx(900.0 / 40.0)  # batched only
    assert t["server_n32_vs_n1"]["met"] is True
    assert t["server_n32_vs_n1"]["tokens_per_s"] == {"1": 40.0, "8": 300.0, "32": 900.0}
    assert t["cuda_tests_pass"]["met"] is False
    assert t["cuda_tests_pass"]["value"] == "7 passed, 1 failed, 0 errors, 2 skipped"
    assert t["cuda_tests_pass"]["failed"] == ["tests.test_ops::test_b"]
    assert report["status"] == "incomplete"
    assert report["stages"]["bench_cupy"]["note"].startswith("out of time")
    assert report["stages"]["tests"]["log_tail"][-1] == "1 failed, 7 passed"
    assert len(report["stages"]["tests"]["log_tail"]) == 30
    printed = capsys.readouterr().out
    assert "NVIDIA H200" in printed and "MISSED" in printed and "not run" in printed


def _gpu_check(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    if shutil.which("bash") is None or shutil.which("timeout") is None:
        pytest.skip("needs bash and coreutils' timeout")
    full_env = {**os.environ, "OUT": str(tmp_path / "out"),
                "GPU_CHECK_WORK": str(tmp_path / "work"), "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(TOOLS / "gpu_check.sh"), *args], capture_output=True,
                          text=True, timeout=300, env=full_env, cwd=ROOT)


@pytest.mark.skipif(torch.version.cuda is not None,
                    reason="a CUDA torch: the dry run would compile the extension (minutes)")
def test_gpu_check_wrong_python_fails_loudly_and_goes_on(tmp_path):
    """The dry run with this (3.11) interpreter for the cp312 wheels: setup fails, naming the
    mismatch; the build is still attempted (and fails here: no CUDA torch); the report and the
    logs come back as three files."""
    done = _gpu_check(["dry-run"], tmp_path, WHEEL_PYTHON=sys.executable)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    setup = report["stages"]["setup"]
    assert setup["status"] == "failed" and setup["rc"] != 0
    if sys.version_info[:2] != (3, 12):
        assert "the carried wheels are for CPython 3.12" in setup["log_tail"][-1]
    assert list(report["stages"]) == ["setup", "build"]  # the dry run stops before tests
    assert report["stages"]["build"]["status"] == "failed"  # no CUDA torch here
    files = sorted(p.name for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert files == ["gpu_check.json", "gpu_check.log", "logs.tar.gz"]


def test_gpu_check_skips_stages_without_time(tmp_path):
    """A budget under the report's reserve plus the shortest stage: every stage is skipped,
    each with the reason, and the report still comes back."""
    done = _gpu_check(["run", "bench_cupy"], tmp_path, GPU_CHECK_BUDGET_S="40")
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert list(report["stages"]) == ["setup", "bench_cupy"]
    for stage in report["stages"].values():
        assert stage["status"] == "skipped" and stage["note"].startswith("out of time")
    assert report["targets"]["cupy_byte_identical"]["met"] is None
