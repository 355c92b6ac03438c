"""The byte format of an :class:`~fc_edge.codecs.base.Encoded` payload.

Specified byte by byte in ``docs/wire-format.md``. All integers are little-endian::

    magic "FC" | version u8 | codec id u8 | dtype u8 | ndim u8 | dims (varint x ndim)
    | codec parameters (varints, fixed list per codec) | body length (varint) | body | CRC32 u32

Varints are unsigned LEB128 (7 bits per byte, low group first, high bit = more follows), so a
decode row's header costs about 20 bytes instead of a fixed-width 40.

``unpack`` of any byte string returns an ``Encoded`` that its codec can decode, or raises
:class:`~fc_edge.errors.WireError`. Every length and parameter is checked against what the
declared shape allows, and sizes against a cap, before anything that depends on them is
allocated; then the codec validates the contents once (``Codec.validate_payload``), keeping what
it decoded for ``decode``. ``unpack`` + ``decode`` of any byte string takes time and memory
linear in the payload plus the declared activation (at float32, the dtype decoders work in).
"""

from __future__ import annotations

import math
import struct
import zlib

import numpy as np
import torch

from fc_edge.codecs.base import (
    ACTIVATION_DTYPES,
    DTYPE_BY_CODE,
    PARAM_MAX,
    WIRE_DTYPES,
    Encoded,
    TensorSpec,
    all_finite,
    codec_by_wire_id,
    codec_class,
)
from fc_edge.codecs.context import CodecContext
from fc_edge.errors import ConfigError, WireError

MAGIC = b"FC"
#: 2: scales of ``quant`` (by ``value_dtype``) and ``rotated`` (bfloat16) cover float32's range,
#: and ``rotated[transform=hadamard]`` rotates all of D (docs/wire-format.md, "Versions").
VERSION = 2
#: Default cap on a payload's declared body and on the activation it decodes to, in bytes.
DEFAULT_MAX_BYTES = 256 * 1024 * 1024

# Wire dtype -> little-endian numpy dtype of the bytes (bfloat16 travels as its 16 raw bits).
_NP_DTYPES = {
    "u1": "<u1",
    "i1": "<i1",
    "u2": "<u2",
    "u4": "<u4",
    "f2": "<f2",
    "bf2": "<i2",
    "f4": "<f4",
}
_INT_RANGES = {"u1": (0, 255), "i1": (-128, 127), "u2": (0, 65535), "u4": (0, 2**32 - 1)}


def pack(enc: Encoded) -> bytes:
    """Serialise a payload. The length of the result is the payload's size on the link."""
    cls = codec_class(enc.codec)
    if enc.dtype not in ACTIVATION_DTYPES:
        raise ConfigError(f"cannot pack an activation of dtype {enc.dtype}")
    specs = cls.layout(enc.shape, enc.params)
    if sorted(s.name for s in specs) != sorted(enc.tensors):
        raise ConfigError(
            f"{enc.codec} payload has tensors {sorted(enc.tensors)}, layout wants "
            f"{[s.name for s in specs]}"
        )
    body = b"".join(_tensor_bytes(enc.tensors[s.name], s) for s in specs)
    header = _header(cls, enc, len(body))
    out = header + body
    return out + struct.pack("<I", zlib.crc32(out))


def unpack(data: bytes | bytearray | memoryview, max_bytes: int = DEFAULT_MAX_BYTES,
           ctx: CodecContext | None = None) -> Encoded:
    """Parse and validate a payload; tensors land on the CPU.

    ``max_bytes`` caps both the declared body and the activation the payload decodes to,
    counted at float32 (4 bytes per element, what decoding works in) even for a 16-bit dtype.
    ``ctx``: what this receiver holds (channel weights, calibration, the rows' tokens); a
    payload that needs what it lacks is a WireError.
    """
    buf = memoryview(data).cast("B") if not isinstance(data, bytes) else memoryview(data)
    n = len(buf)
    pos = _expect(n, 0, 6, "fixed header")
    if bytes(buf[0:2]) != MAGIC:
        raise WireError(f"bad magic {bytes(buf[0:2])!r}: not an fc-edge payload")
    version, codec_id, dtype_code, ndim = buf[2], buf[3], buf[4], buf[5]
    if version != VERSION:
        raise WireError(f"wire version {version} is not supported (this build reads {VERSION})")
    cls = codec_by_wire_id(codec_id)
    if dtype_code not in DTYPE_BY_CODE:
        raise WireError(f"unknown activation dtype code {dtype_code}")
    dtype = DTYPE_BY_CODE[dtype_code]
    if ndim not in (2, 3):
        raise WireError(f"activation must have 2 or 3 dims, payload says {ndim}")
    shape = []
    for _ in range(ndim):
        d, pos = _read_varint(buf, pos, "shape", 2**32 - 1)
        shape.append(d)
    shape = tuple(shape)
    if min(shape) < 1:
        raise WireError(f"activation shape {shape} has an empty dimension")
    out_bytes = math.prod(shape) * 4  # decoders work in float32 whatever the dtype
    if out_bytes > max_bytes:
        raise WireError(
            f"payload declares an activation {shape} of {out_bytes} bytes at float32, above "
            f"the cap of {max_bytes} bytes"
        )
    params = {}
    for name, fmt in cls.wire_params:
        params[name], pos = _read_varint(buf, pos, f"parameter {name}", PARAM_MAX[fmt])
    body_len, pos = _read_varint(buf, pos, "body length", 2**64)
    if body_len > max_bytes:
        raise WireError(f"payload declares a {body_len}-byte body, above the cap of {max_bytes}")
    if n != pos + body_len + 4:
        raise WireError(
            f"payload is {n} bytes but its header declares {pos + body_len + 4} "
            "(truncated or trailing bytes)"
        )
    (crc,) = struct.unpack_from("<I", buf, pos + body_len)
    if zlib.crc32(buf[: pos + body_len]) != crc:
        raise WireError("CRC32 mismatch: the payload was corrupted in transit")
    try:
        specs = cls.layout(tuple(shape), params)
    except ConfigError as e:
        raise WireError(f"invalid {cls.name} parameters {params} for shape {shape}: {e}") from None
    if sum(s.nbytes for s in specs) != body_len:
        raise WireError(
            f"{cls.name} body should be {sum(s.nbytes for s in specs)} bytes for these "
            f"parameters, payload carries {body_len}"
        )
    tensors = {}
    for s in specs:
        t = tensors[s.name] = _read_tensor(buf, pos, s)
        pos += s.nbytes
        if t.is_floating_point() and not all_finite(t):
            raise WireError(f"{cls.name} payload tensor {s.name} holds NaN or Inf")
    enc = Encoded(cls.name, params, tuple(shape), dtype, tensors)
    cls.validate_payload(enc, ctx)
    return enc


def _expect(n: int, pos: int, size: int, what: str) -> int:
    if pos + size > n:
        raise WireError(f"payload truncated: {n} bytes, {what} needs bytes {pos}..{pos + size}")
    return pos + size


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if not value:
            out.append(byte)
            return bytes(out)
        out.append(byte | 0x80)


def _read_varint(buf: memoryview, pos: int, what: str, limit: int) -> tuple[int, int]:
    """Read an LEB128 varint at ``pos``; refuse overlong encodings and values above ``limit``."""
    value, shift, n = 0, 0, len(buf)
    while True:
        if pos >= n:
            raise WireError(f"payload truncated inside the {what}")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
        shift += 7
        if shift > 63:
            raise WireError(f"{what} varint is too long")
    if byte == 0 and shift:
        raise WireError(f"{what} varint is not minimally encoded")
    if value > limit:
        raise WireError(f"{what} {value} is out of range (max {limit})")
    return value, pos


def _header(cls: type, enc: Encoded, body_len: int) -> bytes:
    ndim = len(enc.shape)
    if ndim not in (2, 3) or any(not 1 <= d < 2**32 for d in enc.shape):
        raise ConfigError(f"cannot pack activation shape {enc.shape}")
    code = ACTIVATION_DTYPES[enc.dtype]
    out = bytearray(MAGIC + struct.pack("<BBBB", VERSION, cls.wire_id, code, ndim))
    for d in enc.shape:
        out += _varint(d)
    for name, fmt in cls.wire_params:
        value = enc.params.get(name)
        if not isinstance(value, int) or not 0 <= value <= PARAM_MAX[fmt]:
            raise ConfigError(f"{cls.name} parameter {name}={value!r} does not fit the wire")
        out += _varint(value)
    return bytes(out + _varint(body_len))


def _tensor_bytes(t: torch.Tensor, spec: TensorSpec) -> bytes:
    if tuple(t.shape) != spec.shape:
        raise ConfigError(f"tensor {spec.name} has shape {tuple(t.shape)}, layout {spec.shape}")
    t = t.detach().to("cpu").contiguous()
    if spec.wire_dtype in _INT_RANGES:
        if t.is_floating_point():
            raise ConfigError(f"tensor {spec.name} must be an integer tensor, got {t.dtype}")
        lo, hi = _INT_RANGES[spec.wire_dtype]
        if t.numel() and (int(t.min()) < lo or int(t.max()) > hi):
            raise ConfigError(f"tensor {spec.name} has values outside {spec.wire_dtype}")
        arr = t.to(torch.int64).numpy()
    else:
        want = WIRE_DTYPES[spec.wire_dtype][1]
        if t.dtype != want:
            raise ConfigError(f"tensor {spec.name} must be {want}, got {t.dtype}")
        arr = t.view(torch.int16).numpy() if want == torch.bfloat16 else t.numpy()
    return arr.astype(_NP_DTYPES[spec.wire_dtype], copy=False).tobytes()


def _read_tensor(buf: memoryview, pos: int, spec: TensorSpec) -> torch.Tensor:
    count = math.prod(spec.shape)
    arr = np.frombuffer(buf, dtype=_NP_DTYPES[spec.wire_dtype], count=count, offset=pos)
    want = WIRE_DTYPES[spec.wire_dtype][1]
    if spec.wire_dtype == "bf2":
        t = torch.from_numpy(arr.astype(np.int16)).view(torch.bfloat16)  # native-endian copy
    else:
        t = torch.from_numpy(arr.astype(arr.dtype.newbyteorder("="))).to(want)
    return t.reshape(spec.shape)
