"""Codecs: FourierCompress and its peers behind one interface (see :mod:`fc_edge.codecs.base`).

>>> from fc_edge.codecs import get_codec, roundtrip
>>> codec = get_codec("fourier", ratio=8)
>>> x_hat, nbytes = roundtrip(codec, x)   # through the real wire format
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fc_edge.codecs import klt, lowrank, quant, rotated, sparse, spectral, wire  # noqa: F401  (registers)
from fc_edge.codecs.base import (
    ALIASES,
    Codec,
    Encoded,
    available_codecs,
    codec_class,
    decode,
    get_codec,
)
from fc_edge.codecs.context import ChannelWeights, CodecContext
from fc_edge.codecs.klt import KLTCodec
from fc_edge.codecs.lowrank import QRCodec, SVDCodec
from fc_edge.codecs.quant import IdentityCodec, QuantCodec
from fc_edge.codecs.rotated import RotatedCodec
from fc_edge.codecs.sparse import TopKCodec
from fc_edge.codecs.spectral import FourierCodec


def roundtrip(codec: Codec, x: torch.Tensor, ctx: CodecContext | None = None
              ) -> tuple[torch.Tensor, int]:
    """Encode, pack, unpack and decode ``x``, both ends holding ``ctx`` (default: the codec's
    bound context); returns (reconstruction on x's device, bytes)."""
    ctx = codec.context if ctx is None else ctx
    data = wire.pack(codec.encode(x, ctx))
    enc = wire.unpack(data, ctx=ctx)
    return decode(enc, ctx).to(x.device), len(data)


def element_ratio(enc: Encoded) -> float:
    """The paper's ratio: activation elements / transmitted values (indices and scales free)."""
    return math.prod(enc.shape) / max(codec_class(enc.codec).values_sent(enc), 1)


@dataclass
class Measurement:
    """One codec on one activation: bytes on the wire and reconstruction quality."""

    codec: str
    nbytes: int
    raw_bytes: int
    byte_ratio: float
    element_ratio: float
    rel_error: float


def measure(codec: Codec, x: torch.Tensor) -> Measurement:
    """Packed size and relative error ``||x - x_hat|| / ||x||`` (float64) of ``codec`` on ``x``."""
    ctx = codec.context
    enc = codec.encode(x, ctx)
    data = wire.pack(enc)
    x_hat = decode(wire.unpack(data, ctx=ctx), ctx).to(x.device)
    ref = x.double()
    err = float((x_hat.double() - ref).norm() / ref.norm().clamp_min(1e-30))
    raw = x.numel() * x.element_size()
    return Measurement(codec.name, len(data), raw, raw / len(data), element_ratio(enc), err)


__all__ = [
    "ALIASES",
    "ChannelWeights",
    "Codec",
    "CodecContext",
    "Encoded",
    "FourierCodec",
    "IdentityCodec",
    "KLTCodec",
    "Measurement",
    "QRCodec",
    "QuantCodec",
    "RotatedCodec",
    "SVDCodec",
    "TopKCodec",
    "available_codecs",
    "codec_class",
    "decode",
    "element_ratio",
    "get_codec",
    "measure",
    "roundtrip",
]
