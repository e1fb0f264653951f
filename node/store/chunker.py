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
from hypersdk.node.store.packfile import CODEC_ZSTD_DELTA
from hypersdk.node.store.sealed import seal_payload
from hypersdk.node.store.store import compress
from hypersdk.protocol.chunks import ID_LEN, ZERO_ID, is_zero
from hypersdk.protocol.ids import id_of
from hypersdk.protocol.sealing import KIND_CHUNK, RECORD_OVERHEAD


@dataclass(slots=True)
class Chunk:
    index: int
    length: int
    cid: bytes                  # ZERO_ID for an all-zero chunk
    codec: int = 0              # pack codec (packfile.py: with SEALED | KEYED when sealed)
    data: bytes | None = None   # stored form; None if zero or already in the store
    gen: int = 0                # writer generation at which `has` said absent
    base: bytes | None = None   # a zstd delta's base id


def default_workers() -> int:
    return max(1, min(8, len(os.sched_getaffinity(0))))


@dataclass(slots=True)
class ScanStats:
    bytes_read: int = 0          # read from the source
    hole_bytes: int = 0          # chunks wholly in holes: recorded as zero, never read
    reused_bytes: int = 0        # chunks the source vouched unchanged: previous ids, never read


def scan(src, chunk_size: int, *, has, level: int, generation=lambda: 0,
         deltas=None, workers: int | None = None, depth: int | None = None,
         stats: ScanStats | None = None, key=None):
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
    A source may also have `known(index, pos, n)`: the id of a chunk it knows is
    unchanged since a previous backup and held in the store (vSphere's Changed
    Block Tracking), or None; such a chunk is recorded with that id, not read.
    `key` (a protocol.sealing.DataKey): chunk ids are keyed under it and the
    stored form of a new chunk is sealed (node/store/sealed.py), in the workers,
    so ids, compression and sealing all run on every core. A sealed chunk's `data`
    is a view of one of depth + 1 reused buffers: valid until the next chunk is
    asked for (a fresh 1 MiB buffer per record cost more than its encryption).
    """
    workers = workers or default_workers()
    depth = depth or max(4, workers * 4)
    stats = stats if stats is not None else ScanStats()

    def work(buf: bytearray, n: int, index: int, out) -> Chunk:
        view = buf if n == len(buf) else memoryview(buf)[:n]
        if is_zero(view):
            return Chunk(index, n, ZERO_ID)
        cid = id_of(key, view)
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
        base = data[:ID_LEN] if codec == CODEC_ZSTD_DELTA else None
        if key is not None:
            codec, data = seal_payload(key, KIND_CHUNK, cid, codec, n, data, True, out)
        return Chunk(index, n, cid, codec, data, gen, base)

    size = src.size
    known = getattr(src, "known", None)
    free = [bytearray(chunk_size) for _ in range(depth)]
    # sealed records: a payload is at most the chunk (raw), or a delta's base id and a
    # frame under 0.8x the chunk (delta.MARGIN), plus the seal
    outs = [bytearray(chunk_size + ID_LEN + RECORD_OVERHEAD) for _ in range(depth + 1)] \
        if key is not None else None
    held = None                   # the buffer of the sealed chunk yielded last
    inflight: deque = deque()
    index, pos = 0, 0
    with ThreadPoolExecutor(workers, thread_name_prefix="chunker") as pool:
        try:
            while True:
                if held is not None:      # the caller asked for the next chunk: it is free
                    outs.append(held)
                    held = None
                while free and pos < size and len(inflight) < depth:
                    n = min(chunk_size, size - pos)
                    if src.is_hole(pos, n):
                        # a hole in a sparse source: zero without reading it
                        inflight.append((Chunk(index, n, ZERO_ID), None, None))
                        stats.hole_bytes += n
                    elif known is not None and (cid := known(index, pos, n)) is not None:
                        inflight.append((Chunk(index, n, cid), None, None))
                        stats.reused_bytes += n
                    else:
                        buf = free.pop()
                        try:
                            src.read_into(buf, pos, n)
                        except BaseException:
                            free.append(buf)
                            raise
                        stats.bytes_read += n
                        out = outs.pop() if outs is not None else None
                        inflight.append((pool.submit(work, buf, n, index, out), buf, out))
                    index += 1
                    pos += n
                if not inflight:
                    return
                item, buf, out = inflight.popleft()
                if buf is None:
                    yield item
                    continue
                chunk = item.result()
                free.append(buf)
                if out is not None:
                    held = out
                yield chunk
        finally:
            for item, buf, _ in inflight:
                if buf is not None:
                    item.cancel()
