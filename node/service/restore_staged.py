"""Staging a restore's image while its chunks arrive from the network.

node/service/replication.py stages OUT before a network restore fetches; the fetch
writes each verified chunk into the staged temporary file as it arrives, and
restore() (node/service/restore.py) then takes the stage and writes only what is left.
"""
from __future__ import annotations

import ctypes
import errno
import mmap
import os
import queue
import stat
import threading

from hypersdk.node.service.image_write import ALIGN, memmove, open_out, pwrite_all, write_plain
from hypersdk.node.service.restore_partials import PartialRegistry
from hypersdk.protocol.chunks import ZERO_ID


class StagedImage:
    """An image written while its chunks arrive from the network (a network restore:
    node/service/replication.py), which restore() then completes instead of starting over.

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

    def __init__(self, out: str, manifest_id: bytes, data_dir=None):
        self.out = os.path.abspath(out)
        self.manifest_id = manifest_id
        parent = os.path.dirname(self.out)
        self.tmp = os.path.join(parent, f".{os.path.basename(self.out)}"
                                f".hypersdk-partial-{os.getpid()}-stage")
        self.registry = PartialRegistry(data_dir) if data_dir is not None else None
        if self.registry is not None:
            self.registry.add(self.tmp)   # before the file exists: a crash leaves a record
        try:
            self.fd, self.direct = open_out(self.tmp)
        except BaseException:
            if self.registry is not None:
                self.registry.remove(self.tmp)
            raise
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
                write_plain(self.fd, self.direct, plain, i * self.chunk_size)
                with self._lock:
                    self.written.add(i)

    # -- the pool and the writer thread

    def _start(self) -> None:
        with self._lock:
            if self._writers or self._closed or self.fd is None:
                return
            self.capacity = self.chunk_size + 1
            size = -(-(self.capacity) // ALIGN) * ALIGN
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
        memmove(ctypes.addressof(ctypes.c_char.from_buffer(buf)), data, n)

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
            padded = -(-n // ALIGN) * ALIGN
            if padded > n:
                buf[n:padded] = bytes(padded - n)
            view = memoryview(buf)[:padded]
        else:
            view = memoryview(buf)[:n]
        try:
            for i in self.positions.get(cid, ()):
                pwrite_all(self.fd, view, i * self.chunk_size)
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
            if os.path.exists(self.tmp):  # still ours (locked): nobody else removes it
                os.unlink(self.tmp)
            os.close(self.fd)
            self.fd = None
        if self.registry is not None:
            self.registry.remove(self.tmp)


_STAGED: dict[str, StagedImage] = {}


def stage(out: str, manifest_id: bytes, data_dir=None) -> StagedImage:
    """A StagedImage for OUT, registered for the restore(…, OUT) that follows.
    data_dir: record the temporary file in that data dir's partials registry (so
    gc can remove it if this process dies); restore() records it otherwise.
    OSError if OUT exists and is not a regular file (a device is written in
    place, a symlink or anything else is refused: restore() says why)."""
    try:
        st = os.lstat(out)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file: no staged image", out)
    old = _STAGED.pop(os.path.abspath(out), None)
    if old is not None:
        old.discard()
    st = StagedImage(out, manifest_id, data_dir)
    _STAGED[st.out] = st
    return st


def discard_staged(out: str) -> None:
    """Remove OUT's stage if nobody took it."""
    st = _STAGED.pop(os.path.abspath(out), None)
    if st is not None:
        st.discard()
