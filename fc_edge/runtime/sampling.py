"""Choosing the next token from the tail's logits, on the server: a whole batch at once.

A temperature below :data:`GREEDY_BELOW` (``0`` included) is greedy (argmax, ties to the lowest
id, as ``torch.argmax``). Otherwise the logits are divided by the temperature **in float64**,
filtered by top-k then top-p (nucleus), and one token is drawn by the Gumbel-max trick,
``argmax(z + g)`` with ``g = -log(-log U)`` and ``U`` uniform from the session's own seeded
``torch.Generator``: an exact draw from ``softmax(z)`` that needs no normalisation, so nothing
in it can overflow or raise for finite logits (``|z| <= 3.4e38 / 1e-5`` is finite in float64;
``z + g`` is finite or ``-inf``, never NaN). Same seed and same logits give the same tokens,
alone or in any batch (each row draws from its own generator).

:func:`sample_batch` samples every row of a step's batch with one host synchronisation; a row
whose logits are not finite gets ``None`` (its session ends, the others go on).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fc_edge.errors import ConfigError

#: Temperatures below this are greedy (vLLM's ``_SAMPLING_EPS``): the limit of sampling as T -> 0,
#: and the floor that keeps ``logits / T`` finite in float64.
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 (or below :data:`GREEDY_BELOW`) = greedy; top_k 0 = off; top_p 1.0 = off;
    seed None = random."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        t = self.temperature
        if not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ConfigError(f"temperature must be a number >= 0, got {t!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ConfigError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        p = self.top_p
        if not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise ConfigError(f"top_p must be in (0, 1] (1 = off), got {p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**63):
            raise ConfigError(f"seed must be an integer in 0..2**63-1, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def filtered(self) -> bool:
        """Whether top-k or top-p cut the distribution."""
        return self.top_k > 0 or self.top_p < 1.0


class Sampler:
    """Stateful per session: the settings and the seeded generator (on ``device``, where the
    logits are; ``generator`` replaces the seeded one)."""

    def __init__(self, config: SamplingConfig, device: torch.device | str = "cpu",
                 generator: torch.Generator | None = None) -> None:
        self.config = config
        self.generator = generator
        if generator is None and not config.greedy:
            seed = config.seed if config.seed is not None else secrets.randbits(63)
            self.generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, logits: Tensor) -> int:
        """The next token id from ``logits`` (V,) float; raises ConfigError if not finite."""
        token = sample_batch(logits[None], [self])[0]
        if token is None:
            raise ConfigError("the logits are not finite")
        return token


def sample(logits: Tensor, config: SamplingConfig, generator: torch.Generator | None = None) -> int:
    """One token id from ``logits`` (V,) under ``config`` (``generator``: the draw's source)."""
    return Sampler(config, logits.device, generator)(logits)


def sample_batch(logits: Tensor, samplers: Sequence[Sampler]) -> list[int | None]:
    """Row ``i`` of ``logits`` (B, V) float drawn with ``samplers[i]``: the token ids, ``None``
    for a row that is not finite. One host synchronisation for the whole batch."""
    b = logits.shape[0]
    if b != len(samplers):
        raise ValueError(f"{b} rows of logits for {len(samplers)} samplers")
    if b == 0:
        return []
    # a row is finite iff its max and min are (NaN propagates through both); cheaper than
    # isfinite over the whole row. max's indices: the first maximum, as torch.argmax
    best, tokens = logits.max(dim=1)
    finite = torch.isfinite(best) & torch.isfinite(logits.amin(dim=1))
    drawn = [i for i, s in enumerate(samplers) if not s.config.greedy]
    if drawn:
        index = torch.tensor(drawn, device=logits.device)
        tokens = tokens.index_copy(0, index, _draw(logits.index_select(0, index),
                                                   [samplers[i] for i in drawn]))
    out = torch.stack((tokens, finite.long())).tolist()  # the one host sync
    return [t if ok else None for t, ok in zip(out[0], out[1])]


def _draw(logits: Tensor, samplers: Sequence[Sampler]) -> Tensor:
    """Gumbel-max draws (B,) long for the non-greedy rows ``logits`` (B, V)."""
    v = logits.shape[1]
    temperature = torch.tensor([s.config.temperature for s in samplers], dtype=torch.float64,
                               device=logits.device)
    # a non-finite row gives a garbage id here (reported as None by the caller); keep it finite
    z = torch.nan_to_num(logits.double(), nan=0.0, posinf=0.0, neginf=0.0) / temperature[:, None]
    gumbel = torch.stack([
        -torch.log(-torch.log(torch.rand(v, generator=s.generator, dtype=torch.float64,
                                         device=logits.device)))
        for s in samplers])
    choice = torch.argmax(z + gumbel, dim=1)
    cut = [i for i, s in enumerate(samplers) if s.config.filtered]
    if cut:
        index = torch.tensor(cut, device=logits.device)
        choice = choice.index_copy(0, index, _draw_filtered(
            z.index_select(0, index), gumbel.index_select(0, index),
            [samplers[i].config for i in cut]))
    return choice


def _draw_filtered(z: Tensor, gumbel: Tensor, configs: Sequence[SamplingConfig]) -> Tensor:
    """Gumbel-max over the top-k, then top-p, tokens of each row of ``z`` (B, V) float64."""
    b, v = z.shape
    device = z.device
    sorted_z, order = torch.sort(z, dim=1, descending=True, stable=True)
    rank = torch.arange(v, device=device)[None]
    k = torch.tensor([c.top_k if c.top_k > 0 else v for c in configs], device=device)
    keep = rank < k[:, None]
    sorted_z = sorted_z.masked_fill(~keep, float("-inf"))
    p = torch.tensor([c.top_p for c in configs], dtype=torch.float64, device=device)
    probs = torch.softmax(sorted_z, dim=1)
    # the smallest prefix whose mass reaches top_p (the first token always stays)
    drop = probs.cumsum(1) - probs >= p[:, None]
    sorted_z = sorted_z.masked_fill(drop, float("-inf"))
    pick = torch.argmax(sorted_z + gumbel.gather(1, order), dim=1)
    return order.gather(1, pick[:, None])[:, 0]
