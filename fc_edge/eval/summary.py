"""Tables and paired statistics of an accuracy run from its per-item records."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fc_edge.eval.multiple_choice import ChoiceScores, setting_key
from fc_edge.eval.scoring import ItemScore, Tally, mean_over_tasks
from fc_edge.eval.settings import CodecSetting


def decisions(logliks: Sequence[float], rec: Mapping[str, Any]) -> dict[str, Any]:
    """What one item's log-likelihoods decide: ``acc``, ``acc_norm`` (0/1) and the choices they
    pick (``pred``, ``pred_norm``)."""
    sc = ItemScore(list(logliks), rec["chars"], rec["label"])
    return {"acc": sc.acc, "acc_norm": sc.acc_norm, "pred": sc.pred, "pred_norm": sc.pred_norm}


def summarize(records: Mapping[str, Sequence[Mapping[str, Any]]], layers: Sequence[int],
              settings: Sequence[CodecSetting]) -> dict[str, Any]:
    """``results[layer][label]`` from per-item records (``records[task]``): per task the metrics
    of :class:`Tally` with lm-eval's standard errors, the mean over tasks and, for a codec, the
    paired statistics of :func:`fc_edge.eval.stats.accuracy_comparison` for acc and acc_norm
    (``stats``) with ``delta``, ``delta_ci95``, ``mcnemar_p``, ``agreement_ci95`` of acc in
    points."""
    from fc_edge.eval import stats

    ref_items = {t: [decisions(r["ref"], r) for r in recs] for t, recs in records.items()}
    results: dict[str, Any] = {}
    for L in layers:
        per_layer: dict[str, Any] = {}
        for s in settings:
            key = setting_key(L, s)
            per_task = {}
            mine: dict[str, list[dict[str, Any]]] = {}
            for task, recs in records.items():
                t = Tally()
                mine[task] = []
                for r in recs:
                    got = ChoiceScores.from_record(r["s"][key])
                    t.add(ItemScore(got.ll, r["chars"], r["label"]),
                          ItemScore(r["ref"], r["chars"], r["label"]))
                    t.traffic.merge(got.traffic)
                    mine[task].append(decisions(got.ll, r))
                res = t.result()
                for m in ("acc", "acc_norm"):
                    res[f"{m}_stderr"] = stats.lm_eval_stderr([d[m] for d in mine[task]])
                per_task[task] = res
            entry: dict[str, Any] = {"codec": s.name, "config": s.config,
                                     "row_wise": s.row_wise, "tasks": per_task,
                                     "mean": mean_over_tasks(per_task)}
            if s.codec is not None and any(records.values()):
                entry["stats"] = {m: stats.accuracy_comparison(ref_items, mine, m)
                                  for m in ("acc", "acc_norm")}
                # in points (percent of items), as in the tables
                acc = entry["stats"]["acc"]
                entry["delta"] = 100 * acc["delta"]
                entry["delta_ci95"] = [100 * v for v in acc["delta_ci95"]]
                entry["mcnemar_p"] = acc["mcnemar_p"]
                entry["agreement_ci95"] = [100 * v for v in acc["agreement_ci95"]]
            per_layer[s.label] = entry
        results[str(L)] = per_layer
    return results
