"""The server tail: decoder layers[L:] + final norm + lm_head, the head's own modules.

The tail is the same explicit decoder as the device head (:mod:`fc_edge.models.decoder`: RMSNorm,
rotary with the family's scaling, grouped-query attention, sliding windows, gated MLP), loaded
from a Hugging Face model's weights and checked against its logits in the tests. Keys and values
live in a :class:`PagedKVCache`: fixed-size blocks shared by every sequence on the server, each
sequence holding a block table (vLLM-style paging), so one forward can carry many sessions of
different lengths::

    tail = Tail.from_hf(model, layer=1)
    cache = tail.new_cache(num_blocks=64)
    table = cache.allocate(cache.blocks_for(40))           # a sequence of up to 40 positions
    logits = tail.forward_paged(x, positions, cache, blocks) # x (B, S, D), positions (B, S)

:meth:`Tail.start` gives a :class:`TailSession` over a private cache, one call per step, for
single-sequence use (the in-process split generation, the tests).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import Tensor, nn

from fc_edge.errors import ConfigError, FcEdgeError
from fc_edge.models.decoder import (
    DecoderConfig,
    DecoderLayer,
    KVUpdate,
    concat_kv,
    norm,
    rope_inv_freq,
    run_layers,
    softcap,
)

#: Positions per KV block.
DEFAULT_BLOCK_SIZE = 16


class CacheFullError(FcEdgeError):
    """The paged KV cache has too few free blocks for a request."""


def blocks_for(positions: int, block_size: int = DEFAULT_BLOCK_SIZE) -> int:
    """Blocks of ``block_size`` positions that hold ``positions`` positions (at least one)."""
    return max(1, math.ceil(positions / block_size))


class PagedKVCache:
    """Keys and values of many sequences in blocks of ``block_size`` positions.

    ``k``/``v`` are ``(layers, num_blocks, block_size, n_kv_heads, head_dim)``. Block 0 is a
    zero block that is never handed out: block tables are padded with it, and the attention mask
    hides it. A block is zeroed when it is handed out, so the unwritten slots of a sequence hold
    zeros (never uninitialised memory, whose NaN bit patterns would survive a zero weight).
    """

    def __init__(self, num_layers: int, num_blocks: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str,
                 block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        if num_blocks < 2:
            raise ConfigError(f"a paged KV cache needs at least 2 blocks, got {num_blocks}")
        if block_size < 1:
            raise ConfigError(f"block_size must be >= 1, got {block_size}")
        shape = (num_layers, num_blocks, block_size, n_kv_heads, head_dim)
        self.block_size = block_size
        self.num_blocks = num_blocks
        # torch.empty: pages are touched only as blocks are handed out (and zeroed)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.k[:, 0].zero_()
        self.v[:, 0].zero_()
        self._free = list(range(num_blocks - 1, 0, -1))

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def bytes_per_block(self) -> int:
        return 2 * self.k[:, 0].numel() * self.k.element_size()

    def blocks_for(self, positions: int) -> int:
        """Blocks that hold ``positions`` positions."""
        return blocks_for(positions, self.block_size)

    def allocate(self, n: int) -> list[int]:
        """``n`` zeroed blocks; raises :class:`CacheFullError` when fewer are free."""
        if n > len(self._free):
            raise CacheFullError(
                f"the KV cache has {len(self._free)} free blocks of {self.block_size} positions, "
                f"{n} are needed")
        blocks = [self._free.pop() for _ in range(n)]
        index = torch.tensor(blocks, device=self.k.device)
        self.k[:, index] = 0
        self.v[:, index] = 0
        return blocks

    def release(self, blocks: list[int]) -> None:
        self._free.extend(blocks)

    def table(self, tables: list[list[int]], n_blocks: int) -> Tensor:
        """Block tables as one (B, n_blocks) long tensor, each padded with the zero block."""
        out = torch.zeros((len(tables), n_blocks), dtype=torch.long)
        for i, t in enumerate(tables):
            t = t[:n_blocks]
            out[i, : len(t)] = torch.as_tensor(t, dtype=torch.long)
        return out.to(self.k.device)

    def updater(self, layer: int, table: Tensor, positions: Tensor) -> KVUpdate:
        """Write the keys and values of ``positions`` (B, S) into their blocks of ``table``
        (B, nb), then gather each row's nb * block_size slots (slot j = position j)."""
        bs = self.block_size
        block = table.gather(1, positions // bs)
        offset = positions % bs
        k_store, v_store = self.k[layer], self.v[layer]

        def update(k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
            b, n_kv, _, hd = k.shape
            k_store[block, offset] = k.transpose(1, 2).to(k_store.dtype)
            v_store[block, offset] = v.transpose(1, 2).to(v_store.dtype)
            n = table.shape[1] * bs
            k_all = k_store[table].reshape(b, n, n_kv, hd).transpose(1, 2)
            v_all = v_store[table].reshape(b, n, n_kv, hd).transpose(1, 2)
            return k_all, v_all

        return update


class Tail(nn.Module):
    """Decoder layers[L:] + norm + lm_head of a Llama / Qwen2 model (see the module doc).

    Attributes: ``config`` (the Hugging Face config), ``layer`` (the split point L),
    ``decoder_config`` (:class:`DecoderConfig` of the tail's layers), ``hidden_size`` D,
    ``vocab_size`` V, ``dtype`` and ``device`` of the weights.
    """

    def __init__(self, cfg: DecoderConfig, hf_config: Any, layer: int) -> None:
        super().__init__()
        self.decoder_config = cfg
        self.config = hf_config
        self.layer = layer
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = norm(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    @classmethod
    def from_hf(cls, model: Any, layer: int, device: torch.device | str | None = None,
                dtype: torch.dtype | None = None) -> Tail:
        """The tail of a Hugging Face ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` after ``layer``
        decoder layers. The weights are the model's own tensors (shared, not copied) unless
        ``device`` or ``dtype`` asks for a conversion."""
        n = model.config.num_hidden_layers
        full = DecoderConfig.from_hf(model.config, n)
        cfg = dataclasses.replace(full, num_layers=n - layer,
                                  sliding_windows=full.sliding_windows[layer:])
        with torch.device("meta"):
            tail = cls(cfg, model.config, layer)
        base = model.model
        state = {"norm.weight": base.norm.weight, "lm_head.weight": model.lm_head.weight}
        for i in range(layer, n):
            for name, t in base.layers[i].state_dict().items():
                state[f"layers.{i - layer}.{name}"] = t
        # detach: new tensors over the same storage (a no-op .to keeps it), so converting or
        # moving the tail never touches the model's own parameters
        state = {k: v.detach().to(device=device, dtype=dtype) for k, v in state.items()}
        tail.load_state_dict(state, strict=True, assign=True)
        tail.inv_freq = rope_inv_freq(cfg).to(state["lm_head.weight"].device)  # float32
        return tail.eval()

    @property
    def hidden_size(self) -> int:
        return self.decoder_config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.decoder_config.vocab_size

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def new_cache(self, num_blocks: int, block_size: int = DEFAULT_BLOCK_SIZE) -> PagedKVCache:
        """An empty paged cache of ``num_blocks`` blocks (one is the zero block) for this tail."""
        c = self.decoder_config
        return PagedKVCache(c.num_layers, num_blocks, c.num_kv_heads, c.head_dim, self.dtype,
                            self.device, block_size)

    def _layers(self, h: Tensor, position_ids: Tensor, n_slots: int,
                kv_of_layer: Any) -> Tensor:
        return run_layers(self.layers, self.decoder_config, self.inv_freq, h, position_ids,
                          n_slots, kv_of_layer)[0]

    def _logits(self, h: Tensor) -> Tensor:
        return softcap(self.lm_head(self.norm(h)), self.decoder_config.final_softcap).float()

    def forward(self, activation: Tensor) -> Tensor:
        """activation (B, S, D) at positions 0..S-1, no cache -> logits (B, S, V) float32."""
        h = activation.to(device=self.device, dtype=self.dtype)
        b, s, _ = h.shape
        c = self.decoder_config
        empty = torch.zeros((b, c.num_kv_heads, 0, c.head_dim), dtype=self.dtype,
                            device=self.device)
        positions = torch.arange(s, device=self.device)[None].expand(b, s)
        h = self._layers(h, positions, s, lambda i: concat_kv(empty, empty))
        return self._logits(h)

    def forward_paged(self, activation: Tensor, positions: Tensor, cache: PagedKVCache,
                      table: Tensor, last_only: bool = False) -> Tensor:
        """activation (B, S, D) at ``positions`` (B, S) long, attending over each row's blocks
        ``table`` (B, nb) of ``cache`` (its new keys and values are written there first) ->
        logits (B, S, V) float32, or (B, V) of the last row when ``last_only``."""
        h = activation.to(device=self.device, dtype=self.dtype)
        positions = positions.to(self.device)
        n_slots = table.shape[1] * cache.block_size
        h = self._layers(h, positions, n_slots,
                         lambda i: cache.updater(i, table, positions))
        return self._logits(h[:, -1] if last_only else h)

    def start(self, max_seq_len: int = 256) -> TailSession:
        """A single-sequence server state over a private cache (it grows past ``max_seq_len``
        as needed), position 0."""
        return TailSession(self, max_seq_len)


class TailSession:
    """One generation on a private paged cache: its block table and the next position."""

    def __init__(self, tail: Tail, max_seq_len: int) -> None:
        self.tail = tail
        self.position = 0
        self._reserve(max_seq_len)

    def _reserve(self, positions: int) -> None:
        """A private cache with room for ``positions``; the blocks written so far move over."""
        old, old_blocks = getattr(self, "cache", None), getattr(self, "blocks", [])
        n = blocks_for(positions)
        self.cache = self.tail.new_cache(n + 1)
        self.blocks = self.cache.allocate(n)
        if old is not None:
            used = old.blocks_for(self.position)
            src = torch.tensor(old_blocks[:used], device=old.k.device)
            dst = torch.tensor(self.blocks[:used], device=old.k.device)
            self.cache.k[:, dst] = old.k[:, src]
            self.cache.v[:, dst] = old.v[:, src]

    def step(self, activation: Tensor, last_only: bool = False) -> Tensor:
        """activation (S, D) float for the next S positions -> logits (S, V) float32 (or (V,) of
        the last row when ``last_only``)."""
        if activation.ndim != 2 or activation.shape[1] != self.tail.hidden_size:
            raise ConfigError(
                f"the tail takes an (S, {self.tail.hidden_size}) activation, "
                f"got shape {tuple(activation.shape)}"
            )
        s = activation.shape[0]
        if s == 0:
            raise ConfigError("step needs at least one activation row")
        end = self.position + s
        if end > len(self.blocks) * self.cache.block_size:
            self._reserve(2 * end)
        n_blocks = self.cache.blocks_for(end)
        table = self.cache.table([self.blocks], n_blocks)
        positions = torch.arange(self.position, end)[None]
        with torch.inference_mode():
            logits = self.tail.forward_paged(activation[None], positions, self.cache, table,
                                             last_only)
        self.position = end
        return logits[0]
