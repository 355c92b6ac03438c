"""Accuracy and perplexity with a codec at the split, every setting in one pass over the data.

Per item, the choices go through the model as one right-padded batch. The uncompressed reference
runs once through all layers; on the way it keeps the activation after each requested split
layer L, and every codec setting then runs only layers[L:] on its reconstruction. The codec sees
each scored sequence's own (S, D) activation (S = that sequence's length, no padding) — exactly
what a device would send for that prompt. The final norm and lm_head run only at the
continuation positions.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fc_edge.errors import ConfigError
from fc_edge.eval.forward import LayerStack, pad_batch
from fc_edge.eval.scoring import ItemScore, Tally, mean_over_tasks
from fc_edge.eval.settings import CodecSetting, relative_error
from fc_edge.eval.tasks import encode_item, load_task


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
    kept: dict[int, Tensor] = {}
    prev = 0
    for L in layers:
        h = stack.run(h, ctx, prev, L)
        kept[L] = h
        prev = L
    return stack.run(h, ctx, prev, stack.num_layers), ctx, kept


def evaluate(model: Any, tokenizer: Any, tasks: Sequence[str], settings: Sequence[CodecSetting],
             split_layers: Sequence[int] = (1,), limit: int | None = None,
             data_dir: Path | None = None, max_len: int | None = 2048,
             progress: bool = True, log: Callable[[str], None] | None = None,
             record_items: bool = False) -> dict[str, Any]:
    """Multiple-choice scores of every (split layer, codec setting) on ``tasks``.

    Returns a JSON-ready dict: ``results[layer][label]["tasks"][task]`` -> metrics (``acc``,
    ``acc_norm``, ``agreement``, ``kl``, ``bytes``, ...) and ``["mean"]`` over tasks, plus per
    task the item count and items per second. ``record_items`` also keeps every item's
    per-choice log-likelihoods: ``results[layer][label]["items"][task]`` -> list of lists.
    """
    stack = LayerStack(model)
    layers = check_layers(stack, split_layers)
    encode, eos = _encoder(tokenizer)
    pad_id = eos if eos is not None else 0
    tallies: dict[tuple[int, str, str], Tally] = {}
    timing: dict[str, dict[str, float]] = {}
    t_all = time.perf_counter()
    for task in tasks:
        items = load_task(task, data_dir, limit)
        t0 = time.perf_counter()
        ref_tally = Tally()
        for L in layers:
            for s in settings:
                tallies[(L, s.label, task)] = Tally()
        with torch.inference_mode():
            for item in _progress(items, task, len(items), progress):
                enc = encode_item(item, encode, prefix_id=eos, max_len=max_len)
                ids, lengths = pad_batch(enc.sequences, pad_id)
                rows, cols, toks, counts = _gather_targets(ids, lengths, enc.starts)
                h, ctx, kept = _forward_keeping(stack, ids, layers)
                ref = ItemScore(_logliks(stack, h, rows, cols, toks, counts),
                                list(enc.cont_bytes), item.label)
                ref_tally.add(ref, ref)
                for L in layers:
                    for s in settings:
                        s.bind(model, L)
                        t = tallies[(L, s.label, task)]
                        if s.codec is None:
                            t.add(ref, ref)
                            if record_items:
                                t.items.append(ref.logliks)
                            for n in lengths:
                                t.add_bytes(n * stack.hidden_size * 4, n * stack.hidden_size * 4,
                                            0.0)
                            continue
                        a_hat = send_rows(s, kept[L], lengths, t)
                        hh = stack.run(a_hat, ctx, L, stack.num_layers)
                        score = ItemScore(_logliks(stack, hh, rows, cols, toks, counts),
                                          list(enc.cont_bytes), item.label)
                        t.add(score, ref)
                        if record_items:
                            t.items.append(score.logliks)
        dt = time.perf_counter() - t0
        timing[task] = {"items": len(items), "seconds": dt, "items_per_s": len(items) / dt}
        ref_r = ref_tally.result()
        if log is not None:
            log(f"{task}: {len(items)} items in {dt:.1f} s ({len(items) / dt:.2f} items/s), "
                f"uncompressed acc {ref_r['acc']:.3f} acc_norm {ref_r['acc_norm']:.3f}")
    results: dict[str, Any] = {}
    for L in layers:
        per_layer: dict[str, Any] = {}
        for s in settings:
            per_task = {task: tallies[(L, s.label, task)].result() for task in tasks}
            per_layer[s.label] = {"codec": s.name, "config": s.config, "row_wise": s.row_wise,
                                  "tasks": per_task, "mean": mean_over_tasks(per_task)}
            if record_items:
                per_layer[s.label]["items"] = {task: tallies[(L, s.label, task)].items
                                               for task in tasks}
        results[str(L)] = per_layer
    total_items = sum(t["items"] for t in timing.values())
    elapsed = time.perf_counter() - t_all
    return {"kind": "accuracy", "tasks": list(tasks), "split_layers": layers,
            "settings": [s.label for s in settings], "limit": limit, "results": results,
            "timing": {"tasks": timing, "items": total_items, "seconds": elapsed,
                       "items_per_s": total_items / elapsed if elapsed else 0.0}}


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
               log: Callable[[str], None] | None = None, per_token: bool = False
               ) -> dict[str, Any]:
    """Teacher-forced perplexity and next-token top-1 agreement with the uncompressed model.

    Each document (one per line of ``path``, the first ``max_tokens`` tokens) is one sequence;
    the codec is applied to its whole (S, D) activation at the split. For a row-wise codec this is
    what the server sees at every decode step only if its coding of a row does not depend on the
    block around it; ``per_token`` sends every token row as its own (1, D) message instead, which
    is exactly the decode-step payload for any codec (the mean bytes are then per token).
    """
    if max_tokens < 2:
        raise ConfigError("--max-tokens must be >= 2")
    stack = LayerStack(model)
    layers = check_layers(stack, split_layers)
    encode, _ = _encoder(tokenizer)
    docs = read_documents(path, limit)
    nll: dict[tuple[int, str], float] = {}
    agree: dict[tuple[int, str], int] = {}
    tallies: dict[tuple[int, str], Tally] = {}
    for L in layers:
        for s in settings:
            nll[(L, s.label)] = 0.0
            agree[(L, s.label)] = 0
            tallies[(L, s.label)] = Tally()
    ref_nll, n_tokens, n_docs = 0.0, 0, 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for doc in _progress(docs, "perplexity", len(docs), progress):
            ids_list = encode(doc)[:max_tokens]
            if len(ids_list) < 2:
                continue
            n_docs += 1
            ids = torch.tensor([ids_list])
            targets = ids[0, 1:]
            h, ctx, kept = _forward_keeping(stack, ids, layers)
            ref_logits = stack.logits(h)[0, :-1]
            ref_top = ref_logits.argmax(-1)
            d_nll = float(-torch.log_softmax(ref_logits.double(), -1).gather(
                1, targets.view(-1, 1)).sum())
            ref_nll += d_nll
            n_tokens += targets.numel()
            S = ids.shape[1]
            for L in layers:
                for s in settings:
                    s.bind(model, L)
                    key = (L, s.label)
                    if s.codec is None:
                        nll[key] += d_nll
                        agree[key] += targets.numel()
                        for n in ([1] * S if per_token else [S]):
                            tallies[key].add_bytes(n * stack.hidden_size * 4,
                                                   n * stack.hidden_size * 4, 0.0)
                        continue
                    a_hat = send_rows(s, kept[L], [S], tallies[key], per_token)
                    logits = stack.logits(stack.run(a_hat, ctx, L, stack.num_layers))[0, :-1]
                    nll[key] += float(-torch.log_softmax(logits.double(), -1).gather(
                        1, targets.view(-1, 1)).sum())
                    agree[key] += int((logits.argmax(-1) == ref_top).sum())
    dt = time.perf_counter() - t0
    if n_tokens == 0:
        raise ConfigError(f"{path}: no document has two or more tokens")
    results: dict[str, Any] = {}
    for L in layers:
        per: dict[str, Any] = {}
        for s in settings:
            key = (L, s.label)
            b = tallies[key].result()
            per[s.label] = {"codec": s.name, "config": s.config, "row_wise": s.row_wise,
                            "ppl": math.exp(nll[key] / n_tokens),
                            "agreement": agree[key] / n_tokens,
                            "bytes": b["bytes"], "raw_bytes": b["raw_bytes"],
                            "byte_ratio": b["byte_ratio"], "rel_error": b["rel_error"],
                            "budget_fallbacks": b["budget_fallbacks"]}
        results[str(L)] = per
    if log is not None:
        log(f"perplexity: {n_docs} documents, {n_tokens} scored tokens in {dt:.1f} s; "
            f"uncompressed ppl {math.exp(ref_nll / n_tokens):.2f}")
    return {"kind": "perplexity", "file": str(path), "documents": n_docs, "tokens": n_tokens,
            "max_tokens": max_tokens, "split_layers": layers, "per_token": per_token,
            "settings": [s.label for s in settings], "reference_ppl": math.exp(ref_nll / n_tokens),
            "results": results,
            "timing": {"seconds": dt, "docs_per_s": n_docs / dt if dt else 0.0}}
