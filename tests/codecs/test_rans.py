"""rANS coding of Gaussian symbols: exact round trips, the tables against the normal, the cost
against the information content, and corrupt streams refused."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fc_edge.codecs import rans
from fc_edge.errors import WireError


def _phi(v: float) -> float:
    return 0.5 * (1 + math.erf(v / math.sqrt(2)))


@pytest.mark.parametrize("j", [rans.J_MIN, -40, -16, 0, 16, 37, 80, rans.J_MAX])
def test_tables_are_the_discretised_normal(j):
    """Frequencies sum to 2^16, each >= 1, and follow the normal of sd 2^(j/16) (an erf
    computed here) to within the rounding and the floor of one count per symbol."""
    f = rans.frequencies(j)
    rho = 2 ** (j / 16)
    Q = (len(f) - 1) // 2
    assert Q == max(1, math.ceil(10 * rho))
    assert f.sum() == rans.M and f.min() >= 1
    q = np.arange(-Q, Q + 1)
    p = np.array([_phi((v + 0.5) / rho) - _phi((v - 0.5) / rho) for v in q])
    p[0], p[-1] = _phi((-Q + 0.5) / rho), 1 - _phi((Q - 0.5) / rho)
    assert np.abs(f / rans.M - p).max() <= (len(f) + 2) / rans.M


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.lists(st.integers(rans.J_MIN, rans.J_MAX), min_size=1, max_size=40),
       st.integers(0, 2**31 - 1))
def test_round_trip_is_exact(n_rows, tables, seed):
    rng = np.random.default_rng(seed)
    j = np.sort(np.array(tables))[::-1].copy()
    y = rng.standard_normal((n_rows, len(j))) * 2.0 ** (j / 16) * rng.choice([0.5, 1, 3])
    symbols = rans.quantize(y.astype(np.float32), np.ones(n_rows, np.float32), j)
    q = np.array([rans.table_q(int(v)) for v in j])
    assert (np.abs(symbols) <= q).all()
    want = np.clip(np.rint(y.astype(np.float32)), -q, q)  # round half to even, then clamp
    assert np.array_equal(symbols, want)
    stream = rans.encode(symbols, j)
    assert np.array_equal(rans.decode(stream, n_rows, j), symbols)


def test_cost_is_the_information_content():
    """A rANS stream costs -sum log2 P(symbol) bits plus at most the 4-byte state and a byte of
    renormalisation slack: far below Huffman's one bit per symbol for rare non-zero symbols."""
    rng = np.random.default_rng(3)
    j = np.array([40] * 50 + [-30] * 500)
    y = rng.standard_normal((20, len(j))) * 2.0 ** (j / 16)
    symbols = rans.quantize(y.astype(np.float32), np.ones(20, np.float32), j)
    stream = rans.encode(symbols, j)
    info = 0.0
    for k, t in enumerate(j):
        f = rans.frequencies(int(t))
        Q = (len(f) - 1) // 2
        info += -np.log2(f[symbols[:, k] + Q] / rans.M).sum()
    assert info / 8 <= len(stream) <= info / 8 + 5
    assert len(stream) * 8 / symbols.size < 0.8  # Huffman spends at least 1 bit a symbol


def test_corrupt_streams_are_refused():
    rng = np.random.default_rng(1)
    j = np.full(64, 20)
    symbols = rans.quantize((rng.standard_normal((4, 64)) * 2).astype(np.float32),
                            np.ones(4, np.float32), j)
    stream = rans.encode(symbols, j)
    for bad in (stream[:-1], stream + b"\0", b"\0\0\0", stream[:3]):
        with pytest.raises(WireError):
            rans.decode(bad, 4, j)
    refused = 0
    for i in range(len(stream)):
        flipped = bytearray(stream)
        flipped[i] ^= 0x10
        try:
            out = rans.decode(bytes(flipped), 4, j)
        except WireError:
            refused += 1
            continue
        assert out.shape == (4, 64)  # a flip that still decodes gives the right shape
    assert refused >= 0.9 * len(stream)  # the end-state check catches nearly every flip


def test_tables_digest_is_the_documented_one():
    """docs/wire-format.md publishes the tables' SHA-256 for other implementations."""
    from pathlib import Path

    doc = (Path(__file__).parents[2] / "docs" / "wire-format.md").read_text()
    assert rans.tables_digest() in doc
