"""DirectAppender: a pack's appends written with O_DIRECT from one reused buffer.

Why. A buffered write puts every byte into newly allocated page-cache pages, and
their first touch is what costs: on our test VM, writing 700 MB into the page
cache measured 0.11-0.12 CPU-s at some times and 0.7-1.5 CPU-s at others (likely
pages the host had taken back through virtio-balloon free page reporting; see
BENCHMARKS.md, swarm section; bench/bench_write_paths.py pagecache). A fetch
that stores what it downloads (node/chunk_source.StoreSink) wrote ~660 MB that
way per 2 GiB restore. Here the records are copied into one page-aligned buffer
that stays mapped for the writer's life, and full 4 KiB blocks go to the disk
straight from it (O_DIRECT: no page cache, ~0.03 CPU-s per 700 MB).

Layout. The buffer mirrors the pack from `base` (4 KiB-aligned) to the pack's
logical end: [base, base + fill). append() copies a record in and writes the
aligned prefix once CHUNK bytes are full, keeping the partial last block.
sync_out() (before every commit) also writes that partial block, zero-padded,
and cuts the file back to its logical end: the pack's bytes are then on the
device (the commit's fdatasync makes them and the size durable) and the file
looks exactly as a buffered writer leaves it. The next write of the partial
block rewrites its committed bytes with the same values.

The pack format, the commit rule (pack bytes durable before the index rows
that point at them) and the readers are unchanged; readers only ever read
committed records, which sync_out has written.
"""
from __future__ import annotations

import errno
import mmap
import os

ALIGN = 4096
CHUNK = 4 << 20              # bytes written per O_DIRECT write in the steady state
CAPACITY = CHUNK + ALIGN     # the buffer: CHUNK plus the kept partial block


def open_direct(path) -> int | None:
    """An O_DIRECT write descriptor for path, or None where the filesystem refuses
    O_DIRECT (EINVAL: tmpfs before Linux 6.6, some network filesystems): the
    caller writes buffered."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        return os.open(path, os.O_WRONLY | flag)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return None
        raise


class DirectAppender:
    def __init__(self, fd: int, dfd: int, end: int):
        """fd: the pack opened for reading and writing (buffered); dfd: the same
        file opened with O_DIRECT; end: the pack's logical end."""
        self.fd = fd
        self.dfd = dfd
        self._buf = mmap.mmap(-1, CAPACITY)
        self._view = memoryview(self._buf)
        self.reset(end)

    def reset(self, end: int) -> None:
        """Mirror the pack as it is on disk up to `end` (at open, after an abort)."""
        self.base = end - end % ALIGN
        self.fill = end - self.base
        if self.fill:
            got = os.preadv(self.fd, [self._view[:self.fill]], self.base)
            if got != self.fill:
                raise OSError(errno.EIO, f"pack shorter than its committed end {end}")

    @property
    def end(self) -> int:
        return self.base + self.fill

    def append(self, *parts) -> None:
        """Copy parts (bytes-like) to the pack's end."""
        for p in parts:
            v = memoryview(p).cast("B")
            while len(v):
                room = CAPACITY - self.fill
                if room == 0:
                    self._write_full()
                    continue
                n = min(room, len(v))
                self._view[self.fill:self.fill + n] = v[:n]
                self.fill += n
                v = v[n:]
        if self.fill >= CHUNK:
            self._write_full()

    def _write_full(self) -> None:
        """Write the whole blocks; keep the partial one at the buffer's start."""
        full = self.fill - self.fill % ALIGN
        if full == 0:
            return
        _pwrite_all(self.dfd, self._view[:full], self.base)
        tail = self.fill - full
        if tail:
            self._view[:tail] = self._view[full:self.fill]
        self.base += full
        self.fill = tail

    def sync_out(self) -> None:
        """Put every appended byte in the file (not yet durable: the commit's
        fdatasync does that) and cut the file to the logical end."""
        self._write_full()
        if self.fill:
            padded = ALIGN
            self._view[self.fill:padded] = bytes(padded - self.fill)
            _pwrite_all(self.dfd, self._view[:padded], self.base)
        os.ftruncate(self.fd, self.end)

    def close(self) -> None:
        os.close(self.dfd)
        try:
            self._view.release()
            self._buf.close()
        except BufferError:   # a slice still held by a pending exception's frames:
            pass              # the buffer is freed with the last of them


def _pwrite_all(fd: int, view, offset: int) -> None:
    """Write all of view (a multiple of ALIGN long, from an aligned buffer) at offset."""
    while len(view):
        n = os.pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if n % ALIGN:                     # a short O_DIRECT write: finish it aligned
            n -= n % ALIGN
            if n == 0:
                raise OSError(errno.EIO, "short O_DIRECT write")
        view = view[n:]
        offset += n
