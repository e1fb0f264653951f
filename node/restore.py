"""Restoring a backup from the local store into a sparse image file.

The image is written to a temporary file next to OUT and renamed over it
only when every chunk has been read, verified and written and the data is
synced, so OUT is either absent (or untouched) or complete. All-zero chunks
are never written: they stay holes in the sparse output.
"""
from __future__ import annotations

import ctypes
import errno
import mmap
import os
import queue
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from protocol.chunks import ZERO_ID

from . import catalog
from .chunker import default_workers
from .errors import UserError


@dataclass
class RestoreResult:
    manifest_id: bytes
    out: str
    size: int
    chunks: int
    zero_chunks: int
    seconds: float

    def to_json(self) -> dict:
        return {"manifest": self.manifest_id.hex(), "out": self.out, "bytes": self.size,
                "chunks": self.chunks, "zero_chunks": self.zero_chunks,
                "seconds": round(self.seconds, 3)}


class StagedImage:
    """An image written while its chunks arrive from the network (a network restore:
    node/replication.py), which restore() then completes instead of starting over.

    stage(out, manifest_id) creates the temporary file restore() would create and
    registers it under OUT; the fetch hands it every verified new chunk, which is
    written at each position the chunk has in the image; restore(store, ref, OUT)
    takes the stage if it is for the same manifest, writes only the positions not
    written yet (read and verified from the store as usual), syncs and renames. OUT
    stays untouched until then; discard() (or a restore of anything else) removes
    the temporary file.

    Two ways in, both from worker threads:
      write_many([(cid, plain), ...])     writes at once (synchronous);
      buf = buffer(n); ...; submit(cid, buf, n)
                                          the fetch's verifiers decode a chunk straight
                                          into a page-aligned buffer of the stage's
                                          pool and, once it is verified, submit it;
                                          one of WRITERS writer threads writes it
                                          (O_DIRECT with no copy) and returns the
                                          buffer to the pool.
                                          buffer() blocks while all POOL_BYTES are
                                          queued (backpressure), so verifying never
                                          waits for the disk unless the disk is behind.
                                          release(buf) returns an unused buffer.
    finish() waits for the queued writes and stops the writers, raising the first
    error (restore() calls it before it takes the file; the fetch before it ends).

    Why several writers: an O_DIRECT write returns when the device has the data, so
    one writer keeps one write in flight. In a 2 GiB 4-seed restore on this VM that
    one writer spent 1.1-1.4 s waiting on 1.3 GB of writes while the verifiers,
    starved of pool buffers, waited 0.4-1.0 s for it (the same writes take 0.54 s
    on an idle machine: the VM's disk slows while its vCPUs are busy). With 2-4
    writes in flight the restore took 1.45 s on average instead of 1.59 s
    (BENCHMARKS.md, swarm section). Chunks never overlap in the image, so the
    writers need no ordering among themselves."""

    POOL_BYTES = 24 << 20
    WRITERS = 3

    def __init__(self, out: str, manifest_id: bytes):
        self.out = os.path.abspath(out)
        self.manifest_id = manifest_id
        parent = os.path.dirname(self.out)
        self.tmp = os.path.join(parent, f".{os.path.basename(self.out)}"
                                f".hypersdk-partial-{os.getpid()}-stage")
        self.fd, self.direct = _open_out(self.tmp)
        self.written: set[int] = set()
        self.positions: dict[bytes, list[int]] = {}
        self.chunk_size = 0
        self.size = 0
        self.capacity = 0                 # bytes a pool buffer holds (chunk_size + 1)
        self._lock = threading.Lock()
        self._free: queue.SimpleQueue | None = None
        self._queue: queue.SimpleQueue | None = None
        self._writers: list[threading.Thread] = []
        self._closed = False
        self._error: BaseException | None = None

    def begin(self, m, ids) -> None:
        """The manifest and every position's chunk id (ZERO_ID for zero chunks)."""
        self.chunk_size, self.size = m.chunk_size, m.size
        pos: dict[bytes, list[int]] = {}
        for i, cid in enumerate(ids):
            if cid != ZERO_ID:
                pos.setdefault(cid, []).append(i)
        self.positions = pos

    def write_many(self, items) -> None:
        """Write verified plaintexts at their positions (a worker thread)."""
        for cid, plain in items:
            if plain is None:
                continue
            for i in self.positions.get(cid, ()):
                _write_plain(self.fd, self.direct, plain, i * self.chunk_size)
                with self._lock:
                    self.written.add(i)

    # -- the pool and the writer thread

    def _start(self) -> None:
        with self._lock:
            if self._writers or self._closed or self.fd is None:
                return
            self.capacity = self.chunk_size + 1
            size = -(-(self.capacity) // _ALIGN) * _ALIGN
            self._free = queue.SimpleQueue()
            for _ in range(max(4, self.POOL_BYTES // size)):
                self._free.put(mmap.mmap(-1, size))
            self._queue = queue.SimpleQueue()
            self._writers = [threading.Thread(target=self._write_loop, daemon=True,
                                              name=f"stage-writer-{i}")
                             for i in range(self.WRITERS)]
            for w in self._writers:
                w.start()

    def buffer(self, n: int):
        """A page-aligned buffer for a chunk of n <= capacity bytes (blocks while
        every buffer is queued for writing); RuntimeError once the stage is closed."""
        if not self._writers:
            self._start()
        if self._error is not None:
            raise self._error
        if self._closed or self._free is None:
            raise RuntimeError("the staged image is closed")
        if n > self.capacity - 1:
            raise ValueError(f"a {n}-byte chunk does not fit the stage's buffers")
        buf = self._free.get()
        if buf is None:                   # closed: pass the sentinel on to other waiters
            self._free.put(None)
            raise RuntimeError("the staged image is closed")
        return buf

    def release(self, buf) -> None:
        self._free.put(buf)

    def fill(self, buf, data) -> None:
        """Copy data (a verified raw chunk, bytes) into the start of a pool buffer,
        with the GIL released (a foreign-function memmove), unlike a slice copy."""
        n = len(data)
        if n > len(buf):
            raise ValueError("the data does not fit the buffer")
        _memmove(ctypes.addressof(ctypes.c_char.from_buffer(buf)), data, n)

    def submit(self, cid: bytes, buf, n: int) -> None:
        """Queue buf[:n], a verified plaintext from buffer(), for writing at cid's
        positions; the buffer goes back to the pool once written (a stage closed
        meanwhile leaves those positions to restore())."""
        if self._closed:
            self._free.put(buf)
            return
        self._queue.put((cid, buf, n))

    def _write_loop(self) -> None:
        q = self._queue
        while True:
            item = q.get()
            if item is None:
                return
            cid, buf, n = item
            try:
                if self._error is None:
                    self.write_aligned(cid, buf, n)
            except BaseException as exc:      # reported by buffer() and finish()
                with self._lock:
                    if self._error is None:
                        self._error = exc
            finally:
                self._free.put(buf)

    def finish(self) -> None:
        """Wait for every submitted write, stop the writers; raise the first error."""
        with self._lock:
            self._closed = True
            writers, self._writers = self._writers, []
        if writers:
            for _ in writers:             # one stop mark each, after every queued write
                self._queue.put(None)
            for w in writers:
                w.join()
            self._free.put(None)          # a buffer() still waiting fails instead
        if self._error is not None:
            raise self._error

    def write_aligned(self, cid: bytes, buf, n: int) -> None:
        """Write a verified plaintext held at buf[:n] at its positions. buf is
        page-aligned (an mmap) with room for n rounded up to a page: O_DIRECT writes
        go straight from it (its bytes past n are zeroed), no copy."""
        if self.direct:
            padded = -(-n // _ALIGN) * _ALIGN
            if padded > n:
                buf[n:padded] = bytes(padded - n)
            view = memoryview(buf)[:padded]
        else:
            view = memoryview(buf)[:n]
        try:
            for i in self.positions.get(cid, ()):
                _pwrite_all(self.fd, view, i * self.chunk_size)
                with self._lock:
                    self.written.add(i)
        finally:
            view.release()

    def discard(self) -> None:
        _STAGED.pop(self.out, None)
        try:
            self.finish()
        except BaseException:
            pass                          # discarded anyway
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)


_STAGED: dict[str, StagedImage] = {}


def stage(out: str, manifest_id: bytes) -> StagedImage:
    """A StagedImage for OUT, registered for the restore(…, OUT) that follows."""
    old = _STAGED.pop(os.path.abspath(out), None)
    if old is not None:
        old.discard()
    st = StagedImage(out, manifest_id)
    _STAGED[st.out] = st
    return st


def discard_staged(out: str) -> None:
    """Remove OUT's stage if nobody took it."""
    st = _STAGED.pop(os.path.abspath(out), None)
    if st is not None:
        st.discard()


def restore(store, ref: str, out: str, *, force: bool = False, progress=None,
            on_wait=None, workers: int | None = None,
            direct: bool | None = None) -> RestoreResult:
    """direct: None = O_DIRECT where the filesystem takes it, False = buffered."""
    staged = _STAGED.pop(os.path.abspath(out), None)
    try:
        return _restore(store, ref, out, force, progress, on_wait, workers, direct, staged)
    finally:
        if staged is not None:
            staged.discard()           # used (fd taken, file renamed) or not: cleaned up


def _restore(store, ref, out, force, progress, on_wait, workers, direct, staged):
    t0 = time.perf_counter()
    with store.read_lock(on_wait):
        b = catalog.resolve(store, ref)
        m = catalog.load_manifest(store, b.manifest_id)
        if os.path.lexists(out) and not force:
            raise UserError(f"{out} exists; use --force to overwrite it")
        if os.path.isdir(out):
            raise UserError(f"{out} is a directory")
        parent = os.path.dirname(os.path.abspath(out))
        if not os.path.isdir(parent):
            raise UserError(f"{parent}: no such directory")
        skip: set[int] = set()
        if staged is not None and staged.manifest_id == m.id and staged.fd is not None:
            try:
                staged.finish()               # its queued writes are in the file
            except OSError as exc:
                raise UserError(f"cannot write {out}: {exc.strerror}") from None
            tmp, fd, direct = staged.tmp, staged.fd, staged.direct
            staged.fd = None                  # ours now
            skip = staged.written
        else:
            tmp = os.path.join(parent, f".{os.path.basename(out)}.hypersdk-partial-{os.getpid()}")
            try:
                fd, direct = _open_out(tmp, direct is not False)
            except OSError as exc:
                raise UserError(f"cannot write {out}: {exc.strerror}") from None
        try:
            zeros, n = _write_image(store, m, fd, direct, progress,
                                    workers or default_workers(), skip)
            os.ftruncate(fd, m.size)
            os.fdatasync(fd)
            os.close(fd)
            fd = None
            os.replace(tmp, out)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise UserError(f"no space left to write {out}; nothing written") from None
            raise
        finally:
            if fd is not None:
                os.close(fd)
            if os.path.exists(tmp):
                os.unlink(tmp)
    return RestoreResult(m.id, out, m.size, n, zeros, time.perf_counter() - t0)


def _open_out(path: str, try_direct: bool = True):
    """(fd, direct): O_DIRECT when the filesystem takes it (tmpfs does not).

    Writing a fresh multi-GB file through the page cache costs more kernel
    time than everything else in a restore on this kind of machine (page
    allocation + copy); direct I/O from aligned buffers skips it.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    if try_direct and hasattr(os, "O_DIRECT"):
        try:
            fd = os.open(path, flags | os.O_DIRECT, 0o600)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
        else:
            try:            # some filesystems accept the flag but refuse the writes
                os.pwrite(fd, memoryview(_aligned(_ALIGN))[:_ALIGN], 0)
                os.ftruncate(fd, 0)
                return fd, True
            except OSError as exc:
                os.close(fd)
                if exc.errno != errno.EINVAL:
                    raise
    return os.open(path, flags, 0o600), False


_tls = threading.local()
_memmove = ctypes.memmove


def _aligned(size: int) -> mmap.mmap:
    """A per-thread page-aligned buffer of at least size bytes (for O_DIRECT)."""
    buf = getattr(_tls, "buf", None)
    if buf is None or len(buf) < size:
        buf = _tls.buf = mmap.mmap(-1, size)
    return buf


def _pwrite_all(fd: int, data, offset: int):
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _write_chunk(store, fd: int, direct: bool, cid: bytes, offset: int) -> int:
    """Read, verify and write one chunk at its offset (runs in a worker thread)."""
    return _write_plain(fd, direct, store.read(cid), offset)


def _write_plain(fd: int, direct: bool, data, offset: int) -> int:
    if direct:
        padded = -(-len(data) // _ALIGN) * _ALIGN       # the last chunk may be short
        buf = _aligned(padded)
        buf[:len(data)] = data
        if padded > len(data):
            buf[len(data):padded] = bytes(padded - len(data))
        _pwrite_all(fd, memoryview(buf)[:padded], offset)
    else:
        _pwrite_all(fd, data, offset)
    return len(data)


_ALIGN = 4096


def _write_image(store, m, fd: int, direct: bool, progress, workers: int, skip=frozenset()):
    """Workers read, verify and write chunks (any order, each at its offset);
    returns (zero chunks, chunks)."""
    depth = workers * 4
    zeros = n = 0
    inflight: deque = deque()

    def drain_one():
        size = inflight.popleft().result()
        if progress:
            progress(size)

    with ThreadPoolExecutor(workers, thread_name_prefix="restore") as pool:
        try:
            for index, cid in catalog.iter_chunk_ids(store, m):
                n += 1
                if cid == ZERO_ID:
                    zeros += 1
                    if progress:
                        progress(m.chunk_len(index))
                    continue
                if index in skip:             # written by the network fetch (StagedImage)
                    if progress:
                        progress(m.chunk_len(index))
                    continue
                inflight.append(pool.submit(_write_chunk, store, fd, direct, cid,
                                            index * m.chunk_size))
                if len(inflight) >= depth:
                    drain_one()
            while inflight:
                drain_one()
        finally:
            for fut in inflight:
                fut.cancel()
    return zeros, n
