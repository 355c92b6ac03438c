"""The decoder both sides of a split run: one set of layers for every supported family.

Plain modules whose forward reads like the equations (RMSNorm, rotary position embedding with the
family's frequency scaling, grouped-query attention, gated MLP), loaded from a Hugging Face
state dict and checked against the Hugging Face model in the tests. The device head
(:mod:`fc_edge.models.head`: embedding + layers[:L]) and the server tail
(:mod:`fc_edge.models.tail`: layers[L:] + norm + lm_head) are both a :class:`DecoderConfig`, a
list of :class:`DecoderLayer` and :func:`run_layers`; they differ only in where keys and values
live (a :data:`KVUpdate`: concatenation for export, a static buffer on the device, paged blocks on
the server).

The families (:data:`FAMILIES`, keyed by the config's ``model_type``) differ in a few switches of
:class:`DecoderConfig`, each named after what it computes:

==========  ==================================================================================
llama       the base: RMSNorm, rotary (default, linear or llama3 scaling), GQA, SiLU gated MLP
mistral     + a sliding window in every layer (``sliding_window``)
qwen2       + biases on q, k, v; sliding windows per layer (``layer_types``)
qwen3       + RMSNorm of each query and key head before rotary (``q_norm``, ``k_norm``)
gemma2      + norms of (1 + w) computed in float32, a norm after attention and around the MLP,
            the embedding scaled by sqrt(D), attention scores and final logits soft-capped
            (``c tanh(x / c)``), queries scaled by ``query_pre_attn_scalar``, GELU (tanh)
gemma3_text + Gemma 2's norms, scale and GELU, q/k norms, and a rotary base of its own in the
            sliding-window layers (``rope_parameters["sliding_attention"]``)
phi3        + fused ``qkv_proj`` and ``gate_up_proj``, partial rotary embeddings
==========  ==================================================================================
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fc_edge.errors import ModelError

#: ``model_type`` -> the Hugging Face class the decoder implements (what :func:`split` accepts).
FAMILIES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
}
#: The MLP activations: Hugging Face's names -> the function.
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": F.silu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def check_family(config: Any) -> str:
    """The config's ``model_type`` when the decoder implements it; :class:`ModelError` naming the
    supported families otherwise (read from the config alone, before any weight)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        arch = (getattr(config, "architectures", None) or [model_type])[0]
        raise ModelError(
            f"cannot split a {arch} (model_type {model_type!r}): supported families are "
            f"{', '.join(FAMILIES.values())}"
        )
    return model_type


@dataclass(frozen=True)
class DecoderConfig:
    """What a stack of decoder layers computes, read from a Hugging Face config of one of
    :data:`FAMILIES` (the head's layers[:L] or the tail's layers[L:])."""

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
    rotary_dim: int = 0  # leading dims of each head that rotate (0: all of head_dim)
    attention_bias: bool = False  # bias on q, k, v (Qwen2: always) ...
    output_bias: bool = False  # ... and on o_proj (Llama's attention_bias covers both)
    mlp_bias: bool = False
    # Per layer of this stack: None (full attention) or W (a query at p sees keys p-W+1..p).
    sliding_windows: tuple[int | None, ...] = ()
    hidden_act: str = "silu"
    norm_offset: float = 0.0  # Gemma: the norms scale by (1 + w), in float32
    qk_norm: bool = False  # Qwen3: RMSNorm over each query / key head before rotary
    sandwich_norms: bool = False  # Gemma 2: a norm after attention, before and after the MLP
    attn_scale: float = 0.0  # scores = q k^T * attn_scale (0: head_dim ** -0.5)
    attn_softcap: float | None = None  # scores = c tanh(scores / c) before the mask (Gemma 2)
    final_softcap: float | None = None  # the same on the logits (the tail's)
    embed_scale: float = 1.0  # the embedding is multiplied by this (Gemma: sqrt(D))
    fused_qkv: bool = False  # Phi-3: one qkv_proj, split q | k | v
    fused_gate_up: bool = False  # Phi-3: one gate_up_proj, split gate | up
    # Gemma 3: the rotary base of the sliding-window layers (default rope), when it differs
    local_rope_theta: float | None = None

    @classmethod
    def from_hf(cls, config: Any, num_layers: int) -> DecoderConfig:
        """Read a transformers 5 (``rope_parameters``) or 4 (``rope_theta``, ``rope_scaling``)
        config of one of :data:`FAMILIES`; ``num_layers`` are its first layers (the head's)."""
        model_type = getattr(config, "model_type", "llama")
        if model_type not in FAMILIES:
            check_family(config)
        hidden_act = getattr(config, "hidden_activation", None) or getattr(
            config, "hidden_act", "silu")
        if hidden_act not in ACTIVATIONS:
            raise ModelError(f"the decoder supports the {', '.join(ACTIVATIONS)} gated MLPs, "
                             f"not {hidden_act!r}")
        rope = dict(getattr(config, "rope_parameters", None) or {})
        local = None
        if "full_attention" in rope or "sliding_attention" in rope:  # per layer type (Gemma 3)
            local = dict(rope.get("sliding_attention") or {})
            rope = dict(rope.get("full_attention") or {})
            if local.get("rope_type", "default") != "default":
                raise ModelError(f"the sliding-window layers' rope {local.get('rope_type')!r} is "
                                 "not supported by the decoder (default)")
        if not rope:
            rope = dict(getattr(config, "rope_scaling", None) or {})
            rope.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
        if "rope_type" not in rope:
            rope["rope_type"] = rope.get("type", "default")
        rope_type = rope["rope_type"]
        if rope_type not in ("default", "linear", "llama3"):
            raise ModelError(
                f"rope_type {rope_type!r} is not supported by the decoder (default, linear, llama3)"
            )
        num_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        partial = float(rope.get("partial_rotary_factor",
                                 getattr(config, "partial_rotary_factor", 1.0) or 1.0))
        rotary_dim = int(head_dim * partial)
        if not 0 < rotary_dim <= head_dim or rotary_dim % 2:
            raise ModelError(f"partial_rotary_factor {partial} leaves {rotary_dim} rotary "
                             f"dimensions of {head_dim}: not supported")
        qwen2 = model_type == "qwen2"
        gemma = model_type in ("gemma2", "gemma3_text")
        windows = _sliding_windows(config, num_layers)
        attention_bias = qwen2 or bool(getattr(config, "attention_bias", False))
        scalar = getattr(config, "query_pre_attn_scalar", None) if gemma else None
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
            rotary_dim=rotary_dim if rotary_dim < head_dim else 0,
            attention_bias=attention_bias,
            output_bias=attention_bias and not qwen2,
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            sliding_windows=windows,
            hidden_act=hidden_act,
            norm_offset=1.0 if gemma else 0.0,
            qk_norm=model_type in ("qwen3", "gemma3_text"),
            sandwich_norms=gemma,
            attn_scale=float(scalar) ** -0.5 if scalar else 0.0,
            attn_softcap=_cap(getattr(config, "attn_logit_softcapping", None) if gemma else None),
            final_softcap=_cap(getattr(config, "final_logit_softcapping", None)
                               if gemma else None),
            embed_scale=float(config.hidden_size) ** 0.5 if gemma else 1.0,
            fused_qkv=model_type == "phi3",
            fused_gate_up=model_type == "phi3",
            local_rope_theta=float(local["rope_theta"]) if local and "rope_theta" in local
            else None,
        )

    def layers_from(self, start: int) -> DecoderConfig:
        """The config of layers[start:] of a stack read with all its layers (the tail's)."""
        return dataclasses.replace(self, num_layers=self.num_layers - start,
                                   sliding_windows=self.sliding_windows[start:])


def _cap(value: Any) -> float | None:
    return float(value) if value else None


def _sliding_windows(config: Any, num_layers: int) -> tuple[int | None, ...]:
    """Per layer: None or the window. ``layer_types`` when the config has them (Qwen2/3,
    Gemma 2); otherwise ``sliding_window`` applies to every layer when it is set (Mistral,
    Phi-3), as transformers' masks do."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if not layer_types:
        return (window,) * num_layers
    if any(kind not in ("full_attention", "sliding_attention") for kind in layer_types):
        raise ModelError(f"the decoder supports full and sliding attention, not {layer_types}")
    return tuple(window if kind == "sliding_attention" else None
                 for kind in layer_types[:num_layers])


def rope_inv_freq(cfg: DecoderConfig) -> Tensor:
    """Rotary inverse frequencies ``(rotary_dim / 2,)`` float32 on the CPU: theta^(-2i/d), then
    the scaling.

    llama3: wavelengths longer than ``original_max / low_freq_factor`` are stretched by ``factor``,
    shorter than ``original_max / high_freq_factor`` are kept, and the band between is a linear
    blend in ``original_max / wavelength``. linear: every frequency divided by ``factor``.
    """
    d = cfg.rotary_dim or cfg.head_dim
    # on the CPU even inside a meta-device context (where modules are built): arithmetic on meta
    # tensors loads torch's symbolic-shape machinery, about 50 MB of a device's memory
    arange = torch.arange(0, d, 2, dtype=torch.int64, device="cpu")
    inv_freq = 1.0 / (cfg.rope_theta ** (arange.float() / d))
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
    """cos, sin ``(B, S, rotary_dim)`` of the angles position * inv_freq (each half repeated)."""
    angles = position_ids[..., None].float() * inv_freq.float()
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first ``rotary_dim`` dims of ``x`` (B, H, S, head_dim) by the angles of cos,
    sin (B, S, rotary_dim); the rest pass (partial rotary embeddings)."""
    cos, sin = cos[:, None], sin[:, None]
    d = cos.shape[-1]
    if d == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    x_rot, x_pass = x[..., :d], x[..., d:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)


def softcap(x: Tensor, cap: float | None) -> Tensor:
    """``cap * tanh(x / cap)`` (Gemma 2's soft-capping), or ``x`` when ``cap`` is None."""
    return x if cap is None else torch.tanh(x / cap) * cap


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
    """y = w * x / sqrt(mean(x^2) + eps), the mean taken in float32.

    ``offset`` 1 is Gemma's form: ``(1 + w) * x_normed`` computed in float32, then cast (Llama
    casts first, then scales)."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0) -> None:
        super().__init__()
        self.eps = eps
        self.offset = offset
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (x32 * (self.offset + self.weight.float())).to(x.dtype)
        return self.weight * x32.to(x.dtype)


def norm(cfg: DecoderConfig, dim: int | None = None) -> RMSNorm:
    """The family's RMSNorm over ``dim`` (default: the hidden size)."""
    return RMSNorm(dim or cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset)


class Attention(nn.Module):
    """Grouped-query self-attention: n_heads queries share n_kv_heads keys and values."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.scale = cfg.attn_scale or cfg.head_dim**-0.5
        self.softcap = cfg.attn_softcap
        q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.split_sizes = (q_dim, kv_dim, kv_dim)
        bias = cfg.attention_bias
        if cfg.fused_qkv:
            self.qkv_proj = nn.Linear(cfg.hidden_size, q_dim + 2 * kv_dim, bias=bias)
        else:
            self.q_proj = nn.Linear(cfg.hidden_size, q_dim, bias=bias)
            self.k_proj = nn.Linear(cfg.hidden_size, kv_dim, bias=bias)
            self.v_proj = nn.Linear(cfg.hidden_size, kv_dim, bias=bias)
        self.o_proj = nn.Linear(q_dim, cfg.hidden_size, bias=cfg.output_bias)
        if cfg.qk_norm:
            self.q_norm = norm(cfg, cfg.head_dim)
            self.k_norm = norm(cfg, cfg.head_dim)
        self.qk_norm = cfg.qk_norm
        self.fused = cfg.fused_qkv

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, visible: Tensor, kv: KVUpdate
    ) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, S, D); visible (B, 1, S, T) bool -> out (B, S, D) and the keys, values (T).

        ``kv`` stores the new keys and values (B, n_kv, S, hd) in the caller's cache and returns
        the T slots to attend over (see :func:`concat_kv`, :func:`static_kv`; the server's tail
        passes a paged one).
        """
        b, s, _ = x.shape
        if self.fused:
            q, k, v = self.qkv_proj(x).split(self.split_sizes, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(b, s, self.n_heads, self.head_dim)
        k = k.view(b, s, self.n_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        attend = getattr(kv, "attend", None)
        if attend is not None:  # a paged batch of many sequences (the server's tail) attends
            return self.o_proj(attend(self, q, k, v)), k, v  # over its own blocks: (B, S, H*hd)
        k_all, v_all = kv(k, v)
        out = self.attend(q, k_all, v_all, visible)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1)), k_all, v_all

    def attend(self, q: Tensor, k: Tensor, v: Tensor, visible: Tensor) -> Tensor:
        """softmax(cap(q k^T * scale) + mask) v; each kv head serves n_heads / n_kv_heads
        queries."""
        groups = self.n_heads // self.n_kv_heads
        b, _, t, hd = k.shape
        k = k[:, :, None].expand(b, self.n_kv_heads, groups, t, hd).reshape(b, self.n_heads, t, hd)
        v = v[:, :, None].expand(b, self.n_kv_heads, groups, t, hd).reshape(b, self.n_heads, t, hd)
        scores = softcap(torch.matmul(q, k.transpose(2, 3)) * self.scale, self.softcap)
        scores = scores.masked_fill(~visible, float("-inf"))
        # in float32, cast first: the same as softmax(dtype=float32) here, and what an exported
        # float16 graph keeps (the torchscript exporter casts softmax's output, not its input)
        weights = F.softmax(scores.float(), dim=-1).to(q.dtype)
        return torch.matmul(weights, v)


class MLP(nn.Module):
    """down(act(gate(x)) * up(x)); Phi-3 computes gate and up as one matrix (``gate_up_proj``)."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        d, i, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        if cfg.fused_gate_up:
            self.gate_up_proj = nn.Linear(d, 2 * i, bias=bias)
        else:
            self.gate_proj = nn.Linear(d, i, bias=bias)
            self.up_proj = nn.Linear(d, i, bias=bias)
        self.down_proj = nn.Linear(i, d, bias=bias)
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.fused = cfg.fused_gate_up

    def forward(self, x: Tensor) -> Tensor:
        if self.fused:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(self.act(gate) * up)


class DecoderLayer(nn.Module):
    """h = x + attn(norm(x)); out = h + mlp(norm(h)). Gemma 2 also normalises the attention's
    and the MLP's outputs (``post_attention_layernorm`` then is the former)."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.input_layernorm = norm(cfg)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = norm(cfg)
        self.mlp = MLP(cfg)
        self.sandwich = cfg.sandwich_norms
        if self.sandwich:
            self.pre_feedforward_layernorm = norm(cfg)
            self.post_feedforward_layernorm = norm(cfg)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, visible: Tensor, kv: KVUpdate
    ) -> tuple[Tensor, Tensor, Tensor]:
        a, k, v = self.self_attn(self.input_layernorm(x), cos, sin, visible, kv)
        if self.sandwich:
            h = x + self.post_attention_layernorm(a)
            m = self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
            return h + m, k, v
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
    rotary = {False: rotary_cos_sin(inv_freq, position_ids, x.dtype)}
    windows = cfg.sliding_windows or (None,) * len(layers)
    if cfg.local_rope_theta is not None:  # Gemma 3: sliding-window layers rotate by their own
        local = dataclasses.replace(cfg, rope_theta=cfg.local_rope_theta, rope_type="default",
                                    rope_factor=1.0)
        rotary[True] = rotary_cos_sin(rope_inv_freq(local).to(inv_freq.device), position_ids,
                                      x.dtype)
    visible = attention_masks(position_ids, n_slots, windows)
    keys: list[Tensor] = []
    values: list[Tensor] = []
    for i, layer in enumerate(layers):
        cos, sin = rotary[cfg.local_rope_theta is not None and windows[i] is not None]
        x, k, v = layer(x, cos, sin, visible[windows[i]], kv_of_layer(i))
        if collect:
            keys.append(k)
            values.append(v)
    return x, keys, values


def embed(embed_tokens: nn.Embedding, cfg: DecoderConfig, input_ids: Tensor) -> Tensor:
    """The token embedding (B, S, D), scaled as the family does (Gemma: by sqrt(D), the scale
    rounded to the weights' dtype first, as transformers does)."""
    x = embed_tokens(input_ids)
    if cfg.embed_scale != 1.0:
        x = x * torch.tensor(cfg.embed_scale).to(x.dtype)
    return x


def channel_gains(norm_weights: Sequence[Tensor], cfg: DecoderConfig) -> Tensor:
    """``(D,)`` importance of each hidden channel of the activation sent at a split: the RMS,
    over the decoder layers after it, of their input RMSNorm gains (``offset + w``), floored at
    1e-3 of the largest. Channels that later layers scale down tolerate more noise; the
    ``rotated`` codec shapes its noise with it."""
    gains = torch.stack([w.detach().float() + cfg.norm_offset for w in norm_weights])
    w = gains.square().mean(dim=0).sqrt()
    return w.clamp_min(1e-3 * float(w.max()))
