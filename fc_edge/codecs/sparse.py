"""Top-k sparsification: keep the ``k`` largest-magnitude values of each activation item.

The payload is ``k`` values (``value_dtype``; float16 saturates at 65504) and their flat indices
into ``S*D``, ascending, in the smallest unsigned integer type that holds ``S*D - 1`` (u8, u16 or
u32); both count against the budget.
Not row-wise: the ``k`` values are chosen over the whole ``(S, D)`` item.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fc_edge.codecs.base import (
    WIRE_DTYPE_OF_VALUE,
    WIRE_DTYPES,
    Codec,
    ConfigError,
    Encoded,
    TensorSpec,
    as_batched,
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


def index_wire_dtype(n: int) -> str:
    """Smallest unsigned wire dtype holding indices ``0..n-1``."""
    return "u1" if n <= 2**8 else "u2" if n <= 2**16 else "u4"


@register
class TopKCodec(Codec):
    name = "topk"
    wire_id = 3
    wire_params = (("k", "I"), ("value_dtype", "B"))
    row_wise = False

    def __init__(
        self, ratio: float | None = None, k: int | None = None, value_dtype: str = "float16"
    ) -> None:
        if k is not None and ratio is not None:
            raise ConfigError("topk takes ratio or k, not both")
        if k is not None and (not isinstance(k, int) or k < 1):
            raise ConfigError(f"k must be an integer >= 1, got {k!r}")
        self.ratio = check_ratio(ratio if ratio is not None or k is not None else 8.0)
        self.k = k
        value_dtype_code(value_dtype)
        self.value_dtype = value_dtype

    def config(self) -> dict[str, Any]:
        return {
            **({"k": self.k} if self.k is not None else {"ratio": self.ratio}),
            "value_dtype": self.value_dtype,
        }

    def k_for(self, x: torch.Tensor) -> int:
        B, S, D = check_activation(x)
        if self.k is not None:
            return min(self.k, S * D)
        assert self.ratio is not None
        vdt = value_dtype_of({"value_dtype": value_dtype_code(self.value_dtype)})
        per = vdt.itemsize + WIRE_DTYPES[index_wire_dtype(S * D)][0]
        k = min(
            self.budget_bytes(tuple(x.shape), x.dtype, self.ratio, {"k": S * D, "value_dtype": 3})
            // (B * per),
            S * D,
        )
        if k < 1:
            raise too_small(self.name, tuple(x.shape), self.ratio, "not even one value fits")
        return k

    def encode(self, x: torch.Tensor, ctx: CodecContext | None = None) -> Encoded:
        k = self.k_for(x)
        flat = as_batched(x.detach()).flatten(1)
        idx = flat.abs().float().topk(k, dim=1, sorted=False).indices.sort(dim=1).values
        vcode = value_dtype_code(self.value_dtype)
        values = to_value_dtype(flat.gather(1, idx), value_dtype_of({"value_dtype": vcode}))
        return self._encoded(x, {"k": k, "value_dtype": vcode}, values=values, indices=idx)

    @classmethod
    def decode(cls, enc: Encoded, ctx: CodecContext | None = None) -> torch.Tensor:
        S, D = enc.shape[-2:]
        values, idx = enc.tensors["values"], enc.tensors["indices"].long()
        out = torch.zeros(values.shape[0], S * D, dtype=torch.float32, device=values.device)
        out.scatter_(1, idx, values.float())
        return restore(out, enc)

    @classmethod
    def layout(cls, shape: tuple[int, ...], params: Mapping[str, int]) -> list[TensorSpec]:
        B = shape[0] if len(shape) == 3 else 1
        S, D = shape[-2:]
        k = params["k"]
        if not 1 <= k <= S * D:
            raise ConfigError(f"k must be in 1..{S * D}, got {k}")
        return [
            TensorSpec("values", WIRE_DTYPE_OF_VALUE[value_dtype_of(params)], (B, k)),
            TensorSpec("indices", index_wire_dtype(S * D), (B, k)),
        ]

    @classmethod
    def validate_payload(cls, enc: Encoded, ctx: CodecContext | None = None) -> None:
        S, D = enc.shape[-2:]
        idx = enc.tensors["indices"]
        if int(idx.max()) >= S * D:
            raise WireError(f"topk index out of range for an ({S}, {D}) activation")
        if idx.shape[1] > 1 and not bool((idx[:, 1:] > idx[:, :-1]).all()):
            raise WireError("topk indices must be strictly ascending within each item")
