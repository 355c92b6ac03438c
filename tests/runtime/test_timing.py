"""Stage timer and the generation result's summaries."""

from __future__ import annotations

import time

from fc_edge.runtime.timing import GenerationResult, StepTiming, stage, stage_table


def step(phase: str, total: float, rows: int = 1, codec: str = "int8") -> StepTiming:
    return StepTiming(phase=phase, rows=rows, codec=codec, device_compute_s=total / 4,
                      encode_s=0.001, pack_s=0.001, network_s=0.002, server_unpack_s=0.0005,
                      server_decode_s=0.0005, server_compute_s=total / 2, bytes_up=100 * rows,
                      bytes_down=12, total_s=total)


def test_stage_timer_cpu():
    with stage("sleep") as t:
        time.sleep(0.02)
    assert 0.015 < t.seconds < 1.0


def test_summary():
    r = GenerationResult([1, 2, 3, 4], "x", [step("prefill", 0.5, rows=7),
                                             step("decode", 0.1), step("decode", 0.3),
                                             step("decode", 0.2, codec="fp16")], "sid")
    assert r.ttft_s == 0.5 and abs(r.tpot_s - 0.2) < 1e-12
    assert r.bytes_up == 1000 and r.bytes_down == 48
    assert r.codecs_used("decode") == ["int8", "fp16"]
    s = r.summary()
    assert s["prefill_bytes"] == 700 and s["decode_bytes"] == 100 and s["tokens"] == 4
    table = stage_table(r)
    assert "prefill (x1)" in table and "decode (x3)" in table and "int8,fp16" in table
