"""Structured fuzzing of every codec's decoder, with a memory bound, and the crafted payloads of
issue 11 (memory and time amplification).

Payloads are taken apart into fields (dims, codec parameters, body) with the reference reader,
mutated field by field and put back together with a *valid* CRC, so every mutation reaches the
parameter, length and content validators instead of stopping at the CRC. The fuzz loop runs in a
subprocess so its peak RSS can be bounded: a decoder that sizes an allocation from an unchecked
field (one int64 per bit of a stream, rows padded to a 65535-value group) blows the bound by
orders of magnitude.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

HERE = Path(__file__).parent

# Shared by both child scripts: an LEB128 writer (written here, not imported from fc_edge).
VARINT = r"""
def varint(v):
    out = bytearray()
    while True:
        b, v = v & 0x7F, v >> 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)
"""

# The subprocess: build valid payloads, mutate them, decode, report counts and peak RSS growth.
FUZZ = r"""
import importlib.util, json, random, resource, struct, sys, zlib
import torch
from fc_edge.codecs import wire
from fc_edge.codecs import decode, get_codec
from fc_edge.errors import WireError

spec = importlib.util.spec_from_file_location("wire_reference", sys.argv[1])
ref = importlib.util.module_from_spec(spec); spec.loader.exec_module(ref)
CAP = int(sys.argv[2]); CASES = int(sys.argv[3])
torch.set_num_threads(1)


def split(data):
    r = ref.Reader(data[:-4]); r.take(3)
    codec_id, dtype, ndim = r.take(3)
    dims = [r.varint() for _ in range(ndim)]
    params = [r.varint() for _ in ref.PARAMS[codec_id][1]]
    r.varint()
    return codec_id, dtype, dims, params, bytearray(data[r.pos:-4])

def join(codec_id, dtype, dims, params, body):
    out = b"FC" + bytes([wire.VERSION, codec_id, dtype, len(dims)])
    out += b"".join(varint(d) for d in dims) + b"".join(varint(p) for p in params)
    out += varint(len(body)) + bytes(body)
    return out + struct.pack("<I", zlib.crc32(out))

SPECIAL = [0, 1, 2, 3, 7, 8, 9, 15, 16, 17, 64, 127, 128, 255, 256, 4095, 65535, 65536,
           2**31, 2**32 - 1]

def mutate(rng, fields):
    codec_id, dtype, dims, params, body = fields
    dims, params, body = list(dims), list(params), bytearray(body)
    for _ in range(rng.randint(1, 3)):
        what = rng.random()
        if what < 0.3 and params:
            i = rng.randrange(len(params))
            params[i] = rng.choice(SPECIAL + [params[i] + rng.randint(-2, 2)]) % 2**32
        elif what < 0.45:
            i = rng.randrange(len(dims))
            dims[i] = max(1, rng.choice(SPECIAL + [dims[i] * rng.randint(1, 64), dims[i] + 1]))
        elif what < 0.7 and body:
            for _ in range(rng.randint(1, 8)):
                body[rng.randrange(len(body))] = rng.randrange(256)
        elif what < 0.85:  # body length: cut or grow (the declared length follows)
            n = rng.choice(
                [rng.randint(0, len(body)), len(body) + rng.randint(1, 64), len(body) * 4])
            body = (body + bytearray(rng.randbytes(max(0, n - len(body)))))[:n]
        else:
            dtype = rng.choice([1, 2, 3])
    return codec_id, dtype, dims, params, body

CODECS = [("identity", {}), ("fp16", {}), ("int8", {}), ("int4", {}),
          ("quant", {"bits": 3, "group_size": 8}), ("fourier", {"ratio": 4}),
          ("topk", {"ratio": 4}), ("svd", {"rank": 2}), ("qr", {"rank": 2}),
          ("rotated", {}), ("rotated", {"transform": "hadamard", "keep": 20}),
          ("rotated", {"quantizer": "absmax", "entropy": "none", "bits": 5, "group_size": 8}),
          ("rotated", {"quantizer": "absmax", "entropy": "deflate", "bits": 8})]
g = torch.Generator().manual_seed(0)
seeds = [wire.pack(get_codec(n, **kw).encode(torch.randn(6, 48, generator=g))) for n, kw in CODECS]
for data in seeds:  # warm up every decoder (and numba's cache) before the baseline
    decode(wire.unpack(data))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
rng = random.Random(1234)
counts = {"refused": 0, "decoded": 0}
problems = []
for i in range(CASES):
    seed = seeds[i % len(seeds)]
    data = join(*mutate(rng, split(seed)))
    try:
        out = decode(wire.unpack(data, max_bytes=CAP))
    except WireError:
        counts["refused"] += 1
        continue
    except Exception as e:  # anything else is a bug
        problems.append(f"{CODECS[i % len(CODECS)][0]}: {type(e).__name__}: {e}"[:200])
        continue
    counts["decoded"] += 1
    if not bool(torch.isfinite(out).all()):
        problems.append(f"{CODECS[i % len(CODECS)][0]}: non-finite output")
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({**counts, "problems": problems[:5], "growth_mib": (peak - base) / 1024}))
"""

# The issue's crafted payloads, each with a valid CRC; printed: peak RSS growth and the outcome.
CRAFTED = r"""
import json, resource, struct, sys, zlib
import torch
from fc_edge.codecs import wire
from fc_edge.codecs import decode, get_codec
from fc_edge.errors import WireError
torch.set_num_threads(1)


def payload(codec_id, dtype, dims, params, body):
    out = b"FC" + bytes([wire.VERSION, codec_id, dtype, len(dims)])
    out += b"".join(varint(d) for d in dims) + b"".join(varint(p) for p in params)
    out += varint(len(body)) + body
    return out + struct.pack("<I", zlib.crc32(out))

cases = {
    # rotated, one 576-value row, step 56, a 4 MiB code stream (the old validator made one
    # int64 per bit of it before checking any row length)
    "rotated_4MiB_stream": payload(7, 1, [1, 576], [1, 1, 0, 56, 0, 576, 0, 0, 0, 4 << 20],
                                   b"\x55" * (4 << 20) + b"\x80\x3f"),
    # quant 8-bit on (4096, 1) with group_size 65535 (rows were padded to the group)
    "quant_group_65535": payload(6, 1, [4096, 1], [8, 65535, 3], bytes(4096) + bytes(2 * 4096)),
    # rotated absmax, the same
    "rotated_absmax_group_65535": payload(
        7, 1, [4096, 1], [1, 2, 4, 0, 65535, 1, 0, 0, 0, 2048], bytes(2048) + bytes(2 * 4096)),
    # fourier, 27 bytes declaring a (1, 2^26) float16 activation: 128 MiB at float16, 256 MiB
    # at float32, which decoding works in; a 128 MiB cap must refuse it
    "fourier_tiny": payload(
        2, 2, [1, 2**26], [1, 1, 2], b"\x00\x3c\x00\x00" + struct.pack("<f", 1.0)),
}
decode(wire.unpack(wire.pack(get_codec("int8").encode(torch.randn(4, 8)))))
data = cases[sys.argv[1]]  # one case per process: peak RSS is a high-water mark
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    decode(wire.unpack(data, max_bytes=128 << 20))
    what = "decoded"
except WireError as e:
    what = "WireError: " + str(e)
print(json.dumps([what, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024]))
"""


def run_child(code: str, *args: str) -> dict | list:
    proc = subprocess.run(
        [sys.executable, "-c", VARINT + textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_structured_fuzz_only_wire_errors_and_bounded_memory():
    cap = 4 << 20  # declared activations up to 1 Mi float32 elements
    res = run_child(FUZZ, str(HERE / "wire_reference.py"), str(cap), "800")
    print(res)
    assert res["problems"] == []
    # mutations reach both outcomes: refused, and decoded to the (possibly new) declared shape
    assert res["refused"] > 200 and res["decoded"] > 30, res
    # peak RSS: a small constant times the largest admissible activation (+ allocator slack)
    assert res["growth_mib"] < 12 * cap / 2**20 + 48, res


@pytest.mark.parametrize(
    "case,message",
    [("rotated_4MiB_stream", "cannot hold"), ("quant_group_65535", "wider than the row"),
     ("rotated_absmax_group_65535", "wider than the row"), ("fourier_tiny", "cap")],
)
def test_issue_payloads_are_refused_without_blowing_up(case, message):
    what, growth_mib = run_child(CRAFTED, case)
    assert what.startswith("WireError") and message in what, what
    # the old decoders took +0.25 to +2 GiB on these; the largest body is 4 MiB
    assert growth_mib < 64, growth_mib


@pytest.mark.parametrize(
    "name,kw,shape",
    [("rotated", {}, (3, 64)), ("int8", {}, (3, 64)), ("int4", {}, (3, 64)),
     ("rotated", {"quantizer": "absmax", "entropy": "none"}, (3, 64)),
     ("rotated", {"quantizer": "absmax", "entropy": "deflate", "bits": 8}, (3, 256))],
)
def test_each_payload_is_decoded_once(monkeypatch, name, kw, shape):
    """unpack validates by decoding the codes; decode reuses them instead of decoding again."""
    import torch

    from fc_edge.codecs import decode, entropy, get_codec, quant, rotated, wire

    calls = []

    def counting(fn):
        def wrapper(*a, **k):
            calls.append(fn.__name__)
            return fn(*a, **k)

        return wrapper

    monkeypatch.setattr(entropy, "decode_rows", counting(entropy.decode_rows))
    unpack_bits = counting(quant.unpack_bits)
    for mod in (quant, rotated):
        monkeypatch.setattr(mod, "unpack_bits", unpack_bits)
    monkeypatch.setattr(rotated, "inflate", counting(rotated.inflate))
    data = wire.pack(get_codec(name, **kw).encode(torch.randn(shape)))
    calls.clear()
    decode(wire.unpack(data))
    assert len(calls) == 1, calls
