"""Chunk id schemes: which hash names a chunk, and which key a manifest needs.

Two schemes, told apart by the manifest (protocol/manifest.py `key`):

    plain   BLAKE3-256 of the plaintext (protocol.chunks.chunk_id): every manifest
            without a key, i.e. every backup made before encryption at rest and
            every backup of a node without a data key
    keyed   BLAKE3 keyed with the data key's id subkey (protocol.sealing.keyed_id):
            the manifest names the key by its fingerprint

Hash-list ids follow the scheme of the manifest that lists them; the all-zero
chunk is ZERO_ID in both. Whoever checks a chunk against its id (a store read, a
restore, `verify --against`, the swarm) uses id_of(scheme_key(...), data).

Pure: no I/O.
"""
from __future__ import annotations

from .chunks import chunk_id
from .sealing import DataKey, keyed_id


class DataKeyMissing(Exception):
    """A backup's ids (or records) are keyed with a data key this node does not hold.
    Not damage: the bytes may be perfect; the key is elsewhere (`hypersdk key import`)."""

    def __init__(self, fingerprint: bytes):
        self.fingerprint = fingerprint
        super().__init__(f"this backup is encrypted with data key {fingerprint.hex()[:16]}; "
                         "this node does not have it")


def id_of(key: DataKey | None, data) -> bytes:
    """The id of a non-zero chunk's plaintext: keyed under `key`, plain BLAKE3 if None."""
    return chunk_id(data) if key is None else keyed_id(key, data)


def scheme_key(fingerprint: bytes | None, have: DataKey | None) -> DataKey | None:
    """The key ids named by `fingerprint` are keyed with (None: plain BLAKE3), given
    the key this node has (`have`, or None). DataKeyMissing when it is not that key."""
    if fingerprint is None:
        return None
    if have is None or have.fingerprint != fingerprint:
        raise DataKeyMissing(fingerprint)
    return have
