"""Scoring conventions (lm-evaluation-harness) as small pure functions over log-likelihoods.

* ``loglik``: the summed log-probability of a choice's continuation tokens, each predicted by the
  logits one position earlier.
* ``acc``: the choice with the highest summed log-likelihood is right.
* ``acc_norm``: the same after dividing each log-likelihood by the choice's length in characters
  (lm-evaluation-harness: ``len(choice)`` of the Python string).
* agreement with the uncompressed model: the two ``acc`` choices are the same.
* KL: ``KL(p_ref || p_codec)`` (nats) of the choice distributions ``softmax(logliks)``.

Ties go to the first choice (``argmax``), as in lm-evaluation-harness (numpy ``argmax``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


def continuation_loglik(logits: Tensor, tokens: Tensor) -> float:
    """Summed log-probability of ``tokens`` (T,) long under ``logits`` (T, V), where row t holds
    the logits that predict ``tokens[t]`` (i.e. taken at the position before it)."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    return float(logp.gather(1, tokens.view(-1, 1).long()).sum())


def choose(logliks: Sequence[float]) -> int:
    """Index of the largest value; the first on ties."""
    best = 0
    for i, v in enumerate(logliks):
        if v > logliks[best]:
            best = i
    return best


def choice_distribution(logliks: Sequence[float]) -> list[float]:
    """``softmax(logliks)`` in float64 (the model's distribution over the choices)."""
    m = max(logliks)
    e = [math.exp(v - m) for v in logliks]
    z = sum(e)
    return [v / z for v in e]


def kl_divergence(ref: Sequence[float], other: Sequence[float]) -> float:
    """``KL(softmax(ref) || softmax(other))`` in nats, >= 0."""
    p = choice_distribution(ref)
    mq = max(other)
    log_zq = mq + math.log(sum(math.exp(v - mq) for v in other))
    mr = max(ref)
    log_zr = mr + math.log(sum(math.exp(v - mr) for v in ref))
    out = 0.0
    for pi, r, o in zip(p, ref, other, strict=True):
        if pi > 0:
            out += pi * ((r - log_zr) - (o - log_zq))
    return max(out, 0.0)


@dataclass
class ItemScore:
    """One item under one setting: the per-choice log-likelihoods and what they decide."""

    logliks: list[float]
    cont_chars: list[int]
    label: int

    @property
    def pred(self) -> int:
        return choose(self.logliks)

    @property
    def pred_norm(self) -> int:
        return choose([v / max(n, 1) for v, n in zip(self.logliks, self.cont_chars, strict=True)])

    @property
    def acc(self) -> float:
        return float(self.pred == self.label)

    @property
    def acc_norm(self) -> float:
        return float(self.pred_norm == self.label)


@dataclass
class Traffic:
    """The messages one setting sent (for an item, a document or a whole task): how many, their
    bytes on the wire and as float32, their summed relative error ``||A - Â|| / ||A||``, and how
    many the codec could not code at its budget (sent as float16 instead, counted at that size).

    A records file keeps it per item under the keys of :meth:`record` (``bytes``, ``raw``,
    ``err``, ``seqs``, ``fb``), the format of every run so far.
    """

    messages: int = 0
    sent: int = 0          # bytes on the wire
    raw: int = 0           # float32 bytes of the same activations
    error_sum: float = 0.0
    fallbacks: int = 0

    def add(self, sent: int, raw: int, rel_error: float, fell_back: bool = False) -> None:
        """One message of ``sent`` bytes (``raw`` as float32) with relative error ``rel_error``."""
        self.messages += 1
        self.sent += int(sent)
        self.raw += int(raw)
        self.error_sum += float(rel_error)
        self.fallbacks += int(fell_back)

    def merge(self, other: Traffic) -> None:
        self.messages += other.messages
        self.sent += other.sent
        self.raw += other.raw
        self.error_sum += other.error_sum
        self.fallbacks += other.fallbacks

    @classmethod
    def uncompressed(cls, rows: Sequence[int], hidden: int) -> Traffic:
        """Messages of ``rows[i]`` float32 rows of ``hidden`` values each, sent as they are."""
        raw = sum(int(n) * hidden * 4 for n in rows)
        return cls(messages=len(rows), sent=raw, raw=raw)

    def record(self) -> dict[str, int | float]:
        return {"bytes": self.sent, "raw": self.raw, "err": self.error_sum,
                "seqs": self.messages, "fb": self.fallbacks}

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> Traffic:
        return cls(messages=int(rec["seqs"]), sent=int(rec["bytes"]), raw=int(rec["raw"]),
                   error_sum=float(rec["err"]), fallbacks=int(rec["fb"]))

    def result(self) -> dict[str, float | int]:
        s = max(self.messages, 1)
        return {
            "bytes": self.sent / s,            # mean bytes sent per message
            "raw_bytes": self.raw / s,         # mean float32 bytes per message
            "byte_ratio": self.raw / self.sent if self.sent else 1.0,
            "rel_error": self.error_sum / s,
            "sequences": self.messages,
            "budget_fallbacks": self.fallbacks,
        }


@dataclass
class Tally:
    """Running sums over the items of one (task, setting); :meth:`result` gives the means."""

    n: int = 0
    acc: float = 0.0
    acc_norm: float = 0.0
    agree: float = 0.0
    agree_norm: float = 0.0
    kl: float = 0.0
    traffic: Traffic = field(default_factory=Traffic)

    def add(self, score: ItemScore, ref: ItemScore | None) -> None:
        self.n += 1
        self.acc += score.acc
        self.acc_norm += score.acc_norm
        if ref is not None:
            self.agree += float(score.pred == ref.pred)
            self.agree_norm += float(score.pred_norm == ref.pred_norm)
            self.kl += kl_divergence(ref.logliks, score.logliks)

    def result(self) -> dict[str, float | int]:
        n = max(self.n, 1)
        return {
            "n": self.n,
            "acc": self.acc / n,
            "acc_norm": self.acc_norm / n,
            "agreement": self.agree / n,
            "agreement_norm": self.agree_norm / n,
            "kl": self.kl / n,
            **self.traffic.result(),
        }


METRICS = ("acc", "acc_norm", "agreement", "agreement_norm", "kl", "bytes", "raw_bytes",
           "byte_ratio", "rel_error")


def mean_over_tasks(per_task: dict[str, dict[str, float | int]]) -> dict[str, float]:
    """Unweighted mean of each metric over tasks (the paper's "Avg." column)."""
    out: dict[str, float] = {}
    if not per_task:
        return out
    for key in METRICS:
        vals = [float(r[key]) for r in per_task.values() if key in r]
        if vals:
            out[key] = sum(vals) / len(vals)
    out["n"] = sum(int(r.get("n", 0)) for r in per_task.values())
    raw = sum(float(r["raw_bytes"]) * int(r["sequences"]) for r in per_task.values())
    sent = sum(float(r["bytes"]) * int(r["sequences"]) for r in per_task.values())
    out["byte_ratio_pooled"] = raw / sent if sent else 1.0
    return out
