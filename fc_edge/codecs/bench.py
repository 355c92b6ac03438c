"""Codec speed and quality, side by side in one run (``make bench``, ``fc-edge bench``).

Speed: encode + decode time of every codec at one ratio on float32 activations of several shapes,
interleaved round by round so that all codecs see the same machine load, reported as medians and
as ratios to Top-k, SVD, QR and to the floor (a bare ``rfft2`` + ``irfft2`` of the same input).
Quality: relative error of each codec on real SmolLM2 layer-1 activations when the model is at
hand. Timings include the wire format (pack + unpack), since that is what a link pays for.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fc_edge.codecs import decode, get_codec, measure, wire
from fc_edge.errors import BudgetError, FcEdgeError
from fc_edge.paths import read_texts

# (1, 576): one SmolLM2 decode row, the shape a device sends per generated token.
DEFAULT_SHAPES: tuple[tuple[int, int], ...] = (
    (1, 576),
    (1, 2048),
    (128, 2048),
    (512, 2048),
    (2048, 2048),
)
# (label, codec name, keyword arguments); ratio is filled in per run where a codec takes one.
DEFAULT_CODECS: tuple[tuple[str, str, dict], ...] = (
    ("fourier", "fourier", {}),
    ("fourier-energy", "fourier", {"geometry": "energy"}),
    ("topk", "topk", {}),
    ("svd", "svd", {}),
    ("qr", "qr", {}),
    ("quant", "quant", {}),
    ("rotated", "rotated", {}),
    ("klt", "klt", {}),
    ("int8", "int8", {}),
)
_TAKES_RATIO = {"fourier", "topk", "svd", "qr", "quant", "rotated", "klt"}


def synthetic_calibration(D: int, seed: int = 0) -> Any:
    """A ``klt`` calibration for timing on random input: a random orthonormal basis (QR of a
    Gaussian matrix), deviations spread over 5 octaves, zero means and predictor."""
    from fc_edge.codecs.calibration import Calibration

    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))[0].T.float()
    log_std = torch.linspace(16, -64, D).round().to(torch.int32)
    zeros, ones = torch.zeros(D), torch.ones(D)
    return Calibration(zeros, ones, basis, log_std, basis, log_std, torch.zeros(D, D),
                       torch.zeros(D, D), zeros, digest=f"{seed:08x}{D:056x}")


def _bound(codec: Any, D: int) -> Any:
    """The codec bound as a deployment binds it; ``klt`` to a synthetic calibration."""
    if codec.name == "klt":
        from fc_edge.codecs import CodecContext

        return codec.bind(CodecContext(calibration=synthetic_calibration(D)))
    return codec


@dataclass
class Timing:
    label: str
    shape: tuple[int, int]
    encode_s: list[float] = field(default_factory=list)
    decode_s: list[float] = field(default_factory=list)
    nbytes: int = 0
    rel_error: float = float("nan")
    note: str = ""

    @property
    def encode(self) -> float:
        return statistics.median(self.encode_s) if self.encode_s else math.nan

    @property
    def decode(self) -> float:
        return statistics.median(self.decode_s) if self.decode_s else math.nan

    @property
    def total(self) -> float:
        return self.encode + self.decode


def _timed(fn: Callable[[], object]) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def time_codecs(
    shapes: Sequence[tuple[int, int]] = DEFAULT_SHAPES,
    codecs: Sequence[tuple[str, str, dict]] = DEFAULT_CODECS,
    ratio: float = 8.0,
    budget_s: float = 1.5,
    min_rounds: int = 3,
    max_rounds: int = 500,
    seed: int = 0,
) -> dict[tuple[int, int], dict[str, Timing]]:
    """Median encode (+pack) and decode (+unpack) seconds per codec and shape, interleaved.

    The floor is recorded under label ``"floor"``: ``rfft2`` (as encode) and ``irfft2`` (decode).
    """
    results: dict[tuple[int, int], dict[str, Timing]] = {}
    g = torch.Generator().manual_seed(seed)
    for shape in shapes:
        x = torch.randn(shape, generator=g).cumsum(0) / math.sqrt(shape[0])
        row: dict[str, Timing] = {"floor": Timing("floor", shape)}
        built = {}
        for label, name, kw in codecs:
            kwargs = {**kw, "ratio": ratio} if name in _TAKES_RATIO else dict(kw)
            row[label] = Timing(label, shape)
            try:
                codec = _bound(get_codec(name, **kwargs), shape[1])
                data = wire.pack(codec.encode(x))  # warm-up and feasibility
                decode(wire.unpack(data, ctx=codec.context), codec.context)
                built[label] = codec
                row[label].nbytes = len(data)
            except BudgetError as e:
                row[label].note = f"n/a: {e}".split(";")[0]
        spec = torch.fft.rfft2(x)
        torch.fft.irfft2(spec, s=shape)
        start = time.perf_counter()
        rounds = 0
        while rounds < min_rounds or (
            time.perf_counter() - start < budget_s and rounds < max_rounds
        ):
            rounds += 1
            t, spec = _timed(lambda x=x: torch.fft.rfft2(x))
            row["floor"].encode_s.append(t)
            t, _ = _timed(lambda s=spec, n=shape: torch.fft.irfft2(s, s=n))
            row["floor"].decode_s.append(t)
            for label, codec in built.items():
                t, data = _timed(lambda c=codec, x=x: wire.pack(c.encode(x)))
                row[label].encode_s.append(t)
                t, _ = _timed(lambda d=data, c=codec.context: decode(wire.unpack(d, ctx=c), c))
                row[label].decode_s.append(t)
        results[tuple(shape)] = row
    return results


def real_activation_errors(
    ratio: float = 8.0,
    codecs: Sequence[tuple[str, str, dict]] = DEFAULT_CODECS,
    n_texts: int = 4,
    max_tokens: int = 256,
) -> tuple[list[tuple[str, float, float]], str]:
    """(label, mean relative error, mean byte ratio) on SmolLM2 layer-1 activations.

    Returns ``([], reason)`` when the model or the texts are not available.
    """
    try:
        from fc_edge.models.pretrained import load_model

        model, tok = load_model()
    except (ImportError, FcEdgeError) as e:
        return [], f"real activations skipped: {e}"
    if tok is None:
        return [], "real activations skipped: no tokenizer"
    texts = read_texts(limit=n_texts)
    if not texts:
        texts = [
            "The capital of France is Paris, a city on the Seine known for its museums.",
            "def fibonacci(n):\n    return n if n < 2 else fibonacci(n-1) + fibonacci(n-2)",
            "Photosynthesis converts light energy into chemical energy stored in glucose.",
            "A user asked how to reset a router; the assistant explained the steps.",
        ]
    acts = []
    with torch.inference_mode():
        for text in texts[:n_texts]:
            ids = tok(text, return_tensors="pt").input_ids[:, :max_tokens]
            hs = model(ids, output_hidden_states=True).hidden_states[1]
            acts.append(hs[0].float())
    out = []
    for label, name, kw in codecs:
        kwargs = {**kw, "ratio": ratio} if name in _TAKES_RATIO else dict(kw)
        errs, ratios = [], []
        for a in acts:
            try:
                if name == "klt":
                    continue  # needs the model's calibration: the frontier measures it
                m = measure(get_codec(name, **kwargs), a)
            except BudgetError:
                continue
            errs.append(m.rel_error)
            ratios.append(m.byte_ratio)
        if errs:
            out.append((label, statistics.mean(errs), statistics.mean(ratios)))
    shapes = ", ".join(str(tuple(a.shape)) for a in acts)
    return out, f"SmolLM2-135M layer-1 activations, float32, shapes {shapes}"


def format_speed_table(results: dict[tuple[int, int], dict[str, Timing]]) -> str:
    lines = []
    for shape, row in results.items():
        lines.append(f"\n### (S, D) = {shape}, float32, CPU ({torch.get_num_threads()} threads)\n")
        lines.append(
            "| codec | bytes | ratio | encode ms | decode ms | total ms | x floor "
            "| Top-k / this | SVD / this | QR / this |"
        )
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        raw = shape[0] * shape[1] * 4
        floor = row["floor"].total
        ref = {
            k: row[k].total if k in row and row[k].encode_s else math.nan
            for k in ("topk", "svd", "qr")
        }
        for label, t in row.items():
            if t.note:
                lines.append(f"| {label} | {t.note} | | | | | | | | |")
                continue
            nb = f"{t.nbytes}" if t.nbytes else "-"
            r = f"{raw / t.nbytes:.2f}" if t.nbytes else "-"
            cells = [
                f"{ref[k] / t.total:.1f}x" if not math.isnan(ref[k]) else "-"
                for k in ("topk", "svd", "qr")
            ]
            lines.append(
                f"| {label} | {nb} | {r} | {t.encode * 1e3:.3f} | {t.decode * 1e3:.3f} "
                f"| {t.total * 1e3:.3f} | {t.total / floor:.2f} | " + " | ".join(cells) + " |"
            )
        if "fourier" in row and row["fourier"].encode_s:
            enc_vs = row["fourier"].encode / row["floor"].encode
            lines.append(f"\nfourier encode+pack / bare rfft2 = {enc_vs:.2f}")
    return "\n".join(lines)


# (shape, numerator, denominator, goal, "<=" or ">="): round-trip ratios the project tracks.
TARGETS: tuple[tuple[tuple[int, int], str, str, float, str], ...] = (
    ((1, 576), "rotated", "int8", 2.0, "<="),
    ((512, 2048), "rotated", "int8", 4.0, "<="),
    ((1, 576), "klt", "int8", 2.0, "<="),
    ((512, 2048), "klt", "int8", 4.0, "<="),
    ((512, 2048), "topk", "fourier", 5.0, ">="),
    ((512, 2048), "svd", "fourier", 30.0, ">="),
    ((512, 2048), "fourier", "floor", 1.0, "<="),
)


def format_targets(results: dict[tuple[int, int], dict[str, Timing]]) -> str:
    """The tracked round-trip ratios (encode+pack + unpack+decode, medians measured side by side
    in the same rounds), each with its goal; a ratio whose shape or codec was not run is left
    out. The floor is a bare rfft2 + irfft2 of the same input."""
    lines = [
        "\n## Targets (round trip, side by side)\n",
        "| shape | ratio | measured | goal | met |",
        "|---|---|---:|---:|---|",
    ]
    for shape, num, den, goal, sense in TARGETS:
        row = results.get(shape, {})
        if not (num in row and den in row and row[num].encode_s and row[den].encode_s):
            continue
        r = row[num].total / row[den].total
        met = r <= goal if sense == "<=" else r >= goal
        lines.append(
            f"| {shape} | {num} / {den} | {r:.2f}x | {sense} {goal:g}x | {'yes' if met else 'NO'} |"
        )
    return "\n".join(lines)


def run(
    ratio: float = 8.0,
    shapes: Sequence[tuple[int, int]] = DEFAULT_SHAPES,
    real: bool = True,
    budget_s: float = 1.5,
) -> str:
    """The whole benchmark as markdown text."""
    out = [f"# Codec benchmark: ratio {ratio:g} vs float32, torch {torch.__version__}"]
    results = time_codecs(shapes, ratio=ratio, budget_s=budget_s)
    out.append(format_speed_table(results))
    out.append(format_targets(results))
    if real:
        errs, note = real_activation_errors(ratio)
        out.append(f"\n## Relative error on real activations ({note})\n")
        if errs:
            out.append("| codec | mean rel. error | mean byte ratio |\n|---|---:|---:|")
            out += [f"| {label} | {e:.4f} | {r:.2f} |" for label, e, r in errs]
    return "\n".join(out)
