"""rANS entropy coding of quantized Gaussian components, with a table per variance.

A calibrated codec knows each component's standard deviation before it sees a row, so a
symbol ``q = round(y / step)`` of a component with ``sigma / step = rho`` is coded with the
discretised normal of standard deviation ``rho``. Huffman (``entropy.py``) cannot spend less
than one bit on a symbol, which is most of the budget at one or two bits per element, where
many components are nearly always zero; rANS (Duda 2013; the byte-wise variant of Giesen's
``rans_byte.h``) spends ``-log2 P(q)`` bits to within about 0.01 bit.

The tables form one family indexed by an integer ``j``: ``rho = 2^(j/16)``, from
``J_MIN`` (``rho = 1/16``, below which a component is not coded: it is almost always zero)
to ``J_MAX``. Both ends build them from the recipe in docs/wire-format.md, integers only after
the ``erfc`` values are rounded, and :func:`tables_digest` hashes them so another
implementation can check its tables.

The coder: 32-bit state ``x`` in ``[2^23, 2^31)``, frequencies out of ``M = 2^16``, bytes
written in reverse and read forward, the final state's 4 bytes (little-endian) first. The
decoder must end in the encoder's start state ``2^23`` with every byte consumed; anything else
is a WireError. Loops are ``numba``-compiled (``cache=True``), linear in the symbols.
"""

from __future__ import annotations

import functools
import hashlib
import math

import numba
import numpy as np

from fc_edge.errors import WireError

PROB_BITS = 16
M = 1 << PROB_BITS
RANS_L = 1 << 23
#: Table indices: ``rho = 2^(j/16)``. Below J_MIN a component is not coded.
J_MIN, J_MAX = -64, 112
#: Symbols are clamped at ``CLAMP`` standard deviations: ``Q = max(1, ceil(CLAMP * rho))``.
CLAMP = 10.0
_N_TABLES = J_MAX - J_MIN + 1


def rho(j: int) -> float:
    """Standard deviation in steps of table ``j``: ``2^(j/16)``."""
    return 2.0 ** (j / 16.0)


def table_q(j: int) -> int:
    """Largest magnitude table ``j`` codes: ``max(1, ceil(CLAMP * rho))``."""
    return max(1, math.ceil(CLAMP * rho(j)))


@functools.lru_cache(maxsize=_N_TABLES)
def frequencies(j: int) -> np.ndarray:
    """``(2Q+1,)`` int64 frequencies of symbols ``q = -Q..Q`` (index ``q + Q``), summing to M.

    ``P(q) = Phi((q+1/2)/rho) - Phi((q-1/2)/rho)``, the end symbols taking the tails; each
    ``f = 1 + floor(P * (M - n))`` with ``n = 2Q+1`` but the centre, which takes the rest.
    """
    if not J_MIN <= j <= J_MAX:
        raise ValueError(f"table index must be in {J_MIN}..{J_MAX}, got {j}")
    r, Q = rho(j), table_q(j)
    n = 2 * Q + 1

    def phi(v: float) -> float:
        return 0.5 * math.erfc(-v / math.sqrt(2.0))

    # the edges q +- 1/2 once each (an upper edge is the next symbol's lower one)
    edges = [0.0] + [phi((q + 0.5) / r) for q in range(-Q, Q)] + [1.0]
    f = np.ones(n, dtype=np.int64)
    for i in range(n):
        f[i] = 1 + math.floor((edges[i + 1] - edges[i]) * (M - n))
    f[Q] = 0
    f[Q] = M - int(f.sum())
    return f


@functools.lru_cache(maxsize=_N_TABLES)
def model_bits(j: int) -> float:
    """Mean code length (bits per symbol) of table ``j`` under its own normal (rate control)."""
    r, Q = rho(j), table_q(j)
    f = frequencies(j).astype(np.float64)
    q = np.arange(-Q, Q + 1, dtype=np.float64)
    hi = np.where(q == Q, 1.0, 0.5 * _erfc_vec(-(q + 0.5) / r / math.sqrt(2.0)))
    lo = np.where(q == -Q, 0.0, 0.5 * _erfc_vec(-(q - 0.5) / r / math.sqrt(2.0)))
    p = np.clip(hi - lo, 0.0, 1.0)
    return float(-(p * np.log2(f / M)).sum())


@functools.lru_cache(maxsize=1)
def model_bits_table() -> np.ndarray:
    """:func:`model_bits` of every table, indexed by ``j - J_MIN``."""
    return np.array([model_bits(j) for j in range(J_MIN, J_MAX + 1)])


def _erfc_vec(v: np.ndarray) -> np.ndarray:
    return np.array([math.erfc(float(a)) for a in v])


@functools.lru_cache(maxsize=1)
def packed_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every table in flat arrays for the kernels: (offsets ``(T+1,)``, Q ``(T,)``, cumulative
    starts ``(sum n + T,)`` with each table's ``n + 1`` starts, the last = M)."""
    offsets = np.zeros(_N_TABLES + 1, dtype=np.int64)
    qs = np.zeros(_N_TABLES, dtype=np.int64)
    parts = []
    for t, j in enumerate(range(J_MIN, J_MAX + 1)):
        f = frequencies(j)
        qs[t] = (len(f) - 1) // 2
        starts = np.zeros(len(f) + 1, dtype=np.int64)
        np.cumsum(f, out=starts[1:])
        parts.append(starts)
        offsets[t + 1] = offsets[t] + len(starts)
    return offsets, qs, np.concatenate(parts)


@functools.lru_cache(maxsize=1)
def packed_costs() -> np.ndarray:
    """``-log2(f / M)`` of every symbol of every table, laid out as :func:`packed_tables`'
    starts (the last entry of each table unused): what a symbol costs in a rANS stream."""
    offsets, _, cum = packed_tables()
    f = np.diff(cum).astype(np.float64)
    cost = np.zeros(len(cum))
    cost[:-1] = -np.log2(np.maximum(f, 1) / M)
    return cost


def tables_digest() -> str:
    """SHA-256 of every table's frequencies as little-endian u16 (M itself never occurs: no
    table has a single symbol), tables in order of ``j``: docs/wire-format.md lists it."""
    h = hashlib.sha256()
    for j in range(J_MIN, J_MAX + 1):
        h.update(frequencies(j).astype("<u2").tobytes())
    return h.hexdigest()


# --- kernels ----------------------------------------------------------------------------------
@numba.njit(cache=True, nogil=True)
def _quantize(y, inv_step, tables, offsets, qs, symbols):  # pragma: no cover (compiled)
    """``symbols[r, k] = clamp(round(y[r, k] * inv_step[r]), -Q, Q)`` with Q of table
    ``tables[k]`` (an index into the packed tables); ties to even."""
    N, K = symbols.shape
    for r in range(N):
        s = inv_step[r]
        for k in range(K):
            Q = qs[tables[k]]
            q = np.rint(y[r, k] * s)
            if q > Q:
                q = Q
            elif q < -Q:
                q = -Q
            symbols[r, k] = np.int32(q)


@numba.njit(cache=True, nogil=True)
def _cost(y, inv_step, tables, offsets, qs, costs):  # pragma: no cover (compiled)
    """Bits the symbols of :func:`_quantize` would cost, without storing them."""
    N, K = y.shape
    total = 0.0
    for r in range(N):
        s = inv_step[r]
        for k in range(K):
            t = tables[k]
            Q = qs[t]
            q = np.rint(y[r, k] * s)
            if q > Q:
                q = Q
            elif q < -Q:
                q = -Q
            total += costs[offsets[t] + np.int64(q) + Q]
    return total


@numba.njit(cache=True, nogil=True)
def _largest_step(y, log_std, step_zero, lo, hi, budget_bits, offsets, qs,
                  costs):  # pragma: no cover (compiled)
    """The largest step in ``lo..hi`` whose symbols cost at most ``budget_bits`` (bisection;
    cost grows with the step), or ``lo - 1``. Step s quantizes with ``2^((s - step_zero)/16)``
    and codes the components with ``j = log_std + s - step_zero >= J_MIN``."""
    N, K = y.shape
    best = lo - 1
    while lo <= hi:
        s = (lo + hi) // 2
        inv = np.float32(2.0 ** ((s - step_zero) / 16.0))
        total = 0.0
        for k in range(K):
            j = log_std[k] + s - step_zero
            if j < J_MIN:
                break
            t = j - J_MIN
            Q = qs[t]
            base = offsets[t] + Q
            for r in range(N):
                q = np.rint(y[r, k] * inv)
                if q > Q:
                    q = Q
                elif q < -Q:
                    q = -Q
                total += costs[base + np.int64(q)]
        if total <= budget_bits:
            best = s
            lo = s + 1
        else:
            hi = s - 1
    return best


@numba.njit(cache=True, nogil=True)
def _encode(symbols, tables, offsets, qs, cum):  # pragma: no cover (compiled)
    """rANS-encode every symbol, row-major; returns the stream (4 state bytes first)."""
    N, K = symbols.shape
    cap = 16 + 3 * N * K  # a symbol of frequency >= 1 costs at most 16 bits
    buf = np.empty(cap, dtype=np.uint8)
    pos = cap
    x = np.uint64(RANS_L)
    for r in range(N - 1, -1, -1):
        for k in range(K - 1, -1, -1):
            t = tables[k]
            i = offsets[t] + symbols[r, k] + qs[t]
            start = np.uint64(cum[i])
            freq = np.uint64(cum[i + 1] - cum[i])
            x_max = np.uint64((RANS_L >> PROB_BITS) << 8) * freq
            while x >= x_max:
                pos -= 1
                buf[pos] = np.uint8(x & np.uint64(0xFF))
                x >>= np.uint64(8)
            x = ((x // freq) << np.uint64(PROB_BITS)) + (x % freq) + start
    for b in range(4):
        pos -= 1
        buf[pos] = np.uint8((x >> np.uint64(8 * (3 - b))) & np.uint64(0xFF))
    return buf[pos:].copy()


@numba.njit(cache=True, nogil=True)
def _find(cum, lo, hi, slot):  # pragma: no cover (compiled)
    """Largest i in [lo, hi) with cum[i] <= slot (cum[lo] = 0 <= slot < cum[hi] = M)."""
    while hi - lo > 1:
        mid = (lo + hi) >> 1
        if cum[mid] <= slot:
            lo = mid
        else:
            hi = mid
    return lo


@numba.njit(cache=True, nogil=True)
def _decode(stream, tables, offsets, qs, cum, symbols):  # pragma: no cover (compiled)
    """Inverse of :func:`_encode` into ``symbols``; returns 0, or 1 when the stream runs out,
    2 when it ends in a state other than the start state or leaves bytes unread."""
    N, K = symbols.shape
    n = stream.shape[0]
    if n < 4:
        return 1
    x = np.uint64(0)
    for b in range(4):  # little-endian
        x |= np.uint64(stream[b]) << np.uint64(8 * b)
    pos = 4
    mask = np.uint64(M - 1)
    for r in range(N):
        for k in range(K):
            t = tables[k]
            base = offsets[t]
            slot = np.int64(x & mask)
            i = _find(cum, base, offsets[t + 1] - 1, slot)
            start = cum[i]
            freq = cum[i + 1] - start
            symbols[r, k] = np.int32(i - base - qs[t])
            x = np.uint64(freq) * (x >> np.uint64(PROB_BITS)) + np.uint64(slot - start)
            while x < np.uint64(RANS_L):
                if pos >= n:
                    return 1
                x = (x << np.uint64(8)) | np.uint64(stream[pos])
                pos += 1
    if x != np.uint64(RANS_L) or pos != n:
        return 2
    return 0


# --- the coder ----------------------------------------------------------------------------
def table_slots(j: np.ndarray) -> np.ndarray:
    """Table indices ``j`` (each in J_MIN..J_MAX) -> positions in :func:`packed_tables`
    (checked: the kernels index without bounds checks)."""
    slots = np.asarray(j, dtype=np.int64) - J_MIN
    if slots.size and (int(slots.min()) < 0 or int(slots.max()) > J_MAX - J_MIN):
        raise ValueError(f"table indices must be in {J_MIN}..{J_MAX}")
    return slots


def quantize(y: np.ndarray, inv_step: np.ndarray, j: np.ndarray) -> np.ndarray:
    """``(N, K)`` float32 values, ``(N,)`` float32 1/step per row, ``(K,)`` table indices ->
    ``(N, K)`` int32 symbols ``clamp(round(y / step), -Q_j, Q_j)``."""
    offsets, qs, _ = packed_tables()
    symbols = np.empty(y.shape, dtype=np.int32)
    _quantize(np.ascontiguousarray(y, dtype=np.float32),
              np.ascontiguousarray(inv_step, dtype=np.float32), table_slots(j), offsets, qs,
              symbols)
    return symbols


def stream_bytes(y: np.ndarray, inv_step: np.ndarray, j: np.ndarray) -> int:
    """Predicted length of the stream of ``quantize(y, inv_step, j)``: its information content
    in whole bytes plus the 4 state bytes (the real stream is within a byte or two of it)."""
    offsets, qs, _ = packed_tables()
    bits = _cost(np.ascontiguousarray(y, dtype=np.float32),
                 np.ascontiguousarray(inv_step, dtype=np.float32), table_slots(j), offsets, qs,
                 packed_costs())
    return int(math.ceil(bits / 8)) + 4


def largest_step(y: np.ndarray, log_std: np.ndarray, step_zero: int, top: int,
                 budget_bytes: float) -> int:
    """The largest step in ``0..top`` whose stream (information content + 4 state bytes) fits
    ``budget_bytes``; -1 if none. ``y`` ``(N, K)`` float32, ``log_std`` ``(K,)``
    non-increasing, with every ``log_std + top - step_zero <= J_MAX``."""
    offsets, qs, _ = packed_tables()
    return int(_largest_step(np.ascontiguousarray(y, dtype=np.float32),
                             np.ascontiguousarray(log_std, dtype=np.int64), step_zero, 0, top,
                             (budget_bytes - 4) * 8.0, offsets, qs, packed_costs()))


def encode(symbols: np.ndarray, j: np.ndarray) -> bytes:
    """rANS stream of ``(N, K)`` symbols, component ``k`` coded with table ``j[k]``."""
    offsets, qs, cum = packed_tables()
    slots = table_slots(j)
    if symbols.size and bool((np.abs(symbols) > qs[slots][None, :]).any()):
        raise ValueError("a symbol is beyond its table's range (quantize clamps them)")
    if symbols.size == 0:
        return _encode(np.zeros((0, 0), np.int32), table_slots(j), offsets, qs, cum).tobytes()
    return _encode(np.ascontiguousarray(symbols, dtype=np.int32), table_slots(j), offsets, qs,
                   cum).tobytes()


def decode(stream: bytes | np.ndarray, n_rows: int, j: np.ndarray) -> np.ndarray:
    """``(n_rows, len(j))`` int32 symbols from a stream of :func:`encode`; WireError unless the
    stream decodes exactly (every byte used, the final state the start state)."""
    offsets, qs, cum = packed_tables()
    data = np.frombuffer(stream, dtype=np.uint8) if isinstance(stream, bytes) else stream
    symbols = np.empty((n_rows, len(j)), dtype=np.int32)
    status = _decode(data, table_slots(j), offsets, qs, cum, symbols)
    if status == 1:
        raise WireError("rANS stream ends before its symbols do")
    if status == 2:
        raise WireError("rANS stream does not decode exactly (final state or trailing bytes)")
    return symbols
