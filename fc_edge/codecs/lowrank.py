"""Low-rank factorisations of each activation item: truncated SVD and column-pivoted QR.

Both send a left factor ``(S, r)`` and a right factor ``(r, D)`` in ``value_dtype``, so a rank
costs ``S + D`` values; with ``ratio`` the largest rank that fits the byte budget is used. A
single row (``S = 1``) cannot be compressed this way: rank 1 already costs ``1 + D`` values, so a
decode step gets a :class:`~fc_edge.errors.BudgetError` at any ratio above ``D / (D + 1)`` x the
value-size gain. Not row-wise.

* ``svd``: the Eckart-Young optimum, ``U_r sqrt(Sigma_r)`` and ``sqrt(Sigma_r) V_r^T`` (the split
  keeps both factors in float16 range).
* ``qr``: greedy column-pivoted Gram-Schmidt (Businger-Golub) picks the ``r`` most independent
  hidden columns; the factors are the orthonormal basis ``Q_r`` and ``Q_r^T A``, i.e. the
  projection of ``A`` onto the span of the pivot columns. (Unpivoted QR would keep the span of
  the *first* ``r`` columns, a strawman.)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from fc_edge.codecs.base import (
    WIRE_DTYPE_OF_VALUE,
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


class LowRankCodec(Codec):
    wire_params: ClassVar[tuple[tuple[str, str], ...]] = (("rank", "I"), ("value_dtype", "B"))
    row_wise = False

    def __init__(
        self, ratio: float | None = None, rank: int | None = None, value_dtype: str = "float16"
    ) -> None:
        if rank is not None and ratio is not None:
            raise ConfigError(f"{self.name} takes ratio or rank, not both")
        if rank is not None and (not isinstance(rank, int) or rank < 1):
            raise ConfigError(f"rank must be an integer >= 1, got {rank!r}")
        self.ratio = check_ratio(ratio if ratio is not None or rank is not None else 8.0)
        self.rank = rank
        value_dtype_code(value_dtype)
        self.value_dtype = value_dtype

    def config(self) -> dict[str, Any]:
        return {
            **({"rank": self.rank} if self.rank is not None else {"ratio": self.ratio}),
            "value_dtype": self.value_dtype,
        }

    def rank_for(self, x: torch.Tensor) -> int:
        B, S, D = check_activation(x)
        if self.rank is not None:
            return min(self.rank, S, D)
        assert self.ratio is not None
        vbytes = value_dtype_of({"value_dtype": value_dtype_code(self.value_dtype)}).itemsize
        r = min(
            self.budget_bytes(
                tuple(x.shape), x.dtype, self.ratio, {"rank": min(S, D), "value_dtype": 3}
            )
            // (B * vbytes * (S + D)),
            S,
            D,
        )
        if r < 1:
            raise too_small(
                self.name,
                tuple(x.shape),
                self.ratio,
                f"rank 1 costs {S + D} values, more than the budget",
            )
        return r

    def factorize(self, a: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, S, D)`` float32 -> left ``(B, S, r)``, right ``(B, r, D)``."""
        raise NotImplementedError

    def encode(self, x: torch.Tensor, ctx: CodecContext | None = None) -> Encoded:
        r = self.rank_for(x)
        left, right = self.factorize(as_batched(x.detach()).float(), r)
        vcode = value_dtype_code(self.value_dtype)
        vdt = value_dtype_of({"value_dtype": vcode})
        return self._encoded(
            x,
            {"rank": r, "value_dtype": vcode},
            left=to_value_dtype(left, vdt).contiguous(),
            right=to_value_dtype(right, vdt).contiguous(),
        )

    @classmethod
    def decode(cls, enc: Encoded, ctx: CodecContext | None = None) -> torch.Tensor:
        return restore(enc.tensors["left"].float() @ enc.tensors["right"].float(), enc)

    @classmethod
    def layout(cls, shape: tuple[int, ...], params: Mapping[str, int]) -> list[TensorSpec]:
        B = shape[0] if len(shape) == 3 else 1
        S, D = shape[-2:]
        r = params["rank"]
        if not 1 <= r <= min(S, D):
            raise ConfigError(f"rank must be in 1..{min(S, D)}, got {r}")
        wdt = WIRE_DTYPE_OF_VALUE[value_dtype_of(params)]
        return [TensorSpec("left", wdt, (B, S, r)), TensorSpec("right", wdt, (B, r, D))]


@register
class SVDCodec(LowRankCodec):
    name = "svd"
    wire_id = 4

    def factorize(self, a: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        root = s[..., :r].sqrt()
        return u[..., :r] * root.unsqueeze(-2), root.unsqueeze(-1) * vh[..., :r, :]


@register
class QRCodec(LowRankCodec):
    name = "qr"
    wire_id = 5

    def factorize(self, a: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        B, S, _ = a.shape
        resid = a.clone()
        q = a.new_zeros(B, S, r)
        batch = torch.arange(B, device=a.device)
        for j in range(r):
            norms = resid.square().sum(dim=1)  # (B, D) residual column energy
            pivot = norms.argmax(dim=1)
            col = resid[batch, :, pivot]  # (B, S)
            nrm = col.norm(dim=1, keepdim=True)
            qj = torch.where(nrm > 0, col / nrm.clamp_min(1e-30), torch.zeros_like(col))
            q[:, :, j] = qj
            resid -= qj.unsqueeze(-1) * (qj.unsqueeze(1) @ resid)
        return q, q.transpose(1, 2) @ a
