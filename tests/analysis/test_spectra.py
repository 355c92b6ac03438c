"""Low-frequency energy shares against signals whose spectra are known (analysis/spectra.py)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fc_edge.analysis.spectra import axis_power, low_frequency_share


def test_constant_is_all_low_frequency():
    x = torch.ones(16, 32)
    assert low_frequency_share(x, 0) == pytest.approx(1.0)
    assert low_frequency_share(x, 1) == pytest.approx(1.0)


def test_impulse_has_a_flat_spectrum():
    # a delta along an axis has equal energy at every frequency: share == kept fraction
    x = torch.zeros(16, 64)
    x[:, 5] = 1.0
    assert low_frequency_share(x, 1, 0.125) == pytest.approx(8 / 64)
    assert low_frequency_share(x, 1, 0.5) == pytest.approx(32 / 64)


def test_low_cosine_counts_both_mirrors():
    # cos(2 pi s / S) has energy at frequencies +1 and -1: the 3 lowest (0, +1, -1) hold all of it
    S = 24
    s = torch.arange(S, dtype=torch.float64)
    x = torch.cos(2 * math.pi * s / S)[:, None].repeat(1, 4)
    assert low_frequency_share(x, 0, 3 / S) == pytest.approx(1.0)
    assert low_frequency_share(x, 0, 1 / S) == pytest.approx(0.0, abs=1e-12)


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 20), st.integers(2, 20), st.integers(0, 2**31 - 1))
def test_parseval(S, D, seed):
    x = torch.randn(S, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    energy = float(x.square().sum())
    assert float(axis_power(x, 0).sum()) == pytest.approx(S * energy)
    assert float(axis_power(x, 1).sum()) == pytest.approx(D * energy)


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 20), st.integers(2, 20), st.floats(0.05, 1.0), st.integers(0, 2**31 - 1))
def test_share_equals_explicit_dft_matrix(S, D, fraction, seed):
    """Oracle: the DFT as an explicit matrix F[k, s] = exp(-2 pi i k s / S) and the lowest
    frequencies picked by hand: |k| = min(k, S - k), k before S - k on a tie."""
    import numpy as np

    x = torch.randn(S, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    for dim, n in ((0, S), (1, D)):
        a = x.numpy() if dim == 0 else x.numpy().T
        k = np.arange(n)
        F = np.exp(-2j * np.pi * np.outer(k, k) / n)
        power = (np.abs(F @ a) ** 2).sum(axis=1)
        keep = sorted(k, key=lambda i: (min(i, n - i), i))[: math.ceil(fraction * n)]
        want = power[keep].sum() / power.sum()
        assert low_frequency_share(x, dim, fraction) == pytest.approx(want, rel=1e-9)
