"""The wire format: exact round trips, and any byte string is either valid or a WireError."""

from __future__ import annotations

import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fc_edge.codecs import decode, get_codec, wire
from fc_edge.codecs.base import header_bytes
from fc_edge.errors import WireError


def _load_reference(name: str = "wire_reference.py"):
    """A module of tests/codecs (the test folders are not packages)."""
    import importlib.util

    path = Path(__file__).parent / name
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


wire_reference = _load_reference()
klt_cases = _load_reference("klt_cases.py")

CODECS = [
    ("identity", {}),
    ("fourier", {"ratio": 4}),
    ("topk", {"ratio": 4}),
    ("svd", {"ratio": 2}),
    ("qr", {"ratio": 2}),
    ("int8", {}),
    ("bf16", {}),
    ("quant", {"bits": 3, "group_size": 16}),
    ("rotated", {}),
    ("rotated", {"quantizer": "absmax", "entropy": "none"}),
    ("rotated", {"quantizer": "absmax", "entropy": "deflate"}),
]


def payloads():
    x = torch.randn(2, 12, 96, generator=torch.Generator().manual_seed(0))
    return {f"{n}{kw}": wire.pack(get_codec(n, **kw).encode(x)) for n, kw in CODECS}


PAYLOADS = payloads()


def check_any(data: bytes, max_bytes: int = 1 << 20) -> None:
    """unpack + decode either raise WireError or return the declared, finite activation."""
    try:
        out = decode(wire.unpack(data, max_bytes=max_bytes))
    except WireError:
        return
    assert out.dtype in (torch.float32, torch.float16, torch.bfloat16)
    assert bool(torch.isfinite(out).all())


@pytest.mark.parametrize("key", list(PAYLOADS))
def test_round_trip_is_exact(key):
    data = PAYLOADS[key]
    enc = wire.unpack(data)
    assert wire.pack(enc) == data  # re-packing reproduces every byte


def test_header_layout_matches_the_document():
    x = torch.randn(3, 200)
    data = wire.pack(get_codec("fourier", k_s=2, k_d=3, value_dtype="float32").encode(x))
    assert data[:2] == b"FC" and data[2] == 2 and data[3] == 2  # magic, version, fourier id
    assert data[4] == 1 and data[5] == 2  # float32, 2 dims
    assert data[6:9] == bytes([3, 0xC8, 0x01])  # varints 3 and 200 (LEB128: 200 = 0xC8 0x01)
    assert data[9:12] == bytes([2, 3, 1])  # k_s, k_d, value dtype
    body_len = 3 * 3 * 2 * 4 + 4  # R=3 rows x k_d=3 complex float32 + scale = 76
    assert data[12] == body_len
    assert len(data) == 13 + body_len + 4
    assert struct.unpack("<I", data[-4:])[0] == zlib.crc32(data[:-4])


def test_header_bytes_is_exact_and_bounds_the_estimate():
    x = torch.randn(5, 576)
    for name, kw in CODECS:
        codec = get_codec(name, **kw)
        enc = codec.encode(x)
        data = wire.pack(enc)
        body = sum(t.nbytes for t in type(codec).layout(enc.shape, enc.params))
        exact = header_bytes(type(codec), enc.shape, enc.params, body)
        assert len(data) == exact + body
        assert header_bytes(type(codec), enc.shape) >= exact  # the budget estimate is safe


def test_overlong_varints_are_refused():
    good = bytearray(PAYLOADS["int8{}"][:-4])
    # dims start at byte 6: re-encode the first dim (2) as the overlong 0x82 0x00
    bad = good[:6] + bytes([0x82, 0x00]) + good[7:]
    bad += struct.pack("<I", zlib.crc32(bad))
    with pytest.raises(WireError):
        wire.unpack(bytes(bad))


@pytest.mark.parametrize("key", list(PAYLOADS))
def test_every_truncation_is_a_wire_error(key):
    data = PAYLOADS[key]
    for n in range(len(data)):
        with pytest.raises(WireError):
            wire.unpack(data[:n])
    with pytest.raises(WireError):
        wire.unpack(data + b"\0")


@pytest.mark.parametrize("key", list(PAYLOADS))
def test_every_single_bit_flip_is_caught(key):
    data = bytearray(PAYLOADS[key])
    step = max(1, len(data) // 300)
    for i in range(0, len(data), step):
        for bit in (0, 5):
            bad = bytearray(data)
            bad[i] ^= 1 << bit
            with pytest.raises(WireError):
                wire.unpack(bytes(bad))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_random_bytes_after_a_valid_fixed_header(tail):
    """Random bytes behind a valid magic and version (CRC fixed) reach every later check."""
    data = b"FC" + bytes([wire.VERSION]) + tail
    check_any(data + struct.pack("<I", zlib.crc32(data)))


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(list(PAYLOADS)), st.data())
def test_mutated_bytes_anywhere_with_valid_crc(key, data):
    """Rewrite bytes anywhere (header, parameters, body) and fix the CRC: only WireError or a
    payload that decodes to the declared shape."""
    raw = bytearray(PAYLOADS[key][:-4])
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    check_any(bytes(raw) + struct.pack("<I", zlib.crc32(raw)))


def test_out_of_range_indices_with_valid_crc_are_refused():
    x = torch.randn(4, 16)
    enc = get_codec("topk", k=5).encode(x)
    enc.tensors["indices"] = enc.tensors["indices"].clone()
    enc.tensors["indices"][0, 0] = 4 * 16 + 3  # fits the u8 index type, but out of range
    with pytest.raises(WireError, match="out of range"):
        wire.unpack(wire.pack(enc))


@pytest.mark.parametrize("kw", [{"quantizer": "absmax", "entropy": "deflate"}, {}])
def test_corrupt_entropy_stream_with_valid_crc_is_refused(kw):
    enc = get_codec("rotated", **kw).encode(torch.randn(8, 576))
    stream = enc.tensors["codes"].clone()
    stream[len(stream) // 2 :] = 0xFF
    enc.tensors["codes"] = stream
    with pytest.raises(WireError):
        wire.unpack(wire.pack(enc))


def test_size_cap_refuses_before_allocating():
    # A tiny payload that declares a 2^31 x 2^31 activation must not allocate it.
    big = bytes([0x80, 0x80, 0x80, 0x80, 0x08])  # varint 2^31
    data = b"FC" + bytes([wire.VERSION, 1, 1, 2]) + big + big + bytes([1]) + bytes([0])
    data += struct.pack("<I", zlib.crc32(data))
    with pytest.raises(WireError, match="cap"):
        wire.unpack(data)
    small = PAYLOADS["identity{}"]
    with pytest.raises(WireError, match="cap"):
        wire.unpack(small, max_bytes=100)
    wire.unpack(small)  # the default cap admits it


def test_unknown_codec_version_and_dtype():
    good = bytearray(PAYLOADS["int8{}"])
    for pos, value, what in [(3, 99, "codec"), (2, 9, "version"), (4, 7, "dtype")]:
        bad = bytearray(good)
        bad[pos] = value
        bad[-4:] = struct.pack("<I", zlib.crc32(bad[:-4]))
        with pytest.raises(WireError, match=what):
            wire.unpack(bytes(bad))


def documented_vectors() -> list[tuple[str, str, bytes, list[float]]]:
    """(codec call, input name, payload, decoded values) from docs/wire-format.md."""
    text = (Path(__file__).parents[2] / "docs" / "wire-format.md").read_text()
    found = re.findall(
        r"- `(get_codec\(.*?\))` on `(\w)`, \d+ bytes:\n  hex `([0-9a-f]+)`\n"
        r"  decoded `([^`]*)`",
        text,
    )
    return [(c, i, bytes.fromhex(h), [float(v) for v in d.split()]) for c, i, h, d in found]


VECTORS = documented_vectors()
VECTOR_INPUTS = {
    "A": torch.tensor([[1.0, -2.0, 0.5, 3.0], [0.25, -1.5, 2.5, -0.75]]),
    "C": torch.linspace(-1, 1, 16).reshape(1, 16) ** 3,
    "H": torch.linspace(-1, 1, 12).reshape(2, 6),
    "R": torch.tensor([[1.0, -2.0, 0.5, 3.0, 0.25, -1.5, 2.5, -0.75]]),
}


def test_every_codec_has_a_documented_vector():
    names = {wire_reference.decode(data, _klt_arrays(call))[0] for call, _, data, _ in VECTORS}
    assert names == {"identity", "fourier", "topk", "svd", "qr", "quant", "rotated", "klt"}
    assert len(VECTORS) >= 13


def _klt_tokens(call: str) -> list[int] | None:
    return klt_cases.TOKENS if 'predict="token"' in call else None


def _klt_arrays(call: str) -> dict | None:
    """What a klt vector's receiver holds (the document's K4), for the second reader."""
    return klt_cases.k4_arrays(_klt_tokens(call)) if '"klt"' in call else None


@pytest.mark.parametrize("call,inp,data,values", VECTORS, ids=[v[0] for v in VECTORS])
def test_documented_vectors(call, inp, data, values):
    """Both readers (fc_edge and the one written from the document) give the listed values."""
    want = np.array(values)
    tol = 1e-6 * np.abs(want).max()  # the reference's transforms are float64, fc_edge's float32
    _, ref = wire_reference.decode(data, _klt_arrays(call))
    assert np.allclose(ref.ravel(), want, rtol=0, atol=tol)
    ctx = klt_cases.k4_context(_klt_tokens(call)) if '"klt"' in call else None
    ours = decode(wire.unpack(data, ctx=ctx), ctx).double().numpy().ravel()
    assert np.allclose(ours, want, rtol=0, atol=tol)
    # the reconstruction is near its input (a vector that decoded to zeros would fail here)
    x = VECTOR_INPUTS[inp].double().numpy().ravel()
    assert np.linalg.norm(ours - x) < 0.8 * np.linalg.norm(x)
    if not any(name in call for name in ("rotated", "fourier", "svd", "klt")):
        # no transform: encoding the documented input reproduces every byte
        codec = eval(call, {"get_codec": get_codec})  # the call as printed in the document
        assert wire.pack(codec.encode(VECTOR_INPUTS[inp])) == data
