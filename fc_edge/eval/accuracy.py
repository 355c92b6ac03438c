"""`fc-edge eval` on multiple-choice tasks: every task's items scored, recorded and summarized."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fc_edge.errors import ConfigError
from fc_edge.eval.forward import LayerStack
from fc_edge.eval.multiple_choice import (
    ItemScores,
    score_item_per_choice,
    score_items,
    setting_key,
)
from fc_edge.eval.progress import progress_bar
from fc_edge.eval.records import Records, file_sha256, provenance, read_lines
from fc_edge.eval.settings import NONE, CodecSetting
from fc_edge.eval.summary import decisions, summarize
from fc_edge.eval.tasks import default_data_dir, encode_item, load_task, task_file, token_encoder


@dataclass
class Reuse:
    """Settings whose scores are taken from an earlier run's records instead of scored again
    (e.g. the uncompressed model's, which no codec or wire-format change touches).

    ``labels``: the reused settings; ``none`` among them reuses the uncompressed reference too
    (its log-likelihoods are the ``none`` setting's), so its forward pass is skipped.
    ``records``: (task, idx) -> that run's record."""

    path: Path
    labels: tuple[str, ...]
    records: Mapping[tuple[str, int], Mapping[str, Any]]

    @classmethod
    def load(cls, path: Path, labels: Sequence[str], layers: Sequence[int],
             max_len: int | None) -> Reuse:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--reuse {str(path)!r}: no such records file")
        run, lines = read_lines(path)
        if run.get("kind") != "accuracy" or list(run.get("split_layers", [])) != list(layers) \
                or run.get("max_len") != max_len:
            raise ConfigError(f"--reuse {path}: another kind of run ({run})")
        missing = [lb for lb in labels if lb not in run.get("settings", [])]
        if missing:
            raise ConfigError(f"--reuse {path} has no {', '.join(missing)} "
                              f"(it holds {', '.join(run.get('settings', []))})")
        recs = {(r["task"], int(r["idx"])): r for r in lines if "idx" in r}
        return cls(path, tuple(labels), recs)

    @property
    def reference(self) -> bool:
        return NONE in self.labels

    def describe(self) -> dict[str, Any]:
        return {"file": self.path.name, "sha256": file_sha256(self.path),
                "settings": list(self.labels)}

    def merge(self, task: str, idx: int, rec: dict[str, Any], layers: Sequence[int]
              ) -> dict[str, Any]:
        """``rec`` (scored now) with the reused settings (and reference) of the earlier record
        of the same item; the item must be the same (id, label, choice lengths)."""
        old = self.records.get((task, idx))
        if old is None:
            raise ConfigError(f"--reuse {self.path.name}: no record of {task} item {idx}")
        for k in ("id", "label", "chars"):
            if old[k] != rec[k]:
                raise ConfigError(f"--reuse {self.path.name}: {task} item {idx} differs ({k})")
        s = dict(rec["s"])
        for L in layers:
            for label in self.labels:
                s[f"{L}:{label}"] = old["s"][f"{L}:{label}"]
        return {**rec, "ref": old["ref"] if self.reference else rec["ref"], "s": s}


def evaluate(model: Any, tokenizer: Any, tasks: Sequence[str], settings: Sequence[CodecSetting],
             split_layers: Sequence[int] = (1,), limit: int | None = None,
             data_dir: Path | None = None, max_len: int | None = 2048,
             progress: bool = True, log: Callable[[str], None] | None = None,
             record_items: bool = False, records: Path | None = None,
             shared_context: bool = True, batch_items: int = 32,
             batch_tokens: int = 256, reuse: Path | None = None,
             reuse_settings: Sequence[str] = ()) -> dict[str, Any]:
    """Multiple-choice scores of every (split layer, codec setting) on ``tasks``.

    Returns a JSON-ready dict: ``results[layer][label]["tasks"][task]`` -> metrics (``acc``,
    ``acc_norm``, their lm-eval standard errors, ``agreement``, ``kl``, ``bytes``, ...) and
    ``["mean"]`` over tasks; each compressed setting also carries ``delta`` and ``delta_ci95``
    (mean acc change in points and its 95% interval), ``mcnemar_p`` and ``stats`` (see
    :mod:`fc_edge.eval.stats`); ``provenance`` says what made it (:func:`provenance`) and
    ``sessions`` which processes scored its items. ``record_items`` adds the per-item records
    (``records[task]``: label, choice lengths, per setting the per-choice log-likelihoods and
    bytes) and per setting ``items[task]`` (the log-likelihoods).
    ``records``: a JSON-lines file that gets every item as it is scored; a run given the same
    file again skips the items already there (resume). ``shared_context`` (default) scores
    ``batch_items`` items at a time, each shared context run once, in forward batches of
    ``batch_tokens`` rows (:func:`score_items`); False runs every choice's whole sequence, item
    by item (:func:`score_item_per_choice`, the slower reference path). ``reuse`` +
    ``reuse_settings``: take those settings' scores from an earlier run's records file
    (:class:`Reuse`) and score only the others.
    """
    stack = LayerStack(model)
    layers = stack.split_layers(split_layers)
    encode, eos = token_encoder(tokenizer)
    pad_id = eos if eos is not None else 0
    if batch_items < 1 or batch_tokens < 1:
        raise ConfigError("--batch-items and --batch-tokens must be >= 1")
    labels = [s.label for s in settings]
    unknown = [lb for lb in reuse_settings if lb not in labels]
    if unknown:
        raise ConfigError(f"--reuse-settings {', '.join(unknown)}: not among --codecs")
    reused = (Reuse.load(reuse, reuse_settings, layers, max_len) if reuse is not None
              else None)
    if reuse_settings and reused is None:
        raise ConfigError("--reuse-settings needs --reuse FILE")
    to_score = [s for s in settings if reused is None or s.label not in reused.labels]
    reference = reused is None or not reused.reference
    folder = Path(data_dir) if data_dir else default_data_dir()
    files = [task_file(folder, t) for t in tasks]
    from fc_edge.codecs import wire

    prov = provenance(files, **({"reused": reused.describe()} if reused else {}))
    sink = Records(records, {"kind": "accuracy", "split_layers": layers,
                             "settings": labels, "max_len": max_len,
                             "wire_version": wire.VERSION}, prov)
    by_task: dict[str, list[dict[str, Any]]] = {}
    timing: dict[str, dict[str, float]] = {}
    t_all = time.perf_counter()
    scored = 0
    try:
        for task in tasks:
            items = load_task(task, data_dir, limit)
            t0 = time.perf_counter()
            new = 0
            done = {idx: sink.get(task, idx) for idx in range(len(items))}
            todo = [idx for idx, rec in done.items() if rec is None]
            bar = progress_bar(None, task, len(items), progress)
            if bar is not None:
                bar.update(len(items) - len(todo))
            step = batch_items if shared_context else 1
            for a in range(0, len(todo), step):
                chunk = todo[a: a + step]
                encs = [encode_item(items[i], encode, prefix_id=eos, max_len=max_len)
                        for i in chunk]
                got: list[ItemScores] = (
                    score_items(stack, model, encs, layers, to_score, batch_tokens,
                                reference=reference)
                    if shared_context else
                    [score_item_per_choice(stack, model, encs[0], layers, to_score, pad_id,
                                           reference=reference)])
                for idx, enc, g in zip(chunk, encs, got, strict=True):
                    item = items[idx]
                    rec = {"task": task, "idx": idx, "id": item.id, "label": item.label,
                           "chars": list(enc.cont_chars), **g.record()}
                    if reused is not None:
                        rec = reused.merge(task, idx, rec, layers)
                    done[idx] = rec
                    sink.add(rec)
                new += len(chunk)
                if bar is not None:
                    bar.update(len(chunk))
            if bar is not None:
                bar.close()
            recs = [done[idx] for idx in range(len(items))]
            dt = time.perf_counter() - t0
            scored += new
            by_task[task] = recs
            timing[task] = {"items": len(items), "scored": new, "seconds": dt,
                            "items_per_s": new / dt if dt else 0.0}
            if log is not None:
                ref_acc = sum(decisions(r["ref"], r)["acc"] for r in recs) / len(recs)
                log(f"{task}: {len(items)} items ({new} scored now) in {dt:.1f} s "
                    f"({new / dt if dt else 0:.2f} items/s), uncompressed acc {ref_acc:.3f}")
    finally:
        sink.close()
    results = summarize(by_task, layers, settings)
    if record_items:
        for L in layers:
            for s in settings:
                results[str(L)][s.label]["items"] = {
                    t: [r["s"][setting_key(L, s)]["ll"] for r in recs]
                    for t, recs in by_task.items()}
    elapsed = time.perf_counter() - t_all
    keys = {(t, int(r["idx"])) for t, recs in by_task.items() for r in recs}
    out = {"kind": "accuracy", "tasks": list(tasks), "split_layers": layers,
           "settings": labels, "limit": limit, "results": results,
           "shared_context": shared_context, "provenance": prov,
           "sessions": sink.sessions(keys),
           "timing": {"tasks": timing, "items": sum(len(r) for r in by_task.values()),
                      "scored": scored, "seconds": elapsed,
                      "items_per_s": scored / elapsed if elapsed else 0.0}}
    if record_items:
        out["records"] = by_task
    return out
