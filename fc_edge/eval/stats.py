"""Paired statistics of a compressed setting against the uncompressed model.

Every figure from a sample comes with its interval and n. The two settings are scored on the same
items (or documents), so every comparison is paired:

* Δacc: per-item differences ``correct_codec - correct_ref`` (each -1, 0 or +1). The table's mean
  is the unweighted mean over tasks of each task's mean, so the bootstrap resamples items **within
  each task** (a stratified bootstrap: each task's differences are resampled on their own) and
  averages the task means the same way (:func:`delta_acc_ci`, scipy.stats.bootstrap, percentile).
* McNemar's exact test on the discordant items (ref right / codec wrong vs ref wrong / codec
  right), pooled over tasks (:func:`mcnemar_exact`, scipy.stats.binomtest).
* agreement (the codec picks the uncompressed model's choice): a proportion over all items, with
  its Clopper-Pearson ("exact") 95% interval (:func:`proportion_ci`, scipy.stats.binomtest).
* a proportion over units that come in clusters (tokens of one document): a bootstrap that
  resamples whole clusters (:func:`clustered_proportion_ci`).
* per-task standard error as lm-evaluation-harness prints it: the sample standard deviation
  (ddof 1) over sqrt(n) (:func:`lm_eval_stderr`).
* Δppl %: ``exp(sum nll_codec / sum tokens) / exp(sum nll_ref / sum tokens) - 1``; documents are
  resampled in pairs (:func:`delta_ppl_ci`).

(scipy, not statsmodels: scipy.stats is loaded for the bootstrap anyway, and statsmodels' import,
pandas included, cost each `fc-edge eval` process 0.5-0.6 s. The results are statsmodels' to
the last bit or so: tests/eval/test_stats.py holds them to it.)

Intervals are 95% by default; bootstraps draw 10,000 resamples from a fixed seed, so a report
reproduces exactly.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np

N_RESAMPLES = 10_000
SEED = 12345
#: The per-item key holding the choice each metric picks (its agreement compares these).
PRED = {"acc": "pred", "acc_norm": "pred_norm"}


def lm_eval_stderr(values: Sequence[float]) -> float:
    """lm-evaluation-harness's ``mean_stderr``: sample std (ddof 1) / sqrt(n); 0 for n < 2."""
    x = np.asarray(values, dtype=np.float64)
    if x.size < 2:
        return 0.0
    return float(x.std(ddof=1) / math.sqrt(x.size))


def proportion_ci(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Clopper-Pearson interval of a proportion ``successes / n`` (scipy.stats.binomtest,
    method "exact")."""
    from scipy.stats import binomtest

    if n <= 0:
        return (float("nan"), float("nan"))
    ci = binomtest(int(successes), int(n)).proportion_ci(confidence_level=level, method="exact")
    return (float(ci.low), float(ci.high))


def clustered_proportion_ci(outcomes: Sequence[float], clusters: Sequence[Hashable],
                            level: float = 0.95, n_resamples: int = N_RESAMPLES,
                            seed: int = SEED) -> tuple[float, float]:
    """Interval of the proportion ``mean(outcomes)`` (0/1 per unit) when units come in clusters
    (e.g. tokens of one document) that are not independent inside: a percentile bootstrap that
    resamples whole clusters, the statistic being ``sum successes / sum units`` of the resample
    (a ratio estimator, so clusters of different sizes weigh by their size as in the point
    estimate). A proportion that is the same in every cluster (all 0 or all 1, say) gives that
    point. NaNs for no unit; ValueError for fewer than two clusters or mismatched lengths."""
    y = np.asarray(outcomes, dtype=np.float64)
    if len(clusters) != y.size:
        raise ValueError(f"{len(clusters)} cluster keys for {y.size} outcomes")
    if y.size == 0:
        return (float("nan"), float("nan"))
    index = {k: i for i, k in enumerate(dict.fromkeys(np.asarray(clusters).tolist()))}
    if len(index) < 2:
        raise ValueError("a clustered interval needs at least two clusters")
    of = np.asarray([index[k] for k in np.asarray(clusters).tolist()])
    s = np.bincount(of, weights=y, minlength=len(index))
    n = np.bincount(of, minlength=len(index)).astype(np.float64)
    share = s / n
    if np.allclose(share, share[0], rtol=0, atol=1e-15):
        v = float(s.sum() / n.sum())
        return (v, v)

    def ratio(s_: np.ndarray, n_: np.ndarray, axis: int = -1) -> np.ndarray:
        return s_.sum(axis=axis) / n_.sum(axis=axis)

    return _bootstrap((s, n), ratio, True, level, n_resamples, seed)


def mcnemar_exact(ref_correct: Sequence[float], codec_correct: Sequence[float]
                  ) -> dict[str, float | int]:
    """Exact (binomial) McNemar test of paired 0/1 outcomes.

    Returns ``{"b": ref right & codec wrong, "c": ref wrong & codec right, "p": two-sided p}``;
    p is 1.0 when there is no discordant item.
    """
    from scipy.stats import binomtest

    r = np.asarray(ref_correct, dtype=bool)
    c = np.asarray(codec_correct, dtype=bool)
    if r.shape != c.shape:
        raise ValueError(f"paired outcomes differ in length: {r.size} vs {c.size}")
    b = int(np.sum(r & ~c))
    cc = int(np.sum(~r & c))
    if b + cc == 0:
        return {"b": 0, "c": 0, "p": 1.0}
    # the discordant counts are Binomial(b + c, 1/2) under the null
    p = float(binomtest(min(b, cc), b + cc, 0.5).pvalue)
    return {"b": b, "c": cc, "p": min(p, 1.0)}


def _bootstrap(data: tuple[np.ndarray, ...], statistic: Any, paired: bool, level: float,
               n_resamples: int, seed: int) -> tuple[float, float]:
    """Percentile interval of ``statistic`` (scipy.stats.bootstrap). Every resample must give
    a finite value: a non-finite one (e.g. a ratio over a resample with nothing in it) would make
    scipy's percentiles NaN, so it raises ValueError instead of passing for an interval. A
    resample distribution that is one value (every draw the same) is that point."""
    import warnings

    from scipy.stats import bootstrap

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns about a degenerate distribution; see below
        res = bootstrap(data, statistic, paired=paired, vectorized=True, confidence_level=level,
                        n_resamples=n_resamples, method="percentile",
                        rng=np.random.default_rng(seed))
    dist = np.asarray(res.bootstrap_distribution, dtype=np.float64)
    bad = int(np.sum(~np.isfinite(dist)))
    if bad:
        raise ValueError(f"bootstrap: {bad} of {dist.size} resamples gave a non-finite "
                         "statistic; no interval")
    if np.all(dist == dist.flat[0]):
        v = float(dist.flat[0])
        return (v, v)
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return (lo, hi)


def delta_acc_ci(per_task_diffs: Mapping[str, Sequence[float]], level: float = 0.95,
                 n_resamples: int = N_RESAMPLES, seed: int = SEED) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean over tasks of the per-task mean paired
    difference (items resampled within each task, independently across tasks).

    ``per_task_diffs[task]``: per item ``correct_codec - correct_ref`` (fractions; multiply by 100
    for points).
    """
    data = tuple(np.asarray(v, dtype=np.float64) for v in per_task_diffs.values() if len(v))
    if not data:
        return (float("nan"), float("nan"))

    def mean_of_means(*samples: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.mean([s.mean(axis=axis) for s in samples], axis=0)

    # scipy resamples each of several samples independently: exactly a stratified bootstrap.
    if len(data) == 1 or any(len(d) < 2 for d in data):
        # scipy needs >= 2 observations per sample; a 1-item task contributes its fixed mean.
        fixed = [d.mean() for d in data if len(d) < 2]
        var = tuple(d for d in data if len(d) >= 2)
        if not var:
            m = float(np.mean(fixed))
            return (m, m)
        k = len(data)

        def partial(*samples: np.ndarray, axis: int = -1) -> np.ndarray:
            return (np.sum([s.mean(axis=axis) for s in samples], axis=0) + sum(fixed)) / k

        return _bootstrap(var, partial, False, level, n_resamples, seed)
    return _bootstrap(data, mean_of_means, False, level, n_resamples, seed)


def delta_ppl_ci(ref_nll: Sequence[float], codec_nll: Sequence[float], tokens: Sequence[int],
                 level: float = 0.95, n_resamples: int = N_RESAMPLES, seed: int = SEED,
                 clusters: Sequence[Hashable] | None = None) -> tuple[float, float]:
    """Interval of the relative perplexity change (a fraction: 0.01 = +1%), documents resampled
    in pairs. ``*_nll``: per document summed negative log-likelihood (nats); ``tokens``: scored
    tokens per document. ``clusters``: per document a key (e.g. a digest of its text); the
    documents of one key are resampled together (a cluster bootstrap), so copies of one text
    do not count as independent documents."""
    r = np.asarray(ref_nll, dtype=np.float64)
    c = np.asarray(codec_nll, dtype=np.float64)
    n = np.asarray(tokens, dtype=np.float64)
    if not (r.size == c.size == n.size) or r.size == 0:
        raise ValueError("per-document arrays must be non-empty and of one length")
    if clusters is not None:
        if len(clusters) != r.size:
            raise ValueError(f"{len(clusters)} cluster keys for {r.size} documents")
        # the statistic is a ratio of sums, so a cluster is its documents' sums
        index = {k: i for i, k in enumerate(dict.fromkeys(clusters))}
        of = np.asarray([index[k] for k in clusters])
        r, c, n = (np.bincount(of, weights=v, minlength=len(index)) for v in (r, c, n))

    def rel(r_: np.ndarray, c_: np.ndarray, n_: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.expm1((c_.sum(axis=axis) - r_.sum(axis=axis)) / n_.sum(axis=axis))

    if r.size < 2:
        v = float(rel(r, c, n))
        return (v, v)
    # Per-token differences that are the same in every document give a fixed ratio.
    d = (c - r) / n
    if np.allclose(d, d[0], rtol=0, atol=1e-15):
        v = float(rel(r, c, n))
        return (v, v)
    return _bootstrap((r, c, n), rel, True, level, n_resamples, seed)


def accuracy_comparison(ref: Mapping[str, Sequence[Mapping[str, Any]]],
                        other: Mapping[str, Sequence[Mapping[str, Any]]],
                        metric: str = "acc", level: float = 0.95) -> dict[str, Any]:
    """Every paired statistic of ``other`` against ``ref`` from per-item records.

    ``ref[task]`` / ``other[task]``: per item a dict with ``metric`` (0/1) and the index the
    metric chooses (``pred`` for acc, ``pred_norm`` for acc_norm: :data:`PRED`). Returns
    ``delta`` (mean over the tasks that have items, a fraction; ``tasks_scored`` says how many),
    ``delta_ci95`` (over the same tasks), ``mcnemar_p`` (with ``discordant`` = [b, c]),
    ``agreement`` over all items with ``agreement_ci95`` (the two settings choose the same answer
    under ``metric``), and per task ``stderr`` (lm-eval style) of both settings.
    """
    pred = PRED[metric]
    diffs: dict[str, list[float]] = {}
    r_all: list[float] = []
    o_all: list[float] = []
    agree = n = 0
    per_task: dict[str, dict[str, float]] = {}
    for task, r_items in ref.items():
        o_items = other[task]
        if len(o_items) != len(r_items):
            raise ValueError(f"{task}: {len(r_items)} reference items vs {len(o_items)}")
        rv = [float(x[metric]) for x in r_items]
        ov = [float(x[metric]) for x in o_items]
        diffs[task] = [o - r for o, r in zip(ov, rv, strict=True)]
        r_all += rv
        o_all += ov
        a = sum(int(x[pred] == y[pred]) for x, y in zip(r_items, o_items, strict=True))
        agree += a
        n += len(r_items)
        per_task[task] = {"n": len(rv), "ref": float(np.mean(rv)) if rv else float("nan"),
                          "value": float(np.mean(ov)) if ov else float("nan"),
                          "ref_stderr": lm_eval_stderr(rv), "stderr": lm_eval_stderr(ov),
                          "delta": float(np.mean(diffs[task])) if rv else float("nan")}
    mc = mcnemar_exact(r_all, o_all)
    scored = [t for t, v in diffs.items() if v]  # a task with no item has no mean to average
    lo, hi = delta_acc_ci({t: diffs[t] for t in scored}, level)
    return {"metric": metric, "n": n, "tasks_scored": len(scored),
            "delta": (float(np.mean([per_task[t]["delta"] for t in scored])) if scored
                      else float("nan")),
            "delta_ci95": [lo, hi], "mcnemar_p": mc["p"], "discordant": [mc["b"], mc["c"]],
            "agreement": agree / n if n else float("nan"),
            "agreement_ci95": list(proportion_ci(agree, n, level)), "tasks": per_task}


def within(upper_loss: float, limit: float) -> bool:
    """The goal verdict: the upper end of the loss interval is at most ``limit``."""
    return bool(upper_loss <= limit)
