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


_LEAF = frozenset({bool, int, bytes, str, type(None)})
MAX_DEPTH = 32


def _canonical(value, depth=0):
    """The value with every map's keys sorted, ready for msgpack.packb; raises
    LocalProtocolError for anything the encoding does not allow. One pass:
    exact-type dispatch first (the hot path), isinstance for subclasses."""
    t = type(value)
    if t in _LEAF:
        return value
    if depth >= MAX_DEPTH:
        raise LocalProtocolError("value nested too deeply")
    if t is dict or isinstance(value, dict):
        for k in value:
            if type(k) is not str:
                raise LocalProtocolError(f"map key {k!r} is not a string")
        return {k: _canonical(value[k], depth + 1) for k in sorted(value)}
    if t is list or t is tuple or isinstance(value, (list, tuple)):
        return [v if type(v) in _LEAF else _canonical(v, depth + 1) for v in value]
    if isinstance(value, (bool, int, bytes, str)):
        return value
    raise LocalProtocolError(f"cannot encode {t.__name__}")


def _is_canonical_tree(value, depth=0) -> bool:
    """True when a freshly decoded tree re-encodes to canonical form, i.e. its
    maps' keys are sorted text and it holds no floats. (msgpack.packb of such a
    tree then reproduces the canonical bytes, so decode compares the two.)"""
    t = type(value)
    if t is dict:
        if depth >= MAX_DEPTH:
            return False
        keys = list(value)
        for k in keys:
            if type(k) is not str:
                return False
        if keys != sorted(keys):
            return False
        items = value.values()
    elif t is list:
        if depth >= MAX_DEPTH:
            return False
        items = value
    else:
        return t in _LEAF
    for v in items:
        if type(v) not in _LEAF and not _is_canonical_tree(v, depth + 1):
            return False
    return True


def encode(value) -> bytes:
    """Canonical encoding of a tree of dict/list/int/bytes/str/bool/None."""
    try:
        return msgpack.packb(_canonical(value), use_bin_type=True)
    except (OverflowError, ValueError) as exc:   # an int outside msgpack's 64-bit range
        raise LocalProtocolError(f"cannot encode: {exc}") from None


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
    if not _is_canonical_tree(value):
        raise RemoteProtocolError("non-canonical document: unsorted or non-text map "
                                  "keys, a float, or nesting deeper than 32")
    if msgpack.packb(value, use_bin_type=True) != data:
        raise RemoteProtocolError("non-canonical document encoding")
    return value
