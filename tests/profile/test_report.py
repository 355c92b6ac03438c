"""Statistics, link application and report files over hand-made step timings (no runtime)."""

import json

import pytest

from fc_edge.profile.link import LinkModel
from fc_edge.profile.profiler import loopback_link, workload_from_steps
from fc_edge.profile.report import markdown, on_link, rate_sweep, summarize_steps, write_report
from fc_edge.profile.simulate import saturation_clients

D = 64


def _step(phase, rows, bytes_up, head=0.010, tail=0.020, net=0.002, total=None):
    t = {"phase": phase, "rows": rows, "codec": "x", "device_compute_s": head, "encode_s": 0.001,
         "pack_s": 0.0005, "network_s": net, "server_unpack_s": 0.0002,
         "server_decode_s": 0.0003, "server_compute_s": tail, "bytes_up": bytes_up,
         "bytes_down": 50, "token_id": 1}
    t["total_s"] = total if total is not None else (
        head + 0.001 + 0.0005 + net + 0.0002 + 0.0003 + tail)
    return t


def _steps():
    out = []
    for k in range(3):  # three generations: a prefill and 3 decode steps each
        out.append(_step("prefill", 16, 16 * D * 4 // 8, head=0.05 + 0.01 * k, tail=0.1))
        out += [_step("decode", 1, 40, head=0.01 + 0.001 * i) for i in range(3)]
    return out


def test_summary_medians_p90_bytes_and_ratio():
    s = summarize_steps(_steps(), hidden_size=D)
    assert s["prefill"]["steps"] == 3 and s["decode"]["steps"] == 9
    assert s["prefill"]["stages"]["head"]["median"] == pytest.approx(0.06)
    assert s["prefill"]["stages"]["head"]["p90"] == pytest.approx(0.068)  # numpy-style p90
    assert s["prefill"]["bytes_up"] == 512 and s["prefill"]["byte_ratio"] == pytest.approx(8.0)
    assert s["decode"]["byte_ratio"] == pytest.approx(D * 4 / 40)
    assert s["ttft"]["median"] == pytest.approx(s["prefill"]["total"]["median"])
    assert s["tpot"]["median"] == pytest.approx(0.011 + 0.024)


def test_link_adds_hand_computed_transfer_times():
    s = summarize_steps(_steps(), hidden_size=D)
    link = LinkModel("t", 8e6, latency_s=0.001, frame_overhead=0)  # 1 byte per us
    v = on_link(s, link, new_tokens=4)
    assert v["prefill"]["stages"]["transfer"] == pytest.approx(0.001 + 512e-6)
    assert v["decode"]["stages"]["return"] == pytest.approx(0.001 + 50e-6)
    ttft = s["prefill"]["total"]["median"] + 0.001 + 512e-6 + 0.001 + 50e-6
    tpot = s["decode"]["total"]["median"] + 0.002 + 90e-6
    assert v["ttft_s"] == pytest.approx(ttft) and v["tpot_s"] == pytest.approx(tpot)
    assert v["response_s"] == pytest.approx(ttft + 3 * tpot)
    sweep = rate_sweep(s, 4, [1e6, 1e9])
    assert sweep[0]["response_s"] > sweep[1]["response_s"]


def test_workload_demands_add_up_to_the_step_totals():
    steps = _steps()
    w = workload_from_steps(steps, new_tokens=4, setup_s=[0.003])
    assert w.decode_steps == 3
    lo = loopback_link(steps)
    assert lo.latency_s == pytest.approx(0.001)
    alone = saturation_clients(w, lo)["response_alone_s"]
    expected = sum(s["total_s"] for s in steps) / 3 + 0.003
    assert alone == pytest.approx(expected, rel=1e-3)


def test_report_files(tmp_path):
    steps = _steps()
    s = summarize_steps(steps, hidden_size=D)
    links = [LinkModel("5g", 50e6, 4e-3), LinkModel("1gbit", 1e9)]
    report = {
        "config": {"model": "m", "split_layer": 2, "new_tokens": 4, "repeats": 3,
                   "links": [ln.name for ln in links]},
        "environment": {"hidden_size": D, "threads": 1, "cpu_count": 2, "device": "cpu"},
        "preset_rates": {"5g": 50e6},
        "runs": [{"codec": c, "prompt_len": 16, "summary": s, "steps": steps,
                  "links": [on_link(s, ln, 4) for ln in links],
                  "rate_sweep": rate_sweep(s, 4, [1e6, 1e8, 1e10])} for c in ("a", "b")],
        "simulation": {"link": "5g", "workers": 1, "prompt_len": 16, "codecs": {
            "a": {"sweep": [{"n_clients": n, "mean_response_s": 0.1 * n,
                             "p90_response_s": 0.12 * n, "throughput_gen_per_s": 10.0}
                            for n in (1, 2)],
                  "saturation": {"n_star": 1.5, "bottleneck": "server"}}}},
        "multi_client_check": {"codec": "a", "prompt_len": 16, "new_tokens": 4,
                               "generations_per_client": 2, "cpu_cores": 2, "tolerance": 0.2,
                               "load_average": [1.0, 1.0, 1.0],
                               "rows": [{"n_clients": 1, "measured_mean_s": 0.1,
                                         "simulated_mean_s": 0.11, "rel_error": 0.1,
                                         "within_tolerance": True}]},
    }
    paths = write_report(report, tmp_path)
    names = sorted(p.name for p in paths)
    assert names == ["clients.png", "profile.json", "profile.md", "rate_sweep.png",
                     "stages_1gbit.png", "stages_5g.png"]
    assert json.loads((tmp_path / "profile.json").read_text())["runs"][0]["codec"] == "a"
    md = markdown(report)
    assert "### prefill" in md and "### decode" in md
    assert "| 1 | 100.00 | 110.00 | +10.0% | ok |" in md
    assert all(p.stat().st_size > 0 for p in paths)
