"""Parallel fixed-size chunking: read, zero-test, hash, dedup-test, compress.

The calling thread reads the image into a small ring of reusable buffers;
a thread pool does the CPU work (BLAKE3 and zstd release the GIL, so two
cores are used) and results come back in image order. Memory is bounded by
the ring: `depth` buffers of one chunk each plus their compressed outputs.
"""
from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from hypersdk.node.store.delta import MARGIN
from hypersdk.node.store.store import compress
from hypersdk.protocol.chunks import ZERO_ID, chunk_id, is_zero


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


@dataclass(slots=True)
class ScanStats:
    bytes_read: int = 0          # read from the source
    hole_bytes: int = 0          # chunks wholly in holes: recorded as zero, never read


def scan(src, chunk_size: int, *, has, level: int, generation=lambda: 0,
         deltas=None, workers: int | None = None, depth: int | None = None,
         stats: ScanStats | None = None):
    """Yield a Chunk per chunk of the image src, in order (src: an image source,
    e.g. node/sources/local.py ImageSource: size, is_hole(pos, n), read_into(buf,
    pos, n)).

    Reads are positional (src.read_into at each chunk's offset), so a hole
    probe never moves what is read, and stop at the size src recorded at open.
    `has(cid)` tells whether the store already holds a chunk (then it is not
    compressed); it is called from worker threads. `generation()` is read
    just before, and recorded in the Chunk (see PackWriter.put). `deltas`
    (a delta.DeltaSource) lets new chunks be stored as deltas against the
    previous version of the image. `stats` counts bytes read and skipped.
    """
    workers = workers or default_workers()
    depth = depth or max(4, workers * 4)
    stats = stats if stats is not None else ScanStats()

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

    size = src.size
    free = [bytearray(chunk_size) for _ in range(depth)]
    inflight: deque = deque()
    index, pos = 0, 0
    with ThreadPoolExecutor(workers, thread_name_prefix="chunker") as pool:
        try:
            while True:
                while free and pos < size and len(inflight) < depth:
                    n = min(chunk_size, size - pos)
                    if src.is_hole(pos, n):
                        # a hole in a sparse source: zero without reading it
                        inflight.append((Chunk(index, n, ZERO_ID), None))
                        stats.hole_bytes += n
                    else:
                        buf = free.pop()
                        try:
                            src.read_into(buf, pos, n)
                        except BaseException:
                            free.append(buf)
                            raise
                        stats.bytes_read += n
                        inflight.append((pool.submit(work, buf, n, index), buf))
                    index += 1
                    pos += n
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
