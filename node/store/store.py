"""The embedded chunk store: an SQLite index over append-only pack files.

Layout of a data dir:
    index.sqlite      chunk index, packs, manifests, backups (WAL mode)
    packs/pack-N.dat  chunk records (see packfile.py)
    write.lock, compact.lock

Crash safety rests on one ordering rule: chunk bytes are appended to a pack
and fdatasync'ed *before* the index rows that point at them are committed.
So every committed row points at durable, complete bytes; a crash leaves at
worst a torn tail past the committed end of the active pack, which the next
writer cuts off. Manifests and backup records are committed in the same
transaction as the last chunk rows, so a backup exists completely or not at
all. Every read re-hashes the chunk.

Encryption at rest (schema 3): with a data key in the data dir, records and
manifests are sealed; reads open them first (node/store/sealed.py). Records of
older stores stay plaintext and read as before (read old, write new).
"""
from __future__ import annotations

import os
import sqlite3
import threading
import urllib.parse
from pathlib import Path

import zstandard

from hypersdk.node.errors import UserError
from hypersdk.node.files import flock, private_db, private_dir
from hypersdk.node.net import datakey
from hypersdk.node.store import delta, intents, packfile, sealed, vm_sets
from hypersdk.protocol import sealing
from hypersdk.protocol.errors import ChunkCorrupt, ChunkHashMismatch, ChunkMissing
from hypersdk.protocol.ids import id_of

SCHEMA_VERSION = 4         # 2: audit_intents (node/store/intents.py); 3: sealed records,
                           # manifests.key (encryption at rest); 4: vm_sets (node/store/vm_sets.py)
SCHEMA = """
CREATE TABLE IF NOT EXISTS packs(
    id INTEGER PRIMARY KEY, end INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS chunks(
    id BLOB PRIMARY KEY, pack INTEGER NOT NULL, offset INTEGER NOT NULL,
    stored_len INTEGER NOT NULL, raw_len INTEGER NOT NULL, codec INTEGER NOT NULL,
    base BLOB              -- delta records: the full chunk they decode against
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS manifests(
    id BLOB PRIMARY KEY, body BLOB NOT NULL,
    key BLOB               -- fingerprint of the data key body is sealed with; NULL: plaintext
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS backups(
    seq INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL,
    version INTEGER NOT NULL, manifest BLOB NOT NULL, created INTEGER NOT NULL,
    size INTEGER NOT NULL, stats TEXT NOT NULL, UNIQUE(name, version));
""" + intents.TABLE + vm_sets.TABLE

_tls = threading.local()


def _zstd_d():
    d = getattr(_tls, "zd", None)
    if d is None:
        d = _tls.zd = zstandard.ZstdDecompressor()
    return d


def _zstd_c(level: int):
    c = getattr(_tls, "zc", None)
    if c is None or _tls.zc_level != level:
        c = _tls.zc = zstandard.ZstdCompressor(level=level)
        _tls.zc_level = level
    return c


def compress(data, level: int):
    """(codec, bytes to store): zstd, or raw when zstd does not shrink the chunk."""
    z = _zstd_c(level).compress(data)
    if len(z) < len(data):
        return packfile.CODEC_ZSTD, z
    return packfile.CODEC_RAW, bytes(data)


def _disk_full(path: Path) -> bool:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize < (1 << 20)


def decode_chunk(cid: bytes, codec: int, raw_len: int, stored, where: str = "",
                 base_plain: bytes | None = None, key=None, check: bool = True) -> bytes:
    """Plaintext of a stored record's payload (codec: raw, zstd or zstd delta),
    verified against its id: keyed under `key`, plain BLAKE3 if None (a delta
    record needs its base's plaintext); check=False: not against the id (a FOREIGN
    hash-list piece, whose id is keyed under a key this node does not hold)."""
    if codec == packfile.CODEC_ZSTD:
        try:
            data = _zstd_d().decompress(stored, max_output_size=raw_len)
        except zstandard.ZstdError as exc:
            raise ChunkCorrupt(cid, f"zstd frame does not decode: {exc}", where) from None
    elif codec == packfile.CODEC_ZSTD_DELTA:
        try:
            data = delta.decompress_delta(base_plain, delta.split_record(stored)[1], raw_len)
        except zstandard.ZstdError as exc:
            raise ChunkCorrupt(cid, f"zstd delta frame does not decode: {exc}", where) from None
    else:
        data = bytes(stored)
    if len(data) != raw_len:
        raise ChunkCorrupt(cid, f"decodes to {len(data)} bytes, index says {raw_len}", where)
    if not check:
        return data
    actual = id_of(key, data)
    if actual != cid:
        raise ChunkHashMismatch(cid, actual, where)
    return data


class ChunkStore:
    def __init__(self, root: Path, *, readonly: bool = False):
        """readonly: the caller will only read; then a data dir on a full disk
        still opens (see _connect)."""
        self.root = Path(root)
        self.readonly = readonly
        self.packs_dir = self.root / "packs"
        self.db_path = self.root / "index.sqlite"
        if not (readonly and self.db_path.exists()):
            private_dir(self.root)
            private_dir(self.packs_dir)
        self._key = None
        self._fds: dict[int, int] = {}
        self._fd_lock = threading.Lock()
        self._conns: list[tuple[threading.Thread, sqlite3.Connection]] = []
        self._local = threading.local()
        db = self.db
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if not self._immutable:
            private_db(self.db_path)
        if version > SCHEMA_VERSION:
            raise UserError(f"store {self.root} has schema {version}, this hypersdk "
                            f"knows {SCHEMA_VERSION}: upgrade hypersdk")
        if version < SCHEMA_VERSION and not (self._immutable and version):
            # (a store of an older schema on a full disk still opens for reading)
            if self._immutable:
                raise UserError(f"no space left in data dir {self.root} to create a store")
            db.execute("PRAGMA journal_mode=WAL")
            with db:
                db.executescript(SCHEMA)
                if "key" not in self._manifest_columns():      # from schema 1 or 2
                    db.execute("ALTER TABLE manifests ADD COLUMN key BLOB")
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        # (an older store opened immutable on a full disk has no manifests.key yet)
        self.manifest_key_sql = "key" if "key" in self._manifest_columns() else "NULL"

    def _manifest_columns(self) -> set[str]:
        return {r[1] for r in self.db.execute("PRAGMA table_info(manifests)")}

    # -- the data key -----------------------------------------------------
    @property
    def key(self):
        """This data dir's data key (protocol.sealing.DataKey), or None. Looked up
        again while there is none: a running node gains one (network create, a join
        that shares it, key import); a key, once there, never changes."""
        if self._key is None:
            self._key = datakey.load(self.root)
        return self._key

    def key_for(self, fingerprint: bytes | None):
        """The key what `fingerprint` names needs (None for None); DataKeyNotHeld
        when this node does not have it."""
        return sealed.key_for(None if fingerprint is None else self.key, fingerprint)

    # -- connections and files ------------------------------------------
    @property
    def db(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
            with self._fd_lock:
                # a long-lived handle (the node's) is used from recycled worker
                # threads: close the connections of threads that have ended
                alive = [(t, c) for t, c in self._conns if t.is_alive()]
                for t, c in self._conns:
                    if not t.is_alive():
                        c.close()
                self._conns = alive + [(threading.current_thread(), conn)]
        return conn

    _immutable = False

    def _connect(self) -> sqlite3.Connection:
        """A connection for this thread.

        In WAL mode even a reader must create index.sqlite-wal/-shm, which a
        clean close removed; on a full disk that fails. Reading must still
        work then (a full disk is when one needs a restore most): if no WAL
        holds uncheckpointed commits, the database file alone is the whole
        truth and an immutable read-only open is exact.
        """
        conn = sqlite3.connect(self.db_path, timeout=60, check_same_thread=False)
        try:
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
            return conn
        except sqlite3.OperationalError:
            conn.close()
            if not _disk_full(self.root):
                raise
        wal = self.db_path.with_name(self.db_path.name + "-wal")
        if not self.readonly or (wal.exists() and wal.stat().st_size):
            raise UserError(f"no space left in data dir {self.root} (its file system is full)")
        self._immutable = True
        uri = f"file:{urllib.parse.quote(str(self.db_path))}?mode=ro&immutable=1"
        return sqlite3.connect(uri, uri=True, check_same_thread=False)

    def pack_path(self, pack_id: int) -> Path:
        return self.packs_dir / packfile.pack_name(pack_id)

    def _fd(self, pack_id: int) -> int:
        fd = self._fds.get(pack_id)
        if fd is None:
            with self._fd_lock:
                fd = self._fds.get(pack_id)
                if fd is None:
                    fd = self._fds[pack_id] = os.open(self.pack_path(pack_id), os.O_RDONLY)
        return fd

    def forget_pack(self, pack_id: int):
        with self._fd_lock:
            fd = self._fds.pop(pack_id, None)
        if fd is not None:
            os.close(fd)

    def close(self):
        for pack_id in list(self._fds):
            self.forget_pack(pack_id)
        for _, conn in self._conns:
            conn.close()
        self._conns.clear()
        self._local = threading.local()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- locks ------------------------------------------------------------
    def write_lock(self, on_wait=None):
        return flock(self.root / "write.lock", exclusive=True, on_wait=on_wait)

    def read_lock(self, on_wait=None):
        return flock(self.root / "compact.lock", exclusive=False, on_wait=on_wait)

    def compact_lock(self, on_wait=None):
        return flock(self.root / "compact.lock", exclusive=True, on_wait=on_wait)

    # -- reads ------------------------------------------------------------
    def has(self, cid: bytes) -> bool:
        return self.db.execute("SELECT 1 FROM chunks WHERE id=?", (cid,)).fetchone() is not None

    def location(self, cid: bytes):
        """(pack, offset, stored_len, raw_len, codec) or None."""
        return self.db.execute(
            "SELECT pack, offset, stored_len, raw_len, codec FROM chunks WHERE id=?",
            (cid,)).fetchone()

    def read_stored(self, cid: bytes, loc=None):
        """(codec, raw_len, stored bytes) exactly as kept on disk (header checked)."""
        loc = loc or self.location(cid)
        if loc is None:
            raise ChunkMissing(cid)
        pack, offset, stored_len, raw_len, codec = loc
        where = f"{packfile.pack_name(pack)} offset {offset}"
        try:
            fd = self._fd(pack)
        except FileNotFoundError:
            raise ChunkCorrupt(cid, "its pack file is missing", where) from None
        rcodec, rraw, stored = packfile.read_record(fd, offset, cid, stored_len, where)
        if rcodec != codec or rraw != raw_len:
            raise ChunkCorrupt(cid, "record header does not match the index", where)
        return codec, raw_len, stored

    def base_of(self, cid: bytes) -> bytes | None:
        r = self.db.execute("SELECT base FROM chunks WHERE id=?", (cid,)).fetchone()
        return bytes(r[0]) if r and r[0] is not None else None

    def open_stored(self, cid: bytes, codec: int, raw_len: int, stored, where: str = "",
                    scratch: int | None = None):
        """(payload codec, payload) of a record as read_stored returns it, opened if
        sealed (node/store/sealed.py open_payload; scratch: see there)."""
        if not codec & packfile.SEALED:
            return codec, stored
        return sealed.open_payload(self.key, cid, codec, raw_len, stored, where, scratch)

    def read(self, cid: bytes, loc=None, *, _depth: int = 0) -> bytes:
        """The chunk's plaintext, verified against its id (in the id scheme of its
        record: keyed under this node's key, or plain BLAKE3)."""
        loc = loc or self.location(cid)
        if loc is None:
            raise ChunkMissing(cid)
        where = f"{packfile.pack_name(loc[0])} offset {loc[1]}"
        if packfile.is_opaque(loc[4]):
            raise sealed.DataKeyNotHeld(
                f"chunk {cid.hex()[:16]} is another tenant's sealed record: this node holds "
                "it for them and cannot read it (it has not their data key)")
        flags, raw_len, stored = self.read_stored(cid, loc)
        # decoded before read returns: a reused buffer per depth (a delta reads its base
        # into the other one while its own payload waits)
        codec, stored = self.open_stored(cid, flags, raw_len, stored, where, scratch=_depth)
        base_plain = None
        if codec == packfile.CODEC_ZSTD_DELTA:
            base = delta.split_record(stored)[0]
            if _depth:
                raise ChunkCorrupt(cid, "a delta's base is itself a delta", where)
            try:
                base_plain = self.read(base, _depth=1)
            except (ChunkCorrupt, ChunkMissing) as exc:
                raise ChunkCorrupt(cid, f"its delta base is unreadable: {exc}", where) from None
        return decode_chunk(cid, codec, raw_len, stored, where, base_plain,
                            self.key if flags & packfile.KEYED else None,
                            check=not flags & packfile.FOREIGN)

    def check_opaque(self, cid: bytes, loc=None) -> int:
        """What a holder without the key can check of another tenant's sealed
        record (packfile.is_opaque): it reads back whole, and its sealed header
        claims a chunk of the index's codec and length. Returns the bytes read;
        ChunkCorrupt otherwise. Its content is proven to its owner by possession
        challenges over the sealed record (protocol/possession.py)."""
        loc = loc or self.location(cid)
        if loc is None:
            raise ChunkMissing(cid)
        where = f"{packfile.pack_name(loc[0])} offset {loc[1]}"
        codec, raw_len, stored = self.read_stored(cid, loc)
        try:
            h = sealing.peek_header(stored)
        except sealing.SealError as exc:
            raise ChunkCorrupt(cid, f"sealed record is malformed: {exc.reason}", where) from None
        if (h.kind != sealing.KIND_CHUNK or h.codec != packfile.inner(codec)
                or h.raw_len != raw_len):
            raise ChunkCorrupt(cid, "sealed record header does not match the index", where)
        return len(stored)

    def stats(self) -> dict:
        db = self.db
        n, stored, raw = db.execute(
            "SELECT COUNT(*), COALESCE(SUM(stored_len + ?), 0), COALESCE(SUM(raw_len), 0) "
            "FROM chunks", (packfile.HDR_LEN,)).fetchone()
        backups, logical = db.execute(
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM backups").fetchone()
        deltas, delta_raw = db.execute(
            "SELECT COUNT(*), COALESCE(SUM(raw_len), 0) FROM chunks WHERE base IS NOT NULL"
        ).fetchone()
        disk = sum(packfile.allocated_bytes(p) for p in self.packs_dir.glob("pack-*.dat"))
        return {"backups": backups, "unique_chunks": n, "unique_raw_bytes": raw,
                "delta_chunks": deltas, "delta_raw_bytes": delta_raw,
                "stored_bytes": stored, "pack_bytes_on_disk": disk,
                "logical_bytes": logical,
                "dedup_ratio": round(logical / raw, 3) if raw else None,
                "compression_ratio": round(raw / stored, 3) if stored else None,
                "reduction_ratio": round(logical / stored, 3) if stored else None}

    def writer(self, **kw):
        from hypersdk.node.store.writer import PackWriter
        return PackWriter(self, **kw)
