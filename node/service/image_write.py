"""Writing an image: the output file and positional writes, O_DIRECT where it works.

Used by restore (node/service/restore.py), the staged network restore
(node/service/restore_staged.py) and device restores (node/service/restore_target.py). Every
write is positional (pwrite at the chunk's offset), so writers in several
threads never share a file position. O_DIRECT writes go from page-aligned
buffers (a per-thread mmap), padded to ALIGN; the caller truncates the file to
the image size at the end.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import stat
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor

from hypersdk.node.store import catalog
from hypersdk.protocol.chunks import ZERO_ID


def block_size(fd: int) -> int:
    """The device's logical block size (BLKSSZGET), 0 if unknown."""
    import struct
    try:
        return struct.unpack("i", fcntl.ioctl(fd, 0x1268, b"\0\0\0\0"))[0]
    except OSError:
        return 0


def set_direct(fd: int) -> bool:
    """Turn O_DIRECT on for fd; False where the file system refuses it."""
    if not hasattr(os, "O_DIRECT"):
        return False
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_DIRECT)
        return True
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        return False


def fsync_dir(path: str) -> None:
    """Make a rename in directory path durable (where the file system can)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def open_out(path: str, try_direct: bool = True):
    """(fd, direct) of a fresh partial file at path, mode 0600, locked (flock, held
    until the fd closes: a locked partial is live); O_DIRECT when the filesystem
    takes it (tmpfs does not).

    Writing a fresh multi-GB file through the page cache costs more kernel
    time than everything else in a restore on this kind of machine (page
    allocation + copy); direct I/O from aligned buffers skips it.
    """
    for _ in range(64):      # bounded: each retry means another writer renamed that name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o600)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EINVAL, "not a regular file", path)
            fcntl.flock(fd, fcntl.LOCK_EX)       # waits only for a writer of this name
            try:
                cur = os.lstat(path)
            except FileNotFoundError:
                cur = None
            if cur is None or (cur.st_dev, cur.st_ino) != (st.st_dev, st.st_ino):
                os.close(fd)                     # renamed (or removed) meanwhile: again
                continue
            os.ftruncate(fd, 0)
            os.fchmod(fd, 0o600)
            if try_direct and set_direct(fd):
                try:            # some filesystems accept the flag but refuse the writes
                    os.pwrite(fd, memoryview(aligned(ALIGN))[:ALIGN], 0)
                    os.ftruncate(fd, 0)
                    return fd, True
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    fcntl.fcntl(fd, fcntl.F_SETFL,
                                fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
            return fd, False
        except BaseException:
            os.close(fd)
            raise
    raise OSError(errno.EBUSY, "other restores keep replacing it", path)


_tls = threading.local()
memmove = ctypes.memmove


def aligned(size: int) -> mmap.mmap:
    """A per-thread page-aligned buffer of at least size bytes (for O_DIRECT)."""
    buf = getattr(_tls, "buf", None)
    if buf is None or len(buf) < size:
        buf = _tls.buf = mmap.mmap(-1, size)
    return buf


def pwrite_all(fd: int, data, offset: int):
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def write_chunk(store, fd: int, direct: bool, cid: bytes, offset: int) -> int:
    """Read, verify and write one chunk at its offset (runs in a worker thread)."""
    return write_plain(fd, direct, store.read(cid), offset)


def write_plain(fd: int, direct: bool, data, offset: int) -> int:
    if direct:
        padded = -(-len(data) // ALIGN) * ALIGN       # the last chunk may be short
        buf = aligned(padded)
        buf[:len(data)] = data
        if padded > len(data):
            buf[len(data):padded] = bytes(padded - len(data))
        pwrite_all(fd, memoryview(buf)[:padded], offset)
    else:
        pwrite_all(fd, data, offset)
    return len(data)


ALIGN = 4096


def write_zeros(fd: int, direct: bool, length: int, offset: int) -> int:
    """Write length zero bytes at offset (a zero chunk on a device), from a
    per-thread page-aligned buffer that is never written to (so stays zero)."""
    padded = -(-length // ALIGN) * ALIGN if direct else length
    buf = getattr(_tls, "zeros", None)
    if buf is None or len(buf) < padded:
        buf = _tls.zeros = mmap.mmap(-1, max(padded, ALIGN))
    view = memoryview(buf)[:padded]
    try:
        pwrite_all(fd, view, offset)
    finally:
        view.release()
    return length


def write_image(store, m, fd: int, direct: bool, progress, workers: int, skip=frozenset(),
                 zero_fill: bool = False):
    """Workers read, verify and write chunks (any order, each at its offset);
    returns (zero chunks, chunks). zero_fill: write zero chunks as zeros (a
    device), instead of leaving them holes (a fresh file)."""
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
                    if zero_fill:
                        inflight.append(pool.submit(write_zeros, fd, direct,
                                                    m.chunk_len(index), index * m.chunk_size))
                        if len(inflight) >= depth:
                            drain_one()
                    elif progress:
                        progress(m.chunk_len(index))
                    continue
                if index in skip:             # written by the network fetch (StagedImage)
                    if progress:
                        progress(m.chunk_len(index))
                    continue
                inflight.append(pool.submit(write_chunk, store, fd, direct, cid,
                                            index * m.chunk_size))
                if len(inflight) >= depth:
                    drain_one()
            while inflight:
                drain_one()
        finally:
            for fut in inflight:
                fut.cancel()
    return zeros, n
