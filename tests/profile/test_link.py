"""The analytic link against hand-computed transfer times."""

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fc_edge.errors import ConfigError
from fc_edge.profile.link import PRESETS, LinkModel, parse_link, parse_links, step_response_s


def test_field_presets_match_field_round_trips():
    """A small payload's round trip (up + down) on the 5G presets lies in the 10-30 ms field
    range; Wi-Fi is faster; the paper's links are given by rate alone."""
    for name in ("5g", "5g-field"):
        rtt = 2 * PRESETS[name].transfer_s(100)
        assert 10e-3 <= rtt <= 30e-3, name
    assert 2 * PRESETS["wifi6"].transfer_s(100) < 2 * PRESETS["5g"].transfer_s(100)
    assert PRESETS["5g-field"].jitter_s > 0 and PRESETS["5g-field"].loss > 0
    assert all(PRESETS[k].latency_s == 0 for k in ("1gbit", "3gbit", "5gbit", "10gbit"))


def test_5g_hand_computed():
    # 64 KiB = 65536 B = 45.26 segments of 1448 -> 46 segments * 66 B framing = 3036 B.
    link = LinkModel("x", 50e6, 4e-3)
    assert link.wire_bytes(65536) == 65536 + 46 * 66
    expected = 4e-3 + (65536 + 3036) * 8 / 50e6  # 4 ms + 10.97152 ms
    assert link.transfer_s(65536) == pytest.approx(expected, rel=1e-12)
    assert link.transfer_s(65536) == pytest.approx(0.01497152, rel=1e-9)


def test_loss_hand_computed_and_sampled():
    # 10 segments, 1% loss, each loss one round trip (20 ms) + one 1514-byte frame at 50 Mbit/s
    link = parse_link("50mbit:10ms:0ms:1%")
    assert link.loss == pytest.approx(0.01)
    retx = 20e-3 + 1514 * 8 / 50e6
    n = 14480
    want = 10e-3 + (n + 10 * 66) * 8 / 50e6 + 10 * 0.01 * retx
    assert link.transfer_s(n) == pytest.approx(want, rel=1e-12)
    # the sampled mean converges to the expectation (binomial losses; 3 standard errors)
    rng = random.Random(3)
    draws = [link.sample_transfer_s(n, rng) for _ in range(20000)]
    sd = retx * (10 * 0.01 * 0.99) ** 0.5
    assert abs(sum(draws) / len(draws) - want) < 3 * sd / len(draws) ** 0.5
    with pytest.raises(ConfigError, match="loss"):
        parse_link("50mbit:10ms:0ms:lots")
    with pytest.raises(ConfigError, match="loss"):
        LinkModel("bad", 1e6, loss=1.5)


def test_raw_pipe_hand_computed():
    # A 1 Gbit/s pipe without framing: 576 KiB (a 1x576 fp32 row is 2304 B; take 256 rows).
    link = LinkModel("raw", 1e9, latency_s=0.5e-3, frame_overhead=0)
    assert link.transfer_s(589_824) == pytest.approx(0.5e-3 + 589_824 * 8 / 1e9)
    assert link.transfer_s(0) == pytest.approx(0.5e-3)


def test_small_payload_pays_one_segment_of_framing():
    link = PRESETS["wifi6"]
    assert link.wire_bytes(1) == 67
    assert link.transfer_s(1) == pytest.approx(2e-3 + 67 * 8 / 500e6)


def test_round_trip():
    link = LinkModel("x", 100e6, 1e-3, frame_overhead=0)
    assert step_response_s(link, 0.010, 12_500, 125) == pytest.approx(0.010 + 2e-3 + 1e-3 + 1e-5)


def test_parse():
    assert parse_link("5G") is PRESETS["5g"]
    link = parse_link("100mbit:5ms:1ms")
    assert (link.rate_bps, link.latency_s, link.jitter_s) == (100e6, 5e-3, 1e-3)
    assert parse_link("2.5gbit").rate_bps == 2.5e9 and parse_link("2.5gbit").latency_s == 0
    assert [ln.name for ln in parse_links("5g, wifi6,5g")] == ["5g", "wifi6"]
    for bad in ("fast", "100mb", "1gbit:4 parsecs", "", "0mbit"):
        with pytest.raises(ConfigError):
            parse_links(bad)


@given(st.integers(0, 10_000_000), st.integers(0, 10_000_000))
def test_monotone_and_subadditive_framing(a, b):
    link = PRESETS["5g"]
    if a <= b:
        assert link.transfer_s(a) <= link.transfer_s(b)
    # splitting a payload never saves framing
    assert link.wire_bytes(a) + link.wire_bytes(b) >= link.wire_bytes(a + b)


def test_jitter_sampling_mean_and_floor():
    link = LinkModel("j", 1e9, latency_s=2e-3, jitter_s=0.5e-3, frame_overhead=0)
    rng = random.Random(1)
    xs = [link.sample_latency_s(rng) for _ in range(20_000)]
    assert min(xs) >= 0
    assert sum(xs) / len(xs) == pytest.approx(2e-3, rel=0.01)
    assert LinkModel("n", 1e9).sample_latency_s(rng) == 0.0
