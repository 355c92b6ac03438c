"""FourierCompress: keep a low-frequency block of the activation's 2-D real FFT.

For an activation ``A`` of shape ``(S, D)``, ``rfft2(A)`` has ``S x (D/2+1)`` coefficients. The
codec keeps token frequencies ``0..k_s-1`` and their mirrors ``S-k_s+1..S-1`` (so
``R = min(2 k_s - 1, S)`` rows) and the first ``k_d`` half-spectrum columns, sends that block,
and the receiver zero-pads it and inverts with ``irfft2(s=(S, D))``. Because the kept set is
closed under the conjugate symmetry of a real signal's spectrum, the reconstruction is the
orthogonal projection of ``A`` onto the kept frequencies: real, idempotent, and with squared error
equal to the discarded energy (Parseval). A ``(B, S, D)`` input is coded item by item.

Block geometry for a target ``ratio`` (``docs/wire-format.md`` and ``block_geometry``): the body
holds ``2 R k_d`` values of ``value_dtype`` per item plus one float32 scale; the largest blocks
that fit are enumerated over ``k_s``, and

* ``geometry="balanced"`` (default, the paper's rectangular low-pass block) picks, among blocks
  within 5% of the largest coefficient count, the one whose kept fractions along the two axes,
  ``R / S`` and ``k_d / (D/2+1)``, are closest;
* ``geometry="energy"`` picks the block that keeps the most energy of this very input (the
  receiver learns ``k_s, k_d`` from the header, so adapting costs no bytes).

A decode step (``S = 1``) keeps the first ``k_d`` of the ``D/2+1`` frequencies of the row.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from fc_edge.codecs.base import (
    VALUE_DTYPE_CODES,
    WIRE_DTYPE_OF_VALUE,
    Codec,
    ConfigError,
    Encoded,
    TensorSpec,
    all_finite,
    as_batched,
    check_activation,
    check_ratio,
    register,
    restore,
    too_small,
    value_dtype_code,
    value_dtype_of,
)
from fc_edge.codecs.context import CodecContext
from fc_edge.errors import NonFiniteError
from fc_edge.ops import (
    block_rows,
    check_geometry,
    n_block_rows,
    spectral_compress,
    spectral_decompress,
)

GEOMETRIES = ("balanced", "energy")


def block_geometry(
    S: int, D: int, max_coefs: int, geometry: str = "balanced", energy: torch.Tensor | None = None
) -> tuple[int, int]:
    """Choose ``(k_s, k_d)`` so that ``R * k_d <= max_coefs`` complex coefficients.

    ``energy`` (needed for ``geometry="energy"``): ``(S, D/2+1)`` weighted power of the
    half spectrum, summed over the batch.
    """
    half = D // 2 + 1
    candidates = []
    for k_s in range(1, S // 2 + 2):
        R = n_block_rows(S, k_s)
        k_d = min(half, max_coefs // R)
        if k_d >= 1:
            candidates.append((k_s, k_d, R))
        if R == S:
            break
    if not candidates:
        raise ConfigError(f"no spectral block of at most {max_coefs} coefficients for ({S}, {D})")
    if geometry == "energy":
        if energy is None:
            raise ConfigError("geometry='energy' needs the input's spectrum")
        col_cum = energy.cumsum(dim=1)  # (S, half)

        def kept(k_s: int, k_d: int) -> float:
            return float(col_cum[block_rows(S, k_s), k_d - 1].sum())

        k_s, k_d, _ = max(candidates, key=lambda c: (kept(c[0], c[1]), -c[0]))
        return k_s, k_d
    best = max(R * k_d for _, k_d, R in candidates)
    near = [c for c in candidates if c[2] * c[1] >= 0.95 * best]
    k_s, k_d, _ = min(near, key=lambda c: (abs(math.log((c[2] / S) / (c[1] / half))), -c[2] * c[1]))
    return k_s, k_d


def half_spectrum_power(x: torch.Tensor) -> torch.Tensor:
    """``(B, S, D)`` -> ``(S, D/2+1)`` power of ``rfft2`` summed over the batch, each column
    weighted by how often it appears in the full spectrum (1 for DC/Nyquist, else 2)."""
    D = x.shape[-1]
    power = torch.fft.rfft2(x.float()).abs().square().sum(0)
    w = torch.full((D // 2 + 1,), 2.0, device=x.device)
    w[0] = 1.0
    if D % 2 == 0:
        w[-1] = 1.0
    return power * w


@register
class FourierCodec(Codec):
    """The paper's method (FourierCompress), exact; see the module docstring."""

    name = "fourier"
    wire_id = 2
    wire_params = (("k_s", "I"), ("k_d", "I"), ("value_dtype", "B"))
    row_wise = False  # mixes tokens; on a single row (S = 1) it is a 1-D low-pass

    def __init__(
        self,
        ratio: float | None = None,
        k_s: int | None = None,
        k_d: int | None = None,
        value_dtype: str = "float16",
        geometry: str = "balanced",
    ) -> None:
        if (k_s is None) != (k_d is None):
            raise ConfigError("fourier needs both k_s and k_d (or neither, with ratio)")
        if k_s is not None and ratio is not None:
            raise ConfigError("fourier takes either ratio or (k_s, k_d), not both")
        if k_s is not None and (
            not isinstance(k_s, int) or not isinstance(k_d, int) or k_s < 1 or k_d < 1
        ):
            raise ConfigError(f"k_s and k_d must be integers >= 1, got {k_s!r}, {k_d!r}")
        if geometry not in GEOMETRIES:
            raise ConfigError(f"geometry must be one of {', '.join(GEOMETRIES)}, got {geometry!r}")
        self.ratio = check_ratio(ratio if ratio is not None or k_s is not None else 8.0)
        self.k_s, self.k_d = k_s, k_d
        value_dtype_code(value_dtype)
        self.value_dtype = value_dtype
        self.geometry = geometry

    def config(self) -> dict[str, Any]:
        out: dict[str, Any] = (
            {"k_s": self.k_s, "k_d": self.k_d} if self.k_s is not None else {"ratio": self.ratio}
        )
        return {**out, "value_dtype": self.value_dtype, "geometry": self.geometry}

    def geometry_for(self, x: torch.Tensor) -> tuple[int, int]:
        """``(k_s, k_d)`` this codec uses for ``x`` (explicit ones are clipped to the shape)."""
        B, S, D = check_activation(x)
        if self.k_s is not None:
            return min(self.k_s, S // 2 + 1), min(self.k_d, D // 2 + 1)
        assert self.ratio is not None
        bound = {"k_s": S // 2 + 1, "k_d": D // 2 + 1, "value_dtype": 3}
        budget = self.budget_bytes(tuple(x.shape), x.dtype, self.ratio, bound)
        vbytes = torch.empty(
            (), dtype=value_dtype_of({"value_dtype": VALUE_DTYPE_CODES[self.value_dtype]})
        ).element_size()
        max_coefs = (budget - 4 * B) // (2 * vbytes * B)
        if max_coefs < 1:
            raise too_small(self.name, tuple(x.shape), self.ratio, "not even one coefficient fits")
        energy = half_spectrum_power(as_batched(x)) if self.geometry == "energy" else None
        return block_geometry(S, D, max_coefs, self.geometry, energy)

    def encode(self, x: torch.Tensor, ctx: CodecContext | None = None) -> Encoded:
        k_s, k_d = self.geometry_for(x)
        xb = as_batched(x.detach())
        block = spectral_compress(xb, k_s, k_d)  # (B, R, k_d, 2) float32
        # One scale per item keeps float16 coefficients in range (the DC term is a sum of S*D).
        scale = block.abs().amax(dim=(1, 2, 3)).clamp_min(torch.finfo(torch.float32).tiny)
        if not all_finite(scale):
            raise NonFiniteError(
                f"the spectrum of the activation {tuple(x.shape)} overflows float32 "
                "(values too large for fourier)"
            )
        vcode = value_dtype_code(self.value_dtype)
        vdt = value_dtype_of({"value_dtype": vcode})
        coefs = (block / scale.view(-1, 1, 1, 1)).to(vdt)
        return self._encoded(
            x, {"k_s": k_s, "k_d": k_d, "value_dtype": vcode}, coefs=coefs, scale=scale
        )

    @classmethod
    def decode(cls, enc: Encoded, ctx: CodecContext | None = None) -> torch.Tensor:
        S, D = enc.shape[-2:]
        block = enc.tensors["coefs"].float() * enc.tensors["scale"].float().view(-1, 1, 1, 1)
        return restore(spectral_decompress(block, S, D, enc.params["k_s"]), enc)

    @classmethod
    def layout(cls, shape: tuple[int, ...], params: Mapping[str, int]) -> list[TensorSpec]:
        B = shape[0] if len(shape) == 3 else 1
        S, D = shape[-2:]
        k_s, k_d = params["k_s"], params["k_d"]
        check_geometry(S, D, k_s, k_d)
        wdt = WIRE_DTYPE_OF_VALUE[value_dtype_of(params)]
        return [
            TensorSpec("coefs", wdt, (B, n_block_rows(S, k_s), k_d, 2)),
            TensorSpec("scale", "f4", (B,)),
        ]
