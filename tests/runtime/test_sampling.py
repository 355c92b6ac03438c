"""Sampling: greedy is argmax; filters keep only allowed tokens; a seed reproduces draws."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fc_edge.errors import ConfigError
from fc_edge.runtime.sampling import Sampler, SamplingConfig, sample


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
