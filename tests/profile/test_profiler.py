"""`fc-edge profile` end to end on a small synthetic model: server child process, real client."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fc_edge.cli import main
from fc_edge.profile.link import parse_links
from fc_edge.profile.profiler import ProfileConfig, run_profile
from fc_edge.profile.shaped import unavailable_reason

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_profile_tiny_model_end_to_end(tmp_path):
    cfg = ProfileConfig(model="synthetic:tiny-llama", codecs=["identity", "fourier"],
                        prompt_lengths=[16], new_tokens=3, repeats=2,
                        links=parse_links("5g,1gbit"), sim_clients=[1, 4], check_clients=[1, 2],
                        check_new_tokens=3, out=tmp_path)
    report = run_profile(cfg, log=lambda m: None)
    runs = {r["codec"]: r for r in report["runs"]}
    assert set(runs) == {"identity", "fourier"}
    for run in runs.values():
        s = run["summary"]
        assert s["prefill"]["steps"] == 2 and s["decode"]["steps"] == 4
        assert sorted({st["round"] for st in run["steps"]}) == [0, 1]
        assert s["ttft"]["median"] > 0 and s["tpot"]["median"] > 0
        for phase in ("prefill", "decode"):
            assert all(v["median"] >= 0 for v in s[phase]["stages"].values())
        five_g = run["links"][0]
        assert five_g["prefill"]["stages"]["transfer"] >= 4e-3  # the 5G latency at least
    # the spectral codec sends fewer prefill bytes than the raw activation
    assert runs["fourier"]["summary"]["prefill"]["bytes_up"] < \
        runs["identity"]["summary"]["prefill"]["bytes_up"]
    check = report["multi_client_check"]
    assert [r["n_clients"] for r in check["rows"]] == [1, 2]
    rows = check["rows"]
    for r in rows:  # the reported mean is the mean of the reported samples
        assert r["measured_mean_s"] == pytest.approx(sum(r["measured_samples_s"])
                                                     / len(r["measured_samples_s"]))
    # calibrated on N = 1, the simulation reproduces that run (its demands add up to the
    # measured steps; sampling noise only), and a second client sharing one device slot and
    # one server worker cannot make a generation faster
    assert rows[0]["simulated_mean_s"] == pytest.approx(rows[0]["measured_mean_s"], rel=0.35)
    assert rows[1]["simulated_mean_s"] >= 0.95 * rows[0]["simulated_mean_s"]
    assert set(report["simulation"]["codecs"]) == {"identity", "fourier"}
    for name in ("profile.json", "profile.md", "stages_5g.png", "stages_1gbit.png",
                 "rate_sweep.png", "clients.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert json.loads((tmp_path / "profile.json").read_text())["config"]["links"] == \
        ["5g", "1gbit"]


def test_cli_rejects_a_bad_link_in_one_line(capsys):
    rc = main(["profile", "--links", "warp9", "--out", "/nonexistent/never-written"])
    err = capsys.readouterr().err
    assert rc == 1 and "warp9" in err and len(err.strip().splitlines()) == 1


def test_tool_script_is_the_same_verb():
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "profile_latency.py"), "--help"],
                         capture_output=True, text=True, check=True).stdout
    for flag in ("--codecs", "--prompt-lengths", "--new-tokens", "--links", "--out"):
        assert flag in out


@pytest.mark.slow
@pytest.mark.skipif(unavailable_reason() is not None, reason=f"{unavailable_reason()}")
def test_runtime_over_a_shaped_link_matches_the_prediction(tmp_path):
    # 1024 rows x 64 fp32 = 256 KiB per prefill: ~110 ms at 20 Mbit/s, well above the rpc's own
    # few ms, and the tbf burst (3 frames, 1.8 ms at this rate) small beside it
    cfg = ProfileConfig(model="synthetic:tiny-llama", codecs=["identity"],
                        prompt_lengths=[1024], new_tokens=2, repeats=2,
                        links=parse_links("20mbit"), sim_clients=[], check_clients=[],
                        shaped_check=False, shaped_links=parse_links("20mbit"), out=tmp_path)
    report = run_profile(cfg, log=lambda m: None)
    (row,) = report["shaped_runtime"]["rows"]
    assert row["measured_rpc_prefill_s"] > 0.1
    # the prediction adds the loopback rpc time to the link's; part of it overlaps the transfer
    assert row["measured_rpc_prefill_s"] == pytest.approx(row["predicted_net_prefill_s"],
                                                          rel=0.15)
    # (TTFT also carries the compute of two fresh processes on a shared host: reported only)
