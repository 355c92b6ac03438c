"""Running several client sessions at once in tests: one thread each, released together."""

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
