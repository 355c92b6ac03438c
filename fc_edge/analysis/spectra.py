"""Where an activation's energy sits in frequency, along each axis.

For an (S, D) activation A, the token-axis spectrum is the DFT of each column (over s), the
hidden-axis spectrum the DFT of each row (over d). By Parseval the energies of all S (or D)
frequencies sum to S * ||A||^2 (or D * ||A||^2); the *low-frequency share* is the fraction held by
the ``fraction`` of frequencies nearest zero (|f| smallest, so k and -k count together). A signal
with a flat spectrum has a share equal to the fraction; a smooth one has a share near 1.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def axis_power(x: Tensor, dim: int) -> Tensor:
    """Energy per DFT frequency along ``dim`` of an (S, D) tensor, summed over the other axis,
    in the order of ``torch.fft.fftfreq`` (float64, length x.shape[dim])."""
    spec = torch.fft.fft(x.double(), dim=dim)
    return spec.abs().square().sum(dim=1 - dim)


def low_frequency_share(x: Tensor, dim: int, fraction: float = 0.125) -> float:
    """Share of the energy along ``dim`` in the ``ceil(fraction * n)`` frequencies nearest 0."""
    if not 0 < fraction <= 1:
        raise ValueError("fraction must be in (0, 1]")
    power = axis_power(x, dim)
    n = power.numel()
    keep = max(1, math.ceil(fraction * n))
    order = torch.argsort(torch.fft.fftfreq(n).abs(), stable=True)
    total = float(power.sum())
    return float(power[order[:keep]].sum()) / total if total > 0 else 0.0


def spectrum_image(x: Tensor) -> Tensor:
    """log10 |FFT2(x)| with the zero frequency centred, (S, D) float32, for plotting."""
    spec = torch.fft.fftshift(torch.fft.fft2(x.double()))
    return torch.log10(spec.abs() + 1e-12).float()
