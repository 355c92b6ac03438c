"""Raw DEFLATE (RFC 1951, Huffman only) of ``rotated``'s absmax codes, and its checked inverse."""

from __future__ import annotations

import zlib

from fc_edge.errors import WireError

ENTROPY = {"none": 0, "deflate": 1}


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
