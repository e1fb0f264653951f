"""Sealed records in the store: what encryption at rest adds to reading and writing.

When the data dir holds a data key (DATA/network/data.key, node/net/datakey.py),
every record the store writes is sealed with protocol/sealing.py (AES-256-GCM with
a synthetic IV: the same plaintext under the same key is the same record at every
site): chunk and hash-list records in the packs (packfile.py codec flag SEALED,
and KEYED when the id is keyed, which it is for every backup of a keyed node; a
backup with plain ids fetched from elsewhere is sealed with plain ids), and
manifest bodies in the index (catalog.py). The payload sealed is exactly what an
unsealed record stores (a zstd frame, raw bytes, or a delta's base id + frame),
so everything after opening is unchanged.

Reading opens the record under the chunk's id: a record that does not open, or
claims another codec or length than the index, is a corrupt chunk (ChunkCorrupt
with the reason and where), as one whose bytes hash wrong is. A sealed record on
a node without the key (or with another one) is not damage: DataKeyNotHeld, a
UserError with one clear line.
"""
from __future__ import annotations

import threading

from hypersdk.node.errors import UserError
from hypersdk.node.store import packfile
from hypersdk.protocol import sealing
from hypersdk.protocol.errors import ChunkCorrupt
from hypersdk.protocol.ids import DataKeyMissing, scheme_key

_tls = threading.local()


def _scratch(i: int, n: int) -> bytearray:
    """This thread's reused buffer number i, of at least n bytes."""
    bufs = getattr(_tls, "bufs", None)
    if bufs is None:
        bufs = _tls.bufs = [bytearray(), bytearray()]
    if len(bufs[i]) < n:
        bufs[i] = bytearray(max(n, 1 << 20))
    return bufs[i]


class DataKeyNotHeld(UserError):
    """A sealed record or manifest, or keyed ids, and no (or another) data key here."""


def key_for(have, fingerprint: bytes | None):
    """The key (have, this node's, or None) that what `fingerprint` names needs;
    None when fingerprint is None; DataKeyNotHeld when it is not `have`."""
    if fingerprint is None:
        return None
    try:
        return scheme_key(bytes(fingerprint), have)
    except DataKeyMissing as exc:
        raise DataKeyNotHeld(str(exc)) from None


def seal_payload(key, kind: int, cid: bytes, codec: int, raw_len: int, payload,
                 keyed: bool, out=None) -> tuple[int, bytes]:
    """(pack codec, sealed record) of a codec's output for object `cid` (kind:
    sealing.KIND_CHUNK or KIND_HASHLIST; keyed: cid is a keyed id); the record is
    written into `out` (a reused buffer; then a view of it is returned) if given."""
    flags = packfile.SEALED | (packfile.KEYED if keyed else 0) | codec
    if out is None:
        return flags, sealing.seal(key, kind, cid, codec, raw_len, payload)
    return flags, sealing.seal_into(key, kind, cid, codec, raw_len, payload, out)


def open_payload(key, cid: bytes, codec: int, raw_len: int, stored, where: str = "",
                 scratch: int | None = None):
    """(payload codec, payload) of a pack record's stored bytes: themselves unless
    sealed, else what the seal holds, opened under cid (see the module doc).
    scratch: decrypt into this thread's reused buffer number `scratch` (0 or 1): the
    payload is then valid only until that buffer is used again (store.read decodes
    at once; a delta's base is read with the other buffer); None: a new bytearray."""
    if not codec & packfile.SEALED:
        return codec, stored
    if key is None:
        raise DataKeyNotHeld(f"chunk {cid.hex()[:16]} is sealed with a data key and this "
                             "node has none: import it (`hypersdk key import FILE`)")
    try:
        kind = sealing.peek_header(stored).kind
        if kind not in (sealing.KIND_CHUNK, sealing.KIND_HASHLIST):
            raise ChunkCorrupt(cid, f"sealed record is a {sealing.KIND_NAMES[kind]}, "
                                    "not a chunk", where)
        if scratch is None:
            opened = sealing.open_record(key, kind, cid, stored)
        else:
            opened = sealing.open_record_into(key, kind, cid, stored,
                                              _scratch(scratch, len(stored)))
    except sealing.SealError as exc:
        raise ChunkCorrupt(cid, f"sealed record does not open: {exc.reason}", where) from None
    if opened.codec != packfile.inner(codec) or opened.raw_len != raw_len:
        raise ChunkCorrupt(cid, "sealed record header does not match the index", where)
    return opened.codec, opened.payload
