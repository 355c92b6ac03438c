"""Cutting a Hugging Face causal LM into a device head and a server tail.

::

    head, tail = split(model, layer=L)
    hs = head.start(max_seq_len)      # device session: static KV cache + position
    a = hs.step(input_ids)            # (S,) long -> (S, D) float32 activation
    ts = tail.start()                 # server session: paged KV cache + position
    logits = ts.step(a)               # (S, D) -> (S, V) float32
"""

from __future__ import annotations

from typing import Any

import torch

from fc_edge.errors import ConfigError, ModelError
from fc_edge.models.decoder import FAMILIES, DecoderConfig, channel_gains
from fc_edge.models.defaults import DEFAULT_SPLIT_LAYER  # noqa: F401  (re-exported)
from fc_edge.models.head import Head
from fc_edge.models.tail import Tail

#: The Hugging Face classes the decoder implements (:data:`fc_edge.models.decoder.FAMILIES`).
SUPPORTED_FAMILIES = tuple(FAMILIES.values())


def check_supported(model: Any) -> None:
    """Raise :class:`ModelError` unless ``model`` is of a family the head implements."""
    name = type(model).__name__
    if name not in SUPPORTED_FAMILIES:
        raise ModelError(
            f"cannot split a {name}: supported families are {', '.join(SUPPORTED_FAMILIES)}"
        )


def check_split(model: Any, layer: int) -> None:
    """Raise unless ``model`` can be split after ``layer`` decoder layers: :class:`ModelError`
    for an unsupported family, :class:`ConfigError` unless ``layer`` is in 1..num_hidden_layers-1.
    """
    check_supported(model)
    check_split_layer(model.config, layer)


def check_split_layer(config: Any, layer: int) -> None:
    """:class:`ConfigError` unless ``layer`` is an integer in 1..num_hidden_layers-1 of
    ``config`` (a Hugging Face config: checked before any weight is read)."""
    n = config.num_hidden_layers
    if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer <= n - 1:
        raise ConfigError(
            f"split layer must be an integer in 1..{n - 1} for this model, got {layer!r}"
        )


def split(model: Any, layer: int) -> tuple[Head, Tail]:
    """The head (embedding + layers[:layer], our own modules with copied weights) and the tail
    (layers[layer:] + norm + lm_head, our own modules over ``model``'s weight tensors) of a
    causal LM of one of :data:`SUPPORTED_FAMILIES`.

    Raises as :func:`check_split` does.
    """
    check_split(model, layer)
    return Head.from_hf(model, layer), Tail.from_hf(model, layer)


def channel_weights(model, layer: int) -> torch.Tensor:
    """``(D,)`` importance of each hidden channel of the activation sent after ``layer`` layers.

    The RMS, over the decoder layers after the split, of their input RMSNorm gains: a channel that
    later layers scale down tolerates more noise. Used to shape the ``rotated`` codec's noise
    (:func:`fc_edge.models.decoder.channel_gains`; a device without the tail's weights reads the
    same gains from the checkpoint).
    """
    check_split(model, layer)
    cfg = DecoderConfig.from_hf(model.config, model.config.num_hidden_layers)
    return channel_gains([blk.input_layernorm.weight for blk in model.model.layers[layer:]], cfg)


def bind_codec(codec, model, layer: int):
    """Bind ``codec`` to the model it serves (channel weights for noise shaping); returns it."""
    return codec.bind(channel_weights(model, layer))
