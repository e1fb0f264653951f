"""Canonical msgpack: one byte string per value, bounded decoding.

Canonical means: maps have their keys sorted (all keys are str), integers use
the shortest msgpack form (msgpack-python does this), bytes are bin, text is
str, no floats, no extension types. Decoding refuses anything else and bounds
every size, so hostile input raises RemoteProtocolError and nothing else.
"""
from __future__ import annotations

import msgpack

from .errors import LocalProtocolError, RemoteProtocolError

MAX_DOC = 16 << 20          # largest encoded document we accept
MAX_ITEMS = 1 << 20         # largest list/map we accept
MAX_STR = 1 << 16           # longest text string


def _check(value, depth=0):
    if depth > 32:
        raise LocalProtocolError("value nested too deeply")
    if isinstance(value, bool) or value is None or isinstance(value, (int, bytes, str)):
        return
    if isinstance(value, (list, tuple)):
        for v in value:
            _check(v, depth + 1)
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise LocalProtocolError(f"map key {k!r} is not a string")
            _check(v, depth + 1)
        return
    raise LocalProtocolError(f"cannot encode {type(value).__name__}")


def _sorted(value):
    if isinstance(value, dict):
        return {k: _sorted(value[k]) for k in sorted(value)}
    if isinstance(value, (list, tuple)):
        return [_sorted(v) for v in value]
    return value


def encode(value) -> bytes:
    """Canonical encoding of a tree of dict/list/int/bytes/str/bool/None."""
    _check(value)
    return msgpack.packb(_sorted(value), use_bin_type=True)


def decode(data: bytes, *, max_size: int = MAX_DOC):
    """Decode one canonical document; RemoteProtocolError on anything else."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise RemoteProtocolError("document is not bytes")
    if len(data) > max_size:
        raise RemoteProtocolError(f"document of {len(data)} bytes exceeds {max_size}")
    # every element takes at least one byte (a map entry two), so no honest
    # document claims more elements than it has bytes; bounding by the size
    # stops a few hostile bytes from making msgpack reserve a 1M-slot list
    n = len(data)
    try:
        value = msgpack.unpackb(
            data, raw=False, strict_map_key=True, use_list=True,
            max_bin_len=max_size, max_str_len=MAX_STR, max_array_len=min(MAX_ITEMS, n),
            max_map_len=min(MAX_ITEMS, n // 2), max_ext_len=0)
    except Exception as exc:   # msgpack raises many types on bad input
        raise RemoteProtocolError(f"malformed msgpack: {exc}") from None
    try:
        again = encode(value)
    except LocalProtocolError as exc:
        raise RemoteProtocolError(f"non-canonical document: {exc}") from None
    if again != bytes(data):
        raise RemoteProtocolError("non-canonical document encoding")
    return value
