"""The device head: token embedding + decoder layers[:L] of a Llama / Qwen2 model, written out.

Plain modules whose forward reads like the equations (RMSNorm, rotary position embedding with the
family's frequency scaling, grouped-query attention, gated SiLU MLP), loaded from a Hugging Face
state dict and checked against the Hugging Face model's hidden states.

Two ways to run it, one set of layers:

* :meth:`Head.forward` is the functional, export-friendly core (ONNX opset 18)::

      forward(input_ids (B, S) long, position_ids (B, S) long, past_k, past_v)
          -> activation (B, S, D) float32, present_k, present_v

  ``past_k``/``past_v`` are ``(L, B, n_kv_heads, T, head_dim)`` tensors in the model dtype, the
  keys (after rotary) and values of the T positions seen so far, stacked over the head's L layers;
  ``present_*`` is ``(L, B, n_kv_heads, T + S, head_dim)``: past concatenated with the new step
  along the time axis. Key slot ``j`` holds position ``j``, and a query at position ``p`` sees
  the slots ``j <= p`` (and ``j > p - W`` in a sliding-window layer). Prefill passes ``T = 0``
  (:meth:`Head.empty_kv`). Checked with ``torch.onnx.export(..., opset_version=18,
  dynamo=True)`` and onnxruntime with B, S and T dynamic; trace it with example inputs of
  B >= 2, S >= 2 and T >= 2, or the exporter specialises those sizes to the example's 0 or 1.
* :meth:`Head.start` gives a :class:`HeadSession` for the runtime: a static cache of
  ``max_seq_len`` slots written in place (gpt-fast style), one call per prefill or decode step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fc_edge.errors import ConfigError, ModelError


@dataclass(frozen=True)
class HeadConfig:
    """What the head computes, read from a Hugging Face Llama / Qwen2 config."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int  # decoder layers in the head (the split point L)
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
    def from_hf(cls, config: Any, num_layers: int) -> HeadConfig:
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


def rope_inv_freq(cfg: HeadConfig) -> Tensor:
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
#: to attend over.
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

    def __init__(self, cfg: HeadConfig) -> None:
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

    def __init__(self, cfg: HeadConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """h = x + attn(norm(x)); out = h + mlp(norm(h))."""

    def __init__(self, cfg: HeadConfig) -> None:
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


class Head(nn.Module):
    """Embedding + the first ``layer`` decoder layers of a Llama / Qwen2 model (see module doc).

    Build it with :func:`fc_edge.models.split.split` or :meth:`from_hf`. Attributes: ``config``
    (the Hugging Face config), ``layer`` (= ``num_layers``, the split point L), ``hidden_size``
    (D), ``head_config`` (:class:`HeadConfig`), ``dtype`` (of the weights and the cache).
    """

    def __init__(self, cfg: HeadConfig, hf_config: Any = None) -> None:
        super().__init__()
        self.head_config = cfg
        self.config = hf_config
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    @classmethod
    def from_hf(cls, model: Any, layer: int) -> Head:
        """The head of a Hugging Face ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` cut after
        ``layer`` decoder layers; the weights are copied (the head is independent of ``model``)."""
        cfg = HeadConfig.from_hf(model.config, layer)
        source = model.model
        param = next(source.parameters())
        with torch.device("meta"):
            head = cls(cfg, model.config).to(param.dtype)
        head.to_empty(device=param.device)
        # The rotary frequencies stay float32 whatever the weights' dtype, as in transformers.
        head.inv_freq = rope_inv_freq(cfg).to(param.device)
        state = {"embed_tokens.weight": source.embed_tokens.weight}
        for i in range(layer):
            for name, t in source.layers[i].state_dict().items():
                state[f"layers.{i}.{name}"] = t
        head.load_state_dict(state, strict=True)
        return head.eval()

    def to_device(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Head:
        """Move the weights (and convert them to ``dtype``); the rotary frequencies stay
        float32, as in transformers. Returns ``self``."""
        self.to(device=device, dtype=dtype)
        self.inv_freq = rope_inv_freq(self.head_config).to(device)
        return self

    @property
    def layer(self) -> int:
        return self.head_config.num_layers

    @property
    def num_layers(self) -> int:
        return self.head_config.num_layers

    @property
    def hidden_size(self) -> int:
        return self.head_config.hidden_size

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def kv_shape(self, batch: int, length: int) -> tuple[int, int, int, int, int]:
        """Shape of a stacked key (or value) cache: (L, B, n_kv_heads, T, head_dim)."""
        c = self.head_config
        return (c.num_layers, batch, c.num_kv_heads, length, c.head_dim)

    def empty_kv(self, batch: int = 1, length: int = 0) -> tuple[Tensor, Tensor]:
        """Zero past keys and values of ``length`` slots (``length=0``: the prefill input)."""
        device = self.embed_tokens.weight.device
        shape = self.kv_shape(batch, length)
        return (
            torch.zeros(shape, dtype=self.dtype, device=device),
            torch.zeros(shape, dtype=self.dtype, device=device),
        )

    def forward(
        self, input_ids: Tensor, position_ids: Tensor, past_k: Tensor, past_v: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """input_ids, position_ids (B, S) long; past_* (L, B, n_kv, T, hd) ->
        activation (B, S, D) float32, present_* (L, B, n_kv, T + S, hd)."""
        x, keys, values = self.run_layers(input_ids, position_ids, past_k, past_v, None)
        return x, torch.stack(keys), torch.stack(values)

    def run_layers(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        past_k: Tensor,
        past_v: Tensor,
        write_at: int | None,
    ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """The layers over stacked caches (see :meth:`Attention.forward` for ``write_at``);
        a query at position p sees the key slots j <= p (and j > p - W in a sliding-window
        layer; the cache keeps every slot). Returns the activation in float32 and
        each layer's attended keys and values."""
        x = self.embed_tokens(input_ids)
        cos, sin = rotary_cos_sin(self.inv_freq, position_ids, x.dtype)
        n_past = past_k.shape[3] if write_at is None else write_at
        windows = self.head_config.sliding_windows or (None,) * len(self.layers)
        visible = attention_masks(position_ids, n_past + input_ids.shape[1], windows)
        keys, values = [], []
        for i, layer in enumerate(self.layers):
            kv = (
                concat_kv(past_k[i], past_v[i])
                if write_at is None
                else static_kv(past_k[i], past_v[i], write_at)
            )
            x, k, v = layer(x, cos, sin, visible[windows[i]], kv)
            keys.append(k)
            values.append(v)
        return x.float(), keys, values

    def start(self, max_seq_len: int) -> HeadSession:
        """A per-session device state: a static cache of ``max_seq_len`` slots, position 0."""
        return HeadSession(self, max_seq_len)


class HeadSession:
    """One generation on the device: static key/value buffers and the next position.

    ``k_cache``/``v_cache`` are ``(L, 1, n_kv_heads, max_seq_len, head_dim)``; slot ``p`` holds
    position ``p``. :meth:`step` writes the new keys and values in place and attends over the
    slots written so far (the same layers as :meth:`Head.forward`).
    """

    def __init__(self, head: Head, max_seq_len: int) -> None:
        if max_seq_len < 1:
            raise ConfigError(f"max_seq_len must be at least 1, got {max_seq_len}")
        self.head = head
        self.max_seq_len = max_seq_len
        self.position = 0
        self.k_cache, self.v_cache = head.empty_kv(1, max_seq_len)

    def step(self, input_ids: Tensor) -> Tensor:
        """Run tokens ``input_ids`` (S,) long at the next S positions; returns (S, D) float32."""
        input_ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(-1)
        s = input_ids.shape[0]
        if s == 0:
            raise ConfigError("step needs at least one token")
        start, end = self.position, self.position + s
        if end > self.max_seq_len:
            raise ConfigError(
                f"the session holds {self.max_seq_len} positions; {s} more token(s) at position "
                f"{start} do not fit: start a session with a larger max_seq_len"
            )
        device = self.k_cache.device
        with torch.inference_mode():
            ids = input_ids.to(device)[None]
            positions = torch.arange(start, end, device=device)[None]
            x, _, _ = self.head.run_layers(ids, positions, self.k_cache, self.v_cache, start)
        self.position = end
        return x[0]
