"""Sampling: greedy is argmax; filters keep only allowed tokens; a seed reproduces draws."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fc_edge.errors import ConfigError
from fc_edge.runtime.sampling import GREEDY_BELOW, Sampler, SamplingConfig, sample, sample_batch


def test_greedy_is_argmax():
    logits = torch.tensor([0.1, 3.0, -2.0, 3.0])
    assert sample(logits, SamplingConfig()) == 1  # ties go to the lowest id


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 50), st.integers(1, 10), st.floats(0.05, 1.0), st.integers(0, 2**31))
def test_draws_stay_in_the_filtered_set(v, k, p, seed):
    logits = torch.randn(v, generator=torch.Generator().manual_seed(seed)) * 3
    cfg = SamplingConfig(temperature=0.8, top_k=k, top_p=p, seed=seed)
    sampler = Sampler(cfg)
    allowed_k = set(torch.topk(logits, min(k, v)).indices.tolist())
    probs = torch.softmax(logits / 0.8, -1)
    order = torch.argsort(probs, descending=True)
    mass, nucleus = 0.0, set()
    for i in order.tolist():  # the smallest prefix reaching p
        nucleus.add(i)
        mass += float(probs[i])
        if mass >= p:
            break
    for _ in range(5):
        t = sampler(logits)
        assert t in allowed_k
        if k >= v:
            assert t in nucleus


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = torch.randn(100)
    best = int(logits.argmax())
    assert Sampler(SamplingConfig(temperature=2.0, top_k=1, seed=1))(logits) == best
    assert Sampler(SamplingConfig(temperature=2.0, top_p=1e-6, seed=1))(logits) == best


def test_seed_reproduces():
    logits = torch.zeros(1000)
    a = Sampler(SamplingConfig(temperature=1.0, seed=3))
    b = Sampler(SamplingConfig(temperature=1.0, seed=3))
    assert [a(logits) for _ in range(20)] == [b(logits) for _ in range(20)]


@pytest.mark.parametrize("kwargs", [{"temperature": -1}, {"top_k": -2}, {"top_p": 0.0},
                                    {"top_p": 1.5}, {"seed": -1}, {"temperature": float("nan")}])
def test_bad_config(kwargs):
    with pytest.raises(ConfigError):
        SamplingConfig(**kwargs)


def test_tiny_temperatures_are_greedy_and_never_raise():
    """Issue 19: temperature 1e-38 used to overflow the sampler (inf / nan probabilities). Below
    the floor it is greedy; at the floor, logits of float32's largest magnitude stay finite."""
    logits = torch.tensor([1.0, 5.0, -3.0e38, 3.0e38, 2.0])
    for t in (1e-38, 1e-30, 9e-6):
        assert Sampler(SamplingConfig(temperature=t, seed=1))(logits) == 3
    for kwargs in ({}, {"top_k": 2}, {"top_p": 0.5}, {"top_k": 3, "top_p": 0.9}):
        cfg = SamplingConfig(temperature=GREEDY_BELOW, seed=2, **kwargs)
        assert Sampler(cfg)(logits) == 3  # 3e38 / 1e-5 is finite in float64: still the argmax
    huge = torch.full((50,), 3.0e38)
    assert 0 <= Sampler(SamplingConfig(temperature=1e30, seed=3))(huge) < 50


def test_draws_follow_the_softmax():
    """20,000 draws of a 6-token distribution: each frequency within 5 standard errors of
    softmax(logits / T) computed here in float64 (the oracle), with top-k cutting the tail."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -4.0])
    t, n = 0.8, 20_000
    for top_k in (0, 4):
        sampler = Sampler(SamplingConfig(temperature=t, top_k=top_k, seed=5))
        z = logits.double() / t
        if top_k:
            z[top_k:] = float("-inf")
        p = torch.softmax(z, 0)
        counts = torch.bincount(torch.tensor(sample_batch(logits.expand(n, 6).clone(),
                                                          [sampler] * n)), minlength=6)
        freq = counts.double() / n
        se = (p * (1 - p) / n).sqrt()
        assert ((freq - p).abs() <= 5 * se + 1e-12).all(), (freq, p)


def test_a_batch_draws_what_each_row_draws_alone():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 300, generator=g) * 4
    configs = [SamplingConfig(), SamplingConfig(temperature=0.7, seed=1),
               SamplingConfig(temperature=1.3, top_k=20, seed=2),
               SamplingConfig(temperature=1.0, top_p=0.8, seed=3),
               SamplingConfig(temperature=2.0, top_k=50, top_p=0.9, seed=4)]
    alone = [[Sampler(c)(logits[i]) for _ in range(1)] for i, c in enumerate(configs)]
    batched = sample_batch(logits, [Sampler(c) for c in configs])
    assert batched == [a[0] for a in alone]


def test_a_non_finite_row_is_reported_alone():
    logits = torch.randn(3, 40)
    logits[1, 7] = float("nan")
    logits[2, 3] = float("inf")
    samplers = [Sampler(SamplingConfig(temperature=1.0, seed=i)) for i in range(3)]
    out = sample_batch(logits, samplers)
    assert out[1] is None and out[2] is None and isinstance(out[0], int)
    with pytest.raises(ConfigError, match="not finite"):
        Sampler(SamplingConfig())(logits[1])
