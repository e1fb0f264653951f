"""Chunk identity: BLAKE3-256 of the plaintext; all-zero chunks have no id.

A zero chunk is never hashed, stored or sent. In hash lists it is written as
ZERO_ID (32 zero bytes), which no BLAKE3 output will ever equal in practice;
its length is implied by its position in the image.
"""
from __future__ import annotations

import functools

import blake3

ID_LEN = 32
ZERO_ID = bytes(ID_LEN)
MIN_CHUNK = 64 << 10
MAX_CHUNK = 8 << 20
DEFAULT_CHUNK = 1 << 20



@functools.lru_cache(maxsize=16)
def _zeros(n: int) -> bytes:
    return bytes(n)


def chunk_id(data) -> bytes:
    return blake3.blake3(data).digest()


class VerifiedChunk(bytes):
    """A chunk's plaintext that was already checked against its id `cid`, under the
    id scheme that names it (plain or keyed: protocol/ids.py), by this process: a
    store read, or exchange.open_data. A verifier that holds one (a possession
    reference, protocol/possession.py) need not hash it again, nor know the key.
    Only local code makes one; peers send bytes, never this type."""

    cid: bytes

    @classmethod
    def of(cls, cid: bytes, plain) -> VerifiedChunk:
        v = cls(plain)
        v.cid = cid
        return v


def is_zero(data) -> bool:
    """True if every byte is zero.

    bytes/bytearray compare against a cached zero buffer with memcmp (~60 GB/s);
    a memoryview compares element by element (~1 GB/s), so it is copied first.
    """
    if isinstance(data, memoryview):
        data = data.tobytes()
    return data == _zeros(len(data))


def valid_chunk_size(size: int) -> bool:
    return MIN_CHUNK <= size <= MAX_CHUNK and size & (size - 1) == 0


def short(cid: bytes) -> str:
    return cid.hex()[:16]
