"""PackWriter: the single writer that appends chunk records and commits them.

Used under the store's write lock. Bytes go to the active pack at once;
index rows wait in `pending` until a commit, which first fdatasyncs the pack
and then inserts the rows in one SQLite transaction (see store.py for why).

Batch commits run in a background thread so the chunking pipeline never
stalls on fdatasync; at most one is in flight, and its rows stay visible to
`put` (in `committing`) until SQLite has them. The final commit (with the
manifest) is synchronous. `generation` counts hand-offs to a commit: a
chunk checked absent from the index at generation g is still absent while
the generation is g (only this writer adds rows), so put() need not ask the
index again.
"""
from __future__ import annotations

import errno
import os
from concurrent.futures import ThreadPoolExecutor

from hypersdk.node.store import delta, packfile
from hypersdk.node.store.pack_direct import DirectAppender, open_direct


class PackWriter:
    def __init__(self, store, *, durable: bool = True, batch_bytes: int = 256 << 20,
                 fresh_pack: bool = False, relocate: bool = False, direct: bool = False):
        """relocate=True: records appended for chunks the index already has
        (gc compaction); every commit repoints their rows.
        direct=True: appends go to the disk with O_DIRECT from one reused buffer,
        not through the page cache (node/store/pack_direct.py says why), where the
        filesystem supports it."""
        self.store = store
        self.durable = durable
        self.batch_bytes = batch_bytes
        self.relocate = relocate
        self.pending: dict[bytes, tuple] = {}
        self.pending_bytes = 0
        self.committing: dict[bytes, tuple] = {}
        self.generation = 0
        self._bg = None
        self._committer = None
        self.fd = None
        self.direct = direct
        self._dio: DirectAppender | None = None
        self._unsynced = False            # appended to _dio since its last sync_out
        self._open_active(fresh_pack)

    # -- the active pack ----------------------------------------------------
    def _open_active(self, fresh: bool):
        db = self.store.db
        row = db.execute("SELECT id, end FROM packs ORDER BY id DESC LIMIT 1").fetchone()
        if (not fresh and row and row[1] < packfile.PACK_MAX
                and self.store.pack_path(row[0]).exists()):
            self.pack, self.end = row
            self.committed_end = self.end
            self.fd = os.open(self.store.pack_path(self.pack), os.O_RDWR)
            # cut the torn tail an interrupted writer may have left
            if os.fstat(self.fd).st_size != self.end:
                os.ftruncate(self.fd, self.end)
            self._open_direct()
        else:
            self._new_pack((row[0] + 1) if row else 1)

    def _new_pack(self, pack_id: int):
        self.pack, self.end, self.committed_end = pack_id, 0, 0
        self.fd = os.open(self.store.pack_path(pack_id),
                          os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self._open_direct()

    def _open_direct(self):
        if self.direct:
            dfd = open_direct(self.store.pack_path(self.pack))
            if dfd is not None:
                self._dio = DirectAppender(self.fd, dfd, self.end)

    def _close_pack(self):
        if self._dio is not None:
            self._dio.close()
            self._dio = None
        os.close(self.fd)
        self.fd = None

    def _rotate(self):
        self.commit()
        self._close_pack()
        self._new_pack(self.pack + 1)

    # -- writing --------------------------------------------------------------
    def put(self, cid: bytes, raw_len: int, codec: int, data, *, base: bytes | None = None,
            checked_gen: int | None = None) -> int:
        """Append one chunk record; returns bytes added (0 if already stored).

        codec: the pack codec byte (packfile.py: a payload codec, with SEALED and
        KEYED when data is a sealed record: node/store/store.py seal_payload).
        base: the base id of a zstd delta (read from data when it is not sealed).
        checked_gen: the generation at which the caller saw cid absent from
        the index (then the index is not asked again).
        """
        if cid in self.pending or cid in self.committing:
            return 0
        if not self.relocate and checked_gen != self.generation and self.store.has(cid):
            return 0
        if self.end >= packfile.PACK_MAX:
            self._rotate()
        hdr = packfile.header(cid, codec, raw_len, len(data))
        if self._dio is not None:
            self._dio.append(hdr, data)
            self._unsynced = True
        else:
            _write_all(self.fd, self.end, hdr, data)
        if packfile.inner(codec) != packfile.CODEC_ZSTD_DELTA:
            base = None
        elif base is None:
            if packfile.is_sealed(codec):
                raise ValueError("a sealed delta record needs its base id")
            base = delta.split_record(data)[0]
        self.pending[cid] = (cid, self.pack, self.end, len(data), raw_len, codec, base)
        size = len(hdr) + len(data)
        self.end += size
        self.pending_bytes += size
        if self.pending_bytes >= self.batch_bytes:
            self._commit_in_background()
        return size

    def _take_pending(self) -> dict:
        if self._unsynced:                # the records must be in the file first
            self._dio.sync_out()
            self._unsynced = False
        rows = self.pending
        self.pending = {}
        self.pending_bytes = 0
        self.generation += 1
        return rows

    def _commit_rows(self, rows: dict, end: int, extra=None):
        """fdatasync, then insert rows (+ extra) in one transaction."""
        if self.durable and rows:
            os.fdatasync(self.fd)
        db = self.store.db
        verb = "INSERT OR REPLACE" if self.relocate else "INSERT OR IGNORE"
        with db:
            if rows:
                db.executemany(
                    f"{verb} INTO chunks(id, pack, offset, stored_len, raw_len, codec, base) "
                    "VALUES (?,?,?,?,?,?,?)", rows.values())
                db.execute("INSERT OR REPLACE INTO packs(id, end) VALUES (?,?)",
                           (self.pack, end))
            if extra is not None:
                extra(db)
        self.committed_end = end

    def _commit_in_background(self):
        self._wait()
        end = self.end
        self.committing = rows = self._take_pending()
        if self._committer is None:
            self._committer = ThreadPoolExecutor(1, thread_name_prefix="commit")

        def run():
            self._commit_rows(rows, end)
            self.committing = {}

        self._bg = self._committer.submit(run)

    def commit_in_background(self) -> bool:
        """Hand the pending records to the commit thread now (before batch_bytes
        of them piled up) unless a batch commit is still in flight: then do
        nothing and return False. Never waits (a fetch commits by time as well
        as by bytes: node/exchange/chunk_source.py StoreSink)."""
        if not self.pending or (self._bg is not None and not self._bg.done()):
            return False
        self._commit_in_background()
        return True

    def _wait(self):
        """Wait for the in-flight batch commit; re-raise its error."""
        bg, self._bg = self._bg, None
        if bg is not None:
            bg.result()

    def commit(self, extra=None):
        """Make every pending record durable and visible; run extra(conn) in
        the same transaction. Synchronous."""
        self._wait()
        end = self.end
        rows = self.committing = self._take_pending()
        self._commit_rows(rows, end, extra)
        self.committing = {}

    def abort(self):
        """Drop what is not committed: cut the pack back to its committed end."""
        try:
            self._wait()
        except Exception:
            pass                # that batch is not committed: cut it off too
        self.pending = {}
        self.committing = {}
        self.pending_bytes = 0
        if self.fd is not None:
            try:
                os.ftruncate(self.fd, self.committed_end)
            except OSError:
                pass            # the next writer cuts the tail on open
            self.end = self.committed_end
            if self._dio is not None:
                self._unsynced = False
                try:
                    self._dio.reset(self.committed_end)
                except OSError:
                    self._close_pack()     # unusable; the next writer cuts the tail

    def close(self):
        if self._committer is not None:
            self._committer.shutdown(wait=True)
            self._committer = None
        if self.fd is not None:
            if self.committed_end == 0:
                # a pack we created but never committed to holds nothing
                _unlink_quiet(self.store.pack_path(self.pack))
            self._close_pack()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None or self.pending or self._bg is not None:
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
