"""Codec settings of an evaluation: ``--codecs`` specs -> codecs, and sending one activation.

A spec is a codec name or alias with optional keyword arguments in brackets, e.g.
``none``, ``fourier``, ``int8``, ``rotated[group_size=32,transform=hadamard]``,
``fourier[k_s=3,k_d=64]``. ``none`` is the uncompressed model (float32 activation). The shared
codec flags (``--bits 4``, ...) apply to every codec that takes them; ``--ratio``/``--ratios``
apply to the codecs whose budget is a ratio (fourier, topk, svd, qr) unless the spec sets it.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fc_edge.errors import BudgetError, ConfigError

NONE = "none"
RATIO_CODECS = ("fourier", "topk", "svd", "qr")
FALLBACK = "fp16"  # what the runtime sends for a shape the session codec refuses
_SPEC = re.compile(r"^\s*([A-Za-z0-9_\-]+)\s*(?:\[(.*)\])?\s*$")


def split_specs(text: str) -> list[str]:
    """Split ``a,b[x=1,y=2],c`` at the commas outside brackets."""
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    out.append(cur)
    return [s.strip() for s in out if s.strip()]


def _value(text: str) -> Any:
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text  # "none" stays a string: codecs take it literally (e.g. shaping=none)


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    m = _SPEC.match(spec)
    if not m:
        raise ConfigError(f"bad codec spec {spec!r}: expected NAME or NAME[key=value,...]")
    kwargs: dict[str, Any] = {}
    for part in split_specs(m.group(2) or ""):
        if "=" not in part:
            raise ConfigError(f"bad codec parameter {part!r} in {spec!r}: expected key=value")
        k, v = part.split("=", 1)
        kwargs[k.strip().replace("-", "_")] = _value(v.strip())
    return m.group(1), kwargs


def _accepted(name: str) -> set[str]:
    from fc_edge.codecs import ALIASES, codec_class

    base = ALIASES[name][0] if name in ALIASES else name
    cls = codec_class(base)
    return {p for p in inspect.signature(cls.__init__).parameters if p != "self"}


def _base_name(name: str) -> str:
    from fc_edge.codecs import ALIASES

    return ALIASES[name][0] if name in ALIASES else name


@dataclass
class CodecSetting:
    """One codec configuration of a sweep. ``codec`` is None for ``none`` (uncompressed)."""

    label: str
    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    codec: Any = None

    @property
    def row_wise(self) -> bool:
        return True if self.codec is None else bool(self.codec.row_wise)

    @property
    def config(self) -> dict[str, Any]:
        return {} if self.codec is None else dict(self.codec.config())

    def bind(self, model: Any, layer: int) -> None:
        """Bind the codec to the model's channel weights at this split (as the runtime does)."""
        if self.codec is not None:
            from fc_edge.models.split import bind_codec

            bind_codec(self.codec, model, layer)

    def send(self, x: Tensor, tokens: Tensor | None = None) -> tuple[Tensor, int, bool]:
        """One (S, D) activation through encode -> wire bytes -> decode.

        Returns (reconstruction, bytes on the wire, fell_back). A codec that cannot meet its
        budget for this shape (:class:`BudgetError`, e.g. SVD of a one-row block) is replaced by
        float16 for that message, as the runtime does (``fc_edge.runtime.protocol.FALLBACK_CODEC``),
        counted at its packed size and flagged.
        """
        raw = x.numel() * 4
        if self.codec is None:
            return x, raw, False
        from fc_edge.codecs import decode, wire

        # both ends hold the codec's context; ``tokens`` (decode steps) are the rows' token ids
        ctx = self.codec.context if tokens is None else self.codec.context.with_tokens(tokens)
        try:
            data = wire.pack(self.codec.encode(x, ctx))
        except BudgetError:
            data = wire.pack(_fallback().encode(x))
            return decode(wire.unpack(data)).to(x.device, x.dtype), len(data), True
        return decode(wire.unpack(data, ctx=ctx), ctx).to(x.device, x.dtype), len(data), False


def _fallback() -> Any:
    from fc_edge.codecs import get_codec

    return get_codec(FALLBACK)


def build_settings(specs: str, shared: dict[str, Any] | None = None,
                   ratios: list[float] | None = None) -> list[CodecSetting]:
    """Codec settings from a ``--codecs`` string, the shared codec flags and a ratio sweep."""
    from fc_edge.codecs import get_codec

    shared = dict(shared or {})
    shared_ratio = shared.pop("ratio", None)
    out: list[CodecSetting] = []
    for spec in split_specs(specs):
        name, kw = parse_spec(spec)
        if name == NONE:
            if kw:
                raise ConfigError("codec 'none' takes no parameters")
            out.append(CodecSetting(NONE, NONE))
            continue
        accepted = _accepted(name)
        extra = {k: v for k, v in shared.items() if k in accepted and k not in kw}
        base = _base_name(name)
        uses_ratio = base in RATIO_CODECS and "ratio" not in kw and not (
            {"k", "rank", "k_s", "k_d"} & set(kw) | {"k", "rank", "k_s", "k_d"} & set(extra))
        sweep: list[float | None] = [None]
        if uses_ratio:
            sweep = list(ratios) if ratios else [shared_ratio]
        for r in sweep:
            kwargs = {**extra, **kw}
            if r is not None:
                kwargs["ratio"] = r
            codec = get_codec(name, **kwargs)
            label = _label(name, kw, extra, r)
            out.append(CodecSetting(label, name, kwargs, codec))
    labels = [s.label for s in out]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ConfigError(f"codec settings given twice: {', '.join(dup)}")
    if not out:
        raise ConfigError("no codecs given: e.g. --codecs none,fourier,int8,rotated")
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def _label(name: str, kw: dict[str, Any], extra: dict[str, Any], ratio: float | None) -> str:
    parts = {**extra, **kw}
    if ratio is not None:
        parts = {"ratio": ratio, **parts}
    if not parts:
        return name
    return name + "[" + ",".join(f"{k}={_fmt(v)}" for k, v in parts.items()) + "]"


def relative_error(x: Tensor, x_hat: Tensor) -> float:
    ref = x.double()
    return float((x_hat.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def no_grad() -> Any:
    return torch.inference_mode()
