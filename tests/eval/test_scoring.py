"""Scoring conventions against hand-computed cases (fc_edge/eval/scoring.py)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fc_edge.eval.scoring import (
    ItemScore,
    Tally,
    Traffic,
    choose,
    continuation_loglik,
    kl_divergence,
    mean_over_tasks,
)


def test_continuation_loglik_by_hand():
    # two steps over a 3-token vocabulary; log-softmax computed by hand
    logits = torch.tensor([[0.0, 0.0, 0.0], [math.log(3.0), 0.0, 0.0]], dtype=torch.float64)
    tokens = torch.tensor([1, 0])
    want = math.log(1 / 3) + math.log(3 / 5)
    assert continuation_loglik(logits, tokens) == pytest.approx(want, abs=1e-12)


def test_acc_is_argmax_of_summed_loglik_first_on_ties():
    assert choose([-3.0, -1.0, -1.0]) == 1
    s = ItemScore([-3.0, -1.0, -2.0], [5, 5, 5], label=1)
    assert s.acc == 1.0 and s.pred == 1


def test_acc_norm_divides_by_length_and_can_flip():
    # choice 0: -4 over 2 characters = -2/char; choice 1: -6 over 12 characters = -0.5/char
    s = ItemScore([-4.0, -6.0], [2, 12], label=1)
    assert s.pred == 0 and s.acc == 0.0
    assert s.pred_norm == 1 and s.acc_norm == 1.0


def test_kl_by_hand():
    ref, other = [math.log(0.75), math.log(0.25)], [math.log(0.5), math.log(0.5)]
    want = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert kl_divergence(ref, other) == pytest.approx(want, abs=1e-12)
    # unnormalized log-likelihoods give the same distributions
    assert kl_divergence([r - 7 for r in ref], [o + 3 for o in other]) == pytest.approx(want)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.floats(-50, 0), st.floats(-50, 0)), min_size=2, max_size=8))
def test_kl_equals_scipy_entropy(pairs):
    """Oracle: scipy.stats.entropy(p, q) = sum p log(p / q) of the two softmaxes."""
    import numpy as np
    from scipy.special import softmax
    from scipy.stats import entropy

    xs = [a for a, _ in pairs]
    ys = [b for _, b in pairs]
    want = float(entropy(softmax(np.array(xs)), softmax(np.array(ys))))
    assert kl_divergence(xs, ys) == pytest.approx(want, rel=1e-6, abs=1e-9)
    assert kl_divergence(xs, xs) == pytest.approx(0.0, abs=1e-9)


def test_tally_agreement_and_means():
    t = Tally()
    ref = ItemScore([-1.0, -2.0], [1, 1], 0)
    t.add(ItemScore([-1.0, -2.0], [1, 1], 0), ref)   # right, agrees
    t.add(ItemScore([-3.0, -2.0], [1, 1], 0), ref)   # wrong, disagrees
    t.traffic.add(100, 800, 0.1)
    t.traffic.add(300, 800, 0.3)
    r = t.result()
    assert r["acc"] == 0.5 and r["agreement"] == 0.5
    assert r["bytes"] == 200 and r["byte_ratio"] == 4.0 and r["rel_error"] == pytest.approx(0.2)
    assert r["sequences"] == 2 and r["budget_fallbacks"] == 0
    m = mean_over_tasks({"a": r, "b": {**r, "acc": 1.0}})
    assert m["acc"] == 0.75 and m["n"] == 4


def test_traffic_records_round_trip_and_merge():
    """The records keys of every run so far (bytes, raw, err, seqs, fb) read back the same; an
    uncompressed message is its float32 size; merging adds."""
    t = Traffic.uncompressed([3, 5], hidden=4)
    assert t.record() == {"bytes": 128, "raw": 128, "err": 0.0, "seqs": 2, "fb": 0}
    u = Traffic.from_record({"bytes": 10, "raw": 40, "err": 0.5, "seqs": 1, "fb": 1})
    u.merge(t)
    assert (u.messages, u.sent, u.raw, u.error_sum, u.fallbacks) == (3, 138, 168, 0.5, 1)
    assert Traffic.from_record(u.record()) == u
