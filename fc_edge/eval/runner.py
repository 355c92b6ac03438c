"""Accuracy and perplexity with a codec at the split, every setting in one pass over the data.

Items are scored in groups (:func:`score_items`): the choices of an item that share a context are
one packed tree (the context once, each continuation a branch), and the trees of many items share
forward batches. The uncompressed reference runs once through all layers; on the way it keeps
the activation after each requested split layer L, and every codec setting then runs only
layers[L:] on its reconstruction. The codec sees each scored sequence's own (S, D) activation
(S = that sequence's length, no padding) — exactly what a device would send for that prompt. The
final norm and lm_head run only at the rows that predict continuation tokens.
:func:`score_item_per_choice` (every choice's whole sequence, item by item) is the slower
reference path the tests compare with.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fc_edge.errors import ConfigError
from fc_edge.eval.forward import LayerStack, Tree, pad_batch
from fc_edge.eval.scoring import ItemScore, Tally, mean_over_tasks
from fc_edge.eval.settings import CodecSetting, relative_error
from fc_edge.eval.tasks import Encoded, encode_item, load_task


def _progress(iterable: Any, desc: str, total: int | None, enabled: bool) -> Any:
    """``iterable`` under a progress bar (or a bar to update by hand when ``iterable`` is None);
    ``iterable`` itself / None when not ``enabled``."""
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
    lp = torch.log_softmax(logits.double(), dim=-1).cpu().gather(1, toks.view(-1, 1)).view(-1)
    return [float(x.sum()) for x in lp.split(counts)]


def send_rows(setting: CodecSetting, h: Tensor, lengths: Sequence[int], tally: Tally | None,
              per_token: bool = False, ids: Tensor | None = None) -> Tensor:
    """Each batch row's unpadded (S_i, D) activation through the codec as one message (the
    prefill), or with ``per_token`` each (1, D) token row as its own message (the decode steps);
    the padded tail is kept."""
    out = h.clone()
    for r, n in enumerate(lengths):
        blocks = [(i, i + 1) for i in range(n)] if per_token else [(0, n)]
        for a, b in blocks:
            x = h[r, a:b]
            # a decode step's row comes with its token (the server sampled it): ``ids``
            x_hat, nbytes, fell_back = setting.send(
                x, ids[r, a:b] if per_token and ids is not None else None)
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


def _run_keeping(stack: Any, h: Tensor, ctx: Any, layers: Sequence[int]
                 ) -> tuple[Tensor, dict[int, Tensor]]:
    """All layers over h, keeping the activation after each split layer in ``layers``."""
    kept: dict[int, Tensor] = {}
    prev = 0
    for L in layers:
        h = stack.run(h, ctx, prev, L)
        kept[L] = h
        prev = L
    return stack.run(h, ctx, prev, stack.num_layers), kept


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
    for L, s, (st,) in _codec_settings(stack, model, layers, settings, [(lengths, out)]):
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
                    settings: Sequence[CodecSetting],
                    items: Sequence[tuple[Sequence[int], dict[str, Any]]]) -> Any:
    """Fill each item's ``out["s"]`` for the uncompressed settings (the reference's
    log-likelihoods, float32 bytes); ``items``: (sequence lengths, out) per item. Yield (layer,
    setting, each item's fresh stats dict, already in its ``out``) for each codec, bound to the
    model at that layer."""
    for L in layers:
        for s in settings:
            key = f"{L}:{s.label}"
            if s.codec is None:
                for lengths, out in items:
                    out["s"][key] = _raw_stats(lengths, stack.hidden_size, out["ref"])
                continue
            s.bind(model, L)
            stats = []
            for _, out in items:
                out["s"][key] = st = _new_stats()
                stats.append(st)
            yield L, s, stats


@dataclass
class _Group:
    """Choices of item ``item`` scored in one tree: ``members`` (choice indices) share the first
    ``prefix`` rows of their sequences (the same context tokens for the reference; the same
    coded rows for a codec), each continuation a branch."""

    item: int
    members: list[int]
    prefix: int
    conts: list[list[int]]  # each member's continuation tokens

    def tree(self, full: bool) -> Tree:
        """Every token (``full``: the rows a device codes) or all but each continuation's last:
        that token's output predicts nothing scored, so the scoring pass leaves it out."""
        return Tree(self.prefix, tuple(len(c) - (0 if full else 1) for c in self.conts))

    def branch_rows(self, j: int) -> slice:
        """Rows of member j's continuation in the full tree."""
        a = self.tree(True).branch_start(j)
        return slice(a, a + len(self.conts[j]))

    def scoring_rows(self, full: Tensor) -> Tensor:
        """The rows of :meth:`tree` (``full`` False) taken from the full tree's rows."""
        return torch.cat([full[: self.prefix]]
                         + [full[self.branch_rows(j)][:-1] for j in range(len(self.conts))])


def _group_logliks(stack: LayerStack, groups: Sequence[_Group], finals: Sequence[Tensor],
                   chunk: int = 256) -> list[list[float]]:
    """Each member's summed continuation log-probability from its group's scoring pass (rows of
    ``group.tree(False)``): the first token from the prefix's last row, token t from the row of
    token t - 1 in the member's branch."""
    sel, toks, owner = [], [], []
    base = 0
    for g, grp in enumerate(groups):
        tree = grp.tree(False)
        first = base + grp.prefix - 1
        for j, cont in enumerate(grp.conts):
            a = base + tree.branch_start(j)
            sel.extend([first, *range(a, a + len(cont) - 1)])
            toks.extend(cont)
            owner.extend([(g, j)] * len(cont))
        base += tree.rows
    hidden = torch.cat(list(finals))
    uniq, inverse = torch.unique(torch.as_tensor(sel), return_inverse=True)
    lp = torch.empty(len(sel), dtype=torch.float64)
    tok = torch.as_tensor(toks)
    for a in range(0, len(uniq), chunk):
        rows = uniq[a: a + chunk]
        logp = torch.log_softmax(stack.logits(hidden[rows.to(hidden.device)]).double(), -1).cpu()
        hit = (inverse >= a) & (inverse < a + len(rows))
        lp[hit] = logp[inverse[hit] - a, tok[hit]]
    out = [[0.0] * len(grp.conts) for grp in groups]
    for (g, j), v in zip(owner, lp.tolist(), strict=True):
        out[g][j] += v
    return out


@torch.inference_mode()
def score_items(stack: LayerStack, model: Any, encs: Sequence[Encoded], layers: Sequence[int],
                settings: Sequence[CodecSetting], batch_tokens: int = 256
                ) -> list[dict[str, Any]]:
    """Several items at once, each shared context run once (the same result as
    :func:`score_item_per_choice` item by item, up to float rounding).

    The choices of an item that share a context are one tree: the context once and each
    continuation as a branch that sees the context and itself only (:class:`Tree`), and the
    trees of all the items are packed into batches of ``batch_tokens`` rows. The reference runs
    every token to the deepest split layer (those are the rows a device codes), then all but
    each continuation's last token to the end. A codec still codes each choice's whole (S, D)
    sequence as one message, exactly as the device would send it; choices whose coded context
    rows are bit-identical (all of them for a codec that codes rows on their own with a fixed
    quantizer; those whose rate control picked the same step for ``rotated``) share a tree
    again, the others (all of them for whole-block codecs) are trees of their own.
    """
    N, top = stack.num_layers, max(layers)
    groups: list[_Group] = []
    for it, enc in enumerate(encs):
        by_ctx: dict[tuple[int, ...], list[int]] = {}
        for i, (seq, st) in enumerate(zip(enc.sequences, enc.starts, strict=True)):
            by_ctx.setdefault(tuple(seq[:st]), []).append(i)
        for ctx_ids, members in by_ctx.items():
            c = len(ctx_ids)
            groups.append(_Group(it, members, c, [list(enc.sequences[i][c:]) for i in members]))
    ids = torch.cat([torch.tensor(list(encs[g.item].sequences[g.members[0]][: g.prefix])
                                  + [t for cont in g.conts for t in cont]) for g in groups])
    emb = stack.base.embed_tokens(ids.to(stack.device))
    full = [g.tree(True) for g in groups]
    top_rows, kept = stack.run_trees(list(emb.split([t.rows for t in full])), full, 0, top,
                                     keep=layers, batch_tokens=batch_tokens)
    finals, _ = stack.run_trees([g.scoring_rows(h) for g, h in zip(groups, top_rows,
                                                                     strict=True)],
                                [g.tree(False) for g in groups], top, N,
                                batch_tokens=batch_tokens)
    outs: list[dict[str, Any]] = [{"ref": [0.0] * len(e.sequences), "s": {}} for e in encs]
    of_item: list[list[_Group]] = [[] for _ in encs]
    for g in groups:
        of_item[g.item].append(g)
    for g, lls in zip(groups, _group_logliks(stack, groups, finals), strict=True):
        for i, v in zip(g.members, lls, strict=True):
            outs[g.item]["ref"][i] = v
    # each choice's whole activation after split layer L: its context rows + its branch rows
    acts: dict[int, list[list[Tensor]]] = {
        L: [[torch.empty(0)] * len(e.sequences) for e in encs] for L in layers}
    for L in layers:
        for g, h in zip(groups, kept[L], strict=True):
            for j, i in enumerate(g.members):
                acts[L][g.item][i] = torch.cat([h[: g.prefix], h[g.branch_rows(j)]])
    lengths = [[len(q) for q in e.sequences] for e in encs]
    coded_groups: dict[int, list[_Group]] = {L: [] for L in layers}
    inputs: dict[int, list[Tensor]] = {L: [] for L in layers}
    owners: dict[int, list[dict[str, Any]]] = {L: [] for L in layers}
    for L, s, stats in _codec_settings(stack, model, layers, settings,
                                       list(zip(lengths, outs, strict=True))):
        for it, st in enumerate(stats):
            st["ll"] = [0.0] * len(lengths[it])
            coded = []
            for x in acts[L][it]:
                x_hat, nbytes, fb = s.send(x)
                coded.append(x_hat)
                _count(st, x, x_hat, nbytes, fb)
            for g in of_item[it]:
                for sub in _identical_prefixes(coded, g):
                    coded_groups[L].append(sub)
                    inputs[L].append(torch.cat([coded[sub.members[0]][: sub.prefix]] + [
                        coded[i][sub.prefix: -1] for i in sub.members]))
                    owners[L].append(st)
    for L in layers:
        if not coded_groups[L]:
            continue
        finals, _ = stack.run_trees(inputs[L], [g.tree(False) for g in coded_groups[L]], L, N,
                                    batch_tokens=batch_tokens)
        for g, st, lls in zip(coded_groups[L], owners[L],
                              _group_logliks(stack, coded_groups[L], finals), strict=True):
            for i, v in zip(g.members, lls, strict=True):
                st["ll"][i] = v
    return outs


def _identical_prefixes(coded: Sequence[Tensor], g: _Group) -> list[_Group]:
    """``g``'s members split into groups whose coded context rows are bit-identical."""
    subs: list[_Group] = []
    for j, i in enumerate(g.members):
        for sub in subs:
            if torch.equal(coded[sub.members[0]][: g.prefix], coded[i][: g.prefix]):
                sub.members.append(i)
                sub.conts.append(g.conts[j])
                break
        else:
            subs.append(_Group(g.item, [i], g.prefix, [g.conts[j]]))
    return subs


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
            if not lines[-1].endswith("\n"):  # cut by an interrupted run: scored again
                with open(path, "r+b") as f:
                    f.truncate(path.stat().st_size - len(lines.pop().encode("utf-8")))
            for line in lines[1:]:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a damaged line: that item is scored again
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
             shared_context: bool = True, batch_items: int = 32,
             batch_tokens: int = 256) -> dict[str, Any]:
    """Multiple-choice scores of every (split layer, codec setting) on ``tasks``.

    Returns a JSON-ready dict: ``results[layer][label]["tasks"][task]`` -> metrics (``acc``,
    ``acc_norm``, their lm-eval standard errors, ``agreement``, ``kl``, ``bytes``, ...) and
    ``["mean"]`` over tasks; each compressed setting also carries ``delta`` and ``delta_ci95``
    (mean acc change in points and its 95% interval), ``mcnemar_p`` and ``stats`` (see
    :mod:`fc_edge.eval.stats`). ``record_items`` adds the per-item records (``items[task]``:
    label, choice lengths, per setting the per-choice log-likelihoods and bytes).
    ``records``: a JSON-lines file that gets every item as it is scored; a run given the same
    file again skips the items already there (resume). ``shared_context`` (default) scores
    ``batch_items`` items at a time, each shared context run once, in forward batches of
    ``batch_tokens`` rows (:func:`score_items`); False runs every choice's whole sequence, item
    by item (:func:`score_item_per_choice`, the slower reference path).
    """
    stack = LayerStack(model)
    layers = check_layers(stack, split_layers)
    encode, eos = _encoder(tokenizer)
    pad_id = eos if eos is not None else 0
    if batch_items < 1 or batch_tokens < 1:
        raise ConfigError("--batch-items and --batch-tokens must be >= 1")
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
            new = 0
            done = {idx: sink.get(task, idx) for idx in range(len(items))}
            todo = [idx for idx, rec in done.items() if rec is None]
            bar = _progress(None, task, len(items), progress)
            if bar is not None:
                bar.update(len(items) - len(todo))
            step = batch_items if shared_context else 1
            for a in range(0, len(todo), step):
                chunk = todo[a: a + step]
                encs = [encode_item(items[i], encode, prefix_id=eos, max_len=max_len)
                        for i in chunk]
                got = (score_items(stack, model, encs, layers, settings, batch_tokens)
                       if shared_context else
                       [score_item_per_choice(stack, model, encs[0], layers, settings, pad_id)])
                for idx, enc, g in zip(chunk, encs, got, strict=True):
                    item = items[idx]
                    done[idx] = rec = {"task": task, "idx": idx, "id": item.id,
                                       "label": item.label, "chars": list(enc.cont_chars), **g}
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
           "shared_context": shared_context,
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
    lp = torch.log_softmax(logits.double(), -1)
    return float(-lp.gather(1, targets.to(lp.device).view(-1, 1)).sum())


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
            a_hat = send_rows(s, kept[L], [S], t, per_token, ids)
            logits = stack.logits(stack.run(a_hat, ctx, L, stack.num_layers))[0, :-1]
            out["s"][key] = {"nll": _nll(logits, targets),
                             "agree": int((logits.argmax(-1) == ref_top).sum()),
                             "bytes": t.bytes_sent, "raw": t.raw_bytes, "err": t.error_sum,
                             "seqs": t.sequences, "fb": t.budget_fallbacks}
    return out
