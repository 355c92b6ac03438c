"""The queueing simulation against closed forms (M/M/1, M/M/c) and bound analysis."""

import pytest

from fc_edge.profile.link import LinkModel
from fc_edge.profile.simulate import (
    Empirical,
    StepDemand,
    Workload,
    quantile,
    saturation_clients,
    simulate_clients,
    simulate_open_queue,
)


def test_mm1_mean_response():
    lam, mu = 0.5, 1.0
    r = simulate_open_queue(lam, lambda g: g.expovariate(mu), workers=1, jobs=60_000, seed=3)
    assert sum(r) / len(r) == pytest.approx(1 / (mu - lam), rel=0.05)
    # M/M/1 response time is exponential with rate mu - lam: p90 = ln(10) / (mu - lam)
    assert quantile(r, 0.9) == pytest.approx(2.302585 / (mu - lam), rel=0.07)


def test_mm2_mean_response_erlang_c():
    lam, mu, c = 1.5, 1.0, 2
    a = lam / mu
    p_wait = (a**c / 2 * c / (c - a)) / (1 + a + a**c / 2 * c / (c - a))
    expected = p_wait / (c * mu - lam) + 1 / mu
    r = simulate_open_queue(lam, lambda g: g.expovariate(mu), workers=c, jobs=60_000, seed=4)
    assert sum(r) / len(r) == pytest.approx(expected, rel=0.06)


def _workload(device=0.01, server=0.02, up=10_000, down=100, decode_steps=3):
    step = StepDemand(Empirical.constant(device), Empirical.constant(server),
                      Empirical.constant(up), Empirical.constant(down))
    return Workload(step, step, decode_steps)


def test_single_client_is_the_sum_of_its_stages():
    link = LinkModel("l", 8e6, latency_s=1e-3, frame_overhead=0)  # 1 MB/s
    w = _workload()
    r = simulate_clients(w, 1, link, generations_per_client=3)
    per_step = 0.01 + 0.02 + 0.01 + 1e-4 + 2e-3
    assert r.generation_s == pytest.approx([4 * per_step] * 3)
    assert saturation_clients(w, link)["response_alone_s"] == pytest.approx(4 * per_step)


def test_saturated_throughput_meets_the_bottleneck_bound():
    link = LinkModel("l", 8e9, frame_overhead=0)
    w = _workload(device=0.05, server=0.02, up=100, down=100)
    sat = saturation_clients(w, link, workers=1)
    assert sat["bottleneck"] == "server"
    assert sat["n_star"] == pytest.approx((0.05 + 0.02) / 0.02, rel=1e-3)
    heavy = simulate_clients(w, 12, link, generations_per_client=20)
    assert heavy.throughput_per_s == pytest.approx(sat["max_throughput_gen_per_s"], rel=0.05)
    light = simulate_clients(w, 1, link, generations_per_client=5)
    assert heavy.mean_s > 3 * light.mean_s
    # two workers double the ceiling
    two = saturation_clients(w, link, workers=2)
    assert two["max_throughput_gen_per_s"] == pytest.approx(2 * sat["max_throughput_gen_per_s"])


def test_shared_cpu_pool_slows_colocated_clients():
    link = LinkModel("lo", 1e11, frame_overhead=0)
    w = _workload(device=0.02, server=0.02, up=10, down=10)
    own = simulate_clients(w, 4, link, workers=4, generations_per_client=10)
    shared = simulate_clients(w, 4, link, workers=4, generations_per_client=10, cpu_cores=2)
    assert own.mean_s == pytest.approx(4 * 0.04, rel=0.02)
    assert shared.mean_s == pytest.approx(2 * own.mean_s, rel=0.1)  # 4 jobs on 2 cores


def test_shared_device_slot_serialises_client_threads():
    link = LinkModel("lo", 1e11, frame_overhead=0)
    w = _workload(device=0.03, server=0.0001, up=10, down=10, decode_steps=0)
    r = simulate_clients(w, 3, link, workers=3, generations_per_client=10, device_slots=1)
    # three clients, one slot: each generation waits for the two others
    assert r.mean_s == pytest.approx(3 * 0.03, rel=0.1)


def test_setup_time_is_a_delay_counted_in_the_response():
    link = LinkModel("lo", 1e11, frame_overhead=0)
    w = _workload(device=0.01, server=0.01, up=10, down=10, decode_steps=1)
    w.setup_s = Empirical([0.005])
    r = simulate_clients(w, 1, link, generations_per_client=2)
    assert r.generation_s == pytest.approx([0.045, 0.045], rel=1e-6)
    assert saturation_clients(w, link)["response_alone_s"] == pytest.approx(0.045, rel=1e-3)
