"""``klt``: calibrated transform coding, with decode-step prediction from the sampled token.

Each row ``h`` (length D) of an activation is coded against a base both ends can compute:

* prefill (``predict = 0``): the calibrated channel means (the prompt stays private);
* decode step (``predict = 1``): the calibrated predictor ``A f(t) + B e(t) + c`` of the row's
  token ``t``, which the server sampled itself (``e`` the embedding, ``f`` the head on ``t``
  alone); on SmolLM2 after layer 1 it leaves about 3% of the row's energy.

The residual is weighted by the calibrated channel sensitivities ``w``, divided by the row's
gain ``g`` (its RMS, sent as one byte in 1/16-octave steps: the next layer's RMSNorm sees
relative error) and rotated into the calibrated KLT basis ``P`` of that mode::

    y = P (w * (h - base)) / g            h_hat = base + (P^T y_hat) * g / w

Every component ``k`` is then quantized with one step ``alpha = 2^(4 - step/16)`` for all
components (reverse water-filling: equal noise where a component is coded) and coded with the
rANS table of its calibrated standard deviation in steps (:mod:`fc_edge.codecs.rans`); a
component whose deviation is below 1/16 of a step is not sent at all (its value is the base).
Rate control picks the finest step whose packed payload, header included, takes at most
``bits`` bits per element (or ``raw / ratio`` bytes).

Both ends hold the :class:`~fc_edge.codecs.calibration.Calibration` (a payload names it by 14
bits of its digest) in the :class:`~fc_edge.codecs.context.CodecContext`, and for a decode step
the rows' tokens (``ctx.with_tokens``). Rows are coded on their own (their symbols share one
rANS stream), so a decode row sees what a prefill row sees but for the base.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from fc_edge.codecs import rans
from fc_edge.codecs.base import (
    Codec,
    Encoded,
    TensorSpec,
    check_activation,
    check_ratio,
    header_bytes,
    register,
    restore,
    too_small,
)
from fc_edge.codecs.calibration import Calibration, gain_codes, gains
from fc_edge.codecs.calibration import load as load_calibration
from fc_edge.codecs.context import CodecContext, context_of
from fc_edge.errors import BudgetError, ConfigError, WireError

PREDICT = {"none": 0, "token": 1}
MAX_STEP = 255
#: ``alpha = 2^((STEP_ZERO - step) / 16)`` and table ``j = log_std + step - STEP_ZERO``.
STEP_ZERO = 64


def step_alpha(step: int) -> float:
    """The quantizer step (in units of the row's gain) of step index ``step``."""
    return 2.0 ** ((STEP_ZERO - step) / 16.0)


def coded_tables(log_std: np.ndarray, step: int) -> np.ndarray:
    """Table indices of the coded components at ``step``: the leading components whose
    ``j = log_std + step - 64`` is at least ``rans.J_MIN`` (log_std is non-increasing)."""
    j = log_std.astype(np.int64) + step - STEP_ZERO
    return j[j >= rans.J_MIN]


def max_step(log_std: np.ndarray) -> int:
    """The finest step whose tables all exist (``j <= rans.J_MAX``)."""
    return int(min(MAX_STEP, rans.J_MAX + STEP_ZERO - int(log_std.max())))


@register
class KLTCodec(Codec):
    """Calibrated KLT + water-filling + rANS, with token prediction at decode steps (module
    docstring). ``predict``: ``"auto"`` (predict when the message's context names the rows'
    tokens), ``"token"`` (always; a message without tokens is an error) or ``"none"``."""

    name = "klt"
    wire_id = 8
    wire_params = (
        ("calibration", "H"),
        ("predict", "B"),
        ("step", "B"),
        ("code_bytes", "I"),
    )

    def __init__(self, bits: float = 3.0, predict: str = "auto", ratio: float | None = None,
                 step: int | None = None, calibration: str | None = None) -> None:
        if not isinstance(bits, (int, float)) or not 0.05 <= bits <= 32:
            raise ConfigError(f"bits must be a number of bits per element in 0.05..32, "
                              f"got {bits!r}")
        if predict not in (*PREDICT, "auto"):
            raise ConfigError(f"predict must be auto, token or none, got {predict!r}")
        if step is not None and (isinstance(step, bool) or not isinstance(step, int)
                                 or not 0 <= step <= MAX_STEP):
            raise ConfigError(f"step must be an integer in 0..{MAX_STEP}, got {step!r}")
        self.bits = float(bits)
        self.step = step
        self.predict = predict
        self.ratio = check_ratio(ratio)
        # an artifact named here (a path) joins the context the codec is bound to; a server
        # never takes it from a peer's config (config() leaves it out): it loads its own
        self.calibration = None if calibration is None else load_calibration(calibration)

    def bind(self, context: CodecContext | torch.Tensor | None) -> KLTCodec:
        """Bind to a model's context; the codec's own artifact (``calibration=``), if any,
        joins it, and must be the context's if that holds one already."""
        super().bind(context)
        cal, held = self.calibration, self.context.calibration
        if cal is not None and held is not None and held.digest != cal.digest:
            raise ConfigError(f"klt: the codec names calibration {cal.name}, the context "
                              f"holds {held.name}")
        if cal is not None and held is None:
            self.context = replace(self.context, calibration=cal)
        return self

    def config(self) -> dict[str, Any]:
        out: dict[str, Any] = {"bits": self.bits, "predict": self.predict}
        if self.step is not None:
            out["step"] = self.step
        if self.ratio is not None:
            out["ratio"] = self.ratio
        return out

    def expected_params(self, enc: Encoded) -> dict[str, int]:
        cal = self.context.calibration
        out = {} if cal is None else {"calibration": cal.wire_id}
        if self.predict != "auto":
            out["predict"] = PREDICT[self.predict]
        return out

    def cap_bytes(self, x: torch.Tensor) -> int:
        if self.ratio is not None:
            return math.floor(x.numel() * x.element_size() / self.ratio)
        return math.floor(x.numel() * self.bits / 8)

    # --- encoding ---------------------------------------------------------------------------
    def encode(self, x: torch.Tensor, ctx: CodecContext | None = None) -> Encoded:
        ctx = self.context if ctx is None else ctx
        cal = _calibration(ctx, ConfigError)
        _, _, D = check_activation(x)
        if D != cal.hidden_size:
            raise ConfigError(f"klt: calibration {cal.name} is for rows of {cal.hidden_size} "
                              f"values, the activation has {D}")
        rows = x.detach().reshape(-1, D).float().cpu()
        N = rows.shape[0]
        mode = self.predict
        if mode == "auto":
            mode = "token" if ctx.tokens is not None else "none"
        predict = PREDICT[mode]
        base = _base(ctx, cal, predict, N, ConfigError)
        u = gain_codes(rows)
        y = _forward(cal, predict, rows - base, gains(u))
        log_std = _log_std(cal, predict)
        cap = self.cap_bytes(x)
        params = {"calibration": cal.wire_id, "predict": predict, "step": 0, "code_bytes": 0}
        streams: dict[int, bytes] = {}

        def packed(step: int, code_bytes: int) -> int:
            p = {**params, "step": step, "code_bytes": code_bytes}
            return header_bytes(type(self), tuple(x.shape), p, N + code_bytes) + N + code_bytes

        def stream(step: int) -> bytes:
            if step not in streams:
                j = coded_tables(log_std, step)
                symbols = rans.quantize(y[:, : len(j)], np.full(N, 1 / step_alpha(step),
                                                                np.float32), j)
                streams[step] = rans.encode(symbols, j)
            return streams[step]

        top = max_step(log_std)
        if self.step is not None:  # a fixed quality: this step, coarser only past the cap
            top = min(top, self.step)
        # the finest step whose information content fits (one compiled bisection), then code
        # it, one step coarser at a time while the real stream (within a byte or two) does not
        def fits(s: int) -> bool:
            return packed(s, len(stream(s))) <= cap

        budget = cap - N - header_bytes(type(self), tuple(x.shape), None, cap)
        step = rans.largest_step(y, log_std, STEP_ZERO, top, budget + 2)
        while step >= 0 and not fits(step):
            step -= 1
        while 0 <= step < top and fits(step + 1):  # the header bound was loose by a byte
            step += 1
        if step < 0:
            why = f"the coarsest step takes {packed(0, len(stream(0)))} bytes, the cap is {cap}"
            if self.ratio is not None:
                raise too_small(self.name, tuple(x.shape), self.ratio, why)
            raise BudgetError(f"klt cannot fit {tuple(x.shape)} in {self.bits:g} bits per "
                              f"element ({why}); raise --bits or send a larger block")
        stream = stream(step)
        params.update(step=step, code_bytes=len(stream))
        return self._encoded(x, params, gains=u,
                             codes=torch.frombuffer(bytearray(stream), dtype=torch.uint8))

    # --- decoding ---------------------------------------------------------------------------
    @classmethod
    def layout(cls, shape: tuple[int, ...], params: Mapping[str, int]) -> list[TensorSpec]:
        N = math.prod(shape) // shape[-1]
        if params["predict"] not in PREDICT.values():
            raise ConfigError(f"unknown predict code {params['predict']}")
        # rANS: 4 state bytes, then at most 2 bytes per coded symbol
        if not 4 <= params["code_bytes"] <= 4 + 2 * N * shape[-1]:
            raise ConfigError(f"code stream of {params['code_bytes']} bytes cannot hold {N} "
                              f"rows of at most {shape[-1]} symbols")
        return [TensorSpec("gains", "u1", (N,)), TensorSpec("codes", "u1",
                                                            (params["code_bytes"],))]

    @classmethod
    def validate_payload(cls, enc: Encoded, ctx: CodecContext | None = None) -> None:
        ctx = context_of(ctx)
        cal = _calibration(ctx, WireError)
        p = enc.params
        if p["calibration"] != cal.wire_id:
            raise WireError(f"payload is coded with calibration {p['calibration']}; this "
                            f"receiver holds {cal.name} (id {cal.wire_id}): load the same "
                            "artifact on both ends")
        D = enc.shape[-1]
        if D != cal.hidden_size:
            raise WireError(f"klt payload rows have {D} values, calibration {cal.name} is for "
                            f"{cal.hidden_size}")
        log_std = _log_std(cal, p["predict"])
        if p["step"] > max_step(log_std):
            raise WireError(f"klt step {p['step']} is finer than the tables reach "
                            f"({max_step(log_std)})")
        N = math.prod(enc.shape) // D
        _base(ctx, cal, p["predict"], N, WireError)  # the tokens a prediction needs
        j = coded_tables(log_std, p["step"])
        enc.checked["symbols"] = rans.decode(enc.tensors["codes"].numpy(), N, j)

    @classmethod
    def decode(cls, enc: Encoded, ctx: CodecContext | None = None) -> torch.Tensor:
        ctx = context_of(ctx)
        p = enc.params
        symbols = enc.checked.get("symbols")
        if symbols is None:
            cls.validate_payload(enc, ctx)
            symbols = enc.checked["symbols"]
        cal = _calibration(ctx, WireError)
        D = enc.shape[-1]
        N = math.prod(enc.shape) // D
        y = torch.zeros(N, D)
        alpha = np.float32(step_alpha(p["step"]))
        y[:, : symbols.shape[1]] = torch.from_numpy(symbols.astype(np.float32) * alpha)
        base = _base(ctx, cal, p["predict"], N, WireError)
        rows = base + _inverse(cal, p["predict"], y, gains(enc.tensors["gains"]))
        return restore(rows.to(enc.tensors["codes"].device), enc)

    @classmethod
    def values_sent(cls, enc: Encoded) -> int:
        return int(np.prod(enc.checked["symbols"].shape)) if "symbols" in enc.checked else 0


# --- helpers ------------------------------------------------------------------------------
def _calibration(ctx: CodecContext, error: type[Exception]) -> Calibration:
    if ctx.calibration is None:
        raise error("klt needs a calibration artifact in the codec context (fc-edge calibrate; "
                    "both ends load the same one)")
    return ctx.calibration


def _log_std(cal: Calibration, predict: int) -> np.ndarray:
    return (cal.decode_log_std if predict else cal.prefill_log_std).numpy()


def _forward(cal: Calibration, predict: int, resid: torch.Tensor, g: torch.Tensor
             ) -> np.ndarray:
    """``(N, D)`` residuals -> ``(N, D)`` float32 coefficients ``P (w * r) / g``."""
    basis = cal.decode_basis if predict else cal.prefill_basis
    y = ((resid * cal.weights) @ basis.T) / g[:, None]
    return np.ascontiguousarray(y.numpy(), dtype=np.float32)


def _inverse(cal: Calibration, predict: int, y: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    basis = cal.decode_basis if predict else cal.prefill_basis
    return (y * g[:, None]) @ basis / cal.weights


def _base(ctx: CodecContext, cal: Calibration, predict: int, N: int,
          error: type[Exception]) -> torch.Tensor:
    """``(N, D)`` what the rows are coded against: the means, or the tokens' predictions."""
    if not predict:
        return cal.mean.expand(N, -1)
    if ctx.tokens is None:
        raise error("klt payload predicts from the rows' tokens, which this message's context "
                    "does not name (a prefill, or a receiver without the sampled token)")
    if ctx.tokens.numel() != N:
        raise error(f"klt payload has {N} rows, the context names {ctx.tokens.numel()} tokens")
    return predictions(ctx, cal, ctx.tokens)


def predictions(ctx: CodecContext, cal: Calibration, tokens: torch.Tensor) -> torch.Tensor:
    """``(N, D)`` float32 predicted rows ``A f(t) + B e(t) + c`` of ``tokens``.

    The first call computes the whole vocabulary's table (the head on every token alone, in
    batches: seconds once; ``V x D`` float32, 113 MB for SmolLM2) and keeps it in the context,
    so a decode step's prediction is a row lookup on both ends."""
    if ctx.features is None or ctx.embedding is None:
        raise ConfigError("klt prediction needs the model's token features and embedding in "
                          "the codec context (fc_edge.codecs.calibration.model_context)")
    V = len(ctx.embedding)
    ids = tokens.reshape(-1).long().cpu()
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= V):
        raise WireError(f"token id out of range 0..{V - 1}")
    key = ("klt-pred", cal.digest)
    table = ctx.cache.get(key)
    if table is None:
        parts = []
        for a in range(0, V, 4096):
            t = torch.arange(a, min(a + 4096, V))
            f = ctx.features(t).float()
            e = ctx.embedding[t.to(ctx.embedding.device)].float().cpu()
            parts.append(f @ cal.predictor_features.T + e @ cal.predictor_embedding.T
                         + cal.predictor_bias)
        table = ctx.cache[key] = torch.cat(parts)
    return table[ids]
