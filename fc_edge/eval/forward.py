"""A Hugging Face causal LM run layer by layer, so the work before a split is done once.

:class:`LayerStack` calls the model's own modules (embedding, rotary, decoder layers, norm,
lm_head) the way its forward does, like :class:`fc_edge.models.tail.Tail`, but over right-padded
batches without a cache: position ``t`` of a row only attends to positions ``<= t``, so padding
after a sequence's end changes nothing before it, and no attention mask is needed.

The output of decoder layer ``L-1`` (Hugging Face ``hidden_states[L]``) is the activation a
device sends when the model is split after layer ``L``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from fc_edge.errors import ConfigError, ModelError


class LayerStack:
    """``model``'s decoder as separable pieces. ``num_layers`` N, ``hidden_size`` D."""

    def __init__(self, model: Any) -> None:
        base = getattr(model, "model", None)
        if base is None or not hasattr(base, "layers") or not hasattr(model, "lm_head"):
            raise ModelError(f"{type(model).__name__} is not a decoder-only causal LM with "
                             "model.layers and lm_head (Llama / Qwen2 style)")
        self.model = model
        self.base = base
        self.config = model.config
        self.num_layers = len(base.layers)
        self.hidden_size = int(model.config.hidden_size)
        self.layer_types: list[str] = list(
            getattr(model.config, "layer_types", None) or ["full_attention"] * self.num_layers)

    def check_split(self, layer: int) -> None:
        if not 1 <= layer <= self.num_layers - 1:
            raise ConfigError(f"split layer must be in 1..{self.num_layers - 1} for this model, "
                              f"got {layer}")

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    def start(self, ids: Tensor) -> tuple[Tensor, dict[str, Any]]:
        """ids (B, S) long -> (embeddings (B, S, D), context for :meth:`run`)."""
        h = self.base.embed_tokens(ids.to(self.device))
        return h, self.context(h)

    def context(self, h: Tensor) -> dict[str, Any]:
        """Context of a pass over h (B, S, D) at positions 0..S-1 (causal masks, rotary)."""
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        b, s = h.shape[:2]
        position_ids = torch.arange(s, device=self.device)[None].expand(b, s)
        masks = {}
        for kind in dict.fromkeys(self.layer_types):
            make = (create_sliding_window_causal_mask if kind == "sliding_attention"
                    else create_causal_mask)
            masks[kind] = make(config=self.config, inputs_embeds=h, attention_mask=None,
                               past_key_values=None, position_ids=position_ids)
        return {"position_ids": position_ids, "masks": masks,
                "position_embeddings": self.base.rotary_emb(h, position_ids)}

    def run(self, h: Tensor, ctx: dict[str, Any], start: int, stop: int,
            cache: PrefixCache | None = None) -> Tensor:
        """Decoder layers ``start..stop-1`` on h (B, S, D). With ``cache`` the layers record
        their keys/values (a prefix pass) or attend to the recorded prefix first (a continuation
        pass, ``ctx`` from :meth:`continuation`)."""
        for i in range(start, stop):
            out = self.base.layers[i](
                h, attention_mask=ctx["masks"][self.layer_types[i]],
                position_embeddings=ctx["position_embeddings"],
                position_ids=ctx["position_ids"], past_key_values=cache, use_cache=False)
            h = out[0] if isinstance(out, tuple) else out
        return h

    @property
    def can_share_prefix(self) -> bool:
        """Whether :meth:`continuation` applies: every layer attends to all earlier positions
        (no sliding window, whose mask this class does not build for a continuation)."""
        return all(t == "full_attention" for t in self.layer_types)

    def continuation(self, prefix_len: int, h: Tensor) -> dict[str, Any]:
        """Context of a continuation pass: h (B, K, D) holds positions ``prefix_len ..
        prefix_len + K - 1`` of B sequences that share a recorded prefix of ``prefix_len``
        positions. Row t attends to the whole prefix and to rows ``<= t`` (padding after a
        row's end changes nothing before it)."""
        b, k = h.shape[:2]
        pos = torch.arange(prefix_len, prefix_len + k, device=self.device)
        position_ids = pos[None].expand(b, k)
        allowed = torch.ones(k, prefix_len + k, dtype=torch.bool, device=self.device)
        allowed[:, prefix_len:] = torch.tril(allowed[:, prefix_len:])
        # an additive float mask: the same meaning for the sdpa and eager attention kernels
        mask = torch.zeros(k, prefix_len + k, dtype=h.dtype, device=self.device)
        mask = mask.masked_fill(~allowed, torch.finfo(h.dtype).min)[None, None].expand(b, 1, k, -1)
        return {"position_ids": position_ids, "masks": {"full_attention": mask},
                "position_embeddings": self.base.rotary_emb(h, position_ids)}

    def logits_at(self, h: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
        """Final norm + lm_head at the (row, position) pairs only: (T,) (T,) -> (T, V) float32."""
        sel = h[rows, cols]
        return self.model.lm_head(self.base.norm(sel)).float()

    def logits(self, h: Tensor) -> Tensor:
        """Final norm + lm_head everywhere: (B, S, D) -> (B, S, V) float32."""
        return self.model.lm_head(self.base.norm(h)).float()


class PrefixCache:
    """Keys/values of a shared prefix, for the decoder layers' ``past_key_values`` argument.

    While ``extend`` is False a layer's call records its (1, heads, P, head_dim) keys and values;
    afterwards each call returns the prefix (broadcast to the batch) followed by the new
    positions' keys/values without storing them, so several continuation batches can reuse one
    prefix. Duck-types the one method of a transformers ``Cache`` the attention layers call.
    """

    def __init__(self) -> None:
        self.kv: dict[int, tuple[Tensor, Tensor]] = {}
        self.extend = False

    def update(self, key: Tensor, value: Tensor, layer_idx: int, *args: Any, **kwargs: Any
               ) -> tuple[Tensor, Tensor]:
        if not self.extend:
            self.kv[layer_idx] = (key, value)
            return key, value
        pk, pv = self.kv[layer_idx]
        b = key.shape[0]
        return (torch.cat([pk.expand(b, -1, -1, -1), key], dim=2),
                torch.cat([pv.expand(b, -1, -1, -1), value], dim=2))


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[Tensor, list[int]]:
    """Right-pad token sequences into (B, S_max) long; returns the lengths too."""
    lengths = [len(s) for s in seqs]
    out = torch.full((len(seqs), max(lengths)), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
    return out, lengths
