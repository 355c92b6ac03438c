"""The server tail: decoder layers[L:] + final norm + lm_head, the head's own modules.

The tail is the same explicit decoder as the device head (:mod:`fc_edge.models.decoder`: RMSNorm,
rotary with the family's scaling, grouped-query attention, sliding windows, gated MLP), loaded
from a Hugging Face model's weights and checked against its logits in the tests. Keys and values
live in a :class:`PagedKVCache`: fixed-size blocks shared by every sequence on the server, each
sequence holding a block table (vLLM-style paging), so one forward carries many sequences of
different lengths::

    tail = Tail.from_hf(model, layer=1)
    cache = tail.new_cache(num_blocks=64)
    blocks = cache.allocate(cache.blocks_for(40))          # a sequence of up to 40 positions
    step = cache.plan([Segment(0, 12, blocks)])            # its first 12 rows, at positions 0..11
    logits = tail.forward_packed(x, step, cache)           # x (12, D) -> (1, V): the last row's

One forward is **packed**: the rows of every sequence of the step (one-row decode steps and
prefill chunks alike) are concatenated into one ``(T, D)`` matrix for the projections and the
MLP, and attention runs per group: consecutive one-row sequences as one batched group, each
prefill chunk as its own. A group reads its sequences' blocks with one gather of whole blocks
per layer (``(kv_heads, blocks, block_size, head_dim)`` per layer, so the gather is contiguous
and grouped-query attention needs no copy of the keys per query head).

:meth:`Tail.start` gives a :class:`TailSession` over a private cache, one call per step, for
single-sequence use (the in-process split generation, the tests). :class:`DecodeGraphs` runs the
decode step at padded static shapes (CUDA graphs on a GPU).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fc_edge.errors import ConfigError, FcEdgeError
from fc_edge.models.decoder import (
    DecoderConfig,
    DecoderLayer,
    concat_kv,
    norm,
    rope_inv_freq,
    run_layers,
    softcap,
)

#: Positions per KV block.
DEFAULT_BLOCK_SIZE = 16
#: Decode batch sizes the static-shape path runs (a batch is padded up to the next one).
GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 32)


class CacheFullError(FcEdgeError):
    """The paged KV cache has too few free blocks for a request."""


def blocks_for(positions: int, block_size: int = DEFAULT_BLOCK_SIZE) -> int:
    """Blocks of ``block_size`` positions that hold ``positions`` positions (at least one)."""
    return max(1, math.ceil(positions / block_size))


class Segment(NamedTuple):
    """Rows of one sequence in a packed step: ``rows`` rows at positions ``position`` ..
    ``position + rows - 1``, over the sequence's ``blocks`` (block ids, in position order)."""

    position: int
    rows: int
    blocks: Sequence[int]


@dataclasses.dataclass(frozen=True)
class StepLayout:
    """The shape of a packed step (what a CUDA graph is captured for): ``rows`` T, ``outputs``
    rows whose logits are returned, and per attention group ``(first row, sequences, rows per
    sequence, table width in blocks)``."""

    rows: int
    outputs: int
    groups: tuple[tuple[int, int, int, int], ...]

    @property
    def size(self) -> int:
        """int64 entries of the step's index buffer."""
        return 2 * self.rows + self.outputs + sum(n * nb for _, n, _, nb in self.groups)


class PagedStep:
    """A packed step on the tail's device: views into one int64 ``index`` buffer (one host to
    device copy per step). ``positions`` (T,), ``write_slots`` (T,) flat slot (block *
    block_size + offset) of each row's new key and value, ``out_rows`` rows whose logits are
    wanted, ``tables[g]`` (sequences, width) block table of group ``g``."""

    def __init__(self, index: Tensor, layout: StepLayout, block_size: int) -> None:
        self.index = index
        self.layout = layout
        self.block_size = block_size
        t, o = layout.rows, layout.outputs
        self.positions = index[:t]
        self.write_slots = index[t : 2 * t]
        self.out_rows = index[2 * t : 2 * t + o]
        self.tables: list[Tensor] = []
        at = 2 * t + o
        for _, n, _, nb in layout.groups:
            self.tables.append(index[at : at + n * nb].view(n, nb))
            at += n * nb
        self._visible: dict[tuple[int, int | None], Tensor] = {}

    def visible(self, group: int, window: int | None) -> Tensor:
        """(sequences, rows, width * block_size) bool: slot j of a sequence holds position j; a
        query at p sees j <= p (and j > p - window). Computed once per step and window."""
        key = (group, window)
        mask = self._visible.get(key)
        if mask is None:
            row, n, s, nb = self.layout.groups[group]
            pos = self.positions[row : row + n * s].view(n, s, 1)
            slots = torch.arange(nb * self.block_size, device=pos.device)
            mask = slots <= pos
            if window is not None:
                mask = mask & (slots > pos - window)
            self._visible[key] = mask
        return mask


class _HostStaging:
    """Host-to-device copies of a step's small tensors: on CUDA through one pinned buffer, copied
    without blocking (an event guards its reuse); elsewhere nothing to copy."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._buffers: dict[torch.dtype, Tensor] = {}
        self._done: dict[torch.dtype, Any] = {}

    def to_device(self, host: Tensor) -> Tensor:
        if self.device.type != "cuda":
            return host.to(self.device)
        n, dtype = host.numel(), host.dtype
        done = self._done.get(dtype)
        if done is not None:
            done.synchronize()  # the previous copy out of this buffer has finished
        buf = self._buffers.get(dtype)
        if buf is None or buf.numel() < n:
            buf = torch.empty(max(n, 2 * (buf.numel() if buf is not None else 0)), dtype=dtype,
                              pin_memory=True)
            self._buffers[dtype] = buf
        staged = buf[:n].view(host.shape)
        staged.copy_(host)
        out = staged.to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._done[dtype] = event
        return out


class PagedKVCache:
    """Keys and values of many sequences in blocks of ``block_size`` positions.

    ``k``/``v`` are ``(layers, n_kv_heads, num_blocks + 1, block_size, head_dim)``. Block 0 is a
    zero block that is never handed out: tables are padded with it, and the attention mask hides
    it. Block ``num_blocks`` (past the ones counted) is a scratch block that the padding rows of a
    static-shape step write into and no table names. A block is zeroed when it is handed out, so
    the unwritten slots of a sequence hold zeros (never what an earlier owner left, which may be
    NaN: a NaN survives a zero attention weight).
    """

    def __init__(self, num_layers: int, num_blocks: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str,
                 block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        if num_blocks < 2:
            raise ConfigError(f"a paged KV cache needs at least 2 blocks, got {num_blocks}")
        if block_size < 1:
            raise ConfigError(f"block_size must be >= 1, got {block_size}")
        shape = (num_layers, n_kv_heads, num_blocks + 1, block_size, head_dim)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.scratch_block = num_blocks
        # torch.empty: pages are touched only as blocks are handed out (and zeroed)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.k[:, :, 0].zero_()
        self.v[:, :, 0].zero_()
        self._free = list(range(num_blocks - 1, 0, -1))
        self._staging = _HostStaging(self.k.device)

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def bytes_per_block(self) -> int:
        return 2 * self.k[:, :, 0].numel() * self.k.element_size()

    def blocks_for(self, positions: int) -> int:
        """Blocks that hold ``positions`` positions."""
        return blocks_for(positions, self.block_size)

    def allocate(self, n: int, zero: bool = True) -> list[int]:
        """``n`` blocks (zeroed unless ``zero=False``: then call :meth:`zero` before they are
        read); raises :class:`CacheFullError` when fewer are free."""
        if n > len(self._free):
            raise CacheFullError(
                f"the KV cache has {len(self._free)} free blocks of {self.block_size} positions, "
                f"{n} are needed")
        blocks = [self._free.pop() for _ in range(n)]
        if zero:
            self.zero(blocks)
        return blocks

    def zero(self, blocks: Sequence[int]) -> None:
        if blocks:
            index = torch.tensor(list(blocks), device=self.k.device)
            self.k[:, :, index] = 0
            self.v[:, :, index] = 0

    def release(self, blocks: Sequence[int]) -> None:
        self._free.extend(blocks)

    def table(self, tables: list[list[int]], n_blocks: int) -> Tensor:
        """Block tables as one (B, n_blocks) long tensor, each padded with the zero block."""
        out = torch.zeros((len(tables), n_blocks), dtype=torch.long)
        for i, t in enumerate(tables):
            t = t[:n_blocks]
            out[i, : len(t)] = torch.as_tensor(t, dtype=torch.long)
        return out.to(self.k.device)

    # --- packed steps ---------------------------------------------------------------------------
    def plan_host(self, segments: Sequence[Segment], outputs: str = "last",
                  pad_to: tuple[int, int] | None = None) -> tuple[Tensor, StepLayout]:
        """The index buffer (on the host) and layout of a packed step over ``segments``.

        Consecutive one-row segments form one attention group, every other segment a group of its
        own. ``outputs``: ``"last"`` row of each segment, or ``"all"`` rows. ``pad_to=(sequences,
        blocks)`` pads a step of one-row segments to a static shape: padding rows sit at position
        0 over the zero block and write into the scratch block; tables are ``blocks`` wide."""
        bs = self.block_size
        if pad_to is not None:
            seqs, width = pad_to
            if any(s.rows != 1 for s in segments) or len(segments) > seqs:
                raise ConfigError(f"a static step pads up to {seqs} one-row segments")
            segments = [*segments, *[Segment(0, 1, ())] * (seqs - len(segments))]
        positions: list[int] = []
        slots: list[int] = []
        outs: list[int] = []
        groups: list[tuple[int, int, int, int]] = []
        tables: list[int] = []
        i = 0
        while i < len(segments):
            j = i + 1
            if segments[i].rows == 1:
                while j < len(segments) and segments[j].rows == 1:
                    j += 1
            run = segments[i:j]
            width = max(self.blocks_for(s.position + s.rows) for s in run)
            if pad_to is not None:
                if width > pad_to[1]:
                    raise ConfigError(f"a static step of {pad_to[1]} blocks per table cannot "
                                      f"hold {width}")
                width = pad_to[1]
            groups.append((len(positions), len(run), run[0].rows, width))
            for s in run:
                if s.rows < 1 or s.position < 0:
                    raise ConfigError(f"a segment needs rows >= 1 at a position >= 0, got {s}")
                end = s.position + s.rows
                if not s.blocks:  # a padding row
                    slots.append(self.scratch_block * bs)
                    positions.append(0)
                    tables.extend([0] * width)
                    outs.append(len(positions) - 1)
                    continue
                if len(s.blocks) < self.blocks_for(end):
                    raise ConfigError(f"{len(s.blocks)} blocks cannot hold positions up to {end}")
                first = len(positions)
                positions.extend(range(s.position, end))
                slots.extend(s.blocks[p // bs] * bs + p % bs for p in range(s.position, end))
                used = list(s.blocks[: self.blocks_for(end)])
                tables.extend(used + [0] * (width - len(used)))
                if outputs == "all":
                    outs.extend(range(first, first + s.rows))
                else:
                    outs.append(first + s.rows - 1)
            i = j
        layout = StepLayout(len(positions), len(outs), tuple(groups))
        host = torch.tensor(positions + slots + outs + tables, dtype=torch.long)
        return host, layout

    def plan(self, segments: Sequence[Segment], outputs: str = "last",
             pad_to: tuple[int, int] | None = None) -> PagedStep:
        """:meth:`plan_host`, on the cache's device (one pinned non-blocking copy on CUDA)."""
        host, layout = self.plan_host(segments, outputs, pad_to)
        return PagedStep(self._staging.to_device(host), layout, self.block_size)

    def stage(self, host: Tensor) -> Tensor:
        """A host tensor (the step's activation rows) on the cache's device, through the pinned
        staging buffer on CUDA."""
        return self._staging.to_device(host)


def grouped_attention(q: Tensor, k: Tensor, v: Tensor, visible: Tensor, groups: int,
                      scale: float | None = None, cap: float | None = None) -> Tensor:
    """softmax(cap(q k^T * scale) + mask) v for one attention group, grouped-query attention
    without copying keys per query head (``scale`` None: 1 / sqrt(hd); ``cap`` None: no soft
    cap).

    ``q`` (kv_heads, n, groups * S, hd) (query head ``kv * groups + i`` at ``[kv, :, i * S +
    s]``), ``k``, ``v`` (kv_heads, n, L, hd), ``visible`` (n, S, L) bool ->
    (kv_heads, n, groups * S, hd). The same operations, in the same order, as
    :meth:`fc_edge.models.decoder.Attention.attend`.
    """
    kvh, n, gs, hd = q.shape
    s, length = visible.shape[1], visible.shape[2]
    scores = softcap(torch.matmul(q, k.transpose(2, 3)) * (scale or hd**-0.5), cap)
    scores = scores.view(kvh, n, groups, s, length).masked_fill(~visible[None, :, None],
                                                                 float("-inf"))
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(weights.view(kvh, n, gs, length), v)


class _PagedLayer:
    """The key/value hook of one layer in a packed step: stores the rows' new keys and values in
    their slots, then attends each group over its blocks (see
    :class:`fc_edge.models.decoder.Attention`'s ``attend`` hook)."""

    def __init__(self, tail: Tail, cache: PagedKVCache, step: PagedStep, layer: int) -> None:
        self.tail, self.cache, self.step, self.layer = tail, cache, step, layer

    def __call__(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError("a packed step attends through attend()")

    def attend(self, module: nn.Module, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q (1, H, T, hd), k, v (1, kv_heads, T, hd) -> (1, T, H * hd)."""
        step, cache = self.step, self.cache
        ks, vs = cache.k[self.layer], cache.v[self.layer]  # (kvh, blocks, bs, hd)
        kvh, _, bs, hd = ks.shape
        ks.view(kvh, -1, hd).index_copy_(1, step.write_slots, k[0].to(ks.dtype))
        vs.view(kvh, -1, hd).index_copy_(1, step.write_slots, v[0].to(vs.dtype))
        window = self.tail.window(self.layer)
        n_heads = q.shape[1]
        g = n_heads // kvh
        fast = self.tail.fast_attention()
        outs = []
        for i, (row, n, s, nb) in enumerate(step.layout.groups):
            table = step.tables[i].reshape(-1)
            kg = ks.index_select(1, table).view(kvh, n, nb * bs, hd)
            vg = vs.index_select(1, table).view(kvh, n, nb * bs, hd)
            visible = step.visible(i, window)
            rows = q[0, :, row : row + n * s]  # (H, n * s, hd)
            if fast:
                qg = rows.reshape(kvh, g, n, s, hd).transpose(1, 2).reshape(kvh, n, g * s, hd)
                out = grouped_attention(qg, kg, vg, visible, g, getattr(module, "scale", None),
                                        getattr(module, "softcap", None))
                outs.append(out.view(kvh, n, g, s, hd).permute(1, 3, 0, 2, 4)
                            .reshape(n * s, n_heads * hd))
            else:  # the layer's own attend (a family whose attention the fast path does not know)
                q4 = rows.reshape(n_heads, n, s, hd).transpose(0, 1)
                out = module.attend(q4, kg.transpose(0, 1), vg.transpose(0, 1), visible[:, None])
                outs.append(out.transpose(1, 2).reshape(n * s, n_heads * hd))
        return (outs[0] if len(outs) == 1 else torch.cat(outs))[None]


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
        self._fast_attention: bool | None = None

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

    def window(self, layer: int) -> int | None:
        """The sliding window of the tail's ``layer``-th layer (None: full attention)."""
        windows = self.decoder_config.sliding_windows
        return windows[layer] if windows else None

    def fast_attention(self) -> bool:
        """Whether :func:`grouped_attention` computes what the layers' own ``attend`` does,
        checked once on a random case (within 1e-5): a family whose attention adds something
        (a soft cap, sinks) falls back to the layer's ``attend``."""
        if self._fast_attention is None:
            module = self.layers[0].self_attn
            g = torch.Generator().manual_seed(0)
            n, s, length, hd = 2, 3, 8, module.head_dim
            kvh, heads = module.n_kv_heads, module.n_heads
            q = torch.randn(n, heads, s, hd, generator=g)
            k = torch.randn(n, kvh, length, hd, generator=g)
            v = torch.randn(n, kvh, length, hd, generator=g)
            pos = torch.tensor([[3, 4, 5], [5, 6, 7]])
            visible = torch.arange(length) <= pos[..., None]
            try:
                ref = module.attend(q, k, v, visible[:, None])
                qg = q.transpose(0, 1).reshape(kvh, heads // kvh, n, s, hd).transpose(1, 2)
                got = grouped_attention(qg.reshape(kvh, n, -1, hd), k.transpose(0, 1),
                                        v.transpose(0, 1), visible, heads // kvh,
                                        getattr(module, "scale", None),
                                        getattr(module, "softcap", None))
                got = got.view(kvh, n, heads // kvh, s, hd).transpose(0, 1).reshape(ref.shape)
                self._fast_attention = bool(torch.allclose(got, ref, rtol=1e-5, atol=1e-5))
            except Exception:  # noqa: BLE001 - any doubt: the layer's own attend
                self._fast_attention = False
        return self._fast_attention

    def new_cache(self, num_blocks: int, block_size: int = DEFAULT_BLOCK_SIZE) -> PagedKVCache:
        """An empty paged cache of ``num_blocks`` blocks (one is the zero block) for this tail."""
        c = self.decoder_config
        return PagedKVCache(c.num_layers, num_blocks, c.num_kv_heads, c.head_dim, self.dtype,
                            self.device, block_size)

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
        h = run_layers(self.layers, c, self.inv_freq, h, positions, s,
                       lambda i: concat_kv(empty, empty))[0]
        return self._logits(h)

    def forward_packed(self, x: Tensor, step: PagedStep, cache: PagedKVCache) -> Tensor:
        """The packed rows ``x`` (T, D) of ``step`` (their keys and values are written to their
        slots of ``cache`` first) -> logits (len(step.out_rows), V) float32."""
        h = x.to(device=self.device, dtype=self.dtype)[None]
        # run_layers' own masks are unused (the hook attends); one slot keeps them small
        h = run_layers(self.layers, self.decoder_config, self.inv_freq, h, step.positions[None],
                       1, lambda i: _PagedLayer(self, cache, step, i))[0]
        return self._logits(h[0].index_select(0, step.out_rows))

    def forward_paged(self, activation: Tensor, positions: Tensor, cache: PagedKVCache,
                      table: Tensor, last_only: bool = False) -> Tensor:
        """activation (B, S, D): row b at positions ``positions[b]`` (B, S) long (consecutive),
        over its blocks ``table[b]`` (B, nb) of ``cache`` -> logits (B, S, V) float32, or (B, V)
        of each last row when ``last_only``. A front over :meth:`forward_packed`."""
        b, s, d = activation.shape
        starts = positions[:, 0].tolist()
        blocks = table.tolist()
        step = cache.plan([Segment(int(p), s, t) for p, t in zip(starts, blocks)],
                          outputs="last" if last_only else "all")
        logits = self.forward_packed(activation.reshape(b * s, d), step, cache)
        return logits if last_only else logits.view(b, s, -1)

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
            self.cache.k[:, :, dst] = old.k[:, :, src]
            self.cache.v[:, :, dst] = old.v[:, :, src]

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
        step = self.cache.plan([Segment(self.position, s, self.blocks)],
                               outputs="last" if last_only else "all")
        with torch.inference_mode():
            logits = self.tail.forward_packed(activation, step, self.cache)
        self.position = end
        return logits[0] if last_only else logits


class DecodeGraphs:
    """The decode step (one row per sequence) at static shapes: ``B`` rows padded up to the next
    of ``batch_sizes``, block tables padded to a power of two blocks (at most ``max_blocks``).

    On CUDA each shape is captured once as a CUDA graph (after a warm-up on a side stream, all
    graphs sharing one memory pool) and replayed: the ~50 kernels per layer launch as one
    graph. Elsewhere the same padded step runs eagerly, which is what the tests hold to the
    unpadded step. :meth:`run` returns None for a step it has no shape for (the caller runs it
    eagerly).
    """

    def __init__(self, tail: Tail, cache: PagedKVCache, max_blocks: int,
                 batch_sizes: Sequence[int] = GRAPH_BATCH_SIZES) -> None:
        self.tail = tail
        self.cache = cache
        self.batch_sizes = tuple(sorted(batch_sizes))
        self.max_blocks = max_blocks
        self.capture = tail.device.type == "cuda"
        self._graphs: dict[tuple[int, int], tuple[Any, Tensor, Tensor, Tensor]] = {}
        self._pool: Any = None

    def shape(self, rows: int, blocks: int) -> tuple[int, int] | None:
        """(padded rows, padded table width) of a decode step, or None."""
        b = next((n for n in self.batch_sizes if n >= rows), None)
        width = 1 << max(0, blocks - 1).bit_length()
        if b is None or width > self.max_blocks:
            return None
        return b, width

    def run(self, x: Tensor, segments: Sequence[Segment]) -> Tensor | None:
        """The decode rows ``x`` (B, D) of ``segments`` (one row each) -> logits (B, V), or None
        when the step has no static shape here."""
        if any(s.rows != 1 for s in segments):
            return None
        shape = self.shape(len(segments), max(self.cache.blocks_for(s.position + 1)
                                              for s in segments))
        if shape is None:
            return None
        host, layout = self.cache.plan_host(segments, pad_to=shape)
        b = len(segments)
        padded = torch.zeros((shape[0], x.shape[1]), dtype=self.tail.dtype, device=x.device)
        padded[:b] = x
        if not self.capture:
            step = PagedStep(host.to(self.cache.device), layout, self.cache.block_size)
            return self.tail.forward_packed(padded, step, self.cache)[:b]
        entry = self._graphs.get(shape)
        if entry is None:
            entry = self._capture(shape, layout, host, padded)
        graph, static_x, static_index, logits = entry
        static_index.copy_(self.cache.stage(host), non_blocking=True)
        static_x.copy_(padded)
        graph.replay()
        return logits[:b]

    def _capture(self, shape: tuple[int, int], layout: StepLayout, host: Tensor,
                 x: Tensor) -> tuple[Any, Tensor, Tensor, Tensor]:
        device = self.cache.device
        static_index = host.to(device)
        static_x = x.clone()
        step = PagedStep(static_index, layout, self.cache.block_size)
        # warm-up off the capture (allocator, kernel choice); it writes the same slots the
        # replay writes, with the values the replay then overwrites
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(2):
                self.tail.forward_packed(static_x, step, self.cache)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        step = PagedStep(static_index, layout, self.cache.block_size)  # masks made in the graph
        with torch.cuda.graph(graph, pool=self._pool), torch.inference_mode():
            logits = self.tail.forward_packed(static_x, step, self.cache)
        self._pool = graph.pool()
        entry = (graph, static_x, static_index, logits)
        self._graphs[shape] = entry
        return entry
