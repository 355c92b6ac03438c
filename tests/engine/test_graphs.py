"""The in-graph fourier block (matrix products) equals ops.spectral_compress."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fc_edge.engine.export import relative_error
from fc_edge.engine.graphs import FourierBlock, dft_column_bases, kv_names, token_frequencies
from fc_edge.ops import block_rows, spectral_compress


@settings(max_examples=40, deadline=None)
@given(
    D=st.integers(1, 40),
    k_s=st.integers(1, 6),
    extra=st.integers(0, 9),
    k_d_frac=st.floats(0, 1),
    seed=st.integers(0, 2**16),
)
def test_block_equals_spectral_compress(D, k_s, extra, k_d_frac, seed):
    S = 2 * k_s - 1 + extra
    k_d = 1 + int(k_d_frac * (D // 2))
    x = torch.randn(2, S, D, generator=torch.Generator().manual_seed(seed))
    got = FourierBlock(D, k_s, k_d)(x)
    want = spectral_compress(x, k_s, k_d)
    assert got.shape == want.shape
    assert relative_error(got, want) < 1e-5


def test_k_s_one_is_the_column_sum_for_any_length():
    x = torch.randn(1, 1, 32)
    assert relative_error(FourierBlock(32, 1, 17)(x), spectral_compress(x, 1, 17)) < 1e-6
    x = torch.randn(1, 6, 32)
    assert relative_error(FourierBlock(32, 1, 5)(x), spectral_compress(x, 1, 5)) < 1e-6


def test_token_frequencies_are_the_block_rows():
    for S in range(5, 20):
        assert token_frequencies(S, 3).tolist() == block_rows(S, 3).tolist()


def test_column_bases_are_the_dft_in_float64():
    D, k_d = 576, 40
    cos_d, sin_d = dft_column_bases(D, k_d)
    n = torch.arange(D, dtype=torch.float64)[:, None]
    m = torch.arange(k_d, dtype=torch.float64)[None]
    ref = torch.exp(-2j * torch.pi * n * m / D)
    assert (cos_d.double() - ref.real).abs().max() < 1e-7
    assert (sin_d.double() - ref.imag).abs().max() < 1e-7


def test_kv_names_follow_optimum():
    past, present = kv_names(2)
    assert past == ["past_key_values.0.key", "past_key_values.0.value",
                    "past_key_values.1.key", "past_key_values.1.value"]
    assert present == ["present.0.key", "present.0.value", "present.1.key", "present.1.value"]
