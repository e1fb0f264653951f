"""Backing up one image into the store: chunk, dedup, store, record.

Either the whole backup is committed (chunks, hash lists, manifest, backup
record in one final transaction) or no backup exists. A data dir with a data key
makes keyed backups: chunk and hash-list ids keyed, every record and the
manifest sealed (node/store/store.py), the manifest naming the key. Chunks committed by
earlier batches of an interrupted run stay in the store unreferenced: the
re-run finds them and skips them, and `gc` reclaims them if it never comes.
"""
from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import time
from dataclasses import dataclass

from hypersdk.node.config import DEFAULT_ZSTD_LEVEL, commit_bytes
from hypersdk.node.errors import UsageError, UserError
from hypersdk.node.sources.local import ImageSource, SourceReadError
from hypersdk.node.store import catalog
from hypersdk.node.store.chunker import ScanStats, scan
from hypersdk.node.store.delta import DeltaSource
from hypersdk.node.store.sealed import seal_payload
from hypersdk.node.store.store import compress
from hypersdk.protocol.chunks import ID_LEN, ZERO_ID, is_zero
from hypersdk.protocol.errors import ProtocolError
from hypersdk.protocol.ids import id_of
from hypersdk.protocol.manifest import LIST_ENTRIES, Manifest, check_list_lengths, seal_labels
from hypersdk.protocol.sealing import KIND_HASHLIST


@dataclass
class BackupResult:
    manifest_id: bytes
    name: str
    version: int
    size: int
    chunks: int
    zero_chunks: int
    new_chunks: int
    new_bytes_stored: int
    new_bytes_raw: int
    seconds: float
    bytes_read: int = 0             # read from the source (holes are skipped)
    reused_bytes: int = 0           # unchanged chunks the source vouched for: not read


    def to_json(self) -> dict:
        return {"manifest": self.manifest_id.hex(), "name": self.name,
                "version": self.version, "ref": f"{self.name}@{self.version}",
                "size": self.size, "bytes_read": self.bytes_read,
                "hole_bytes_skipped": self.size - self.bytes_read, "chunks": self.chunks,
                "zero_chunks": self.zero_chunks, "new_chunks": self.new_chunks,
                "new_bytes_stored": self.new_bytes_stored,
                "new_bytes_raw": self.new_bytes_raw, "seconds": round(self.seconds, 3)}


def check_name(name: str):
    if not name or len(name) > 255 or "@" in name or name != name.strip() or "\n" in name:
        raise UsageError(f"bad backup name {name!r}: use 1-255 characters, no '@', "
                         "no leading/trailing spaces")


def _delta_source(store, name: str, chunk_size: int, level: int, sealed: bool):
    """Deltas against the latest backup of the same name and chunk size, if any
    (sealed: this backup's records are sealed, and so must their bases be)."""
    try:
        parent = catalog.resolve_name(store, name)
        if parent is None:
            return None
        m = catalog.load_manifest(store, parent.manifest_id)
    except (UserError, ProtocolError):
        return None
    if m.chunk_size != chunk_size:
        return None
    return DeltaSource(store, m, level, sealed)


def _put_plain(writer, data: bytes, level: int, key) -> tuple[bytes, int]:
    """Store a piece of metadata (a hash list) as a chunk, its id keyed and its
    record sealed under `key` when given; (id, bytes added)."""
    if is_zero(data):
        return ZERO_ID, 0
    cid = id_of(key, data)
    codec, stored = compress(data, level)
    if key is not None:
        codec, stored = seal_payload(key, KIND_HASHLIST, cid, codec, len(data), stored, True)
    return cid, writer.put(cid, len(data), codec, stored)


@dataclass
class _Tally:
    chunks: int = 0
    zeros: int = 0
    new: int = 0
    lists: list = None           # ids in each hash-list piece, in order
    new_raw: int = 0
    added: int = 0


def _ingest(store, w, src, name, chunk_size, level, progress, scanned, key, deltas=True):
    """Chunk the image into writer w (ids keyed and records sealed under `key`, if
    not None); returns (hash-list ids, tally)."""
    t = _Tally(lists=[])
    piece = bytearray()
    lists: list[bytes] = []

    def flush_piece():
        lid, got = _put_plain(w, bytes(piece), level, key)
        lists.append(lid)
        t.lists.append(len(piece) // ID_LEN)
        t.added += got
        piece.clear()

    deltas = _delta_source(store, name, chunk_size, level, key is not None) if deltas else None
    try:
        for c in scan(src, chunk_size, has=store.has, level=level, deltas=deltas,
                      generation=lambda: w.generation, stats=scanned, key=key):
            t.chunks += 1
            if c.cid == ZERO_ID:
                t.zeros += 1
            elif c.data is not None:
                got = w.put(c.cid, c.length, c.codec, c.data, base=c.base,
                            checked_gen=c.gen)
                if got:
                    t.new += 1
                    t.new_raw += c.length
                    t.added += got
            piece += c.cid
            if len(piece) == LIST_ENTRIES * ID_LEN:
                flush_piece()
            if progress:
                progress(c.length)
    except SourceReadError as exc:
        raise UserError(f"{src.path}: read error: {exc}") from None
    if piece:
        flush_piece()
    return lists, t


def backup(store, path: str, *, name: str | None = None, chunk_size: int,
           level: int = DEFAULT_ZSTD_LEVEL, progress=None, on_wait=None,
           now_ns=time.time_ns, extra=None) -> BackupResult:
    """Back up the image at path as the next version of NAME.

    The image is read as it was when opened: never past that size, and if its
    size (or a file's mtime) differs after the last read, SourceChanged is
    raised and nothing is recorded (the chunks stored so far stay for the next
    run). extra(conn, manifest, version) runs in the commit's transaction."""
    name = os.path.basename(os.path.abspath(path)) if name is None else name
    check_name(name)
    src = ImageSource.open(path)
    try:
        return backup_source(store, src, name=name, chunk_size=chunk_size, level=level,
                             progress=progress, on_wait=on_wait, now_ns=now_ns, extra=extra)
    finally:
        src.close()


@contextlib.contextmanager
def space_errors(store, what: str):
    """A full disk (ENOSPC, SQLite's "database or disk is full") as one clear line."""
    no_space = UserError(f"no space left in data dir {store.root}: backup of {what} "
                         "aborted, nothing recorded")
    try:
        yield
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        raise no_space from None
    except sqlite3.OperationalError as exc:
        if "full" not in str(exc):
            raise
        raise no_space from None


@dataclass
class Ingested:
    """One image chunked into a writer, not committed yet (`ingest`)."""
    manifest: Manifest
    stats: dict
    tally: _Tally
    scanned: ScanStats
    seconds: float

    def result(self, version: int) -> BackupResult:
        m, t = self.manifest, self.tally
        return BackupResult(m.id, m.name, version, m.size, t.chunks, t.zeros, t.new, t.added,
                            t.new_raw, self.seconds, self.scanned.bytes_read,
                            self.scanned.reused_bytes)


def ingest(store, w, src, *, name: str, chunk_size: int, level: int = DEFAULT_ZSTD_LEVEL,
           progress=None, now_ns=time.time_ns, deltas: bool = True) -> Ingested:
    """Chunk the open image source `src` (node/sources: size, is_hole, read_into,
    check_unchanged, metadata, path; optionally known) into writer w (the caller
    holds the store's write lock) and build its manifest; nothing is recorded until
    the caller commits w with the catalog rows. deltas=False: no zstd deltas
    against the previous version (a source whose unchanged chunks keep their ids
    has nothing to gain)."""
    t0 = time.perf_counter()
    check_name(name)
    scanned = ScanStats()
    key = store.key                   # a node with a data key stores everything sealed
    lists, t = _ingest(store, w, src, name, chunk_size, level, progress, scanned, key, deltas)
    try:
        src.check_unchanged()
    except SourceReadError as exc:
        raise UserError(f"{src.path}: read error: {exc}") from None
    manifest = Manifest(name=name, size=src.size, chunk_size=chunk_size, lists=tuple(lists),
                        source=src.metadata(), created=now_ns(),
                        key=key.fingerprint if key is not None else None)
    check_list_lengths(manifest, t.lists)   # its lists must match its size
    if key is not None:                     # name, source, time: for the key's holders only
        manifest = seal_labels(manifest, key)
    stats = {"chunks": t.chunks, "zero_chunks": t.zeros, "new_chunks": t.new,
             "new_bytes_stored": t.added, "chunk_size": chunk_size}
    return Ingested(manifest, stats, t, scanned, time.perf_counter() - t0)


def backup_source(store, src, *, name: str, chunk_size: int, level: int = DEFAULT_ZSTD_LEVEL,
                  progress=None, on_wait=None, now_ns=time.time_ns, extra=None) -> BackupResult:
    """Back up an open image source as the next version of NAME (see `backup` and
    `ingest`); the caller closes src."""
    check_name(name)
    with space_errors(store, src.path):
        # direct: the packs are appended with O_DIRECT from one reused buffer, not
        # through fresh page-cache pages (node/store/pack_direct.py says why: on this
        # VM a buffered backup paid 0.3-0.8 CPU-s more in the kernel, BENCHMARKS.md)
        with store.write_lock(on_wait), \
                store.writer(batch_bytes=commit_bytes(), direct=True) as w:
            got = ingest(store, w, src, name=name, chunk_size=chunk_size, level=level,
                         progress=progress, now_ns=now_ns)
            version = []

            def record(db):
                version.append(catalog.add_backup(db, got.manifest, got.stats, store.key))
                if extra is not None:
                    extra(db, got.manifest, version[0])
            w.commit(record)
    return got.result(version[0])
