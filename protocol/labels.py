"""Sealed labels: what a backup is called, kept from whoever merely holds it.

A backup's labels say what it is: its name, its source (an image path, or a VM's
host, inventory path and disk) and when it was made. A site that stores and
serves another site's replicas without the tenant's data key (a storage-only
member), and every member that gossips the audit logs, needs none of that: it
needs sizes, ids and structure. So a node with a data key seals the labels
wherever they leave it:

    manifest version 3   "labels" replaces name, source and created
                         (protocol/manifest.py); the lists, size, chunk size and
                         key fingerprint stay readable
    audit entries        a backup or delete entry carries "labels" (and "key")
                         in place of name and source (protocol/audit.py)

A labels record is a sealed record (protocol/sealing.py, KIND_LABELS) of the
canonical msgpack map of the labels, sealed under an object id that ties it to
its place: a manifest's labels under BLAKE3 of its structure (labels_oid), an
audit entry's under the manifest id it names. A record moved to another manifest
or entry does not open. Sealing is deterministic (synthetic IV), which reveals
only that two records hold the same labels for the same object, and a backup's
creation time in nanoseconds is among them.

What stays readable for everyone who holds the object: sizes, chunk counts,
manifest ids, the key fingerprint (which tenant), versions, who made it and when
the entry was signed. Key holders open the labels and see everything as before.

Pure: no I/O. Errors: a record that does not open, or opens to anything but a
map with exactly the expected fields, raises SealError (an IntegrityError).
"""
from __future__ import annotations

from . import codec, sealing
from .chunks import chunk_id
from .errors import ProtocolError
from .sealing import KIND_LABELS, DataKey, SealError

LABELS_CODEC = 0                          # the payload is the msgpack map itself
MAX_RECORD = sealing.MAX_LABELS_RAW + sealing.RECORD_OVERHEAD
_DOMAIN = b"hypersdk manifest labels v1\x00"


def labels_oid(structure: list) -> bytes:
    """The object id a manifest's labels are sealed under: BLAKE3 of a domain string
    and the canonical encoding of the manifest's structure (size, chunk size, lists,
    key), so the labels of one manifest open in no other."""
    return chunk_id(_DOMAIN + codec.encode(structure))


def seal_labels(key: DataKey, oid: bytes, doc: dict) -> bytes:
    """The sealed record of the labels map `doc` for object `oid`."""
    plain = codec.encode(doc)
    return bytes(sealing.seal(key, KIND_LABELS, oid, LABELS_CODEC, len(plain), plain))


def open_labels(key: DataKey, oid: bytes, record, fields: frozenset) -> dict:
    """The labels map sealed in `record` for `oid`, with exactly `fields`;
    SealError otherwise (wrong key, wrong object, altered, or a foreign shape)."""
    if not isinstance(record, (bytes, bytearray, memoryview)) or len(record) > MAX_RECORD:
        raise SealError(oid, KIND_LABELS, "not a labels record of a possible size")
    opened = sealing.open_record(key, KIND_LABELS, oid, record)
    if opened.codec != LABELS_CODEC or len(opened.payload) != opened.raw_len:
        raise SealError(oid, KIND_LABELS, "unknown codec or length")
    try:
        doc = codec.decode(bytes(opened.payload))
    except ProtocolError as exc:
        raise SealError(oid, KIND_LABELS, f"does not decode: {exc}") from None
    if type(doc) is not dict or doc.keys() != fields:
        raise SealError(oid, KIND_LABELS, f"holds fields other than {sorted(fields)}")
    return doc
