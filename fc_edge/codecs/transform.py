"""Transform coding: an orthonormal transform along the hidden axis, then scalar quantization.

Here the spectral transform spreads energy instead of truncating it (the paper's FourierCompress
truncates). Each row ``x`` (1 x D) is rotated, ``y = T x`` with ``T`` orthonormal, so noise added
to ``y`` comes back with the same energy and no outlier channel dominates a scale:

* ``transform="dct"`` (default): the orthonormal DCT-II along D;
* ``transform="hadamard"``: random signs (from ``seed``, via splitmix64) then a block-diagonal
  Walsh-Hadamard transform whose block is the largest power of two dividing D (all of D when D is
  a power of two; 576 = 9 x 64 uses blocks of 64).

Two quantizers:

* ``quantizer="uniform"`` (default): entropy-coded uniform quantization
  (:mod:`fc_edge.codecs.entropy`): one float16 RMS per row and a step, chosen per payload by rate
  control, so that the *packed* payload, header included, takes at most ``bits`` bits per
  activation element (4 = 1/8 of float32, 1/4 of float16), or at most ``raw / ratio`` bytes when
  ``ratio`` is given.
* ``quantizer="absmax"``: ``bits``-bit symmetric codes with one float16 scale per ``group_size``
  values (0 = per row), bit-packed or, with ``entropy="deflate"``, raw-DEFLATE coded (RFC 1951).
  With ``ratio``, ``bits`` is lowered until the payload fits.

Noise shaping (``shaping="auto"``, default): once bound to a model (:meth:`RotatedCodec.bind`,
``fc_edge.models.split.bind_codec``), rows are coded as ``x * w`` and rebuilt as ``y / w`` with
``w`` the RMS of the RMSNorm gains of the layers after the split, so the error lands where later
layers attenuate it. On SmolLM2 (split after layer 1, 4 bits per element, one message per token)
this took the perplexity change from +2.27% to +0.72% on 40 documents (docs/results.md, §7).
Unbound, or with ``shaping="none"``, rows are coded as they are.

Optional truncation keeps only the first ``keep`` coefficients per row (the low frequencies, for
the DCT), meeting ``fourier`` half-way. Every row is coded on its own, so decode steps see exactly
what prefill rows see.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from fc_edge.codecs import entropy
from fc_edge.codecs.base import (
    WIRE_DTYPES,
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


QUANTIZERS = {"uniform": 1, "absmax": 2}
SHAPINGS = ("auto", "none")

# Channel weights for noise shaping, by id (CRC32 of their float16 bytes); see bind().
_CHANNEL_WEIGHTS: dict[int, torch.Tensor] = {}


def register_channel_weights(weights: torch.Tensor) -> int:
    """Make a ``(D,)`` positive weight vector known to this process; returns its wire id.

    Both ends of a session register the same vector (computed from the same model), and a
    payload names the vector it was shaped with, so a receiver without it refuses the payload.
    """
    w = weights.detach().float().cpu().reshape(-1)
    if w.numel() < 1 or not torch.isfinite(w).all() or (w <= 0).any():
        raise ConfigError("channel weights must be a non-empty vector of positive finite numbers")
    w16 = w.to(torch.float16).float()
    # 14 bits of the CRC: a 2-byte varint (a full CRC32 would take 5 bytes of a 288-byte row)
    key = (zlib.crc32(w16.to(torch.float16).numpy().tobytes()) & 0x3FFF) or 1
    known = _CHANNEL_WEIGHTS.get(key)
    if known is not None and not torch.equal(known, w16):
        raise ConfigError(
            f"two different channel-weight vectors share id {key}; "
            "bind fewer models or split layers in one process"
        )
    _CHANNEL_WEIGHTS[key] = w16
    return key


def channel_weights_by_id(key: int, D: int, device: torch.device) -> torch.Tensor:
    w = _CHANNEL_WEIGHTS.get(key)
    if w is None:
        raise WireError(
            f"payload is shaped with channel weights {key} this process does not know; "
            "bind the codec to the same model on both ends"
        )
    if w.numel() != D:
        raise WireError(f"channel weights {key} have {w.numel()} entries, the row has {D}")
    return w.to(device)


@register
class RotatedCodec(Codec):
    """Orthonormal transform along D + scalar quantization (+ entropy coding); module docstring.

    ``get_codec("rotated")``: DCT, entropy-coded uniform quantizer, at most 4 packed bits per
    element, row by row.
    """

    name = "rotated"
    wire_id = 7
    wire_params = (
        ("transform", "B"),
        ("quantizer", "B"),
        ("bits", "B"),
        ("step", "B"),
        ("group_size", "H"),
        ("keep", "H"),
        ("seed", "I"),
        ("entropy", "B"),
        ("shaping", "I"),
        ("code_bytes", "I"),
    )

    def __init__(
        self,
        bits: int = 4,
        transform: str = "dct",
        quantizer: str = "uniform",
        group_size: int = 64,
        keep: int | None = None,
        seed: int = 0,
        entropy: str = "deflate",
        shaping: str = "auto",
        ratio: float | None = None,
    ) -> None:
        self.bits = check_bits(bits)
        self.group_size = check_group_size(group_size)
        if transform not in TRANSFORMS:
            raise ConfigError(
                f"transform must be one of {', '.join(TRANSFORMS)}, got {transform!r}"
            )
        if quantizer not in QUANTIZERS:
            raise ConfigError(
                f"quantizer must be one of {', '.join(QUANTIZERS)}, got {quantizer!r}"
            )
        if entropy not in ENTROPY:
            raise ConfigError(f"entropy must be one of {', '.join(ENTROPY)}, got {entropy!r}")
        if keep is not None and (not isinstance(keep, int) or not 1 <= keep <= 65535):
            raise ConfigError(f"keep must be an integer in 1..65535, got {keep!r}")
        if not isinstance(seed, int) or not 0 <= seed < 2**32:
            raise ConfigError(f"seed must be an integer in 0..2**32-1, got {seed!r}")
        self.ratio = check_ratio(ratio)
        self.transform, self.quantizer, self.keep = transform, quantizer, keep
        self.seed, self.entropy = seed, entropy
        if shaping not in SHAPINGS:
            raise ConfigError(f"shaping must be one of {', '.join(SHAPINGS)}, got {shaping!r}")
        self.shaping = shaping
        self.weights_id = 0  # set by bind()

    def bind(self, weights: torch.Tensor | None) -> RotatedCodec:
        """Shape the quantization noise by per-channel ``weights`` (``shaping="auto"``).

        Rows are coded as ``x * w`` and decoded as ``y / w``, so channel d's error scales as
        ``1 / w_d``. ``fc_edge.models.split.bind_codec`` passes the RMS of the downstream
        RMSNorm gains, putting less noise where later layers amplify it. Returns self.
        """
        if self.shaping == "auto" and weights is not None:
            self.weights_id = register_channel_weights(weights)
        return self

    def config(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "bits": self.bits,
            "transform": self.transform,
            "quantizer": self.quantizer,
            "keep": self.keep,
            "seed": self.seed,
            "shaping": self.shaping,
        }
        if self.quantizer == "absmax":
            out.update(group_size=self.group_size, entropy=self.entropy)
        if self.ratio is not None:
            out["ratio"] = self.ratio
        return out

    def cap_bytes(self, x: torch.Tensor) -> int | None:
        """Packed-bytes cap for ``x`` (header included), or None for no cap."""
        if self.ratio is not None:
            return math.floor(x.numel() * x.element_size() / self.ratio)
        if self.quantizer == "uniform":
            return math.floor(x.numel() * self.bits / 8)
        return None

    def encode(self, x: torch.Tensor) -> Encoded:
        _, _, D = check_activation(x)
        if D > 65535:
            raise ConfigError(f"rotated supports D <= 65535, got {D}")
        keep = D if self.keep is None else min(self.keep, D)
        tcode = TRANSFORMS[self.transform]
        rows = x.detach().reshape(-1, D).float()
        if self.weights_id:
            rows = rows * channel_weights_by_id(self.weights_id, D, rows.device)
        coefs = rotate(rows, tcode, self.seed)[:, :keep]
        base = {
            "transform": tcode,
            "quantizer": QUANTIZERS[self.quantizer],
            "bits": 0,
            "step": 0,
            "group_size": 0,
            "keep": keep,
            "seed": self.seed,
            "entropy": 0,
            "shaping": self.weights_id,
        }
        cap = self.cap_bytes(x)
        if self.quantizer == "uniform":
            return self._encode_uniform(x, coefs, base, cap)
        return self._encode_absmax(x, coefs, base, cap)

    def _size(self, x: torch.Tensor, params: dict[str, int], body: int) -> int:
        return header_bytes(type(self), tuple(x.shape), params, body) + body

    def _encode_uniform(self, x, coefs, base, cap) -> Encoded:
        N = coefs.shape[0]
        len_dtype = _length_wire_dtype(base["keep"])
        fixed = 2 * N + WIRE_DTYPES[len_dtype][0] * (N - 1)  # sigmas + row lengths

        @functools.cache  # the search and the final encode share each step's quantization
        def size_at(step: int) -> tuple[int, np.ndarray, np.ndarray]:
            symbols, sigma = entropy.quantize(coefs, step)
            code = int(entropy.row_bytes(symbols, step).sum())
            params = {**base, "step": step, "code_bytes": code}
            return self._size(x, params, fixed + code), symbols, sigma

        lo, hi = 0, entropy.MAX_STEP  # finest step whose payload fits the cap
        if cap is not None and size_at(0)[0] > cap:
            raise self._over(x, cap, size_at(0)[0])
        if cap is None:
            lo = entropy.MAX_STEP
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if size_at(mid)[0] <= cap:
                lo = mid
            else:
                hi = mid - 1
        _, symbols, sigma = size_at(lo)
        stream, lengths = entropy.encode_rows(symbols, lo)
        params = {**base, "step": lo, "code_bytes": len(stream)}
        dev = x.device
        return self._encoded(
            x,
            params,
            codes=torch.frombuffer(bytearray(stream), dtype=torch.uint8).to(dev),
            scales=torch.from_numpy(sigma).to(dev),
            lengths=torch.from_numpy(lengths[:-1].astype(np.int64)).to(dev),
        )

    def _encode_absmax(self, x, coefs, base, cap) -> Encoded:
        for bits in range(self.bits, 1, -1):
            codes, scales = quantize_groups(coefs, bits, self.group_size)
            body, entropy_code = self._code_stream(codes, bits)
            params = {
                **base,
                "bits": bits,
                "group_size": self.group_size,
                "entropy": entropy_code,
                "code_bytes": len(body),
            }
            size = self._size(x, params, 2 * scales.numel() + len(body))
            if cap is None or size <= cap:
                stream = torch.frombuffer(bytearray(body), dtype=torch.uint8).to(x.device)
                return self._encoded(x, params, codes=stream, scales=scales)
        raise self._over(x, cap, size)

    def _over(self, x: torch.Tensor, cap: int, size: int) -> BudgetError:
        why = f"the coarsest setting takes {size} bytes, the cap is {cap}"
        if self.ratio is not None:
            return too_small(self.name, tuple(x.shape), self.ratio, why)
        return BudgetError(
            f"rotated cannot fit {tuple(x.shape)} in {self.bits} bits per element ({why}); "
            "raise --bits or send a larger block"
        )

    def _code_stream(self, codes: torch.Tensor, bits: int) -> tuple[bytes, int]:
        packed = pack_bits(codes, bits).cpu().numpy().tobytes()
        if self.entropy == "deflate":
            coded = deflate(codes.cpu().numpy().tobytes())
            if len(coded) < len(packed):
                return coded, ENTROPY["deflate"]
        return packed, ENTROPY["none"]

    @classmethod
    def _n_rows(cls, enc: Encoded) -> int:
        return math.prod(enc.shape) // enc.shape[-1]

    @classmethod
    def _uniform_symbols(cls, enc: Encoded) -> np.ndarray:
        lengths = enc.tensors["lengths"].cpu().numpy().astype(np.int64)
        stream = enc.tensors["codes"].cpu().numpy().tobytes()
        last = len(stream) - int(lengths.sum())
        if last < 0:
            raise WireError("entropy-coded row lengths exceed the stream")
        lengths = np.concatenate([lengths, [last]])
        return entropy.decode_rows(stream, lengths, enc.params["keep"], enc.params["step"])

    @classmethod
    def _absmax_codes(cls, enc: Encoded) -> torch.Tensor:
        p = enc.params
        n = cls._n_rows(enc) * p["keep"]
        stream = enc.tensors["codes"]
        if p["entropy"] == ENTROPY["deflate"]:
            raw = inflate(stream.cpu().numpy().tobytes(), n)
            return torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(stream.device)
        return unpack_bits(stream, p["bits"], n)

    @classmethod
    def decode(cls, enc: Encoded) -> torch.Tensor:
        p = enc.params
        D = enc.shape[-1]
        N = cls._n_rows(enc)
        dev = enc.tensors["codes"].device
        if p["quantizer"] == QUANTIZERS["uniform"]:
            symbols = cls._uniform_symbols(enc)
            sigma = enc.tensors["scales"].cpu().numpy()
            kept = entropy.dequantize(symbols, sigma, p["step"]).to(dev)
        else:
            codes = cls._absmax_codes(enc).view(N, p["keep"])
            kept = dequantize_groups(codes, enc.tensors["scales"], p["bits"], p["group_size"])
        coefs = torch.nn.functional.pad(kept, (0, D - p["keep"]))
        rows = unrotate(coefs, p["transform"], p["seed"])
        if p["shaping"]:
            rows = rows / channel_weights_by_id(p["shaping"], D, rows.device)
        return restore(rows, enc)

    @classmethod
    def layout(cls, shape: tuple[int, ...], params: Mapping[str, int]) -> list[TensorSpec]:
        D = shape[-1]
        N = math.prod(shape) // D
        if params["transform"] not in TRANSFORM_NAMES:
            raise ConfigError(f"unknown transform code {params['transform']}")
        keep = params["keep"]
        if not 1 <= keep <= D:
            raise ConfigError(f"keep must be in 1..{D}, got {keep}")
        code_bytes = params["code_bytes"]
        if params["quantizer"] == QUANTIZERS["uniform"]:
            if params["step"] > entropy.MAX_STEP:
                raise ConfigError(f"step must be in 0..{entropy.MAX_STEP}")
            return [
                TensorSpec("codes", "u1", (code_bytes,)),
                TensorSpec("scales", "f2", (N,)),
                TensorSpec("lengths", _length_wire_dtype(keep), (N - 1,)),
            ]
        if params["quantizer"] != QUANTIZERS["absmax"]:
            raise ConfigError(f"unknown quantizer code {params['quantizer']}")
        check_bits(params["bits"])
        if params["entropy"] not in ENTROPY.values():
            raise ConfigError(f"unknown entropy code {params['entropy']}")
        if params["entropy"] == ENTROPY["none"] and code_bytes != packed_nbytes(
            N * keep, params["bits"]
        ):
            raise ConfigError("bit-packed code stream has the wrong length")
        return [
            TensorSpec("codes", "u1", (code_bytes,)),
            TensorSpec("scales", "f2", (N, n_groups(keep, params["group_size"]))),
        ]

    @classmethod
    def values_sent(cls, enc: Encoded) -> int:
        return cls._n_rows(enc) * enc.params["keep"]  # one code per kept coefficient

    @classmethod
    def validate_payload(cls, enc: Encoded) -> None:
        if enc.params["shaping"]:
            channel_weights_by_id(enc.params["shaping"], enc.shape[-1], torch.device("cpu"))
        if enc.params["quantizer"] == QUANTIZERS["uniform"]:
            cls._uniform_symbols(enc)
            return
        codes = cls._absmax_codes(enc)
        qmax = 2 ** (enc.params["bits"] - 1) - 1
        if codes.numel() and int(codes.max()) > 2 * qmax:
            raise WireError(f"rotated codes exceed {2 * qmax} for {enc.params['bits']} bits")


def _length_wire_dtype(keep: int) -> str:
    """Row stream lengths in bytes: u16 while a row of ``keep`` codes (<= 20 bits each) fits."""
    return "u2" if keep * 20 // 8 + 1 < 2**16 else "u4"
