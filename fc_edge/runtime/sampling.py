"""Choosing the next token from the tail's logits, on the server.

``temperature == 0`` is greedy (argmax, ties to the lowest id, as ``torch.argmax``); otherwise
the logits are divided by the temperature, filtered by top-k then top-p (nucleus), and one token
is drawn with a per-session ``torch.Generator`` seeded from ``seed`` (the same seed and the same
logits give the same tokens).
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import torch
from torch import Tensor

from fc_edge.errors import ConfigError


@dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 = greedy; top_k 0 = off; top_p 1.0 = off; seed None = random."""

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
        return self.temperature == 0


class Sampler:
    """Stateful per session: holds the seeded generator."""

    def __init__(self, config: SamplingConfig) -> None:
        self.config = config
        self.generator: torch.Generator | None = None
        if not config.greedy:
            seed = config.seed if config.seed is not None else secrets.randbits(63)
            self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, logits: Tensor) -> int:
        """The next token id from ``logits`` (V,) float."""
        return sample(logits, self.config, self.generator)


def sample(logits: Tensor, config: SamplingConfig, generator: torch.Generator | None = None) -> int:
    """One token id from ``logits`` (V,) under ``config``."""
    if config.greedy:
        return int(torch.argmax(logits))
    x = logits.detach().float().cpu() / config.temperature
    if config.top_k and config.top_k < x.numel():
        kth = torch.topk(x, config.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if config.top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = probs.cumsum(-1) - probs >= config.top_p
        sorted_x = sorted_x.masked_fill(drop, float("-inf"))
        x = torch.full_like(x, float("-inf")).scatter(0, order, sorted_x)
    probs = torch.softmax(x, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
