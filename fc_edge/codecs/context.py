"""What both ends of a link know besides the payload: the codec context.

A payload is self-describing except for what it deliberately leaves out because both ends hold
it already: the model's channel weights (``rotated``'s noise shaping), a calibration artifact
(``klt``'s basis, variances and predictor) and, at a decode step, the token the row belongs to
(the server sampled it). :class:`CodecContext` carries these explicitly to ``encode``,
``wire.unpack`` (whose validation needs them) and ``decode``; nothing is looked up in
process-global state, so one process can serve several models and splits side by side.

* A server holds one context per model and split (:func:`fc_edge.models.split.codec_context`
  builds it) and derives a per-message one with :meth:`CodecContext.with_tokens` when it knows
  the rows' tokens (decode steps); a device does the same with the token it feeds its head.
* ``tokens`` is per message: ``None`` at prefill (the prompt stays private), the rows' token
  ids at decode steps.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from fc_edge.errors import ConfigError, WireError

if TYPE_CHECKING:
    from fc_edge.codecs.calibration import Calibration


@dataclass(frozen=True)
class ChannelWeights:
    """A ``(D,)`` positive noise-shaping vector, rounded to float16, and its wire id (14 bits of
    the CRC32 of its float16 bytes; 1 when those are 0): a payload names the vector it was
    shaped with, so a receiver holding another refuses it."""

    vector: torch.Tensor
    id: int

    @classmethod
    def of(cls, weights: torch.Tensor) -> ChannelWeights:
        w = torch.as_tensor(weights).detach().float().cpu().reshape(-1)
        if w.numel() < 1 or not torch.isfinite(w).all() or (w <= 0).any():
            raise ConfigError(
                "channel weights must be a non-empty vector of positive finite numbers")
        w16 = w.to(torch.float16)
        # 14 bits of the CRC: a 2-byte varint (a full CRC32 would take 5 bytes of a 288-byte row)
        key = (zlib.crc32(w16.numpy().tobytes()) & 0x3FFF) or 1
        return cls(w16.float(), key)

    def on(self, key: int, D: int, device: torch.device) -> torch.Tensor:
        """The vector for a payload that names ``key`` on rows of width ``D``; WireError when
        it is not this one."""
        if key != self.id:
            raise WireError(
                f"payload is shaped with channel weights {key}; this receiver holds {self.id}: "
                "bind the codec to the same model and split on both ends"
            )
        if self.vector.numel() != D:
            raise WireError(f"channel weights {key} have {self.vector.numel()} entries, the row "
                            f"has {D}")
        return self.vector.to(device)


@dataclass(frozen=True)
class CodecContext:
    """The side information of one model and split, and of one message (module docstring).

    ``weights``: the model's channel weights (``rotated``'s shaping), or None.
    ``calibration``: a :class:`~fc_edge.codecs.calibration.Calibration`, or None.
    ``features``: ``(N,) long token ids -> (N, D) float32``, the head run on each token alone
        (what ``klt``'s decode-step predictor reads besides the embedding); from the model.
    ``embedding``: ``(V, D)`` token embedding table of the model, or None.
    ``tokens``: ``(N,)`` token ids of this message's rows when the receiver knows them
        (decode steps), else None.
    """

    weights: ChannelWeights | None = None
    calibration: Calibration | None = None
    features: Callable[[torch.Tensor], torch.Tensor] | None = None
    embedding: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    _cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def with_tokens(self, tokens: torch.Tensor | list[int] | None) -> CodecContext:
        """The same context for a message whose rows are the tokens ``tokens`` (or None)."""
        if tokens is not None:
            tokens = torch.as_tensor(tokens, dtype=torch.long).reshape(-1).cpu()
        return replace(self, tokens=tokens, _cache=self._cache)  # share the prediction cache

    def channel_weights(self, key: int, D: int, device: torch.device) -> torch.Tensor:
        """The shaping vector a payload names (``key``); WireError when not held."""
        if self.weights is None:
            raise WireError(
                f"payload is shaped with channel weights {key} this receiver does not hold; "
                "decode with the codec context of the same model and split"
            )
        return self.weights.on(key, D, device)

    @property
    def cache(self) -> dict[str, Any]:
        """A scratch dict shared by the contexts derived from this one (per-token predictions)."""
        return self._cache


#: The context of a receiver that holds nothing: shaped or calibrated payloads are refused.
EMPTY = CodecContext()


def context_of(ctx: CodecContext | None) -> CodecContext:
    return EMPTY if ctx is None else ctx


def as_context(value: CodecContext | torch.Tensor | None) -> CodecContext:
    """A context from what ``Codec.bind`` takes: a context, a bare channel-weight vector (the
    context of a model known only by its weights), or None (the empty context)."""
    if value is None:
        return EMPTY
    if isinstance(value, CodecContext):
        return value
    return CodecContext(weights=ChannelWeights.of(value))
