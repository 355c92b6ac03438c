"""Scalar quantization: identity, float16/bfloat16 casts, and a 2-8-bit symmetric group quantizer.

The group quantizer splits every row (token) of the activation into groups of ``group_size``
values along the hidden axis (``0`` = the whole row is one group; at most the row width), stores
one scale per group (``absmax / qmax`` rounded *up* to the scale dtype, so no code clips) and
``bits``-bit codes ``round(x / scale) + qmax`` (ties to even), with ``qmax = 2**(bits-1) - 1``.
The scale dtype is the codec's ``value_dtype``: bfloat16 by default, whose range is float32's (a
3e6 value or a 1e-9 row keeps its usual relative error); float16 scales saturate at 65504.
Codes are bit-packed LSB first (docs/wire-format.md). Every row is coded on its own, so a decode
step's single row is treated exactly like a prefill row.

Registry aliases: ``fp16``, ``bf16``, ``int8`` (per-row absmax), ``int8-block`` (groups of 64),
``int4`` (groups of 64).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numba
import numpy as np
import torch

from fc_edge.codecs.base import (
    ALIASES,
    WIRE_DTYPE_OF_VALUE,
    Codec,
    ConfigError,
    Encoded,
    TensorSpec,
    check_activation,
    check_ratio,
    register,
    restore,
    to_value_dtype,
    too_small,
    value_dtype_code,
    value_dtype_of,
)
from fc_edge.codecs.context import CodecContext
from fc_edge.errors import WireError


# --- bit packing ----------------------------------------------------------------------------
def packed_nbytes(n: int, bits: int) -> int:
    return (n * bits + 7) // 8


@numba.njit(cache=True, nogil=True)
def _pack(codes, bits, out):  # pragma: no cover (compiled)
    acc = 0
    nbits = 0
    j = 0
    for i in range(codes.size):
        acc |= np.int64(codes[i]) << nbits
        nbits += bits
        while nbits >= 8:
            out[j] = acc & 0xFF
            acc >>= 8
            nbits -= 8
            j += 1
    if nbits:
        out[j] = acc & 0xFF


@numba.njit(cache=True, nogil=True)
def _unpack(packed, bits, out):  # pragma: no cover (compiled)
    acc = 0
    nbits = 0
    j = 0
    mask = (1 << bits) - 1
    for i in range(out.size):
        while nbits < bits:
            acc |= np.int64(packed[j]) << nbits
            nbits += 8
            j += 1
        out[i] = acc & mask
        acc >>= bits
        nbits -= bits


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes ``< 2**bits`` (any shape) into a flat uint8 tensor, LSB first."""
    flat = codes.reshape(-1).to(torch.uint8)
    if bits == 8:
        return flat.clone()
    if bits == 4:
        if flat.numel() % 2:
            flat = torch.cat([flat, flat.new_zeros(1)])
        pair = flat.view(-1, 2)
        return pair[:, 0] | (pair[:, 1] << 4)
    out = np.zeros(packed_nbytes(flat.numel(), bits), dtype=np.uint8)
    _pack(flat.cpu().numpy(), bits, out)
    return torch.from_numpy(out).to(codes.device)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``n`` codes as uint8 (``packed`` holds at least
    ``ceil(n bits / 8)`` bytes)."""
    packed = packed.reshape(-1).to(torch.uint8)
    if packed.numel() < packed_nbytes(n, bits):
        raise WireError(f"{packed.numel()} bytes cannot hold {n} codes of {bits} bits")
    if bits == 8:
        return packed[:n].clone()
    if bits == 4:
        both = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(-1)
        return both[:n].contiguous()
    out = np.empty(n, dtype=np.uint8)
    _unpack(packed.cpu().numpy(), bits, out)
    return torch.from_numpy(out).to(packed.device)


# --- the symmetric group quantizer, shared with the rotated codec ---------------------------
def n_groups(width: int, group_size: int) -> int:
    return 1 if group_size == 0 else math.ceil(width / group_size)


def wire_group_size(width: int, group_size: int) -> int:
    """The group size a payload carries: 0 (one group per row) when groups span the whole row,
    since a receiver refuses a group wider than the row."""
    return 0 if group_size >= width else group_size


def scales_up(absmax: torch.Tensor, qmax: int, dtype: torch.dtype) -> torch.Tensor:
    """``absmax / qmax`` rounded *up* to ``dtype`` (so ``|x| / scale <= qmax``), saturating at
    the dtype's largest finite value (then the largest values clip at ``qmax``)."""
    s = absmax.float() / qmax
    if dtype == torch.float32:
        return s
    big = torch.finfo(dtype).max
    r = s.clamp(max=big).to(dtype)
    low = r.float() < s  # rounded down: step to the next representable value (positive)
    if bool(low.any()):
        r = torch.where(low & (r.float() < big), (r.view(torch.int16) + 1).view(dtype), r)
    return r


def quantize_groups(
    rows: torch.Tensor, bits: int, group_size: int, scale_dtype: torch.dtype = torch.bfloat16
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, W)`` float -> (codes ``(N, W)`` uint8 in ``0..2 qmax``, scales ``(N, G)``).

    ``group_size`` must be 0 (one group per row) or at most ``W``: padding is at most one group.
    """
    N, W = rows.shape
    g = W if group_size == 0 else group_size
    G = n_groups(W, group_size)
    padded = rows.float()
    if G * g != W:
        padded = torch.nn.functional.pad(padded, (0, G * g - W))
    padded = padded.view(N, G, g)
    qmax = 2 ** (bits - 1) - 1
    # Scales are rounded to their wire dtype first, so both sides divide by the same number.
    scales = scales_up(padded.abs().amax(-1), qmax, scale_dtype)
    s = scales.float().unsqueeze(-1)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.where(s > 0, torch.round(padded / safe), torch.zeros_like(padded))
    codes = (q.clamp(-qmax, qmax) + qmax).to(torch.uint8).view(N, G * g)[:, :W]
    return codes.contiguous(), scales


def dequantize_groups(
    codes: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int
) -> torch.Tensor:
    """Inverse of :func:`quantize_groups`: ``(N, W)`` float32."""
    N, W = codes.shape
    g = W if group_size == 0 else group_size
    G = scales.shape[1]
    qmax = 2 ** (bits - 1) - 1
    q = codes.float() - qmax
    if G * g != W:
        q = torch.nn.functional.pad(q, (0, G * g - W))
    return (q.view(N, G, g) * scales.float().unsqueeze(-1)).view(N, G * g)[:, :W]


def check_codes(codes: torch.Tensor, bits: int, what: str) -> None:
    """Refuse a code above ``2 qmax`` (every bit width, 8 included: 255 is not a code)."""
    qmax = 2 ** (bits - 1) - 1
    if codes.numel() and int(codes.max()) > 2 * qmax:
        raise WireError(f"{what} codes exceed {2 * qmax} for {bits} bits")


def check_group_width(group_size: int, width: int) -> None:
    """A payload's group size must be 0 or fit the row (wider groups would only pad)."""
    if group_size > width:
        raise ConfigError(f"group_size {group_size} is wider than the row ({width} values)")


def check_bits(bits: int, allowed: range | tuple = range(2, 9)) -> int:
    if not isinstance(bits, int) or bits not in allowed:
        raise ConfigError(f"bits must be one of {list(allowed)}, got {bits!r}")
    return bits


def check_group_size(group_size: int) -> int:
    if not isinstance(group_size, int) or not 0 <= group_size <= 65535:
        raise ConfigError(f"group_size must be 0 (one per row) or 1..65535, got {group_size!r}")
    return group_size


# --- codecs ---------------------------------------------------------------------------------
@register
class IdentityCodec(Codec):
    """Sends the activation unchanged at its own dtype: the uncompressed reference."""

    name = "identity"
    wire_id = 1
    wire_params = (("value_dtype", "B"),)

    def __init__(self) -> None:
        pass

    def encode(self, x: torch.Tensor, ctx: CodecContext | None = None) -> Encoded:
        check_activation(x)
        code = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}[x.dtype]
        return self._encoded(x, {"value_dtype": code}, x=x.detach().contiguous())

    @classmethod
    def decode(cls, enc: Encoded, ctx: CodecContext | None = None) -> torch.Tensor:
        return restore(enc.tensors["x"], enc)

    def expected_params(self, enc: Encoded) -> dict[str, int]:
        # identity sends the values at the activation's own (declared) dtype
        return {"value_dtype": {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}.get(
            enc.dtype, -1)}

    @classmethod
    def layout(cls, shape: tuple[int, ...], params: Mapping[str, int]) -> list[TensorSpec]:
        return [TensorSpec("x", WIRE_DTYPE_OF_VALUE[value_dtype_of(params)], tuple(shape))]


@register
class QuantCodec(Codec):
    """Scalar quantization along the hidden axis, row by row.

    ``bits=16`` casts to ``value_dtype`` (default float16; values beyond 65504 saturate).
    ``bits`` 2..8 quantizes with one scale of ``value_dtype`` (default bfloat16) per
    ``group_size`` values (0 = per row). With ``ratio`` instead of ``bits``, the largest bit
    width that meets the byte budget is chosen per shape.
    """

    name = "quant"
    wire_id = 6
    wire_params = (("bits", "B"), ("group_size", "H"), ("value_dtype", "B"))

    def __init__(
        self,
        bits: int | None = None,
        group_size: int = 0,
        value_dtype: str | None = None,
        ratio: float | None = None,
    ) -> None:
        if bits is not None and ratio is not None:
            raise ConfigError("quant takes bits or ratio, not both")
        self.ratio = check_ratio(ratio)
        self.bits = (
            None
            if bits is None and ratio is not None
            else check_bits(8 if bits is None else bits, (*range(2, 9), 16))
        )
        self.group_size = check_group_size(group_size)
        if value_dtype is None:  # 16-bit values default to float16, scales to bfloat16's range
            value_dtype = "float16" if self.bits == 16 else "bfloat16"
        self.value_dtype = value_dtype
        value_dtype_code(value_dtype)
        if self.bits == 16 and value_dtype == "float32":
            raise ConfigError(
                "quant bits=16 casts to float16 or bfloat16; use identity for float32"
            )

    def config(self) -> dict[str, Any]:
        out: dict[str, Any] = {"group_size": self.group_size, "value_dtype": self.value_dtype}
        out.update({"ratio": self.ratio} if self.ratio is not None else {"bits": self.bits})
        return out

    def expected_params(self, enc: Encoded) -> dict[str, int]:
        out = {"value_dtype": value_dtype_code(self.value_dtype),
               "group_size": wire_group_size(enc.shape[-1] if enc.shape else 1,
                                             self.group_size)}
        if self.bits is not None:  # with a ratio the width follows the shape
            out["bits"] = self.bits
        return out

    def _bits_for(self, x: torch.Tensor, D: int) -> int:
        if self.bits is not None:
            return self.bits
        assert self.ratio is not None
        bound = {"bits": 8, "group_size": self.group_size, "value_dtype": 3}
        budget = self.budget_bytes(tuple(x.shape), x.dtype, self.ratio, bound)
        rows = x.numel() // D
        for bits in range(8, 1, -1):
            body = 2 * rows * n_groups(D, self.group_size) + packed_nbytes(rows * D, bits)
            if body <= budget:
                return bits
        raise too_small(self.name, tuple(x.shape), self.ratio, "even 2-bit codes do not fit")

    def encode(self, x: torch.Tensor, ctx: CodecContext | None = None) -> Encoded:
        _, _, D = check_activation(x)
        bits = self._bits_for(x, D)
        vcode = value_dtype_code(self.value_dtype)
        group = wire_group_size(D, self.group_size)
        params = {"bits": bits, "group_size": group, "value_dtype": vcode}
        rows = x.detach().reshape(-1, D)
        vdt = value_dtype_of(params)
        if bits == 16:
            return self._encoded(x, params, x=to_value_dtype(rows, vdt).reshape(x.shape))
        codes, scales = quantize_groups(rows, bits, group, vdt)
        return self._encoded(x, params, codes=pack_bits(codes, bits), scales=scales)

    @classmethod
    def decode(cls, enc: Encoded, ctx: CodecContext | None = None) -> torch.Tensor:
        bits, g = enc.params["bits"], enc.params["group_size"]
        if bits == 16:
            return restore(enc.tensors["x"], enc)
        D = enc.shape[-1]
        N = math.prod(enc.shape) // D
        codes = enc.checked.get("codes")
        if codes is None:
            codes = unpack_bits(enc.tensors["codes"], bits, N * D)
        return restore(dequantize_groups(codes.view(N, D), enc.tensors["scales"], bits, g), enc)

    @classmethod
    def layout(cls, shape: tuple[int, ...], params: Mapping[str, int]) -> list[TensorSpec]:
        bits, g = params["bits"], params["group_size"]
        check_bits(bits, (*range(2, 9), 16))
        vdt = value_dtype_of(params)
        if bits == 16:
            if vdt == torch.float32:
                raise ConfigError("quant bits=16 needs a 16-bit value dtype")
            return [TensorSpec("x", WIRE_DTYPE_OF_VALUE[vdt], tuple(shape))]
        D = shape[-1]
        N = math.prod(shape) // D
        check_group_width(g, D)
        return [
            TensorSpec("codes", "u1", (packed_nbytes(N * D, bits),)),
            TensorSpec("scales", WIRE_DTYPE_OF_VALUE[vdt], (N, n_groups(D, g))),
        ]

    @classmethod
    def values_sent(cls, enc: Encoded) -> int:
        if enc.params["bits"] == 16:
            return super().values_sent(enc)
        return math.prod(enc.shape)  # one code per value

    @classmethod
    def validate_payload(cls, enc: Encoded, ctx: CodecContext | None = None) -> None:
        bits = enc.params["bits"]
        if bits == 16:
            return
        codes = unpack_bits(enc.tensors["codes"], bits, math.prod(enc.shape))
        check_codes(codes, bits, "quant")
        if bool((enc.tensors["scales"] < 0).any()):
            raise WireError("quant scales must not be negative")
        enc.checked["codes"] = codes


ALIASES.update(
    {
        "fp16": ("quant", {"bits": 16, "value_dtype": "float16"}),
        "bf16": ("quant", {"bits": 16, "value_dtype": "bfloat16"}),
        "int8": ("quant", {"bits": 8, "group_size": 0}),
        "int8-block": ("quant", {"bits": 8, "group_size": 64}),
        "int4": ("quant", {"bits": 4, "group_size": 64}),
    }
)
