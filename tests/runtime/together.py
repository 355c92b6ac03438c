"""Running several client sessions at once in tests: one thread each, released together; and
the oracle their tokens are held to (Hugging Face's own ``generate``)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def run_together(n: int, work: Callable[[int], T], timeout: float = 300) -> list[T]:
    """``work(i)`` for i in 0..n-1 on n threads that start it at the same moment; the results in
    order. Any exception of any thread fails the caller's test."""
    results: list = [None] * n
    errors: list[BaseException] = []
    barrier = threading.Barrier(n)

    def run(i: int) -> None:
        try:
            barrier.wait()
            results[i] = work(i)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not errors, errors
    return results


def hf_generate(model, ids, n: int) -> list[int]:
    """Greedy tokens of Hugging Face's own generate (the oracle), never stopping early: the
    EOS id is one no token has (min_new_tokens would instead forbid the model's EOS token)."""
    import torch

    with torch.no_grad():
        out = model.generate(ids[None], attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=n, pad_token_id=0,
                             eos_token_id=model.config.vocab_size)
    return out[0, len(ids):].tolist()
