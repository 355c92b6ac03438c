"""Transform coding: an orthonormal transform along the hidden axis, then scalar quantization.

Here the spectral transform spreads energy instead of truncating it (the paper's FourierCompress
truncates). Each row ``x`` (1 x D) is rotated, ``y = T x`` with ``T`` orthonormal, so noise added
to ``y`` comes back with the same energy and no outlier channel dominates a scale:

* ``transform="dct"`` (default): the orthonormal DCT-II along D;
* ``transform="hadamard"``: random signs (from ``seed``, via splitmix64) then a block-diagonal
  Walsh-Hadamard transform over the power-of-two blocks of D's binary expansion, largest first,
  each at most 4096 (all of D when D is a power of two; 576 = 512 + 64; 100 = 64 + 32 + 4), so
  every D is rotated.

Two quantizers:

* ``quantizer="uniform"`` (default): entropy-coded uniform quantization
  (:mod:`fc_edge.codecs.entropy`): one bfloat16 RMS per row and a step, chosen per payload by
  rate control, so that the *packed* payload, header included, takes at most ``bits`` bits per
  activation element (4 = 1/8 of float32, 1/4 of float16), or at most ``raw / ratio`` bytes when
  ``ratio`` is given. Rate control predicts the step from the Gaussian model's bits per value and
  probes outward from it (usually 2 quantizations, at most ~14 for rows far from Gaussian).
* ``quantizer="absmax"``: ``bits``-bit symmetric codes with one bfloat16 scale per
  ``group_size`` values (0 = per row), bit-packed or, with ``entropy="deflate"``, raw-DEFLATE
  coded (RFC 1951). With ``ratio``, ``bits`` is lowered until the payload fits.

Noise shaping (``shaping="auto"``, default): once bound to a model's codec context
(:meth:`Codec.bind`, ``fc_edge.models.split.bind_codec``), rows are coded as ``x * w`` and
rebuilt as ``y / w`` with ``w`` the RMS of the RMSNorm gains of the layers after the split, so
the error lands where later layers attenuate it. On SmolLM2 (split after layer 1, 4 bits per
element, one message per token) this took the perplexity change from +2.27% to +0.72% on 40
documents (docs/results.md, §7).
Unbound, or with ``shaping="none"``, rows are coded as they are.

Optional truncation keeps only the first ``keep`` coefficients per row (the low frequencies, for
the DCT), meeting ``fourier`` half-way. Every row is coded on its own, so decode steps see exactly
what prefill rows see.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from fc_edge.codecs import cupy_rotated, entropy
from fc_edge.codecs.base import (
    WIRE_DTYPES,
    Codec,
    ConfigError,
    Encoded,
    TensorSpec,
    all_finite,
    check_activation,
    check_ratio,
    header_bytes,
    register,
    restore,
    too_small,
)
from fc_edge.codecs.context import CodecContext, context_of
from fc_edge.codecs.deflate import ENTROPY, deflate, inflate
from fc_edge.codecs.quant import (
    check_bits,
    check_codes,
    check_group_size,
    check_group_width,
    dequantize_groups,
    n_groups,
    pack_bits,
    packed_nbytes,
    quantize_groups,
    unpack_bits,
    wire_group_size,
)
from fc_edge.codecs.rate import largest_fitting
from fc_edge.codecs.transform import TRANSFORM_NAMES, TRANSFORMS, rotate, unrotate
from fc_edge.errors import BudgetError, NonFiniteError, WireError

QUANTIZERS = {"uniform": 1, "absmax": 2}
SHAPINGS = ("auto", "none")


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

    def bind(self, context: CodecContext | torch.Tensor | None) -> RotatedCodec:
        """Shape the quantization noise by the context's channel weights (``shaping="auto"``).

        Rows are coded as ``x * w`` and decoded as ``y / w``, so channel d's error scales as
        ``1 / w_d``. ``fc_edge.models.split.codec_context`` holds the RMS of the downstream
        RMSNorm gains, putting less noise where later layers amplify it. Returns self.
        """
        super().bind(context)
        weights = self.context.weights
        self.weights_id = weights.id if self.shaping == "auto" and weights is not None else 0
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

    def expected_params(self, enc: Encoded) -> dict[str, int]:
        D = enc.shape[-1] if enc.shape else 1
        return {"transform": TRANSFORMS[self.transform],
                "quantizer": QUANTIZERS[self.quantizer], "seed": self.seed,
                "shaping": self.weights_id, "keep": D if self.keep is None else min(self.keep, D)}

    def mismatch(self, enc: Encoded) -> str | None:
        why = super().mismatch(enc)
        if why is None and self.quantizer == "absmax" and enc.params.get("bits", 0) > self.bits:
            # rate control may lower the width, never raise it
            return f"bits = {enc.params['bits']}, this configuration sends at most {self.bits}"
        numel = math.prod(enc.shape)
        cap = (numel * torch.empty((), dtype=enc.dtype).element_size() / self.ratio
               if self.ratio is not None else
               numel * self.bits / 8 if self.quantizer == "uniform" else None)
        if why is None and cap is not None and enc.params.get("code_bytes", 0) > cap:
            # the uniform quantizer's width is a rate: its codes alone may not exceed it
            return (f"{enc.params['code_bytes']} code bytes for {numel} values, above this "
                    f"configuration's {math.floor(cap)}")
        return why

    def cap_bytes(self, x: torch.Tensor) -> int | None:
        """Packed-bytes cap for ``x`` (header included), or None for no cap."""
        if self.ratio is not None:
            return math.floor(x.numel() * x.element_size() / self.ratio)
        if self.quantizer == "uniform":
            return math.floor(x.numel() * self.bits / 8)
        return None

    def encode(self, x: torch.Tensor, ctx: CodecContext | None = None) -> Encoded:
        _, _, D = check_activation(x)
        if D > 65535:
            raise ConfigError(f"rotated supports D <= 65535, got {D}")
        keep = D if self.keep is None else min(self.keep, D)
        tcode = TRANSFORMS[self.transform]
        rows = x.detach().reshape(-1, D).float()
        if self.weights_id:  # the bound context's vector (a message's ctx adds only tokens)
            rows = rows * self.context.channel_weights(self.weights_id, D, rows.device)
        coefs = rotate(rows, tcode, self.seed)[:, :keep]
        if not all_finite(coefs):
            raise NonFiniteError(
                f"the {self.transform} of the activation {tuple(x.shape)} overflows float32 "
                "(values too large for rotated)"
            )
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
        coder = _row_coder(coefs)
        N, K = coefs.shape
        sigma_max = coder.sigma_max()
        if not np.isfinite(np.float32(entropy.step_alpha(0)) * np.float32(sigma_max)):
            raise NonFiniteError(
                f"rotated: a row RMS of {sigma_max:.3g} makes the quantizer step "
                "overflow float32 (values too large)"
            )
        len_dtype = _length_wire_dtype(K)
        fixed = 2 * N + WIRE_DTYPES[len_dtype][0] * (N - 1)  # sigmas + row lengths
        sizes: dict[int, int] = {}

        def fits(step: int) -> bool:  # each step is quantized at most once (the coder caches)
            if step not in sizes:
                code = coder.code_bytes(step)
                sizes[step] = self._size(x, {**base, "step": step, "code_bytes": code},
                                         fixed + code)
            return cap is None or sizes[step] <= cap

        if cap is None:
            step = entropy.MAX_STEP
        else:
            # Predict the step from the Gaussian model, probe it, rescale the model by what the
            # probe measured (real rows are not exactly Gaussian), and search outward from the
            # corrected prediction: two or three quantizations instead of a bisection's eight.
            bound = {**base, "step": entropy.MAX_STEP, "code_bytes": cap}
            budget = cap - fixed - header_bytes(type(self), tuple(x.shape), bound, cap)
            guess = entropy.predict_step(N, K, budget)
            fits(guess)
            calibration = max(coder.code_bytes(guess), 1) / entropy.expected_bytes(N, K, guess)
            step = largest_fitting(
                fits, entropy.predict_step(N, K, budget, calibration), entropy.MAX_STEP
            )
            if step is None:
                raise self._over(x, cap, sizes[0])
        fits(step)
        tensors = coder.tensors(step)
        params = {**base, "step": step, "code_bytes": int(tensors["codes"].numel())}
        dev = x.device
        return self._encoded(x, params, **{k: t.to(dev) for k, t in tensors.items()})

    def _encode_absmax(self, x, coefs, base, cap) -> Encoded:
        group = wire_group_size(coefs.shape[1], self.group_size)
        for bits in range(self.bits, 1, -1):
            codes, scales = quantize_groups(coefs, bits, group)
            body, entropy_code = self._code_stream(codes, bits)
            params = {
                **base,
                "bits": bits,
                "group_size": group,
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
        p = enc.params
        stream = enc.tensors["codes"].cpu().numpy()
        return entropy.decode_rows(stream, cls._row_lengths(enc), p["keep"], p["step"])

    @classmethod
    def _row_lengths(cls, enc: Encoded) -> np.ndarray:
        """Every row's byte length (the last one implied by the stream), range-checked."""
        p = enc.params
        lengths = enc.tensors["lengths"].cpu().numpy().astype(np.int64)
        n_bytes = enc.tensors["codes"].numel()
        lo, hi = entropy.min_row_bytes(p["keep"], p["step"]), entropy.max_row_bytes(
            p["keep"], p["step"]
        )
        if lengths.size and (int(lengths.min()) < lo or int(lengths.max()) > hi):
            raise WireError(f"entropy-coded row lengths must be in {lo}..{hi} bytes")
        last = n_bytes - int(lengths.sum())
        if not lo <= last <= hi:
            raise WireError("entropy-coded row lengths do not add up to the stream")
        return np.append(lengths, last)

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
    def decode(cls, enc: Encoded, ctx: CodecContext | None = None) -> torch.Tensor:
        p = enc.params
        D = enc.shape[-1]
        N = cls._n_rows(enc)
        dev = enc.tensors["codes"].device
        if p["quantizer"] == QUANTIZERS["uniform"]:
            symbols = enc.checked.get("symbols")
            runner = cupy_rotated.runner_for(enc.tensors["codes"]) if symbols is None else None
            if runner is not None:  # entropy decoding on the GPU (CuPy); the same values
                kept = cupy_rotated.decode_rows(runner, enc.tensors["codes"],
                                                cls._row_lengths(enc), p["keep"], p["step"],
                                                enc.tensors["scales"]).to(dev)
            else:
                if symbols is None:
                    symbols = cls._uniform_symbols(enc)
                sigma = enc.tensors["scales"].float().cpu().numpy()
                kept = entropy.dequantize(symbols, sigma, p["step"]).to(dev)
        else:
            codes = enc.checked.get("codes")
            if codes is None:
                codes = cls._absmax_codes(enc)
            codes = codes.view(N, p["keep"])
            kept = dequantize_groups(codes, enc.tensors["scales"], p["bits"], p["group_size"])
        coefs = kept if p["keep"] == D else torch.nn.functional.pad(kept, (0, D - p["keep"]))
        rows = unrotate(coefs, p["transform"], p["seed"])
        if p["shaping"]:
            rows = rows / context_of(ctx).channel_weights(p["shaping"], D, rows.device)
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
            step = params["step"]
            if step > entropy.MAX_STEP:
                raise ConfigError(f"step must be in 0..{entropy.MAX_STEP}")
            lo, hi = entropy.min_row_bytes(keep, step), entropy.max_row_bytes(keep, step)
            if not N * lo <= code_bytes <= N * hi:  # before anything sized by it is read
                raise ConfigError(
                    f"code stream of {code_bytes} bytes cannot hold {N} rows of {keep} values "
                    f"at step {step} ({N * lo}..{N * hi} bytes)"
                )
            return [
                TensorSpec("codes", "u1", (code_bytes,)),
                TensorSpec("scales", "bf2", (N,)),
                TensorSpec("lengths", _length_wire_dtype(keep), (N - 1,)),
            ]
        if params["quantizer"] != QUANTIZERS["absmax"]:
            raise ConfigError(f"unknown quantizer code {params['quantizer']}")
        bits = check_bits(params["bits"])
        check_group_width(params["group_size"], keep)
        packed = packed_nbytes(N * keep, bits)
        if params["entropy"] == ENTROPY["none"]:
            if code_bytes != packed:
                raise ConfigError("bit-packed code stream has the wrong length")
        elif params["entropy"] == ENTROPY["deflate"]:
            if not 1 <= code_bytes < packed:  # the sender deflates only when that is shorter
                raise ConfigError(f"deflated code stream must be 1..{packed - 1} bytes")
        else:
            raise ConfigError(f"unknown entropy code {params['entropy']}")
        return [
            TensorSpec("codes", "u1", (code_bytes,)),
            TensorSpec("scales", "bf2", (N, n_groups(keep, params["group_size"]))),
        ]

    @classmethod
    def values_sent(cls, enc: Encoded) -> int:
        return cls._n_rows(enc) * enc.params["keep"]  # one code per kept coefficient

    @classmethod
    def validate_payload(cls, enc: Encoded, ctx: CodecContext | None = None) -> None:
        if enc.params["shaping"]:
            context_of(ctx).channel_weights(enc.params["shaping"], enc.shape[-1],
                                            torch.device("cpu"))
        if bool((enc.tensors["scales"] < 0).any()):
            raise WireError("rotated scales must not be negative")
        if enc.params["quantizer"] == QUANTIZERS["uniform"]:
            enc.checked["symbols"] = cls._uniform_symbols(enc)
            return
        codes = cls._absmax_codes(enc)
        check_codes(codes, enc.params["bits"], "rotated")
        enc.checked["codes"] = codes


class _HostRows:
    """The uniform quantizer's rows ``(N, K)`` on the host (numba coder of
    :mod:`~fc_edge.codecs.entropy`); ``cupy_rotated.DeviceRows`` is its GPU twin."""

    def __init__(self, coefs: torch.Tensor) -> None:
        self.c = np.ascontiguousarray(coefs.cpu().numpy(), dtype=np.float32)
        self.sigma = entropy.row_sigma(self.c)
        self._probes: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def sigma_max(self) -> float:
        return float(self.sigma.max())

    def code_bytes(self, step: int) -> int:
        if step not in self._probes:
            self._probes[step] = entropy.quantize_at(self.c, self.sigma, step)
        return int(((self._probes[step][1] + 7) // 8).sum())

    def tensors(self, step: int) -> dict[str, torch.Tensor]:
        if step not in self._probes:
            self.code_bytes(step)
        symbols, bits = self._probes[step]
        stream, lengths = entropy.encode_rows(symbols, step, bits)
        return {
            "codes": torch.frombuffer(bytearray(stream), dtype=torch.uint8),
            "scales": torch.from_numpy(self.sigma).to(torch.bfloat16),
            "lengths": torch.from_numpy(lengths[:-1].astype(np.int64)),
        }


def _row_coder(coefs: torch.Tensor) -> _HostRows | cupy_rotated.DeviceRows:
    """The GPU row coder for CUDA coefficients when CuPy is usable, the numba one otherwise."""
    runner = cupy_rotated.runner_for(coefs)
    if runner is not None:
        return cupy_rotated.DeviceRows(runner, coefs)
    return _HostRows(coefs)



def _length_wire_dtype(keep: int) -> str:
    """Row stream lengths in bytes: u16 while a row of ``keep`` codes (<= 20 bits each) fits."""
    return "u2" if keep * 20 // 8 + 1 < 2**16 else "u4"
