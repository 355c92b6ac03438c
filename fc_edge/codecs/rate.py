"""Rate control's search: the largest quantizer step whose payload still fits its budget."""

from __future__ import annotations

from collections.abc import Callable


def largest_fitting(fits: Callable[[int], bool], guess: int, top: int) -> int | None:
    """Largest ``s`` in ``0..top`` with ``fits(s)``, for ``fits`` true up to a point and false
    after; probes outward from ``guess`` one step, then one more, then doubling (galloping),
    then bisects, so a guess off by one costs two or three calls. None when even ``fits(0)`` is
    false."""
    guess = min(max(guess, 0), top)
    lo, hi = (guess, None) if fits(guess) else (None, guess)
    d, moves = 1, 0
    while lo is None:  # walk down to a fitting step
        s = max(hi - d, 0)
        if fits(s):
            lo = s
        elif s == 0:
            return None
        else:
            hi, moves = s, moves + 1
            d = d * 2 if moves >= 2 else d
    d, moves = 1, 0
    while hi is None:  # walk up to a failing one
        s = min(lo + d, top)
        if s == lo:
            return lo
        if fits(s):
            lo, moves = s, moves + 1
            d = d * 2 if moves >= 2 else d
        else:
            hi = s
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo
