"""The device head: token embedding + decoder layers[:L] of a model the decoder supports.

The layers are :mod:`fc_edge.models.decoder`'s (the same the server's tail runs), loaded from a
Hugging Face state dict and checked against the Hugging Face model's hidden states.

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

from typing import Any

import torch
from torch import Tensor, nn

from fc_edge.errors import ConfigError
from fc_edge.models.decoder import (
    DecoderConfig,
    DecoderLayer,
    concat_kv,
    embed,
    rope_inv_freq,
    run_layers,
    static_kv,
)


class Head(nn.Module):
    """Embedding + the first ``layer`` decoder layers of a model (see the module doc).

    Build it with :func:`fc_edge.models.split.split` or :meth:`from_hf`. Attributes: ``config``
    (the Hugging Face config), ``layer`` (= ``num_layers``, the split point L), ``hidden_size``
    (D), ``decoder_config`` (:class:`DecoderConfig`), ``dtype`` (of the weights and the cache).
    """

    def __init__(self, cfg: DecoderConfig, hf_config: Any = None) -> None:
        super().__init__()
        self.decoder_config = cfg
        self.config = hf_config
        # no random init: the weights always come from a checkpoint, and torch's normal_ on the
        # meta device (where heads are built) loads its symbolic-shape machinery, about 50 MB of
        # a device's memory
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                         _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    @classmethod
    def from_hf(cls, model: Any, layer: int) -> Head:
        """The head of a Hugging Face causal LM of one of the decoder's families cut after
        ``layer`` decoder layers; the weights are copied (the head is independent of ``model``)."""
        cfg = DecoderConfig.from_hf(model.config, layer)
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
        self.inv_freq = rope_inv_freq(self.decoder_config).to(device)
        return self

    @property
    def layer(self) -> int:
        return self.decoder_config.num_layers

    @property
    def num_layers(self) -> int:
        return self.decoder_config.num_layers

    @property
    def hidden_size(self) -> int:
        return self.decoder_config.hidden_size

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def kv_shape(self, batch: int, length: int) -> tuple[int, int, int, int, int]:
        """Shape of a stacked key (or value) cache: (L, B, n_kv_heads, T, head_dim)."""
        c = self.decoder_config
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
        layer; the cache keeps every slot). Returns the activation in float32 and, in the
        export form (``write_at`` None), each layer's attended keys and values ([] otherwise)."""
        x = embed(self.embed_tokens, self.decoder_config, input_ids)
        n_past = past_k.shape[3] if write_at is None else write_at

        def kv(i: int):
            if write_at is None:
                return concat_kv(past_k[i], past_v[i])
            return static_kv(past_k[i], past_v[i], write_at)

        x, keys, values = run_layers(self.layers, self.decoder_config, self.inv_freq, x,
                                     position_ids, n_past + input_ids.shape[1], kv,
                                     collect=write_at is None)
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
        check_max_seq_len(max_seq_len)
        self.head = head
        self.max_seq_len = max_seq_len
        self.position = 0
        self.k_cache, self.v_cache = head.empty_kv(1, max_seq_len)

    def step(self, input_ids: Tensor) -> Tensor:
        """Run tokens ``input_ids`` (S,) long at the next S positions; returns (S, D) float32."""
        input_ids = step_ids(input_ids, self.position, self.max_seq_len)
        start, end = self.position, self.position + input_ids.shape[0]
        device = self.k_cache.device
        with torch.inference_mode():
            ids = input_ids.to(device)[None]
            positions = torch.arange(start, end, device=device)[None]
            x, _, _ = self.head.run_layers(ids, positions, self.k_cache, self.v_cache, start)
        self.position = end
        return x[0]


def step_ids(input_ids: Tensor, position: int, max_seq_len: int) -> Tensor:
    """A session step's tokens as a flat (S,) long CPU tensor, refused (one line) when empty or
    when the S positions after ``position`` overflow the session's ``max_seq_len``: the one
    check of a step, for this head and the engine runners alike."""
    ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(-1).cpu()
    s = ids.shape[0]
    if s == 0:
        raise ConfigError("step needs at least one token")
    if position + s > max_seq_len:
        raise ConfigError(
            f"the session holds {max_seq_len} positions; {s} more token(s) at position "
            f"{position} do not fit: start a session with a larger max_seq_len"
        )
    return ids


def check_max_seq_len(max_seq_len: int, limit: int | None = None, what: str = "") -> None:
    """:class:`ConfigError` unless 1 <= ``max_seq_len`` (<= ``limit``, which ``what`` names)."""
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 1:
        raise ConfigError(f"max_seq_len must be an integer >= 1, got {max_seq_len!r}")
    if limit is not None and max_seq_len > limit:
        raise ConfigError(f"{what}: at most {limit} positions, asked for {max_seq_len}")
