"""The server tail: a Hugging Face model's decoder layers[L:] + final norm + lm_head.

The tail calls the Hugging Face modules themselves (no copy of their math), the way the model's
own forward does: rotary cos/sin from ``model.model.rotary_emb``, the attention masks from
``transformers.masking_utils`` (full and, where the config has them, sliding-window layers), and a
``DynamicCache`` per session. Cache layers 0..L-1 stay empty; the masks are sized against the
tail's first layer of each attention type.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fc_edge.errors import ConfigError


class Tail:
    """Layers[L:] + norm + lm_head of ``model`` (shared, not copied). ``config`` is the Hugging
    Face config, ``layer`` the split point L, ``hidden_size`` D, ``vocab_size`` V."""

    def __init__(self, model: Any, layer: int) -> None:
        self.model = model
        self.config = model.config
        self.layer = layer
        n = model.config.num_hidden_layers
        self.layer_types: list[str] = list(
            getattr(model.config, "layer_types", None) or ["full_attention"] * n
        )

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def dtype(self) -> torch.dtype:
        return self.model.lm_head.weight.dtype

    def new_cache(self) -> Any:
        """An empty Hugging Face cache for one session."""
        from transformers import DynamicCache

        return DynamicCache(config=self.config)

    def forward(self, activation: Tensor, cache: Any | None = None, position: int = 0) -> Tensor:
        """activation (B, S, D) at positions position..position+S-1 -> logits (B, S, V) float32.

        With a ``cache`` the layers append their keys and values to it and attend over what it
        holds; with ``None`` the S positions are the whole sequence (``position`` must be 0).
        """
        from transformers.masking_utils import (
            create_causal_mask,
            create_sliding_window_causal_mask,
        )

        base = self.model.model
        device = self.model.lm_head.weight.device
        h = activation.to(device=device, dtype=self.dtype)
        b, s, _ = h.shape
        position_ids = torch.arange(position, position + s, device=device)[None].expand(b, s)
        masks = {}
        for kind in dict.fromkeys(self.layer_types[self.layer :]):
            first = self.layer_types.index(kind, self.layer)
            make = (
                create_sliding_window_causal_mask
                if kind == "sliding_attention"
                else create_causal_mask
            )
            masks[kind] = make(
                config=self.config,
                inputs_embeds=h,
                attention_mask=None,
                past_key_values=cache,
                position_ids=position_ids,
                layer_idx=first if cache is not None else None,
            )
        position_embeddings = base.rotary_emb(h, position_ids)
        for i in range(self.layer, self.config.num_hidden_layers):
            h = base.layers[i](
                h,
                attention_mask=masks[self.layer_types[i]],
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=cache is not None,
            )
        return self.model.lm_head(base.norm(h)).float()

    def start(self) -> TailSession:
        """A per-session server state: an empty Hugging Face cache, position 0."""
        return TailSession(self)


class TailSession:
    """One generation on the server: the Hugging Face cache and the next position."""

    def __init__(self, tail: Tail) -> None:
        self.tail = tail
        self.cache = tail.new_cache()
        self.position = 0

    def step(self, activation: Tensor) -> Tensor:
        """activation (S, D) float for the next S positions -> logits (S, V) float32."""
        if activation.ndim != 2 or activation.shape[1] != self.tail.hidden_size:
            raise ConfigError(
                f"the tail takes an (S, {self.tail.hidden_size}) activation, "
                f"got shape {tuple(activation.shape)}"
            )
        if activation.shape[0] == 0:
            raise ConfigError("step needs at least one activation row")
        with torch.inference_mode():
            logits = self.tail.forward(activation[None], self.cache, self.position)
        self.position += activation.shape[0]
        return logits[0]
