"""A Hugging Face causal LM run layer by layer, so the work before a split is done once.

:class:`LayerStack` calls the model's own modules (embedding, rotary, decoder layers, norm,
lm_head) the way its forward does, like :class:`fc_edge.models.tail.Tail`, without a cache, over
right-padded batches of either plain sequences (:meth:`LayerStack.context`: causal, so padding
after a sequence's end changes nothing before it) or packed trees (:class:`Tree`,
:meth:`LayerStack.tree_context`: one shared prefix and several branches in one row, each branch
masked to see the prefix and itself only).

The output of decoder layer ``L-1`` (Hugging Face ``hidden_states[L]``) is the activation a
device sends when the model is split after layer ``L``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
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

    def split_layers(self, layers: Sequence[int]) -> list[int]:
        """``layers`` checked (each in 1..N-1, at least one), sorted, each once."""
        if not layers:
            raise ConfigError("give at least one split layer")
        for L in layers:
            self.check_split(L)
        return sorted(set(int(L) for L in layers))

    def forward_keeping(self, ids: Tensor, layers: Sequence[int], to_end: bool = True
                        ) -> tuple[Tensor, dict[str, Any], dict[int, Tensor]]:
        """The uncompressed forward of ids (B, S), keeping the activation after each split layer
        in ``layers`` (sorted). Returns (final hidden states (B, S, D), the pass's context,
        {L: activation (B, S, D)}); a codec then reruns only the layers after its split from
        ``kept[L]``. ``to_end`` False stops after the deepest split layer (the hidden states
        returned are then that layer's)."""
        h, ctx = self.start(ids)
        kept: dict[int, Tensor] = {}
        prev = 0
        for L in layers:
            h = self.run(h, ctx, prev, L)
            kept[L] = h
            prev = L
        return (self.run(h, ctx, prev, self.num_layers) if to_end else h), ctx, kept

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

    def run(self, h: Tensor, ctx: dict[str, Any], start: int, stop: int) -> Tensor:
        """Decoder layers ``start..stop-1`` on h (B, S, D) under ``ctx`` (:meth:`context` or
        :meth:`tree_context`)."""
        for i in range(start, stop):
            out = self.base.layers[i](
                h, attention_mask=ctx["masks"][self.layer_types[i]],
                position_embeddings=ctx["position_embeddings"],
                position_ids=ctx["position_ids"], past_key_values=None, use_cache=False)
            h = out[0] if isinstance(out, tuple) else out
        return h

    def tree_context(self, trees: Sequence[Tree], h: Tensor) -> dict[str, Any]:
        """Context of a pass over packed trees: row r of h (B, T, D) holds ``trees[r]``'s rows
        (prefix, then each branch), right-padded. A prefix row attends to the prefix rows at or
        before it; a branch row to the whole prefix and to its own branch's rows at or before it,
        never to another branch; a sliding-window layer also drops keys ``window`` or more
        positions back. Each row sees exactly what it would see in its own sequence (prefix +
        that branch), so the result is that sequence's, up to float rounding."""
        b, t = h.shape[:2]
        pos = torch.zeros(b, t, dtype=torch.long)
        seg = torch.full((b, t), -1, dtype=torch.long)  # -1: padding
        for r, tree in enumerate(trees):
            pos[r, : tree.rows] = torch.as_tensor(tree.positions())
            seg[r, : tree.rows] = torch.as_tensor(tree.segments())
        pos, seg = pos.to(self.device), seg.to(self.device)
        q_pos, k_pos = pos[:, :, None], pos[:, None, :]
        q_seg, k_seg = seg[:, :, None], seg[:, None, :]
        allowed = (k_pos <= q_pos) & ((k_seg == 0) | (k_seg == q_seg)) & (k_seg >= 0)
        allowed |= torch.eye(t, dtype=torch.bool, device=self.device)  # padding: itself only
        masks = {}
        for kind in dict.fromkeys(self.layer_types):
            ok = allowed
            if kind == "sliding_attention":
                ok = allowed & (q_pos - k_pos < int(self.config.sliding_window))
            # an additive float mask: the same meaning for the sdpa and eager attention kernels
            zero = torch.zeros(b, 1, t, t, dtype=h.dtype, device=self.device)
            masks[kind] = zero.masked_fill(~ok[:, None], torch.finfo(h.dtype).min)
        return {"position_ids": pos, "masks": masks,
                "position_embeddings": self.base.rotary_emb(h, pos)}

    def run_trees(self, inputs: Sequence[Tensor], trees: Sequence[Tree], start: int, stop: int,
                  keep: Sequence[int] = (), batch_tokens: int = 256
                  ) -> tuple[list[Tensor], dict[int, list[Tensor]]]:
        """Layers ``start..stop-1`` over packed trees: ``inputs[i]`` (``trees[i].rows``, D) is
        tree i's activation after layer ``start - 1``. Trees go longest first into right-padded
        batches of at most ``batch_tokens`` padded rows (a longer tree goes alone).

        Returns (each tree's rows after layer ``stop - 1``, {L: each tree's rows after layer
        ``L - 1``} for every L in ``keep``, ``start < L <= stop``)."""
        n = len(trees)
        outs: list[Tensor] = [inputs[0]] * n
        kept: dict[int, list[Tensor]] = {L: [inputs[0]] * n for L in keep}
        cuts = sorted(L for L in set(keep) if start < L < stop) + [stop]
        order = sorted(range(n), key=lambda i: -trees[i].rows)
        while order:
            width = trees[order[0]].rows
            take = max(1, min(len(order), batch_tokens // max(width, 1)))
            batch, order = order[:take], order[take:]
            h = inputs[batch[0]].new_zeros(len(batch), width, self.hidden_size)
            for r, i in enumerate(batch):
                h[r, : trees[i].rows] = inputs[i]
            ctx = self.tree_context([trees[i] for i in batch], h)
            prev = start
            for cut in cuts:
                h = self.run(h, ctx, prev, cut)
                prev = cut
                if cut in kept:
                    for r, i in enumerate(batch):
                        kept[cut][i] = h[r, : trees[i].rows]
            for r, i in enumerate(batch):
                outs[i] = h[r, : trees[i].rows]
        return outs, kept

    def logits_at(self, h: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
        """Final norm + lm_head at the (row, position) pairs only: (T,) (T,) -> (T, V) float32."""
        sel = h[rows, cols]
        return self.model.lm_head(self.base.norm(sel)).float()

    def logits(self, h: Tensor) -> Tensor:
        """Final norm + lm_head everywhere: (B, S, D) -> (B, S, V) float32."""
        return self.model.lm_head(self.base.norm(h)).float()


@dataclass(frozen=True)
class Tree:
    """The layout of one packed row: ``prefix`` rows, then branches of ``branches[j]`` rows.

    Branch j continues the prefix: its rows sit at positions ``prefix, prefix + 1, ...`` and see
    the prefix and their own branch only (:meth:`LayerStack.tree_context`). The choices of a
    multiple-choice item that share a context are one tree: the context once, every choice's
    continuation a branch.
    """

    prefix: int
    branches: tuple[int, ...] = ()

    @property
    def rows(self) -> int:
        return self.prefix + sum(self.branches)

    def branch_start(self, j: int) -> int:
        """Row index of branch j's first row."""
        return self.prefix + sum(self.branches[:j])

    def positions(self) -> list[int]:
        pos = list(range(self.prefix))
        for k in self.branches:
            pos.extend(range(self.prefix, self.prefix + k))
        return pos

    def segments(self) -> list[int]:
        """0 for the prefix's rows, j + 1 for branch j's."""
        seg = [0] * self.prefix
        for j, k in enumerate(self.branches):
            seg.extend([j + 1] * k)
        return seg


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[Tensor, list[int]]:
    """Right-pad token sequences into (B, S_max) long; returns the lengths too."""
    lengths = [len(s) for s in seqs]
    out = torch.full((len(seqs), max(lengths)), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
    return out, lengths
