"""PackWriter: the single writer that appends chunk records and commits them.

Used under the store's write lock. Bytes go to the active pack at once;
index rows wait in `pending` until commit(), which first fdatasyncs the pack
and then inserts the rows in one SQLite transaction (see store.py for why).
"""
from __future__ import annotations

import errno
import os

from . import packfile


class PackWriter:
    def __init__(self, store, *, durable: bool = True, batch_bytes: int = 256 << 20,
                 fresh_pack: bool = False):
        self.store = store
        self.durable = durable
        self.batch_bytes = batch_bytes
        self.pending: dict[bytes, tuple] = {}
        self.pending_bytes = 0
        self.fd = None
        self._open_active(fresh_pack)

    # -- the active pack ----------------------------------------------------
    def _open_active(self, fresh: bool):
        db = self.store.db
        row = db.execute("SELECT id, end FROM packs ORDER BY id DESC LIMIT 1").fetchone()
        if (not fresh and row and row[1] < packfile.PACK_MAX
                and self.store.pack_path(row[0]).exists()):
            self.pack, self.end = row
            self.committed_end = self.end
            self.fd = os.open(self.store.pack_path(self.pack), os.O_WRONLY)
            # cut the torn tail an interrupted writer may have left
            if os.fstat(self.fd).st_size != self.end:
                os.ftruncate(self.fd, self.end)
        else:
            self._new_pack((row[0] + 1) if row else 1)

    def _new_pack(self, pack_id: int):
        self.pack, self.end, self.committed_end = pack_id, 0, 0
        self.fd = os.open(self.store.pack_path(pack_id),
                          os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)

    def _rotate(self):
        self.commit()
        os.close(self.fd)
        self._new_pack(self.pack + 1)

    # -- writing --------------------------------------------------------------
    def put(self, cid: bytes, raw_len: int, codec: int, data, *, move: bool = False) -> int:
        """Append one chunk record; returns bytes added (0 if already stored).

        move=True appends a record the index already has (gc compaction); the
        row is repointed by commit(replace=True).
        """
        if cid in self.pending or (not move and self.store.has(cid)):
            return 0
        if self.end >= packfile.PACK_MAX:
            self._rotate()
        hdr = packfile.header(cid, codec, raw_len, len(data))
        _write_all(self.fd, self.end, hdr, data)
        self.pending[cid] = (cid, self.pack, self.end, len(data), raw_len, codec)
        size = len(hdr) + len(data)
        self.end += size
        self.pending_bytes += size
        if self.pending_bytes >= self.batch_bytes:
            self.commit()
        return size

    def commit(self, extra=None, *, replace: bool = False):
        """Make pending records durable and visible; run extra(conn) in the same transaction."""
        if self.durable and self.pending:
            os.fdatasync(self.fd)
        db = self.store.db
        verb = "INSERT OR REPLACE" if replace else "INSERT OR IGNORE"
        with db:
            if self.pending:
                db.executemany(
                    f"{verb} INTO chunks(id, pack, offset, stored_len, raw_len, codec) "
                    "VALUES (?,?,?,?,?,?)", self.pending.values())
                db.execute("INSERT OR REPLACE INTO packs(id, end) VALUES (?,?)",
                           (self.pack, self.end))
            if extra is not None:
                extra(db)
        self.pending.clear()
        self.pending_bytes = 0
        self.committed_end = self.end

    def abort(self):
        """Drop what is not committed: cut the pack back to its committed end."""
        self.pending.clear()
        self.pending_bytes = 0
        if self.fd is not None:
            try:
                os.ftruncate(self.fd, self.committed_end)
            except OSError:
                pass            # the next writer cuts the tail on open
            self.end = self.committed_end

    def close(self):
        if self.fd is not None:
            if self.committed_end == 0:
                # a pack we created but never committed to holds nothing
                _unlink_quiet(self.store.pack_path(self.pack))
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None or self.pending:
            self.abort()
        self.close()


def _write_all(fd: int, offset: int, hdr: bytes, data):
    """Write hdr+data at offset (positional: never depends on the file position)."""
    bufs = [memoryview(hdr), memoryview(data)]
    while bufs:
        n = os.pwritev(fd, bufs, offset)
        offset += n
        if n == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        while bufs and n >= len(bufs[0]):
            n -= len(bufs[0])
            bufs.pop(0)
        if bufs and n:
            bufs[0] = bufs[0][n:]


def _unlink_quiet(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
