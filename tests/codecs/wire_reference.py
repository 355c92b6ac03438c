"""A second reader of the wire format, written from docs/wire-format.md alone.

It shares no code with ``fc_edge`` (numpy, ``math`` and ``zlib`` only; bit readers are plain
Python loops; transforms are explicit float64 matrices), so a test that compares it with
``fc_edge.codecs.wire.unpack`` + ``decode`` checks the document as much as the code.
"""

from __future__ import annotations

import heapq
import math
import struct
import zlib

import numpy as np

PARAMS = {  # codec id -> (name, parameter names in wire order)
    1: ("identity", ["value_dtype"]),
    2: ("fourier", ["k_s", "k_d", "value_dtype"]),
    3: ("topk", ["k", "value_dtype"]),
    4: ("svd", ["rank", "value_dtype"]),
    5: ("qr", ["rank", "value_dtype"]),
    6: ("quant", ["bits", "group_size", "value_dtype"]),
    7: (
        "rotated",
        ["transform", "quantizer", "bits", "step", "group_size", "keep", "seed", "entropy",
         "shaping", "code_bytes"],
    ),
    8: ("klt", ["calibration", "predict", "step", "code_bytes"]),
}
VALUE_BYTES = {1: 4, 2: 2, 3: 2}


class Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        assert self.pos + n <= len(self.data), "truncated"
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def varint(self) -> int:
        value, shift = 0, 0
        while True:
            b = self.take(1)[0]
            value |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return value

    def floats(self, code: int, count: int) -> np.ndarray:
        raw = self.take(VALUE_BYTES[code] * count)
        if code == 1:
            return np.frombuffer(raw, "<f4").astype(np.float64)
        if code == 2:
            return np.frombuffer(raw, "<f2").astype(np.float64)
        bits = np.frombuffer(raw, "<u2").astype(np.uint32) << 16  # bfloat16: upper half
        return bits.view(np.float32).astype(np.float64)

    def uints(self, width: int, count: int) -> np.ndarray:
        return np.frombuffer(self.take(width * count), f"<u{width}").astype(np.int64)


def lsb_codes(data: bytes, bits: int, n: int) -> list[int]:
    """Codes of ``bits`` bits, least-significant bit first, filling bytes from their LSB."""
    out = []
    for i in range(n):
        c = 0
        for j in range(bits):
            p = i * bits + j
            c |= ((data[p // 8] >> (p % 8)) & 1) << j
        out.append(c)
    return out


def huffman_table(step: int) -> tuple[int, dict[tuple[int, int], int], int]:
    """(Q, {(length, code word): symbol}, longest length) from the document's recipe."""
    alpha = 2.0 ** (2.0 - step / 16.0)
    Q = max(1, math.ceil(8.0 / alpha))

    def phi(v: float) -> float:
        return 0.5 * math.erfc(-v / math.sqrt(2.0))

    cap = max(12, math.ceil(math.log2(2 * Q + 1)) + 4)
    f = cap - 1
    while True:
        weights = []
        for q in range(-Q, Q + 1):
            hi = 1.0 if q == Q else phi((q + 0.5) * alpha)
            lo = 0.0 if q == -Q else phi((q - 0.5) * alpha)
            weights.append(max(round((hi - lo) * 2**30), 2 ** (30 - f)))
        lengths = [0] * len(weights)
        heap = [(w, s, [s]) for s, w in enumerate(weights)]  # (weight, smallest symbol, members)
        heapq.heapify(heap)
        while len(heap) > 1:
            w1, s1, m1 = heapq.heappop(heap)
            w2, s2, m2 = heapq.heappop(heap)
            for s in m1 + m2:
                lengths[s] += 1
            heapq.heappush(heap, (w1 + w2, min(s1, s2), m1 + m2))
        if max(lengths) <= cap:
            break
        f -= 1
    words, code, prev = {}, 0, None
    for rank, s in enumerate(sorted(range(len(lengths)), key=lambda s: (lengths[s], s))):
        if rank:
            code = (code + 1) << (lengths[s] - prev)
        words[(lengths[s], code)] = s
        prev = lengths[s]
    return Q, words, max(lengths)


def huffman_row(data: bytes, K: int, step: int) -> list[int]:
    """``K`` values ``q`` from one row's bytes (MSB first); checks the zero padding."""
    Q, words, _ = huffman_table(step)
    bits = [(b >> (7 - j)) & 1 for b in data for j in range(8)]
    out, pos = [], 0
    for _ in range(K):
        n, code = 0, 0
        while (n, code) not in words:
            code = (code << 1) | bits[pos]
            pos += 1
            n += 1
        out.append(words[(n, code)] - Q)
    assert len(bits) - pos < 8 and not any(bits[pos:]), "bad row padding"
    return out


def dct_matrix(D: int) -> np.ndarray:
    """Orthonormal DCT-II: ``y[k] = c_k sum_n x[n] cos(pi k (2n+1) / 2D)``."""
    k, n = np.arange(D)[:, None], np.arange(D)[None, :]
    c = np.where(k == 0, math.sqrt(1 / D), math.sqrt(2 / D))
    return c * np.cos(math.pi * k * (2 * n + 1) / (2 * D))


def hadamard_transform(D: int, seed: int) -> np.ndarray:
    """``T`` with ``y = T x``: signs from splitmix64, then Sylvester blocks of D's binary
    expansion (largest first, at most 4096)."""
    mask = (1 << 64) - 1
    signs = []
    for i in range(1, D + 1):
        z = (seed + i * 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        z ^= z >> 31
        signs.append(-1.0 if z & 1 else 1.0)
    T, start, rest = np.zeros((D, D)), 0, D
    while rest:
        h = min(1 << (rest.bit_length() - 1), 4096)
        H = np.ones((1, 1))
        while H.shape[0] < h:
            H = np.block([[H, H], [H, -H]])
        T[start : start + h, start : start + h] = H / math.sqrt(h)
        start, rest = start + h, rest - h
    return T * np.array(signs)[None, :]  # T diag(signs)


def klt_table(j: int) -> tuple[int, list[int]]:
    """(Q, frequencies of q = -Q..Q) of rANS table j, from the document's recipe."""
    rho = 2.0 ** (j / 16.0)
    Q = max(1, math.ceil(10 * rho))
    n = 2 * Q + 1

    def phi(v: float) -> float:
        return 0.5 * math.erfc(-v / math.sqrt(2.0))

    freqs = []
    for q in range(-Q, Q + 1):
        hi = 1.0 if q == Q else phi((q + 0.5) / rho)
        lo = 0.0 if q == -Q else phi((q - 0.5) / rho)
        freqs.append(1 + math.floor((hi - lo) * (65536 - n)))
    freqs[Q] = 0
    freqs[Q] = 65536 - sum(freqs)
    return Q, freqs


def rans_symbols(stream: bytes, tables: list[int]) -> list[int]:
    """The document's rANS decoder: one symbol per entry of ``tables`` (table indices)."""
    x = int.from_bytes(stream[:4], "little")
    pos, out = 4, []
    for j in tables:
        Q, freqs = klt_table(j)
        s = x % 65536
        i, cum = 0, 0
        while s >= cum + freqs[i]:  # the symbol whose interval holds s
            cum += freqs[i]
            i += 1
        f = freqs[i]
        out.append(i - Q)
        x = f * (x >> 16) + s - cum
        while x < 2**23:
            assert pos < len(stream), "stream ends early"
            x = (x << 8) | stream[pos]
            pos += 1
    assert x == 2**23 and pos == len(stream), "rANS end state"
    return out


def _klt(r: Reader, p: dict[str, int], N: int, D: int, ctx: dict | None) -> np.ndarray:
    """``ctx``: the calibration tensors (numpy, by the document's names) plus ``features`` and
    ``embedding`` (V, D) tables and ``tokens`` (N,) for a prediction."""
    assert ctx is not None, "klt needs the calibration"
    gains = r.uints(1, N)
    stream = r.take(p["code_bytes"])
    mode = "decode" if p["predict"] else "prefill"
    P = np.asarray(ctx[f"{mode}_basis"], dtype=np.float64)
    e = np.asarray(ctx[f"{mode}_log_std"], dtype=np.int64)
    j = e + p["step"] - 64
    K = int((j >= -64).sum())
    assert (j[:K] <= 112).all(), "step beyond the tables"
    q = np.array(rans_symbols(stream, [int(v) for v in j[:K]] * N), dtype=np.float64)
    alpha = np.float32(2.0 ** ((64 - p["step"]) / 16.0))
    x = np.zeros((N, D))
    for i in range(N):
        y = np.zeros(D)
        y[:K] = [np.float32(np.float32(v) * alpha) for v in q[i * K:(i + 1) * K]]
        if p["predict"]:
            t = ctx["tokens"][i]
            base = (np.asarray(ctx["predictor_features"], np.float64) @ ctx["features"][t]
                    + np.asarray(ctx["predictor_embedding"], np.float64) @ ctx["embedding"][t]
                    + ctx["predictor_bias"])
        else:
            base = np.asarray(ctx["mean"], np.float64)
        g = 2.0 ** ((int(gains[i]) - 128) / 16.0)
        x[i] = base + (P.T @ y) * g / np.asarray(ctx["weights"], np.float64)
    return x


def decode(data: bytes, klt_context: dict | None = None) -> tuple[str, np.ndarray]:
    """(codec name, activation as float64 of the declared shape, before the final cast);
    ``klt_context``: what a ``klt`` receiver holds (see :func:`_klt`)."""
    assert struct.unpack("<I", data[-4:])[0] == zlib.crc32(data[:-4]), "CRC"
    r = Reader(data[:-4])
    assert r.take(2) == b"FC" and r.take(1)[0] == 2, "magic/version"
    codec_id, _dtype, ndim = r.take(3)
    dims = [r.varint() for _ in range(ndim)]
    name, names = PARAMS[codec_id]
    p = {n: r.varint() for n in names}
    body_len = r.varint()
    assert len(data) - 4 - r.pos == body_len, "body length"
    B = dims[0] if ndim == 3 else 1
    S, D = dims[-2:]
    N = B * S
    if name == "identity" or (name == "quant" and p["bits"] == 16):
        x = r.floats(p["value_dtype"], N * D)
    elif name == "quant":
        bits, g = p["bits"], p["group_size"] or D
        qmax = 2 ** (bits - 1) - 1
        codes = lsb_codes(r.take((N * D * bits + 7) // 8), bits, N * D)
        scales = r.floats(p["value_dtype"], N * math.ceil(D / g)).reshape(N, -1)
        x = np.array(
            [(codes[i * D + d] - qmax) * scales[i, d // g] for i in range(N) for d in range(D)]
        )
    elif name == "fourier":
        R = min(2 * p["k_s"] - 1, S)
        coefs = r.floats(p["value_dtype"], B * R * p["k_d"] * 2).reshape(B, R, p["k_d"], 2)
        scale = r.floats(1, B)
        rows = list(range(p["k_s"])) + [u for u in range(S - p["k_s"] + 1, S) if u >= p["k_s"]]
        x = np.zeros((B, S, D))
        for b in range(B):
            spec = np.zeros((S, D // 2 + 1), complex)
            for j, u in enumerate(rows):
                spec[u, : p["k_d"]] = (coefs[b, j, :, 0] + 1j * coefs[b, j, :, 1]) * scale[b]
            x[b] = np.fft.irfft2(spec, s=(S, D))
    elif name == "topk":
        values = r.floats(p["value_dtype"], B * p["k"]).reshape(B, -1)
        width = 1 if S * D <= 256 else 2 if S * D <= 65536 else 4
        idx = r.uints(width, B * p["k"]).reshape(B, -1)
        x = np.zeros((B, S * D))
        for b in range(B):
            x[b, idx[b]] = values[b]
    elif name in ("svd", "qr"):
        left = r.floats(p["value_dtype"], B * S * p["rank"]).reshape(B, S, -1)
        right = r.floats(p["value_dtype"], B * p["rank"] * D).reshape(B, -1, D)
        x = left @ right
    elif name == "klt":
        x = _klt(r, p, N, D, klt_context)
    else:
        x = _rotated(r, p, N, D)
    assert r.pos == len(data) - 4, "body not consumed"
    return name, np.asarray(x, dtype=np.float64).reshape(dims)


def _rotated(r: Reader, p: dict[str, int], N: int, D: int) -> np.ndarray:
    assert p["shaping"] == 0, "the reference holds no channel weights"
    keep = p["keep"]
    stream = r.take(p["code_bytes"])
    y = np.zeros((N, D))
    if p["quantizer"] == 1:
        sigma = r.floats(3, N)
        width = 2 if keep * 20 // 8 + 1 < 65536 else 4
        lengths = list(r.uints(width, N - 1))
        lengths.append(len(stream) - sum(lengths))
        alpha = np.float32(2.0 ** (2.0 - p["step"] / 16.0))
        start = 0
        for i in range(N):
            q = huffman_row(stream[start : start + lengths[i]], keep, p["step"])
            start += lengths[i]
            delta = np.float32(alpha * np.float32(sigma[i]))
            y[i, :keep] = [np.float32(np.float32(v) * delta) for v in q]
    else:
        bits, g = p["bits"], p["group_size"] or keep
        qmax = 2 ** (bits - 1) - 1
        if p["entropy"] == 1:
            codes = list(zlib.decompress(stream, -15))
        else:
            codes = lsb_codes(stream, bits, N * keep)
        scales = r.floats(3, N * math.ceil(keep / g)).reshape(N, -1)
        for i in range(N):
            for k in range(keep):
                y[i, k] = (codes[i * keep + k] - qmax) * scales[i, k // g]
    T = dct_matrix(D) if p["transform"] == 1 else hadamard_transform(D, p["seed"])
    return y @ T  # x = T^T y, row by row
