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
