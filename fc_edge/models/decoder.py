"""The decoder both sides of a split run: Llama / Qwen2 layers, written out.

Plain modules whose forward reads like the equations (RMSNorm, rotary position embedding with the
family's frequency scaling, grouped-query attention, gated SiLU MLP), loaded from a Hugging Face
state dict and checked against the Hugging Face model in the tests. The device head
(:mod:`fc_edge.models.head`: embedding + layers[:L]) and the server tail
(:mod:`fc_edge.models.tail`: layers[L:] + norm + lm_head) are both a :class:`DecoderConfig`, a
list of :class:`DecoderLayer` and :func:`run_layers`; they differ only in where keys and values
live (a :data:`KVUpdate`: concatenation for export, a static buffer on the device, paged blocks on
the server).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fc_edge.errors import ModelError


@dataclass(frozen=True)
class DecoderConfig:
    """What a stack of decoder layers computes, read from a Hugging Face Llama / Qwen2 config
    (the head's layers[:L] or the tail's layers[L:])."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int  # decoder layers in this stack (the head: the split point L)
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_type: str  # "default", "linear" or "llama3"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    attention_bias: bool = False  # bias on q, k, v (Qwen2: always) ...
    output_bias: bool = False  # ... and on o_proj (Llama's attention_bias covers both)
    mlp_bias: bool = False
    # Per head layer: None (full attention) or W (a query at p sees keys p-W+1..p; Qwen2).
    sliding_windows: tuple[int | None, ...] = ()

    @classmethod
    def from_hf(cls, config: Any, num_layers: int) -> DecoderConfig:
        """Read a transformers 5 (``rope_parameters``) or 4 (``rope_theta``, ``rope_scaling``)
        config."""
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ModelError(f"the head supports the SiLU gated MLP, not {config.hidden_act!r}")
        rope = dict(getattr(config, "rope_parameters", None) or {})
        if not rope:
            rope = dict(getattr(config, "rope_scaling", None) or {})
            rope.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
        if "rope_type" not in rope:
            rope["rope_type"] = rope.get("type", "default")
        rope_type = rope["rope_type"]
        if rope_type not in ("default", "linear", "llama3"):
            raise ModelError(
                f"rope_type {rope_type!r} is not supported by the head (default, linear, llama3)"
            )
        if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
            raise ModelError("partial rotary embeddings are not supported by the head")
        num_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        qwen2 = config.model_type == "qwen2"
        layer_types = getattr(config, "layer_types", None) or ["full_attention"] * num_layers
        sliding_windows = tuple(
            config.sliding_window if kind == "sliding_attention" else None
            for kind in layer_types[:num_layers]
        )
        if any(kind not in ("full_attention", "sliding_attention") for kind in layer_types):
            raise ModelError(f"the head supports full and sliding attention, not {layer_types}")
        attention_bias = qwen2 or bool(getattr(config, "attention_bias", False))
        return cls(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=float(config.rms_norm_eps),
            rope_theta=float(rope["rope_theta"]),
            rope_type=rope_type,
            rope_factor=float(rope.get("factor", 1.0)),
            rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            rope_original_max_position=int(
                rope.get("original_max_position_embeddings", config.max_position_embeddings)
            ),
            attention_bias=attention_bias,
            output_bias=attention_bias and not qwen2,
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            sliding_windows=sliding_windows,
        )


def rope_inv_freq(cfg: DecoderConfig) -> Tensor:
    """Rotary inverse frequencies ``(head_dim / 2,)`` float32: theta^(-2i/d), then the scaling.

    llama3: wavelengths longer than ``original_max / low_freq_factor`` are stretched by ``factor``,
    shorter than ``original_max / high_freq_factor`` are kept, and the band between is a linear
    blend in ``original_max / wavelength``. linear: every frequency divided by ``factor``.
    """
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    if cfg.rope_type == "linear":
        return inv_freq / cfg.rope_factor
    if cfg.rope_type == "llama3":
        factor, low, high = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        context = cfg.rope_original_max_position
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > context / low, inv_freq / factor, inv_freq)
        smooth = (context / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= context / high) & (wavelen <= context / low)
        return torch.where(medium, blended, scaled)
    return inv_freq


def rotary_cos_sin(
    inv_freq: Tensor, position_ids: Tensor, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """cos, sin ``(B, S, head_dim)`` of the angles position * inv_freq (each half repeated)."""
    angles = position_ids[..., None].float() * inv_freq.float()
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` (B, H, S, head_dim) by the angles of cos, sin (B, S, head_dim)."""
    cos, sin = cos[:, None], sin[:, None]
    return x * cos + rotate_half(x) * sin


#: Stores a layer's new keys and values (B, n_kv, S, hd) and returns the (B, n_kv, T, hd) slots
#: to attend over. An object with an ``attend(attention, q, k, v) -> (B, S, H * hd)`` method
#: instead stores and attends itself (the server's paged batches, fc_edge/models/tail.py).
KVUpdate = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def concat_kv(past_k: Tensor, past_v: Tensor) -> KVUpdate:
    """The export form: the T past positions in ``past_*`` (B, n_kv, T, hd), then the new ones."""
    return lambda k, v: (torch.cat((past_k, k), dim=2), torch.cat((past_v, v), dim=2))


def static_kv(buf_k: Tensor, buf_v: Tensor, write_at: int) -> KVUpdate:
    """The gpt-fast form: write slots write_at.. of the session's buffers (B, n_kv, max, hd) in
    place and attend over the first write_at + S."""

    def update(k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        end = write_at + k.shape[2]
        buf_k[:, :, write_at:end] = k
        buf_v[:, :, write_at:end] = v
        return buf_k[:, :, :end], buf_v[:, :, :end]

    return update


def attention_masks(
    position_ids: Tensor, n_slots: int, windows: tuple[int | None, ...]
) -> dict[int | None, Tensor]:
    """(B, 1, S, n_slots) bool for each distinct window in ``windows``: slot ``j`` holds position
    ``j``; a query at position p sees the slots j <= p (and j > p - W in a sliding window)."""
    slots = torch.arange(n_slots, device=position_ids.device)[None, None, :]
    pos = position_ids[:, :, None]
    causal = (slots <= pos)[:, None]
    return {
        w: causal if w is None else causal & (slots > pos - w)[:, None]
        for w in dict.fromkeys(windows)
    }


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), the mean taken in float32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Attention(nn.Module):
    """Grouped-query self-attention: n_heads queries share n_kv_heads keys and values."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(
            cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.attention_bias
        )
        self.k_proj = nn.Linear(
            cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.attention_bias
        )
        self.v_proj = nn.Linear(
            cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.attention_bias
        )
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.output_bias)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, visible: Tensor, kv: KVUpdate
    ) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, S, D); visible (B, 1, S, T) bool -> out (B, S, D) and the keys, values (T).

        ``kv`` stores the new keys and values (B, n_kv, S, hd) in the caller's cache and returns
        the T slots to attend over (see :func:`concat_kv`, :func:`static_kv`; the server's tail
        passes a paged one).
        """
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        attend = getattr(kv, "attend", None)
        if attend is not None:  # a paged batch of many sequences (the server's tail) attends
            return self.o_proj(attend(self, q, k, v)), k, v  # over its own blocks: (B, S, H*hd)
        k_all, v_all = kv(k, v)
        out = self.attend(q, k_all, v_all, visible)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1)), k_all, v_all

    def attend(self, q: Tensor, k: Tensor, v: Tensor, visible: Tensor) -> Tensor:
        """softmax(q k^T / sqrt(hd) + mask) v; each kv head serves n_heads / n_kv_heads queries."""
        groups = self.n_heads // self.n_kv_heads
        b, _, t, hd = k.shape
        k = k[:, :, None].expand(b, self.n_kv_heads, groups, t, hd).reshape(b, self.n_heads, t, hd)
        v = v[:, :, None].expand(b, self.n_kv_heads, groups, t, hd).reshape(b, self.n_heads, t, hd)
        scores = torch.matmul(q, k.transpose(2, 3)) * (hd**-0.5)
        scores = scores.masked_fill(~visible, float("-inf"))
        weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(weights, v)


class MLP(nn.Module):
    """down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """h = x + attn(norm(x)); out = h + mlp(norm(h))."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, visible: Tensor, kv: KVUpdate
    ) -> tuple[Tensor, Tensor, Tensor]:
        a, k, v = self.self_attn(self.input_layernorm(x), cos, sin, visible, kv)
        h = x + a
        return h + self.mlp(self.post_attention_layernorm(h)), k, v


def run_layers(
    layers: Sequence[DecoderLayer],
    cfg: DecoderConfig,
    inv_freq: Tensor,
    x: Tensor,
    position_ids: Tensor,
    n_slots: int,
    kv_of_layer: Callable[[int], KVUpdate],
    collect: bool = False,
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """The one layer loop: ``x`` (B, S, D) at ``position_ids`` (B, S) through ``layers``, layer
    ``i`` storing its keys and values through ``kv_of_layer(i)`` and attending over ``n_slots``
    slots (slot j = position j; a query at p sees j <= p, and j > p - W in a sliding-window
    layer). Returns the output (B, S, D) in ``x``'s dtype and, when ``collect``, each layer's
    attended keys and values (the export form needs them)."""
    cos, sin = rotary_cos_sin(inv_freq, position_ids, x.dtype)
    windows = cfg.sliding_windows or (None,) * len(layers)
    visible = attention_masks(position_ids, n_slots, windows)
    keys: list[Tensor] = []
    values: list[Tensor] = []
    for i, layer in enumerate(layers):
        x, k, v = layer(x, cos, sin, visible[windows[i]], kv_of_layer(i))
        if collect:
            keys.append(k)
            values.append(v)
    return x, keys, values
