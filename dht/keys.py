"""The 256-bit keyspace shared by node ids and chunk ids, and XOR distance.

A node id is BLAKE3 of the node's public key: a node cannot choose where it
sits in the keyspace (the first defence against targeted eclipse attacks).
"""
from __future__ import annotations

import blake3

ID_BYTES = 32
ID_BITS = 256


def node_id(public_key: bytes) -> bytes:
    return blake3.blake3(public_key).digest()


def as_int(key: bytes) -> int:
    return int.from_bytes(key, "big")


def distance(a: bytes, b: bytes) -> int:
    return as_int(a) ^ as_int(b)


def bucket_index(own: bytes, other: bytes) -> int:
    """Index of the k-bucket `other` falls in for a node with id `own`:
    255 for the farthest half of the keyspace, 0 for the closest id; -1 for own."""
    return distance(own, other).bit_length() - 1


def closest(target: bytes, contacts, k: int) -> list:
    """The k contacts (objects with .id) closest to target, nearest first."""
    t = as_int(target)
    return sorted(contacts, key=lambda c: t ^ as_int(c.id))[:k]
