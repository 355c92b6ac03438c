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
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        ids = ids.to(self.device)
        h = self.base.embed_tokens(ids)
        b, s = ids.shape
        position_ids = torch.arange(s, device=self.device)[None].expand(b, s)
        masks = {}
        for kind in dict.fromkeys(self.layer_types):
            make = (create_sliding_window_causal_mask if kind == "sliding_attention"
                    else create_causal_mask)
            masks[kind] = make(config=self.config, inputs_embeds=h, attention_mask=None,
                               past_key_values=None, position_ids=position_ids)
        ctx = {"position_ids": position_ids, "masks": masks,
               "position_embeddings": self.base.rotary_emb(h, position_ids)}
        return h, ctx

    def run(self, h: Tensor, ctx: dict[str, Any], start: int, stop: int) -> Tensor:
        """Decoder layers ``start..stop-1`` on h (B, S, D)."""
        for i in range(start, stop):
            out = self.base.layers[i](
                h, attention_mask=ctx["masks"][self.layer_types[i]],
                position_embeddings=ctx["position_embeddings"],
                position_ids=ctx["position_ids"], past_key_values=None, use_cache=False)
            h = out[0] if isinstance(out, tuple) else out
        return h

    def logits_at(self, h: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
        """Final norm + lm_head at the (row, position) pairs only: (T,) (T,) -> (T, V) float32."""
        sel = h[rows, cols]
        return self.model.lm_head(self.base.norm(sel)).float()

    def logits(self, h: Tensor) -> Tensor:
        """Final norm + lm_head everywhere: (B, S, D) -> (B, S, V) float32."""
        return self.model.lm_head(self.base.norm(h)).float()


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[Tensor, list[int]]:
    """Right-pad token sequences into (B, S_max) long; returns the lengths too."""
    lengths = [len(s) for s in seqs]
    out = torch.full((len(seqs), max(lengths)), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
    return out, lengths
