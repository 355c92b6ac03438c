"""`fc-edge eval --perplexity`: teacher-forced perplexity with a codec at the split.

Each document is one sequence. By default a codec codes its whole (S, D) activation as one
message, the prefill; with ``per_token`` every token row is its own (1, D) message, exactly the
payload of a decode step (:func:`send_decode_rows`).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fc_edge.errors import ConfigError
from fc_edge.eval.forward import LayerStack
from fc_edge.eval.multiple_choice import send_whole, setting_key
from fc_edge.eval.progress import progress_bar
from fc_edge.eval.records import Records, provenance
from fc_edge.eval.scoring import Traffic
from fc_edge.eval.settings import CodecSetting, relative_error
from fc_edge.eval.tasks import token_encoder

#: Which documents of a texts file to score: all of them, or one part of
#: :func:`fc_edge.paths.split_documents` (``evaluation``: the first 400 of dev.txt, the ones
#: every published perplexity figure uses; nothing is calibrated on them).
PARTS = ("all", "evaluation", "tuning", "calibration")


def read_documents(path: Path | None = None, part: str = "all", limit: int | None = None
                   ) -> list[str]:
    """The documents (one per non-empty line, stripped) of ``path`` (default: the shared
    ``texts/dev.txt``), only ``part`` of them (:data:`PARTS`), the first ``limit``."""
    from fc_edge.paths import read_texts, shared_dir, split_documents

    path = Path(path) if path is not None else shared_dir() / "texts" / "dev.txt"
    if not path.is_file():
        raise ConfigError(f"--perplexity {str(path)!r}: no such file (one document per line)")
    if part not in PARTS:
        raise ConfigError(f"--documents must be one of {', '.join(PARTS)}, got {part!r}")
    if limit is not None and limit < 1:
        raise ConfigError("--limit must be >= 1")
    docs = read_texts(path)
    if part != "all":
        try:
            docs = split_documents(docs)[part]
        except ValueError as e:
            raise ConfigError(f"{path}: {e} (--documents {part} needs the layout of "
                              "texts/dev.txt; give --documents all)") from None
    docs = docs[:limit] if limit else docs
    if not docs:
        raise ConfigError(f"{path}: no documents")
    return docs


def text_id(text: str) -> str:
    """A short digest of a document's text: records keep it, and copies of one text are one
    cluster of the bootstrap."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def send_decode_row(setting: CodecSetting, row: Tensor, token_id: int, traffic: Traffic
                    ) -> Tensor:
    """One decode step's message: ``row`` (1, D), the activation of token ``token_id`` (the
    token the server sampled the step before, so both ends know it), through the codec;
    counted in ``traffic``. Returns the reconstruction (1, D)."""
    x_hat, nbytes, fell_back = setting.send(row)
    traffic.add(nbytes, row.numel() * 4, relative_error(row, x_hat), fell_back)
    return x_hat


def send_decode_rows(setting: CodecSetting, x: Tensor, token_ids: Sequence[int],
                     traffic: Traffic) -> Tensor:
    """A sequence's activation x (S, D) as S decode steps, row i the message of token
    ``token_ids[i]`` (:func:`send_decode_row`). Returns the reconstruction (S, D)."""
    if len(token_ids) != x.shape[0]:
        raise ValueError(f"{x.shape[0]} rows but {len(token_ids)} token ids")
    out = torch.empty_like(x)
    for i, t in enumerate(token_ids):
        out[i: i + 1] = send_decode_row(setting, x[i: i + 1], int(t), traffic)
    return out


def _nll(logits: Tensor, targets: Tensor) -> float:
    lp = torch.log_softmax(logits.double(), -1)
    return float(-lp.gather(1, targets.to(lp.device).view(-1, 1)).sum())


@torch.inference_mode()
def score_document(stack: LayerStack, model: Any, ids_list: list[int], layers: Sequence[int],
                   settings: Sequence[CodecSetting], per_token: bool) -> dict[str, Any]:
    """One document (token ids, at least 2): the reference NLL (nats, summed over the scored
    tokens 1..S-1) and, per ``"L:label"``, NLL, next-token top-1 agreement with the reference
    (a count) and the messages sent (:class:`Traffic`'s record keys)."""
    ids = torch.tensor([ids_list])
    targets = ids[0, 1:]
    h, ctx, kept = stack.forward_keeping(ids, layers)
    ref_logits = stack.logits(h)[0, :-1]
    ref_top = ref_logits.argmax(-1)
    d_nll = _nll(ref_logits, targets)
    S = ids.shape[1]
    out: dict[str, Any] = {"tokens": int(targets.numel()), "ref": d_nll, "s": {}}
    for L in layers:
        for s in settings:
            key = setting_key(L, s)
            if s.codec is None:
                t = Traffic.uncompressed([1] * S if per_token else [S], stack.hidden_size)
                out["s"][key] = {"nll": d_nll, "agree": int(targets.numel()), **t.record()}
                continue
            s.bind(model, L)
            t = Traffic()
            x = kept[L][0]
            x_hat = (send_decode_rows(s, x, ids_list, t) if per_token else send_whole(s, x, t))
            logits = stack.logits(stack.run(x_hat[None], ctx, L, stack.num_layers))[0, :-1]
            out["s"][key] = {"nll": _nll(logits, targets),
                             "agree": int((logits.argmax(-1) == ref_top).sum()), **t.record()}
    return out


def perplexity(model: Any, tokenizer: Any, path: Path | None, settings: Sequence[CodecSetting],
               split_layers: Sequence[int] = (1,), limit: int | None = None,
               max_tokens: int = 512, progress: bool = True,
               log: Callable[[str], None] | None = None, per_token: bool = False,
               records: Path | None = None, documents: str = "all") -> dict[str, Any]:
    """Teacher-forced perplexity and next-token top-1 agreement with the uncompressed model on
    the ``documents`` part (:data:`PARTS`) of ``path`` (one document per line; the first
    ``max_tokens`` tokens of each; the first ``limit`` documents).

    Every compressed setting carries ``delta`` (Δppl in percent) and ``delta_ci95`` (its 95%
    interval, resampling documents in pairs, copies of one text as one cluster); ``doc_nll``
    (per document summed NLL, nats) and the top-level ``doc_tokens`` / ``doc_ref_nll`` /
    ``doc_text`` keep what the interval is computed from. ``records``: a JSON-lines file that
    gets every document as it is scored (resumable). ``provenance`` / ``sessions`` as in
    :func:`fc_edge.eval.accuracy.evaluate`.
    """
    from fc_edge.codecs import wire
    from fc_edge.eval import stats
    from fc_edge.paths import shared_dir

    if max_tokens < 2:
        raise ConfigError("--max-tokens must be >= 2")
    stack = LayerStack(model)
    layers = stack.split_layers(split_layers)
    encode, _ = token_encoder(tokenizer)
    path = Path(path) if path is not None else shared_dir() / "texts" / "dev.txt"
    docs = read_documents(path, documents, limit)
    prov = provenance([path])
    sink = Records(records, {"kind": "perplexity", "file": path.name, "documents": documents,
                             "split_layers": layers, "settings": [s.label for s in settings],
                             "max_tokens": max_tokens, "per_token": per_token,
                             "wire_version": wire.VERSION}, prov)
    recs: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    scored = 0
    try:
        for idx, doc in enumerate(progress_bar(docs, "perplexity", len(docs), progress,
                                               unit="doc")):
            rec = sink.get("", idx)
            tid = text_id(doc)
            if rec is not None and rec.get("text", tid) != tid:
                raise ConfigError(f"{records}: document {idx} is another text than in the "
                                  "records; give another --records file")
            if rec is None:
                ids_list = encode(doc)[:max_tokens]
                if len(ids_list) < 2:
                    continue
                rec = {"idx": idx, "text": tid,
                       **score_document(stack, model, ids_list, layers, settings, per_token)}
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
    texts = [r.get("text", text_id(docs[r["idx"]])) for r in recs]
    ref_ppl = math.exp(sum(ref_nll) / n_tokens)
    results: dict[str, Any] = {}
    for L in layers:
        per: dict[str, Any] = {}
        for s in settings:
            key = setting_key(L, s)
            t = Traffic()
            for r in recs:
                t.merge(Traffic.from_record(r["s"][key]))
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
                entry["delta_ci95"] = [100 * v for v in stats.delta_ppl_ci(
                    ref_nll, nll, tokens, clusters=texts)]
            per[s.label] = entry
        results[str(L)] = per
    if log is not None:
        log(f"perplexity: {len(recs)} documents ({scored} scored now), {n_tokens} scored tokens "
            f"in {dt:.1f} s; uncompressed ppl {ref_ppl:.2f}")
    keys = {("", int(r["idx"])) for r in recs}
    return {"kind": "perplexity", "file": str(path), "documents_part": documents,
            "documents": len(recs), "distinct_texts": len(set(texts)), "tokens": n_tokens,
            "max_tokens": max_tokens, "split_layers": layers, "per_token": per_token,
            "settings": [s.label for s in settings], "reference_ppl": ref_ppl,
            "doc_tokens": tokens, "doc_ref_nll": ref_nll, "doc_text": texts,
            "results": results, "provenance": prov, "sessions": sink.sessions(keys),
            "timing": {"seconds": dt, "scored": scored,
                       "docs_per_s": scored / dt if dt else 0.0}}
