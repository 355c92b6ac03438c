"""The Gaussian-model Huffman code: complete prefix codes, exact round trips, corruption caught."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fc_edge.codecs import entropy
from fc_edge.errors import WireError


@pytest.mark.parametrize("step", [0, 1, 17, 32, 41, 64, 100, 128])
def test_tables_are_complete_prefix_codes(step):
    t = entropy.table_for_step(step)
    assert sum(2.0 ** -int(n) for n in t.lengths) == pytest.approx(1.0)  # Kraft equality
    words = {(int(c), int(n)) for c, n in zip(t.codes, t.lengths)}
    assert len(words) == len(t.codes)
    for c, n in words:  # no code word is a prefix of another
        for c2, n2 in words:
            if (c, n) != (c2, n2) and n2 > n:
                assert c2 >> (n2 - n) != c


def test_code_lengths_track_the_model_entropy():
    """Huffman of the discretised normal: mean length within 0.1 bit of the model entropy."""
    step = 48
    t = entropy.table_for_step(step)
    a = entropy.step_alpha(step)
    phi = lambda v: 0.5 * math.erfc(-v / math.sqrt(2))  # noqa: E731
    p = [phi((q + 0.5) * a) - phi((q - 0.5) * a) for q in range(-t.Q, t.Q + 1)]
    H = -sum(pi * math.log2(pi) for pi in p if pi > 0)
    mean_len = sum(pi * n for pi, n in zip(p, t.lengths))
    assert H <= mean_len < H + 0.1


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 9), st.integers(1, 300), st.integers(0, 128), st.integers(0, 2**31))
def test_rows_round_trip(n, k, step, seed):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) * 10
    symbols, sigma = entropy.quantize(rows, step)
    stream, lengths = entropy.encode_rows(symbols, step)
    assert int(lengths.sum()) == len(stream)
    assert np.array_equal(entropy.decode_rows(stream, lengths, k, step), symbols)
    err = entropy.dequantize(symbols, sigma, step) - rows
    delta = entropy.step_alpha(step) * torch.from_numpy(sigma.astype(np.float32)).unsqueeze(1)
    t = entropy.table_for_step(step)
    inside = (rows.abs() / delta.clamp_min(1e-30)) < t.Q  # not clamped at 8 sigma
    assert (err.abs()[inside] <= 0.5 * delta.expand_as(err)[inside] * 1.001 + 1e-4).all()


def test_wrong_lengths_and_truncation_are_wire_errors():
    rows = torch.randn(3, 50)
    symbols, _ = entropy.quantize(rows, 40)
    stream, lengths = entropy.encode_rows(symbols, 40)
    with pytest.raises(WireError):
        entropy.decode_rows(stream[:-1], lengths, 50, 40)
    bad = lengths.copy()
    bad[0] += 1
    bad[1] -= 1
    with pytest.raises(WireError):
        entropy.decode_rows(stream, bad, 50, 40)
