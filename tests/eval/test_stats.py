"""Paired statistics (fc_edge/eval/stats.py) against hand-computed cases and closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fc_edge.eval.stats import (
    accuracy_comparison,
    delta_acc_ci,
    delta_ppl_ci,
    lm_eval_stderr,
    mcnemar_exact,
    proportion_ci,
)


def test_lm_eval_stderr_by_hand():
    # [1, 0, 1, 1]: mean 3/4, sample variance (3 * 1/16 + 9/16) / 3 = 1/4, sd 1/2, / sqrt(4)
    assert lm_eval_stderr([1, 0, 1, 1]) == pytest.approx(0.25, abs=1e-15)
    assert lm_eval_stderr([1]) == 0.0


def test_mcnemar_exact_by_hand():
    # 6 discordant, all one way: p = 2 * 0.5**6
    ref = [1] * 6 + [1, 0, 1]
    cod = [0] * 6 + [1, 0, 1]
    r = mcnemar_exact(ref, cod)
    assert (r["b"], r["c"]) == (6, 0)
    assert r["p"] == pytest.approx(2 * 0.5 ** 6, abs=1e-15)
    # b = 4, c = 2: p = 2 * P(X <= 2 | n = 6, 1/2) = 2 * (1 + 6 + 15) / 64
    ref = [1, 1, 1, 1, 0, 0, 1]
    cod = [0, 0, 0, 0, 1, 1, 1]
    r = mcnemar_exact(ref, cod)
    assert (r["b"], r["c"]) == (4, 2)
    assert r["p"] == pytest.approx(44 / 64, abs=1e-15)
    assert mcnemar_exact([1, 0], [1, 0])["p"] == 1.0


def test_clopper_pearson_closed_forms():
    # 0 of n: upper end 1 - (alpha/2)**(1/n); n of n: lower end (alpha/2)**(1/n)
    lo, hi = proportion_ci(0, 10)
    assert lo == 0.0 and hi == pytest.approx(1 - 0.025 ** (1 / 10), abs=1e-9)
    lo, hi = proportion_ci(200, 200)
    assert hi == 1.0 and lo == pytest.approx(0.025 ** (1 / 200), abs=1e-9)


def test_scipy_tests_equal_statsmodels():
    # the exact McNemar p and the Clopper-Pearson interval were statsmodels' before (an independent
    # implementation: binomial cdf / beta quantiles); the scipy ones must give the same figures
    sm = pytest.importorskip("statsmodels.stats.proportion")
    from statsmodels.stats.contingency_tables import mcnemar

    for n in (1, 2, 7, 40, 333, 1000):
        for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
            lo, hi = sm.proportion_confint(k, n, alpha=0.05, method="beta")
            lo = 0.0 if np.isnan(lo) else lo
            hi = 1.0 if np.isnan(hi) else hi
            assert proportion_ci(k, n) == pytest.approx((lo, hi), abs=1e-9)
    for b in range(0, 30, 3):
        for c in range(0, 30, 4):
            if b + c == 0:
                continue
            ref = [1] * b + [0] * c + [1, 0]
            cod = [0] * b + [1] * c + [1, 0]
            want = min(float(mcnemar([[1, b], [c, 1]], exact=True).pvalue), 1.0)
            assert mcnemar_exact(ref, cod)["p"] == pytest.approx(want, rel=1e-9, abs=1e-15)


def test_delta_acc_ci_degenerate_and_normal_limit():
    # every item the same difference: the interval is that point
    assert delta_acc_ci({"a": [0.0] * 30, "b": [0.0] * 5}) == (0.0, 0.0)
    assert delta_acc_ci({"a": [-1.0] * 4, "b": [0.0] * 4}) == (-0.5, -0.5)
    # large n: the stratified bootstrap approaches mean +- 1.96 * sqrt(sum var_t / n_t) / T
    rng = np.random.default_rng(0)
    tasks = {"a": rng.choice([-1.0, 0.0, 1.0], 3000, p=[0.1, 0.8, 0.1]),
             "b": rng.choice([-1.0, 0.0, 1.0], 1000, p=[0.2, 0.75, 0.05])}
    mean = np.mean([v.mean() for v in tasks.values()])
    se = math.sqrt(sum(v.var() / v.size for v in tasks.values())) / 2
    lo, hi = delta_acc_ci(tasks)
    assert lo == pytest.approx(mean - 1.96 * se, abs=0.15 * se)
    assert hi == pytest.approx(mean + 1.96 * se, abs=0.15 * se)


def test_delta_acc_ci_resamples_within_tasks():
    # task a all +1, task b all -1: only the per-task means matter, so the interval is 0 exactly;
    # pooling items across tasks would give a wide interval instead
    assert delta_acc_ci({"a": [1.0] * 10, "b": [-1.0] * 30}) == (0.0, 0.0)


def test_delta_ppl_ci_constant_shift_is_exact():
    # every token's nll grows by d: the ratio is exp(d) - 1 on every resample
    rng = np.random.default_rng(1)
    n = rng.integers(20, 500, 40)
    ref = rng.uniform(3, 5, 40) * n
    d = 0.01
    lo, hi = delta_ppl_ci(ref, ref + d * n, n)
    assert lo == pytest.approx(math.expm1(d), abs=1e-12)
    assert hi == pytest.approx(math.expm1(d), abs=1e-12)


def test_delta_ppl_ci_covers_point_and_widens_with_noise():
    rng = np.random.default_rng(2)
    n = rng.integers(50, 500, 60).astype(float)
    ref = 4.0 * n
    small = ref + 0.01 * n + rng.normal(0, 1, 60)
    big = ref + 0.01 * n + rng.normal(0, 10, 60)
    point = math.expm1((small.sum() - ref.sum()) / n.sum())
    lo, hi = delta_ppl_ci(ref, small, n)
    assert lo < point < hi
    lo2, hi2 = delta_ppl_ci(ref, big, n)
    assert hi2 - lo2 > 3 * (hi - lo)


def test_accuracy_comparison_counts():
    ref = {"t": [{"acc": 1, "pred": 0}, {"acc": 1, "pred": 1}, {"acc": 0, "pred": 2},
                 {"acc": 0, "pred": 0}]}
    cod = {"t": [{"acc": 1, "pred": 0}, {"acc": 0, "pred": 2}, {"acc": 0, "pred": 1},
                 {"acc": 0, "pred": 0}]}
    r = accuracy_comparison(ref, cod)
    assert r["delta"] == pytest.approx(-0.25)
    assert r["discordant"] == [1, 0] and r["mcnemar_p"] == 1.0
    assert r["agreement"] == 0.5 and r["n"] == 4
    assert r["tasks"]["t"]["ref_stderr"] == pytest.approx(math.sqrt(1 / 3) / 2)
    lo, hi = r["delta_ci95"]
    assert -1.0 <= lo <= r["delta"] <= hi <= 0.0


def test_a_non_finite_resample_is_an_error_not_a_point():
    # a document with no scored token: a resample of only that one is 0/0; its interval used to
    # collapse silently to the point estimate
    with pytest.raises(ValueError, match="non-finite"):
        delta_ppl_ci([0.0, 40.0], [0.0, 44.0], [0, 10])


def test_delta_and_its_interval_cover_the_same_tasks():
    # task b has no item: the point Δ is task a's alone (-0.25), as the interval is
    ref = {"a": [{"acc": 1, "pred": 0}, {"acc": 1, "pred": 0}, {"acc": 0, "pred": 1},
                 {"acc": 1, "pred": 0}], "b": []}
    cod = {"a": [{"acc": 0, "pred": 1}, {"acc": 1, "pred": 0}, {"acc": 0, "pred": 1},
                 {"acc": 1, "pred": 0}], "b": []}
    r = accuracy_comparison(ref, cod)
    assert r["delta"] == pytest.approx(-0.25) and r["tasks_scored"] == 1
    lo, hi = r["delta_ci95"]
    assert lo <= r["delta"] <= hi


def test_acc_norm_agreement_compares_the_acc_norm_choices():
    # the acc choices agree on every item, the acc_norm choices on none
    ref = {"t": [{"acc": 1, "acc_norm": 0, "pred": 0, "pred_norm": 1}] * 3}
    cod = {"t": [{"acc": 1, "acc_norm": 1, "pred": 0, "pred_norm": 0}] * 3}
    assert accuracy_comparison(ref, cod, "acc")["agreement"] == 1.0
    assert accuracy_comparison(ref, cod, "acc_norm")["agreement"] == 0.0


def test_clustered_bootstrap_counts_copies_once():
    # every document twice: clustered by text, the interval is the one of the distinct
    # documents (each cluster's sums are twice one document's, the ratio the same); counted as
    # independent, the copies narrow it
    rng = np.random.default_rng(3)
    n = rng.integers(50, 500, 30).astype(float)
    ref = 4.0 * n + rng.normal(0, 5, 30)
    cod = ref + 0.01 * n + rng.normal(0, 5, 30)
    once = delta_ppl_ci(ref, cod, n)
    keys = [f"doc{i}" for i in range(30)] * 2
    twice = [np.concatenate([v, v]) for v in (ref, cod, n)]
    clustered = delta_ppl_ci(*twice, clusters=keys)
    assert clustered == pytest.approx(once, abs=1e-12)
    naive = delta_ppl_ci(*twice)
    assert naive[1] - naive[0] < 0.85 * (once[1] - once[0])
