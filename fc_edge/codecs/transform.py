"""Transform coding: an orthonormal transform along the hidden axis, then the group quantizer.

Here the spectral transform spreads energy instead of truncating it. Each row ``x`` (1 x D) is
rotated, ``y = T x`` with ``T`` orthonormal, so quantization noise added to ``y`` comes back with
the same energy and no outlier channel dominates a scale:

* ``transform="dct"``: the orthonormal DCT-II along D;
* ``transform="hadamard"``: random signs (from ``seed``; both sides derive them) followed by a
  block-diagonal Walsh-Hadamard transform whose block is the largest power of two dividing D
  (all of D when D is a power of two; a D of 576 = 9 x 64 uses blocks of 64).

The rotated rows are quantized to ``bits`` with one float16 scale per ``group_size`` values
(0 = per row). Optional truncation keeps only the first ``keep`` coefficients per row (the low
frequencies, for the DCT), meeting ``fourier`` half-way. With ``entropy="deflate"`` the codes
(one byte each) are entropy coded with raw DEFLATE (RFC 1951, Huffman only), which any platform's
zlib decodes; if that would not be smaller the codes are bit-packed instead (the header says
which).

Rate control: ``max_bits`` (default 4.0) caps the *packed* payload, header included, in bits per
activation element (dtype-independent: 4 bits is 1/8 of float32, 1/4 of float16); ``ratio`` caps
it relative to the raw bytes instead; ``max_bits=0`` removes the cap. If the payload is over the
cap, ``bits`` is lowered one at a
time (down to 2); if even that does not fit, :class:`~fc_edge.errors.BudgetError`. Every row is
coded on its own, so decode steps see exactly what prefill rows see.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from fc_edge.codecs.base import (
    Codec,
    ConfigError,
    Encoded,
    TensorSpec,
    check_activation,
    check_ratio,
    header_bytes,
    register,
    restore,
    too_small,
)
from fc_edge.codecs.quant import (
    check_bits,
    check_group_size,
    dequantize_groups,
    n_groups,
    pack_bits,
    packed_nbytes,
    quantize_groups,
    unpack_bits,
)
from fc_edge.errors import BudgetError, WireError

TRANSFORMS = {"dct": 1, "hadamard": 2}
TRANSFORM_NAMES = {v: k for k, v in TRANSFORMS.items()}
ENTROPY = {"none": 0, "deflate": 1}


def dct(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal DCT-II along the last axis via one FFT of length D (Makhoul), O(D) memory."""
    N = x.shape[-1]
    v = torch.cat([x[..., ::2], x[..., 1::2].flip(-1)], dim=-1)
    k = torch.arange(N, device=x.device, dtype=torch.float64)
    w = torch.exp(-0.5j * math.pi * k / N).to(torch.complex64)
    y = 2 * (torch.fft.fft(v, dim=-1) * w).real
    scale = torch.full((N,), math.sqrt(1 / (2 * N)), device=x.device)
    scale[0] = math.sqrt(1 / (4 * N))
    return y * scale


def idct(y: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`dct` (orthonormal DCT-III)."""
    N = y.shape[-1]
    scale = torch.full((N,), math.sqrt(2 * N), device=y.device)
    scale[0] = math.sqrt(4 * N)
    u = y * scale  # unnormalised DCT-II coefficients
    k = torch.arange(N, device=y.device, dtype=torch.float64)
    w = (0.5 * torch.exp(0.5j * math.pi * k / N)).to(torch.complex64)
    u_rev = torch.cat([torch.zeros_like(u[..., :1]), u[..., 1:].flip(-1)], dim=-1)  # u[N-k]
    v = torch.fft.ifft(torch.complex(u, -u_rev) * w, dim=-1).real
    half = (N + 1) // 2
    x = torch.empty_like(v)
    x[..., ::2] = v[..., :half]
    x[..., 1::2] = v[..., half:].flip(-1)
    return x


def hadamard_block(D: int) -> int:
    """The Walsh-Hadamard block size for D: the largest power of two dividing D (max 4096)."""
    return min(D & -D, 4096)


@functools.lru_cache(maxsize=16)
def hadamard_matrix(h: int, device: str = "cpu") -> torch.Tensor:
    """Orthonormal Sylvester-Hadamard matrix ``(h, h)``, h a power of two."""
    H = torch.ones(1, 1, dtype=torch.float32)
    while H.shape[0] < h:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return (H / math.sqrt(h)).to(device)


@functools.lru_cache(maxsize=16)
def hadamard_signs(D: int, seed: int, device: str = "cpu") -> torch.Tensor:
    """``(D,)`` random signs: ``-1`` where bit 0 of splitmix64 output ``i`` (1-based) is set.

    splitmix64 is a few lines in any language, so a non-Python receiver derives the same signs
    (docs/wire-format.md gives the recurrence).
    """
    with np.errstate(over="ignore"):
        z = np.uint64(seed) + np.arange(1, D + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    signs = 1.0 - 2.0 * (z & np.uint64(1)).astype(np.float32)
    return torch.from_numpy(signs).to(device)


def rotate(rows: torch.Tensor, transform: int, seed: int) -> torch.Tensor:
    """``(N, D)`` float32 -> ``(N, D)`` transformed rows (orthonormal)."""
    D = rows.shape[1]
    dev = str(rows.device)
    if transform == TRANSFORMS["dct"]:
        return dct(rows)
    h = hadamard_block(D)
    y = (rows * hadamard_signs(D, seed, dev)).view(-1, D // h, h) @ hadamard_matrix(h, dev)
    return y.view(-1, D)


def unrotate(coefs: torch.Tensor, transform: int, seed: int) -> torch.Tensor:
    """Inverse of :func:`rotate` (the transpose)."""
    D = coefs.shape[1]
    dev = str(coefs.device)
    if transform == TRANSFORMS["dct"]:
        return idct(coefs)
    h = hadamard_block(D)
    y = (coefs.view(-1, D // h, h) @ hadamard_matrix(h, dev).T).view(-1, D)
    return y * hadamard_signs(D, seed, dev)


def deflate(data: bytes) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -15, 9, zlib.Z_HUFFMAN_ONLY)
    return c.compress(data) + c.flush()


def inflate(data: bytes, size: int) -> bytes:
    """Raw-DEFLATE decode of exactly ``size`` bytes; anything else is a WireError."""
    d = zlib.decompressobj(-15)
    try:
        out = d.decompress(data, size)
        if d.unconsumed_tail or not d.eof or len(out) != size or d.unused_data:
            raise WireError(f"entropy-coded codes do not decode to exactly {size} bytes")
    except zlib.error as e:
        raise WireError(f"entropy-coded codes are corrupt: {e}") from None
    return out


@register
class RotatedCodec(Codec):
    """Orthonormal transform along D + group quantizer (+ entropy coding); see module docstring.

    Defaults (``get_codec("rotated")``): DCT, 4-bit codes, one scale per 64 values, DEFLATE,
    at most 4 packed bits per element.
    """

    name = "rotated"
    wire_id = 7
    wire_params = (
        ("transform", "B"),
        ("bits", "B"),
        ("group_size", "H"),
        ("keep", "H"),
        ("seed", "I"),
        ("entropy", "B"),
        ("code_bytes", "I"),
    )

    def __init__(
        self,
        bits: int = 4,
        group_size: int = 64,
        transform: str = "dct",
        keep: int | None = None,
        seed: int = 0,
        entropy: str = "deflate",
        max_bits: float = 4.0,
        ratio: float | None = None,
    ) -> None:
        self.bits = check_bits(bits)
        self.group_size = check_group_size(group_size)
        if transform not in TRANSFORMS:
            raise ConfigError(
                f"transform must be one of {', '.join(TRANSFORMS)}, got {transform!r}"
            )
        if entropy not in ENTROPY:
            raise ConfigError(f"entropy must be one of {', '.join(ENTROPY)}, got {entropy!r}")
        if keep is not None and (not isinstance(keep, int) or not 1 <= keep <= 65535):
            raise ConfigError(f"keep must be an integer in 1..65535, got {keep!r}")
        if not isinstance(seed, int) or not 0 <= seed < 2**32:
            raise ConfigError(f"seed must be an integer in 0..2**32-1, got {seed!r}")
        self.ratio = check_ratio(ratio)
        if not isinstance(max_bits, (int, float)) or not math.isfinite(max_bits) or max_bits < 0:
            raise ConfigError(f"max_bits must be a number >= 0 (0 = no cap), got {max_bits!r}")
        self.max_bits = 0.0 if ratio is not None else float(max_bits)
        self.transform, self.keep, self.seed, self.entropy = transform, keep, seed, entropy

    def config(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "bits": self.bits,
            "group_size": self.group_size,
            "transform": self.transform,
            "keep": self.keep,
            "seed": self.seed,
            "entropy": self.entropy,
        }
        out.update({"ratio": self.ratio} if self.ratio is not None else {"max_bits": self.max_bits})
        return out

    def budget(self, x: torch.Tensor) -> int | None:
        """Packed-bytes cap for ``x`` (header included), or None for no cap."""
        if self.ratio is not None:
            return math.floor(x.numel() * x.element_size() / self.ratio)
        if self.max_bits:
            return math.floor(x.numel() * self.max_bits / 8)
        return None

    def encode(self, x: torch.Tensor) -> Encoded:
        _, _, D = check_activation(x)
        if D > 65535:
            raise ConfigError(f"rotated supports D <= 65535, got {D}")
        keep = D if self.keep is None else min(self.keep, D)
        tcode = TRANSFORMS[self.transform]
        coefs = rotate(x.detach().reshape(-1, D).float(), tcode, self.seed)[:, :keep]
        cap = self.budget(x)
        overhead = header_bytes(type(self), x.dim())
        for bits in range(self.bits, 1, -1):
            codes, scales = quantize_groups(coefs, bits, self.group_size)
            body, entropy = self._code_stream(codes, bits)
            size = overhead + 2 * scales.numel() + len(body)
            if cap is None or size <= cap:
                params = {
                    "transform": tcode,
                    "bits": bits,
                    "group_size": self.group_size,
                    "keep": keep,
                    "seed": self.seed,
                    "entropy": entropy,
                    "code_bytes": len(body),
                }
                stream = torch.frombuffer(bytearray(body), dtype=torch.uint8).to(x.device)
                return self._encoded(x, params, codes=stream, scales=scales)
        why = f"2-bit codes take {size} bytes, cap {cap}"
        if self.ratio is not None:
            raise too_small(self.name, tuple(x.shape), self.ratio, why)
        raise BudgetError(
            f"rotated cannot fit {tuple(x.shape)} in {self.max_bits} bits per "
            f"element ({why}); raise --max-bits or send a larger block"
        )

    def _code_stream(self, codes: torch.Tensor, bits: int) -> tuple[bytes, int]:
        packed = pack_bits(codes, bits).cpu().numpy().tobytes()
        if self.entropy == "deflate":
            coded = deflate(codes.cpu().numpy().tobytes())
            if len(coded) < len(packed):
                return coded, ENTROPY["deflate"]
        return packed, ENTROPY["none"]

    @classmethod
    def _codes(cls, enc: Encoded) -> torch.Tensor:
        p = enc.params
        D = enc.shape[-1]
        n = (math.prod(enc.shape) // D) * p["keep"]
        stream = enc.tensors["codes"]
        if p["entropy"] == ENTROPY["deflate"]:
            raw = inflate(stream.cpu().numpy().tobytes(), n)
            return torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(stream.device)
        return unpack_bits(stream, p["bits"], n)

    @classmethod
    def decode(cls, enc: Encoded) -> torch.Tensor:
        p = enc.params
        D = enc.shape[-1]
        N = math.prod(enc.shape) // D
        codes = cls._codes(enc).view(N, p["keep"])
        kept = dequantize_groups(codes, enc.tensors["scales"], p["bits"], p["group_size"])
        coefs = torch.nn.functional.pad(kept, (0, D - p["keep"]))
        return restore(unrotate(coefs, p["transform"], p["seed"]), enc)

    @classmethod
    def layout(cls, shape: tuple[int, ...], params: Mapping[str, int]) -> list[TensorSpec]:
        D = shape[-1]
        N = math.prod(shape) // D
        check_bits(params["bits"])
        if params["transform"] not in TRANSFORM_NAMES:
            raise ConfigError(f"unknown transform code {params['transform']}")
        if params["entropy"] not in ENTROPY.values():
            raise ConfigError(f"unknown entropy code {params['entropy']}")
        keep = params["keep"]
        if not 1 <= keep <= D:
            raise ConfigError(f"keep must be in 1..{D}, got {keep}")
        code_bytes = params["code_bytes"]
        if params["entropy"] == ENTROPY["none"] and code_bytes != packed_nbytes(
            N * keep, params["bits"]
        ):
            raise ConfigError("bit-packed code stream has the wrong length")
        return [
            TensorSpec("codes", "u1", (code_bytes,)),
            TensorSpec("scales", "f2", (N, n_groups(keep, params["group_size"]))),
        ]

    @classmethod
    def validate_payload(cls, enc: Encoded) -> None:
        codes = cls._codes(enc)
        qmax = 2 ** (enc.params["bits"] - 1) - 1
        if codes.numel() and int(codes.max()) > 2 * qmax:
            raise WireError(f"rotated codes exceed {2 * qmax} for {enc.params['bits']} bits")
