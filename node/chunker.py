"""Parallel fixed-size chunking: read, zero-test, hash, dedup-test, compress.

The calling thread reads the image into a small ring of reusable buffers;
a thread pool does the CPU work (BLAKE3 and zstd release the GIL, so two
cores are used) and results come back in image order. Memory is bounded by
the ring: `depth` buffers of one chunk each plus their compressed outputs.
"""
from __future__ import annotations

import errno
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from protocol.chunks import ZERO_ID, chunk_id, is_zero

from .delta import MARGIN
from .store import compress


@dataclass(slots=True)
class Chunk:
    index: int
    length: int
    cid: bytes                  # ZERO_ID for an all-zero chunk
    codec: int = 0
    data: bytes | None = None   # stored form; None if zero or already in the store
    gen: int = 0                # writer generation at which `has` said absent


def default_workers() -> int:
    return max(1, min(8, len(os.sched_getaffinity(0))))


class SourceReadError(Exception):
    """Reading the image failed (distinguishes source errors from store errors)."""

    def __init__(self, exc: OSError):
        self.exc = exc
        super().__init__(exc.strerror or str(exc))


def _fill(f, buf: bytearray) -> int:
    """Read until buf is full or EOF; returns the byte count."""
    view = memoryview(buf)
    got = 0
    while got < len(buf):
        try:
            n = f.readinto(view[got:])
        except OSError as exc:
            raise SourceReadError(exc) from exc
        if not n:
            break
        got += n
    return got


def scan(f, chunk_size: int, *, has, level: int, generation=lambda: 0, deltas=None,
         workers: int | None = None, depth: int | None = None):
    """Yield a Chunk per chunk of the open binary file f, in order.

    `has(cid)` tells whether the store already holds a chunk (then it is not
    compressed); it is called from worker threads. `generation()` is read
    just before, and recorded in the Chunk (see PackWriter.put). `deltas`
    (a delta.DeltaSource) lets new chunks be stored as deltas against the
    previous version of the image.
    """
    workers = workers or default_workers()
    depth = depth or max(4, workers * 4)

    def work(buf: bytearray, n: int, index: int) -> Chunk:
        view = buf if n == len(buf) else memoryview(buf)[:n]
        if is_zero(view):
            return Chunk(index, n, ZERO_ID)
        cid = chunk_id(view)
        gen = generation()
        if has(cid):
            return Chunk(index, n, cid)
        best = deltas.try_compress(index, view) if deltas else None
        codec, data = compress(view, level)
        if best:
            won = len(best[1]) < MARGIN * len(data)
            deltas.policy.record(won)
            if won:
                codec, data = best
        return Chunk(index, n, cid, codec, data, gen)

    free = [bytearray(chunk_size) for _ in range(depth)]
    inflight: deque = deque()
    holes = _Holes(f)
    index, pos, eof = 0, 0, False
    with ThreadPoolExecutor(workers, thread_name_prefix="chunker") as pool:
        try:
            while True:
                while free and not eof and len(inflight) < depth:
                    if holes.is_hole(pos, chunk_size):
                        # a hole in a sparse source: zero without reading it
                        n = min(chunk_size, holes.size - pos)
                        inflight.append((Chunk(index, n, ZERO_ID), None))
                        pos += n
                        index += 1
                        f.seek(pos)
                        eof = pos >= holes.size
                        continue
                    buf = free.pop()
                    n = _fill(f, buf)
                    if n == 0:
                        eof = True
                        free.append(buf)
                        break
                    inflight.append((pool.submit(work, buf, n, index), buf))
                    index += 1
                    pos += n
                    if n < chunk_size:
                        eof = True
                if not inflight:
                    return
                item, buf = inflight.popleft()
                if buf is None:
                    yield item
                    continue
                chunk = item.result()
                free.append(buf)
                yield chunk
        finally:
            for item, buf in inflight:
                if buf is not None:
                    item.cancel()


class _Holes:
    """Finds chunks that lie wholly in a hole of a sparse file (SEEK_DATA)."""

    def __init__(self, f):
        self.fd = f.fileno()
        self.size = os.fstat(self.fd).st_size
        self.next_data = 0            # no data before this offset
        self.enabled = hasattr(os, "SEEK_DATA") and self.size > 0

    def is_hole(self, pos: int, length: int) -> bool:
        if not self.enabled or pos >= self.size:
            return False
        if pos >= self.next_data:
            try:
                self.next_data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:          # only a hole from pos to the end
                    self.next_data = self.size
                else:                                 # not supported here: read everything
                    self.enabled = False
                    return False
        return self.next_data >= min(pos + length, self.size)
