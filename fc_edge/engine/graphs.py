"""The head as two ONNX-exportable graphs, and the fourier codec's block as matrix products.

Both graphs run the head's functional core (:meth:`fc_edge.models.head.Head.forward`) with the
key/value cache passed per layer under the names Hugging Face optimum gives them::

    prefill:  input_ids (B, S) int64, position_ids (B, S) int64
              -> activation (B, S, D) float32, present.{i}.key / .value (B, n_kv, S, hd)
    decode:   input_ids (B, 1) int64, position_ids (B, 1) int64,
              past_key_values.{i}.key / .value (B, n_kv, T, hd)
              -> activation (B, 1, D) float32, present.{i}.key / .value (B, n_kv, T + 1, hd)

Key slot ``j`` holds position ``j``: the runner passes ``position_ids = T, T+1, ...``.
With the in-graph fourier option each graph has one more output, ``fourier_block``
``(B, R, k_d, 2)`` float32, equal to :func:`fc_edge.ops.spectral_compress` of the activation.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fc_edge.models.head import Head


def dft_column_bases(D: int, k_d: int) -> tuple[Tensor, Tensor]:
    """cos and -sin bases ``(D, k_d)`` float32 of the first ``k_d`` DFT frequencies along D.

    The angle is reduced modulo D in integers first (2 pi (n m mod D) / D), so the bases are
    accurate to float32 rounding whatever D is.
    """
    n = torch.arange(D, dtype=torch.int64)[:, None]
    m = torch.arange(k_d, dtype=torch.int64)[None, :]
    angle = (n * m % D).to(torch.float64) * (2 * math.pi / D)
    return angle.cos().float(), (-angle.sin()).float()


def token_frequencies(S: Tensor | int, k_s: int) -> Tensor:
    """Kept token frequencies ``0..k_s-1, S-k_s+1..S-1`` (int64, length 2 k_s - 1).

    Equal to :func:`fc_edge.ops.block_rows` when ``S >= 2 k_s - 1`` (no mirror coincides with a
    low frequency); built from S at run time, so the graph keeps a dynamic token axis.
    """
    low = torch.arange(k_s, dtype=torch.int64)
    high = torch.arange(1, k_s, dtype=torch.int64) + (S - k_s)
    return torch.cat((low, high))


class FourierBlock(nn.Module):
    """The unnormalised truncated 2-D DFT of ``x`` (B, S, D) as two matrix products:
    columns ``X W_d`` with ``W_d`` the ``(D, k_d)`` bases, then rows ``W_s (X W_d)`` with the
    ``(R, S)`` token bases built from S in the graph. Output ``(B, R, k_d, 2)`` float32.

    Valid for ``S >= 2 k_s - 1`` (then ``R = 2 k_s - 1``) or ``k_s == 1`` (any S, R = 1): the
    shapes where the block has no repeated row; the runner falls back to
    :func:`fc_edge.ops.spectral_compress` outside them. Uses only MatMul, Cos, Sin, Mod, Range:
    no ONNX DFT op, so any TensorRT runs it.
    """

    def __init__(self, D: int, k_s: int, k_d: int) -> None:
        super().__init__()
        self.k_s, self.k_d = k_s, k_d
        cos_d, sin_d = dft_column_bases(D, k_d)
        self.register_buffer("cos_d", cos_d, persistent=False)
        self.register_buffer("sin_d", sin_d, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        x = x.float()
        re = torch.matmul(x, self.cos_d)  # (B, S, k_d)
        im = torch.matmul(x, self.sin_d)
        if self.k_s == 1:  # row 0 only: the column sums
            return torch.stack((re.sum(1, keepdim=True), im.sum(1, keepdim=True)), dim=-1)
        t = torch.arange(x.shape[1], dtype=torch.int64, device=x.device)
        S = t[-1:] + 1  # S as a (1,) tensor: the exporters trace tensor Mod, not SymInt Mod
        u = token_frequencies(S, self.k_s).to(x.device)
        angle = (u[:, None] * t[None, :] % S).float() * (2 * math.pi) / S.float()  # (R, S)
        cos_s, sin_s = angle.cos(), -angle.sin()
        # (cos + i sin)(re + i im)
        out_re = torch.matmul(cos_s, re) - torch.matmul(sin_s, im)
        out_im = torch.matmul(cos_s, im) + torch.matmul(sin_s, re)
        return torch.stack((out_re, out_im), dim=-1)


def kv_names(num_layers: int) -> tuple[list[str], list[str]]:
    """(past input names, present output names), per layer key then value (optimum's names)."""
    past = [f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    present = [f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    return past, present


class PrefillGraph(nn.Module):
    """``forward(input_ids, position_ids)`` -> activation, [fourier_block,] present.* (no past)."""

    def __init__(self, head: Head, fourier: FourierBlock | None = None) -> None:
        super().__init__()
        self.head = head
        self.fourier = fourier

    def forward(self, input_ids: Tensor, position_ids: Tensor) -> tuple[Tensor, ...]:
        past_k, past_v = self.head.empty_kv(input_ids.shape[0], 0)
        x, keys, values = self.head(input_ids, position_ids, past_k, past_v)
        return _outputs(x, keys, values, self.fourier)


class DecodeGraph(nn.Module):
    """``forward(input_ids, position_ids, *past)`` -> activation, [fourier_block,] present.*;
    ``past`` is key 0, value 0, key 1, ... each ``(B, n_kv, T, hd)``."""

    def __init__(self, head: Head, fourier: FourierBlock | None = None) -> None:
        super().__init__()
        self.head = head
        self.fourier = fourier

    def forward(self, input_ids: Tensor, position_ids: Tensor, *past: Tensor) -> tuple[Tensor, ...]:
        past_k = torch.stack(past[0::2])
        past_v = torch.stack(past[1::2])
        x, keys, values = self.head(input_ids, position_ids, past_k, past_v)
        return _outputs(x, keys, values, self.fourier)


def _outputs(
    x: Tensor, keys: Tensor, values: Tensor, fourier: FourierBlock | None
) -> tuple[Tensor, ...]:
    out: list[Tensor] = [x]
    if fourier is not None:
        out.append(fourier(x))
    for k, v in zip(keys.unbind(0), values.unbind(0), strict=True):
        out += [k, v]
    return tuple(out)
