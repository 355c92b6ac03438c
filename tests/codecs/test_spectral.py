"""FourierCodec against real math: an explicit-DFT float64 reference, Parseval, idempotence."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fc_edge.codecs import get_codec, roundtrip
from fc_edge.codecs.spectral import block_geometry
from fc_edge.errors import BudgetError, ConfigError


def dft(n: int) -> torch.Tensor:
    k = torch.arange(n, dtype=torch.float64)
    return torch.exp(-2j * math.pi * torch.outer(k, k) / n)


def kept(S: int, D: int, k_s: int, k_d: int) -> torch.Tensor:
    """Kept frequencies of the full spectrum, from the definition (independent of the codec)."""
    u = torch.arange(S)
    v = torch.arange(D)
    rows = (u < k_s) | (S - u < k_s)
    cols = (v < k_d) | (D - v < k_d)
    return rows[:, None] & cols[None, :]


def reference(x: torch.Tensor, k_s: int, k_d: int) -> torch.Tensor:
    """Zero all but the kept frequencies with explicit DFT matrices, float64."""
    S, D = x.shape
    fs, fd = dft(S), dft(D)
    spec = fs @ x.to(torch.complex128) @ fd
    spec = spec * kept(S, D, k_s, k_d)
    back = fs.conj() @ spec @ fd.conj() / (S * D)
    return back.real


def exact(k_s: int, k_d: int):
    return get_codec("fourier", k_s=k_s, k_d=k_d, value_dtype="float32")


shapes = st.tuples(st.integers(1, 24), st.integers(2, 40))


@settings(max_examples=60, deadline=None)
@given(shapes, st.data())
def test_matches_explicit_dft_reference(shape, data):
    S, D = shape
    k_s = data.draw(st.integers(1, S // 2 + 1))
    k_d = data.draw(st.integers(1, D // 2 + 1))
    x = torch.randn(S, D, dtype=torch.float64, generator=torch.Generator().manual_seed(S * 97 + D))
    x_hat, _ = roundtrip(exact(k_s, k_d), x.float())
    ref = reference(x, k_s, k_d)
    assert torch.linalg.norm(x_hat.double() - ref) <= 1e-5 * max(torch.linalg.norm(x).item(), 1e-12)


@settings(max_examples=40, deadline=None)
@given(shapes, st.data())
def test_projection_idempotent_and_parseval(shape, data):
    S, D = shape
    k_s = data.draw(st.integers(1, S // 2 + 1))
    k_d = data.draw(st.integers(1, D // 2 + 1))
    x = torch.randn(S, D, generator=torch.Generator().manual_seed(S + 31 * D))
    codec = exact(k_s, k_d)
    x1, _ = roundtrip(codec, x)
    x2, _ = roundtrip(codec, x1)
    scale = x.norm().item()
    assert torch.linalg.norm(x2 - x1) <= 2e-6 * scale  # idempotent
    assert not torch.is_complex(x1) and x1.dtype == torch.float32  # real
    # squared error = discarded energy (Parseval, unnormalised DFT: ||x||^2 = sum|X|^2 / SD)
    spec = torch.fft.fft2(x.double())
    discarded = (spec.abs().square() * ~kept(S, D, k_s, k_d)).sum() / (S * D)
    err2 = (x.double() - x1.double()).square().sum()
    assert abs(err2 - discarded) <= 1e-5 * x.double().square().sum()
    # orthogonality: the error is orthogonal to the reconstruction
    assert abs(float((x - x1).double().flatten() @ x1.double().flatten())) <= 1e-5 * scale**2


def test_full_block_is_lossless():
    x = torch.randn(9, 14)
    x_hat, _ = roundtrip(exact(9 // 2 + 1, 14 // 2 + 1), x)
    assert torch.allclose(x_hat, x, atol=1e-5)


def test_decode_row_keeps_first_k_d_frequencies():
    x = torch.randn(1, 64)
    x_hat, _ = roundtrip(exact(3, 5), x)  # k_s is clipped to 1 on a single row
    spec = torch.fft.rfft(x.double(), dim=-1)
    spec[:, 5:] = 0
    assert torch.allclose(x_hat.double(), torch.fft.irfft(spec, n=64, dim=-1), atol=1e-5)


def test_batched_equals_per_item():
    x = torch.randn(3, 10, 33)
    codec = exact(2, 6)
    batched, _ = roundtrip(codec, x)
    for b in range(3):
        single, _ = roundtrip(codec, x[b])
        assert torch.allclose(batched[b], single, atol=1e-6)


@pytest.mark.parametrize("ratio", [2, 4, 8, 16])
@pytest.mark.parametrize("shape", [(1, 2048), (128, 2048), (37, 577), (2, 31, 65)])
@pytest.mark.parametrize("geometry", ["balanced", "energy"])
def test_ratio_geometry_meets_budget(shape, ratio, geometry):
    x = torch.randn(shape)
    codec = get_codec("fourier", ratio=ratio, geometry=geometry)
    _, nbytes = roundtrip(codec, x)
    assert nbytes <= x.numel() * x.element_size() / ratio


def test_energy_geometry_keeps_at_least_balanced_energy():
    torch.manual_seed(0)
    x = torch.randn(64, 96).cumsum(0)  # smooth along tokens, flat along hidden
    errs = {}
    for g in ("balanced", "energy"):
        x_hat, _ = roundtrip(get_codec("fourier", ratio=8, geometry=g, value_dtype="float32"), x)
        errs[g] = (x_hat - x).norm() / x.norm()
    assert errs["energy"] <= errs["balanced"] + 1e-6


def test_balanced_geometry_is_balanced():
    k_s, k_d = block_geometry(128, 2048, 128 * 1025 // 16)
    R = 2 * k_s - 1
    assert 0.5 < (R / 128) / (k_d / 1025) < 2.0
    assert R * k_d <= 128 * 1025 // 16


def test_bad_parameters_raise_config_error():
    with pytest.raises(ConfigError):
        get_codec("fourier", k_s=3)
    with pytest.raises(ConfigError):
        get_codec("fourier", ratio=8, k_s=1, k_d=2)
    with pytest.raises(ConfigError):
        get_codec("fourier", ratio=0.5)
    with pytest.raises(ConfigError):
        get_codec("fourier", geometry="square")
    with pytest.raises(BudgetError):
        get_codec("fourier", ratio=16).encode(torch.randn(1, 8))
