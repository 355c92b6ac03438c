"""Accuracy and perplexity with a codec at the split, every setting in one pass over the data.

Per item, the choices go through the model as one right-padded batch. The uncompressed reference
runs once through all layers; on the way it keeps the activation after each requested split
layer L, and every codec setting then runs only layers[L:] on its reconstruction. The codec sees
each scored sequence's own (S, D) activation (S = that sequence's length, no padding) — exactly
what a device would send for that prompt. The final norm and lm_head run only at the
continuation positions.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fc_edge.errors import ConfigError
from fc_edge.eval.forward import LayerStack, PrefixCache, pad_batch
from fc_edge.eval.scoring import ItemScore, Tally, mean_over_tasks
from fc_edge.eval.settings import CodecSetting, relative_error
from fc_edge.eval.tasks import Encoded, encode_item, load_task


def _progress(iterable: Any, desc: str, total: int | None, enabled: bool) -> Any:
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, unit="item", leave=False, dynamic_ncols=True)


def _encoder(tokenizer: Any) -> tuple[Callable[[str], list[int]], int | None]:
    if tokenizer is None:
        raise ConfigError("evaluation needs a tokenizer: this model has none (synthetic models "
                          "cannot be scored on text)")

    def encode(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    return encode, getattr(tokenizer, "eos_token_id", None)


def _gather_targets(ids: Tensor, lengths: Sequence[int], starts: Sequence[int]
                    ) -> tuple[Tensor, Tensor, Tensor, list[int]]:
    """(row, position) of the logits that predict each continuation token, the tokens, and how
    many belong to each row."""
    rows, cols, toks, counts = [], [], [], []
    for r, (n, s) in enumerate(zip(lengths, starts, strict=True)):
        pos = torch.arange(s - 1, n - 1)
        rows.append(torch.full_like(pos, r))
        cols.append(pos)
        toks.append(ids[r, s:n])
        counts.append(n - s)
    return torch.cat(rows), torch.cat(cols), torch.cat(toks), counts


def _logliks(stack: LayerStack, h: Tensor, rows: Tensor, cols: Tensor, toks: Tensor,
             counts: list[int]) -> list[float]:
    logits = stack.logits_at(h, rows, cols)
    lp = torch.log_softmax(logits.double(), dim=-1).gather(1, toks.view(-1, 1)).view(-1)
    return [float(x.sum()) for x in lp.split(counts)]


def send_rows(setting: CodecSetting, h: Tensor, lengths: Sequence[int], tally: Tally | None,
              per_token: bool = False) -> Tensor:
    """Each batch row's unpadded (S_i, D) activation through the codec as one message (the
    prefill), or with ``per_token`` each (1, D) token row as its own message (the decode steps);
    the padded tail is kept."""
    out = h.clone()
    for r, n in enumerate(lengths):
        blocks = [(i, i + 1) for i in range(n)] if per_token else [(0, n)]
        for a, b in blocks:
            x = h[r, a:b]
            x_hat, nbytes, fell_back = setting.send(x)
            out[r, a:b] = x_hat
            if tally is not None:
                tally.add_bytes(nbytes, x.numel() * 4, relative_error(x, x_hat), fell_back)
    return out


def check_layers(stack: LayerStack, layers: Sequence[int]) -> list[int]:
    if not layers:
        raise ConfigError("give at least one split layer")
    for L in layers:
        stack.check_split(L)
    return sorted(set(int(L) for L in layers))


def _forward_keeping(stack: Any, ids: Tensor, layers: Sequence[int]
                     ) -> tuple[Tensor, Any, dict[int, Tensor]]:
    """The uncompressed forward of ``ids``, keeping the activation after each split layer.

    Returns (final hidden states, the stack's context, {layer: activation}); each codec then
    reruns only the layers after its split from ``kept[L]``.
    """
    h, ctx = stack.start(ids)
    h, kept = _run_keeping(stack, h, ctx, layers)
    return h, ctx, kept


def _run_keeping(stack: Any, h: Tensor, ctx: Any, layers: Sequence[int],
                 cache: PrefixCache | None = None) -> tuple[Tensor, dict[int, Tensor]]:
    """All layers over h, keeping the activation after each split layer in ``layers``."""
    kept: dict[int, Tensor] = {}
    prev = 0
    for L in layers:
        h = stack.run(h, ctx, prev, L, cache)
        kept[L] = h
        prev = L
    return stack.run(h, ctx, prev, stack.num_layers, cache), kept


def _cont_logliks(stack: LayerStack, last: Tensor, hk: Tensor, toks: Tensor,
                  klen: Sequence[int]) -> list[float]:
    """Summed log-probabilities of B continuations after a shared prefix.

    ``last`` (D,): the prefix's final hidden state at its last position (predicts each
    continuation's first token); ``hk`` (B, K, D): the continuation pass; ``toks`` (B, K) long;
    ``klen``: each row's continuation length.
    """
    rows = torch.cat([torch.full((k - 1,), r) for r, k in enumerate(klen)])
    cols = torch.cat([torch.arange(k - 1) for k in klen])
    first = stack.logits_at(last[None, None], torch.zeros(1, dtype=torch.long),
                            torch.zeros(1, dtype=torch.long))
    lp_first = torch.log_softmax(first.double(), -1)[0]
    rest = stack.logits_at(hk, rows, cols) if len(rows) else first[:0]
    lp = torch.log_softmax(rest.double(), -1)
    tail_toks = torch.cat([toks[r, 1:k] for r, k in enumerate(klen)])
    lp_rest = lp.gather(1, tail_toks.view(-1, 1)).view(-1).split([k - 1 for k in klen])
    return [float(lp_first[toks[r, 0]]) + float(x.sum()) for r, x in enumerate(lp_rest)]


def _shared_tail(stack: LayerStack, ctx_rows: Tensor, conts: Sequence[Tensor], start: int
                 ) -> tuple[Tensor, Tensor, list[int]]:
    """Layers ``start..N-1`` over one shared prefix ``ctx_rows`` (1, C, D) once, then over the
    continuation rows (each (K_i, D)) as one right-padded batch attending to that prefix.

    Returns (the prefix's last final hidden state (D,), the continuation pass (B, K, D), K_i).
    """
    cache = PrefixCache()
    h = stack.run(ctx_rows, stack.context(ctx_rows), start, stack.num_layers, cache)
    cache.extend = True
    klen = [int(c.shape[0]) for c in conts]
    hk = ctx_rows.new_zeros(len(conts), max(klen), ctx_rows.shape[-1])
    for r, c in enumerate(conts):
        hk[r, : c.shape[0]] = c
    hk = stack.run(hk, stack.continuation(ctx_rows.shape[1], hk), start, stack.num_layers, cache)
    return h[0, -1], hk, klen


def _new_stats() -> dict[str, Any]:
    return {"ll": [], "bytes": 0, "raw": 0, "err": 0.0, "seqs": 0, "fb": 0}


def _count(st: dict[str, Any], x: Tensor, x_hat: Tensor, nbytes: int, fell_back: bool) -> None:
    st["bytes"] += nbytes
    st["raw"] += x.numel() * 4
    st["err"] += relative_error(x, x_hat)
    st["seqs"] += 1
    st["fb"] += int(fell_back)


def _raw_stats(lengths: Sequence[int], hidden: int, logliks: list[float]) -> dict[str, Any]:
    raw = sum(n * hidden * 4 for n in lengths)
    return {"ll": logliks, "bytes": raw, "raw": raw, "err": 0.0, "seqs": len(lengths), "fb": 0}


@torch.inference_mode()
def score_item_per_choice(stack: LayerStack, model: Any, enc: Encoded, layers: Sequence[int],
                          settings: Sequence[CodecSetting], pad_id: int) -> dict[str, Any]:
    """One item, every choice's whole sequence through all layers (the reference path).

    Returns ``{"ref": logliks, "s": {"L:label": stats}}`` where stats hold the per-choice
    log-likelihoods ``ll`` and the bytes of the messages sent.
    """
    ids, lengths = pad_batch(enc.sequences, pad_id)
    rows, cols, toks, counts = _gather_targets(ids, lengths, enc.starts)
    h, ctx, kept = _forward_keeping(stack, ids, layers)
    ref = _logliks(stack, h, rows, cols, toks, counts)
    out: dict[str, Any] = {"ref": ref, "s": {}}
    for L, s, st in _codec_settings(stack, model, layers, settings, lengths, out):
        a_hat = kept[L].clone()
        for r, n in enumerate(lengths):
            x = kept[L][r, :n]
            x_hat, nbytes, fb = s.send(x)
            a_hat[r, :n] = x_hat
            _count(st, x, x_hat, nbytes, fb)
        hh = stack.run(a_hat, ctx, L, stack.num_layers)
        st["ll"] = _logliks(stack, hh, rows, cols, toks, counts)
    return out


def _codec_settings(stack: LayerStack, model: Any, layers: Sequence[int],
                    settings: Sequence[CodecSetting], lengths: Sequence[int],
                    out: dict[str, Any]) -> Any:
    """Fill ``out["s"]`` for the uncompressed settings (the reference's log-likelihoods, float32
    bytes); yield (layer, setting, its fresh stats dict, already in ``out``) for each codec,
    bound to the model at that layer."""
    for L in layers:
        for s in settings:
            key = f"{L}:{s.label}"
            if s.codec is None:
                out["s"][key] = _raw_stats(lengths, stack.hidden_size, out["ref"])
                continue
            s.bind(model, L)
            out["s"][key] = st = _new_stats()
            yield L, s, st


@torch.inference_mode()
def score_item_shared(stack: LayerStack, model: Any, enc: Encoded, layers: Sequence[int],
                      settings: Sequence[CodecSetting]) -> dict[str, Any]:
    """One item with the shared context run once (same result as :func:`score_item_per_choice`
    up to float rounding).

    The choices that share a context (the task's prompt) share its forward: the layers run over
    the context once with a key/value cache, then over all continuations as one batch. A codec
    still codes each choice's whole (S, D) sequence as one message, exactly as the device would
    send it; the tail then runs over the coded context once for every group of choices whose
    coded context rows are bit-identical (all choices for a codec that codes rows on their own
    with a fixed quantizer; choices whose rate control picked the same step for ``rotated``).
    The other choices (all of them for whole-block codecs) run as whole sequences in one
    right-padded batch, as in the per-choice path.
    """
    seqs, starts = enc.sequences, enc.starts
    n = len(seqs)
    N = stack.num_layers
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (seq, st) in enumerate(zip(seqs, starts, strict=True)):
        groups.setdefault(tuple(seq[:st]), []).append(i)
    ref: list[float] = [0.0] * n
    acts: dict[int, list[Tensor]] = {L: [torch.empty(0)] * n for L in layers}
    for ctx_ids, members in groups.items():
        c = len(ctx_ids)
        cache = PrefixCache()
        h, ctx = stack.start(torch.tensor([ctx_ids]))
        h, kept_c = _run_keeping(stack, h, ctx, layers, cache)
        cache.extend = True
        kid, klen = pad_batch([seqs[i][c:] for i in members], 0)
        hk = stack.base.embed_tokens(kid.to(stack.device))
        hk, kept_k = _run_keeping(stack, hk, stack.continuation(c, hk), layers, cache)
        for j, ll in enumerate(_cont_logliks(stack, h[0, -1], hk, kid, klen)):
            i = members[j]
            ref[i] = ll
            for L in layers:
                acts[L][i] = torch.cat([kept_c[L][0], kept_k[L][j, : klen[j]]])
    lengths = [len(s) for s in seqs]
    out: dict[str, Any] = {"ref": ref, "s": {}}
    for L, s, st in _codec_settings(stack, model, layers, settings, lengths, out):
        coded = []
        for i in range(n):
            x_hat, nbytes, fb = s.send(acts[L][i])
            coded.append(x_hat)
            _count(st, acts[L][i], x_hat, nbytes, fb)
        ll: list[float] = [0.0] * n
        alone: list[int] = []  # choices that share their coded context with no other
        for ctx_ids, members in groups.items():
            c = len(ctx_ids)
            sub: list[list[int]] = []  # choices whose coded context rows are identical
            for i in members:
                for g in sub:
                    if torch.equal(coded[g[0]][:c], coded[i][:c]):
                        g.append(i)
                        break
                else:
                    sub.append([i])
            for g in sub:
                if len(g) == 1:
                    alone.append(g[0])
                    continue
                last, hk, klen = _shared_tail(stack, coded[g[0]][:c][None],
                                              [coded[i][c:] for i in g], L)
                toks, _ = pad_batch([seqs[i][c:] for i in g], 0)
                for i, v in zip(g, _cont_logliks(stack, last, hk, toks, klen), strict=True):
                    ll[i] = v
        if alone:  # whole sequences as one right-padded batch, as the per-choice path
            ids, lens = pad_batch([seqs[i] for i in alone], 0)
            a_hat = coded[alone[0]].new_zeros(len(alone), ids.shape[1], stack.hidden_size)
            for r, i in enumerate(alone):
                a_hat[r, : lens[r]] = coded[i]
            hh = stack.run(a_hat, stack.context(a_hat), L, N)
            targets = _gather_targets(ids, lens, [starts[i] for i in alone])
            for i, v in zip(alone, _logliks(stack, hh, *targets), strict=True):
                ll[i] = v
        st["ll"] = ll
    return out


class Records:
    """Per-item (or per-document) records of one run as JSON lines, written as they are made.

    The first line describes the run (``run``: settings, layers, ...); given the same file
    again, a run of the same description resumes after the records already there, and a file
    of another run is refused with a :class:`ConfigError`. ``path`` None keeps nothing.
    """

    def __init__(self, path: Path | None, run: dict[str, Any]) -> None:
        self.done: dict[tuple[str, int], dict[str, Any]] = {}
        self.sink: Any = None
        if path is None:
            return
        path = Path(path)
        if path.is_file() and path.stat().st_size:
            with open(path, encoding="utf-8") as f:
                lines = f.readlines()
            try:
                first = json.loads(lines[0])["run"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ConfigError(f"{path}: not a records file of `fc-edge eval`") from None
            if first != run:
                raise ConfigError(f"{path} holds another run ({first}); give another --records "
                                  "file or the same settings")
            for line in lines[1:]:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    break  # a line cut by an interrupted run: that item is scored again
                self.done[(rec.get("task", ""), int(rec["idx"]))] = rec
            self.sink = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.sink = open(path, "w", encoding="utf-8")  # noqa: SIM115
            self.sink.write(json.dumps({"run": run}) + "\n")

    def get(self, task: str, idx: int) -> dict[str, Any] | None:
        return self.done.get((task, idx))

    def add(self, rec: dict[str, Any]) -> None:
        if self.sink is not None:
            self.sink.write(json.dumps(rec) + "\n")
            self.sink.flush()

    def close(self) -> None:
        if self.sink is not None:
            self.sink.close()


def summarize(records: dict[str, list[dict[str, Any]]], layers: Sequence[int],
              settings: Sequence[CodecSetting]) -> dict[str, Any]:
    """Tables and paired statistics from per-item records (``records[task]``)."""
    from fc_edge.eval import stats

    results: dict[str, Any] = {}
    for L in layers:
        per_layer: dict[str, Any] = {}
        ref_items = {t: [_decisions(r["ref"], r) for r in recs] for t, recs in records.items()}
        for s in settings:
            key = f"{L}:{s.label}"
            per_task = {}
            mine = {}
            for task, recs in records.items():
                t = Tally()
                mine[task] = []
                for r in recs:
                    st = r["s"][key]
                    ref = ItemScore(r["ref"], r["chars"], r["label"])
                    t.add(ItemScore(st["ll"], r["chars"], r["label"]), ref)
                    t.add_bytes(st["bytes"], st["raw"], st["err"], st["fb"], st["seqs"])
                    mine[task].append(_decisions(st["ll"], r))
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


def _decisions(logliks: list[float], rec: dict[str, Any]) -> dict[str, Any]:
    sc = ItemScore(logliks, rec["chars"], rec["label"])
    return {"acc": sc.acc, "acc_norm": sc.acc_norm, "pred": sc.pred}


def evaluate(model: Any, tokenizer: Any, tasks: Sequence[str], settings: Sequence[CodecSetting],
             split_layers: Sequence[int] = (1,), limit: int | None = None,
             data_dir: Path | None = None, max_len: int | None = 2048,
             progress: bool = True, log: Callable[[str], None] | None = None,
             record_items: bool = False, records: Path | None = None,
             shared_context: bool = True) -> dict[str, Any]:
    """Multiple-choice scores of every (split layer, codec setting) on ``tasks``.

    Returns a JSON-ready dict: ``results[layer][label]["tasks"][task]`` -> metrics (``acc``,
    ``acc_norm``, their lm-eval standard errors, ``agreement``, ``kl``, ``bytes``, ...) and
    ``["mean"]`` over tasks; each compressed setting also carries ``delta`` and ``delta_ci95``
    (mean acc change in points and its 95% interval), ``mcnemar_p`` and ``stats`` (see
    :mod:`fc_edge.eval.stats`). ``record_items`` adds the per-item records (``items[task]``:
    label, choice lengths, per setting the per-choice log-likelihoods and bytes).
    ``records``: a JSON-lines file that gets every item as it is scored; a run given the same
    file again skips the items already there (resume). ``shared_context`` (default) runs each
    item's shared context once (:func:`score_item_shared`); False runs every choice's whole
    sequence (:func:`score_item_per_choice`, the slower reference path).
    """
    stack = LayerStack(model)
    layers = check_layers(stack, split_layers)
    encode, eos = _encoder(tokenizer)
    pad_id = eos if eos is not None else 0
    shared = shared_context and stack.can_share_prefix
    sink = Records(records, {"kind": "accuracy", "split_layers": layers,
                             "settings": [s.label for s in settings], "max_len": max_len})
    by_task: dict[str, list[dict[str, Any]]] = {}
    timing: dict[str, dict[str, float]] = {}
    t_all = time.perf_counter()
    scored = 0
    try:
        for task in tasks:
            items = load_task(task, data_dir, limit)
            t0 = time.perf_counter()
            recs: list[dict[str, Any]] = []
            new = 0
            with torch.inference_mode():
                for idx, item in enumerate(_progress(items, task, len(items), progress)):
                    rec = sink.get(task, idx)
                    if rec is None:
                        enc = encode_item(item, encode, prefix_id=eos, max_len=max_len)
                        got = (score_item_shared(stack, model, enc, layers, settings) if shared
                               else score_item_per_choice(stack, model, enc, layers, settings,
                                                          pad_id))
                        rec = {"task": task, "idx": idx, "id": item.id, "label": item.label,
                               "chars": list(enc.cont_chars), **got}
                        new += 1
                        sink.add(rec)
                    recs.append(rec)
            dt = time.perf_counter() - t0
            scored += new
            by_task[task] = recs
            timing[task] = {"items": len(items), "scored": new, "seconds": dt,
                            "items_per_s": new / dt if dt else 0.0}
            if log is not None:
                ref_acc = sum(_decisions(r["ref"], r)["acc"] for r in recs) / len(recs)
                log(f"{task}: {len(items)} items ({new} scored now) in {dt:.1f} s "
                    f"({new / dt if dt else 0:.2f} items/s), uncompressed acc {ref_acc:.3f}")
    finally:
        sink.close()
    results = summarize(by_task, layers, settings)
    if record_items:
        for L in layers:
            for s in settings:
                results[str(L)][s.label]["items"] = {
                    t: [r["s"][f"{L}:{s.label}"]["ll"] for r in recs]
                    for t, recs in by_task.items()}
    elapsed = time.perf_counter() - t_all
    out = {"kind": "accuracy", "tasks": list(tasks), "split_layers": layers,
           "settings": [s.label for s in settings], "limit": limit, "results": results,
           "shared_context": shared,
           "timing": {"tasks": timing, "items": sum(len(r) for r in by_task.values()),
                      "scored": scored, "seconds": elapsed,
                      "items_per_s": scored / elapsed if elapsed else 0.0}}
    if record_items:
        out["records"] = by_task
    return out


def read_documents(path: Path, limit: int | None = None) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--perplexity {str(path)!r}: no such file (one document per line)")
    docs = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                docs.append(line.strip())
                if limit is not None and len(docs) >= limit:
                    break
    if not docs:
        raise ConfigError(f"{path}: no documents")
    return docs


def perplexity(model: Any, tokenizer: Any, path: Path, settings: Sequence[CodecSetting],
               split_layers: Sequence[int] = (1,), limit: int | None = None,
               max_tokens: int = 512, progress: bool = True,
               log: Callable[[str], None] | None = None, per_token: bool = False,
               records: Path | None = None) -> dict[str, Any]:
    """Teacher-forced perplexity and next-token top-1 agreement with the uncompressed model.

    Each document (one per line of ``path``, the first ``max_tokens`` tokens) is one sequence.
    By default the codec codes its whole (S, D) activation as one message: the prefill. That is
    not what a decode step sends, even for a row-wise codec whose rate control picks one step
    per message (``rotated``); ``per_token`` sends every token row as its own (1, D) message,
    exactly the decode-step payload (the mean bytes are then per token).

    Every compressed setting carries ``delta`` (Δppl in percent) and ``delta_ci95`` (its 95%
    interval, documents resampled in pairs); ``doc_nll`` (per document summed NLL, nats) and the
    top-level ``doc_tokens`` / ``doc_ref_nll`` keep what the interval is computed from.
    ``records``: a JSON-lines file that gets every document as it is scored (resumable).
    """
    from fc_edge.eval import stats

    if max_tokens < 2:
        raise ConfigError("--max-tokens must be >= 2")
    stack = LayerStack(model)
    layers = check_layers(stack, split_layers)
    encode, _ = _encoder(tokenizer)
    docs = read_documents(path, limit)
    sink = Records(records, {"kind": "perplexity", "file": Path(path).name,
                             "split_layers": layers, "settings": [s.label for s in settings],
                             "max_tokens": max_tokens, "per_token": per_token})
    recs: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    scored = 0
    try:
        with torch.inference_mode():
            for idx, doc in enumerate(_progress(docs, "perplexity", len(docs), progress)):
                rec = sink.get("", idx)
                if rec is None:
                    ids_list = encode(doc)[:max_tokens]
                    if len(ids_list) < 2:
                        continue
                    rec = {"idx": idx, **score_document(stack, model, ids_list, layers,
                                                         settings, per_token)}
                    sink.add(rec)
                    scored += 1
                recs.append(rec)
    finally:
        sink.close()
    dt = time.perf_counter() - t0
    n_tokens = sum(r["tokens"] for r in recs)
    if n_tokens == 0:
        raise ConfigError(f"{path}: no document has two or more tokens")
    ref_nll = [r["ref"] for r in recs]
    tokens = [r["tokens"] for r in recs]
    ref_ppl = math.exp(sum(ref_nll) / n_tokens)
    results: dict[str, Any] = {}
    for L in layers:
        per: dict[str, Any] = {}
        for s in settings:
            key = f"{L}:{s.label}"
            t = Tally()
            for r in recs:
                st = r["s"][key]
                t.add_bytes(st["bytes"], st["raw"], st["err"], st["fb"], st["seqs"])
            b = t.result()
            nll = [r["s"][key]["nll"] for r in recs]
            ppl = math.exp(sum(nll) / n_tokens)
            entry = {"codec": s.name, "config": s.config, "row_wise": s.row_wise,
                     "ppl": ppl, "agreement": sum(r["s"][key]["agree"] for r in recs) / n_tokens,
                     "bytes": b["bytes"], "raw_bytes": b["raw_bytes"],
                     "byte_ratio": b["byte_ratio"], "rel_error": b["rel_error"],
                     "budget_fallbacks": b["budget_fallbacks"],
                     "delta": 100 * (ppl / ref_ppl - 1), "doc_nll": nll}
            if s.codec is not None:
                entry["delta_ci95"] = [100 * v for v in stats.delta_ppl_ci(ref_nll, nll, tokens)]
            per[s.label] = entry
        results[str(L)] = per
    if log is not None:
        log(f"perplexity: {len(recs)} documents ({scored} scored now), {n_tokens} scored tokens "
            f"in {dt:.1f} s; uncompressed ppl {ref_ppl:.2f}")
    return {"kind": "perplexity", "file": str(path), "documents": len(recs), "tokens": n_tokens,
            "max_tokens": max_tokens, "split_layers": layers, "per_token": per_token,
            "settings": [s.label for s in settings], "reference_ppl": ref_ppl,
            "doc_tokens": tokens, "doc_ref_nll": ref_nll, "results": results,
            "timing": {"seconds": dt, "scored": scored,
                       "docs_per_s": scored / dt if dt else 0.0}}


def _nll(logits: Tensor, targets: Tensor) -> float:
    return float(-torch.log_softmax(logits.double(), -1).gather(1, targets.view(-1, 1)).sum())


@torch.inference_mode()
def score_document(stack: LayerStack, model: Any, ids_list: list[int], layers: Sequence[int],
                    settings: Sequence[CodecSetting], per_token: bool) -> dict[str, Any]:
    """One document: the reference NLL and, per setting, NLL, top-1 agreement and bytes."""
    ids = torch.tensor([ids_list])
    targets = ids[0, 1:]
    h, ctx, kept = _forward_keeping(stack, ids, layers)
    ref_logits = stack.logits(h)[0, :-1]
    ref_top = ref_logits.argmax(-1)
    d_nll = _nll(ref_logits, targets)
    S = ids.shape[1]
    out: dict[str, Any] = {"tokens": int(targets.numel()), "ref": d_nll, "s": {}}
    for L in layers:
        for s in settings:
            key = f"{L}:{s.label}"
            if s.codec is None:
                st = _raw_stats([1] * S if per_token else [S], stack.hidden_size, [])
                del st["ll"]
                out["s"][key] = {**st, "nll": d_nll, "agree": int(targets.numel())}
                continue
            s.bind(model, L)
            t = Tally()
            a_hat = send_rows(s, kept[L], [S], t, per_token)
            logits = stack.logits(stack.run(a_hat, ctx, L, stack.num_layers))[0, :-1]
            out["s"][key] = {"nll": _nll(logits, targets),
                             "agree": int((logits.argmax(-1) == ref_top).sum()),
                             "bytes": t.bytes_sent, "raw": t.raw_bytes, "err": t.error_sum,
                             "seqs": t.sequences, "fb": t.budget_fallbacks}
    return out
