"""Named backups and their manifests, kept in the store's index database.

A backup record is (name, version, manifest id). Versions of a name are
numbered 1, 2, ... in creation order and keep their number when another
version is deleted, so NAME@N always means the same backup.

REF forms accepted everywhere:
    NAME        the latest version of NAME
    NAME@N      version N of NAME (1 = oldest)
    HEX         a manifest id, or a unique prefix of at least 4 hex digits

Manifests at rest: a node with a data key keeps each manifest body sealed
(protocol/sealing.py KIND_MANIFEST, under the manifest id; manifests.key names the
key's fingerprint), since a manifest holds the source path and the image's hash
lists; manifest_body / load_manifest open it, and open the manifest's sealed labels
(version 3: name, source, created) with the same key. Backup names, sizes and
times stay readable in this node's backups table (`backups` lists them without
the key); a replica whose labels this node cannot open (a storage-only holder's)
is listed as sealed-<manifest id prefix>, the name it never learns.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

from hypersdk.node.errors import UsageError, UserError
from hypersdk.node.store.sealed import DataKeyNotHeld
from hypersdk.protocol import sealing
from hypersdk.protocol.chunks import ZERO_ID
from hypersdk.protocol.errors import ChunkCorrupt, LocalProtocolError, RemoteProtocolError
from hypersdk.protocol.manifest import Manifest, decode_manifest, open_labels, split_list, zero_list

_HEX = re.compile(r"^[0-9a-f]{4,64}$")


@dataclass(frozen=True)
class Backup:
    seq: int
    name: str
    version: int
    manifest_id: bytes
    created: int
    size: int
    stats: dict

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def data_bytes(self) -> int:
        """The image's bytes outside zero chunks: the most a copy of it stores."""
        zeros = self.stats.get("zero_chunks", 0) * self.stats.get("chunk_size", 0)
        return max(0, self.size - zeros)

    def to_json(self) -> dict:
        return {"name": self.name, "version": self.version, "ref": self.ref,
                "manifest": self.manifest_id.hex(), "created_ns": self.created,
                "size": self.size, **self.stats}


_COLS = "seq, name, version, manifest, created, size, stats"


def _row(r) -> Backup:
    return Backup(r[0], r[1], r[2], bytes(r[3]), r[4], r[5], json.loads(r[6]))


MANIFEST_CODEC = 0                # sealed manifest bodies are not compressed (mostly ids)


def put_manifest(conn, mid: bytes, body: bytes, key) -> None:
    """Insert the manifests row of `body` (its canonical encoding, id mid) unless there
    is one: sealed under `key` (a DataKey), or plaintext when key is None."""
    if key is None:
        conn.execute("INSERT OR IGNORE INTO manifests(id, body) VALUES (?,?)", (mid, body))
        return
    record = sealing.seal(key, sealing.KIND_MANIFEST, mid, MANIFEST_CODEC, len(body), body)
    conn.execute("INSERT OR IGNORE INTO manifests(id, body, key) VALUES (?,?,?)",
                 (mid, bytes(record), key.fingerprint))


def add_backup(conn, manifest: Manifest, stats: dict, key=None) -> int:
    """Record manifest as the next version of its name (inside the caller's
    transaction); its body sealed under `key` (the store's data key) when given."""
    if manifest.key is not None and key is None:
        raise LocalProtocolError("a manifest with keyed ids is kept sealed: pass the key")
    put_manifest(conn, manifest.id, manifest.encode(), key)
    name = manifest.name if manifest.opened else sealed_name(manifest.id)
    (last,) = conn.execute("SELECT COALESCE(MAX(version), 0) FROM backups WHERE name=?",
                           (name,)).fetchone()
    conn.execute(f"INSERT INTO backups({_COLS}) VALUES (NULL,?,?,?,?,?,?)",
                 (name, last + 1, manifest.id, manifest.created, manifest.size,
                  json.dumps(stats, sort_keys=True)))
    return last + 1


def sealed_name(manifest_id: bytes) -> str:
    """The name a backup whose labels this node cannot open is listed under (a
    storage-only holder's replica): its real name is sealed (protocol/labels.py)."""
    return f"sealed-{manifest_id.hex()[:16]}"


def list_backups(store) -> list[Backup]:
    return [_row(r) for r in store.db.execute(
        f"SELECT {_COLS} FROM backups ORDER BY name, version")]


def resolve_name(store, name: str) -> Backup | None:
    """The latest version of NAME, or None."""
    r = store.db.execute(f"SELECT {_COLS} FROM backups WHERE name=? ORDER BY version DESC "
                         "LIMIT 1", (name,)).fetchone()
    return _row(r) if r else None


def resolve(store, ref: str) -> Backup:
    """The backup REF names; UserError naming the problem otherwise."""
    db = store.db
    if "@" in ref:
        name, _, ver = ref.rpartition("@")
        if not ver.isdigit() or int(ver) < 1:
            raise UsageError(f"bad REF {ref!r}: the version after @ must be a number >= 1")
        r = db.execute(f"SELECT {_COLS} FROM backups WHERE name=? AND version=?",
                       (name, int(ver))).fetchone()
        if r is None:
            have = [v for (v,) in db.execute(
                "SELECT version FROM backups WHERE name=? ORDER BY version", (name,))]
            hint = f" (versions: {', '.join(map(str, have))})" if have else ""
            raise UserError(f"no backup {ref!r}{hint}")
        return _row(r)
    latest = resolve_name(store, ref)
    if latest is not None:
        return latest
    if _HEX.match(ref.lower()):
        prefix = ref.lower()
        hits = [_row(x) for x in db.execute(
            f"SELECT {_COLS} FROM backups WHERE hex(manifest) LIKE ? ORDER BY seq",
            (prefix.upper() + "%",))]
        ids = {b.manifest_id for b in hits}
        if len(ids) == 1:
            return hits[-1]
        if len(ids) > 1:
            shown = ", ".join(sorted(i.hex()[:16] for i in ids)[:5])
            raise UserError(f"REF {ref!r} is ambiguous: it prefixes {len(ids)} manifests ({shown})")
    raise UserError(f"no backup matches REF {ref!r} (try `hypersdk backups`)")


def manifest_body(store, manifest_id: bytes) -> bytes | None:
    """The manifest's canonical encoding (opened if sealed), or None if not held.
    DataKeyNotHeld (a UserError) when it is sealed under a key this node lacks;
    ChunkCorrupt naming the manifest when its sealed record does not open."""
    r = store.db.execute(f"SELECT body, {store.manifest_key_sql} FROM manifests WHERE id=?",
                         (manifest_id,)).fetchone()
    if r is None:
        return None
    body, fp = bytes(r[0]), r[1]
    if fp is None:
        return body
    key = store.key_for(bytes(fp))
    try:
        opened = sealing.open_record(key, sealing.KIND_MANIFEST, manifest_id, body)
    except sealing.SealError as exc:
        raise ChunkCorrupt(manifest_id, f"sealed manifest does not open: {exc.reason}",
                           "index.sqlite") from None
    if opened.codec != MANIFEST_CODEC or len(opened.payload) != opened.raw_len:
        raise ChunkCorrupt(manifest_id, "sealed manifest has an unknown codec or length",
                           "index.sqlite")
    return bytes(opened.payload)


def load_manifest(store, manifest_id: bytes, *, opaque_ok: bool = False) -> Manifest:
    """The decoded manifest. UserError when it is not held, or when it (or its ids)
    needs a data key this node does not have (DataKeyNotHeld). opaque_ok: ids keyed
    with another tenant's key are fine (a storage-only holder's replica, for callers
    that use only its structure: ids and sizes, never a chunk's content)."""
    body = manifest_body(store, manifest_id)
    if body is None:
        raise UserError(f"manifest {manifest_id.hex()} is not in the store")
    m = decode_manifest(body)
    try:
        key = store.key_for(m.key)    # ids keyed with a key not held here: say so now
    except DataKeyNotHeld:
        if not opaque_ok:
            raise
        return m                      # its labels stay sealed (name None)
    if key is not None and not m.opened:
        try:
            m = open_labels(m, key)
        except RemoteProtocolError as exc:
            raise ChunkCorrupt(manifest_id, str(exc), "index.sqlite") from None
    return m


def iter_chunk_ids(store, manifest: Manifest):
    """Yield (index, chunk id or ZERO_ID) for every chunk of the image, in order.

    Reads one hash-list piece at a time, so memory stays flat for any image size.
    """
    index = 0
    for li, lid in enumerate(manifest.lists):
        n = manifest.list_len(li)
        piece = zero_list(n) if lid == ZERO_ID else store.read(lid)
        for cid in split_list(piece, n):
            yield index, cid
            index += 1


def delete_backup(store, backup: Backup, extra=None):
    """Remove one backup record (and its manifest once no record uses it);
    extra(conn) runs in the same transaction.

    Its chunks stay until `gc`, which reclaims every chunk no manifest references.
    """
    db = store.db
    with db:
        db.execute("DELETE FROM backups WHERE seq=?", (backup.seq,))
        db.execute("DELETE FROM manifests WHERE id=? AND NOT EXISTS "
                   "(SELECT 1 FROM backups WHERE manifest=?)",
                   (backup.manifest_id, backup.manifest_id))
        if extra is not None:
            extra(db)
