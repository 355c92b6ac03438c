"""Greedy split generation in one process: the reference the networked runtime is tested against."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from fc_edge.errors import ConfigError
from fc_edge.models.head import Head
from fc_edge.models.tail import Tail


def generate_split(
    head: Head,
    tail: Tail,
    input_ids: Tensor,
    max_new_tokens: int,
    codec: Any = None,
    eos_token_id: int | Iterable[int] | None = None,
) -> list[int]:
    """Greedy tokens after the prompt ``input_ids`` (S,) long, at most ``max_new_tokens``.

    Prefill: the head runs the whole prompt, the (S, D) activation goes through ``codec``
    (encode, then decode, when one is given) to the tail, whose last row's argmax is the first
    token. Each decode step then sends one (1, D) row, coded knowing its token (the one just
    sampled: :meth:`~fc_edge.codecs.context.CodecContext.with_tokens`), through the wire
    format, as the runtime sends it. Stops after a token in ``eos_token_id``
    (which is included in the result), like ``model.generate``.
    """
    ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(-1)
    if ids.numel() == 0:
        raise ConfigError("generate_split needs a non-empty prompt")
    if max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if eos_token_id is None:
        stop: set[int] = set()
    elif isinstance(eos_token_id, int):
        stop = {eos_token_id}
    else:
        stop = {int(t) for t in eos_token_id}
    decode = None
    if codec is not None:
        from fc_edge.codecs import wire  # the codec package is optional at import time
        from fc_edge.codecs.base import decode

    out: list[int] = []
    hs = head.start(ids.numel() + max(max_new_tokens, 1))
    ts = tail.start()
    step_ids = ids
    for _ in range(max_new_tokens):
        a = hs.step(step_ids)
        if codec is not None:
            # both ends hold the bound context; at a decode step, the row's token too (the
            # token just sampled: what ``klt`` predicts the row from)
            ctx = codec.context if out == [] else codec.context.with_tokens(step_ids)
            a = decode(wire.unpack(wire.pack(codec.encode(a, ctx)), ctx=ctx), ctx)
        token = int(ts.step(a)[-1].argmax())
        out.append(token)
        if token in stop:
            break
        step_ids = torch.tensor([token])
    return out
