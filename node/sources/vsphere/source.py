"""One snapshot disk as an image source for the chunker (node/store/chunker.py).

The chunker asks, chunk by chunk: is it a hole (`is_hole`), is it known unchanged
(`known`), else it reads it (`read_into`). Which chunks to read comes from
QueryChangedDiskAreas (`areas`, in bytes):
- full backup (previous None; areas = the allocated areas, changeId "*"): a
  chunk no area touches is zero, never read;
- incremental (previous = the previous backup's chunk ids of this disk, taken at
  the changeId the areas are relative to): a chunk no area touches is the
  previous backup's chunk, recorded by id without reading, if the store still
  holds it (`has`); otherwise it is read like a changed one.
Chunks are aligned to CBT's 64 KiB blocks (chunk sizes are powers of two >= 64
KiB), so a chunk is unchanged exactly when no changed area touches it.

A chunk that is read is read area by area: only the bytes inside the areas come
from vSphere; the rest of the chunk is the previous backup's chunk read from the
local store (`read_previous`, incremental) or zeros (full: unallocated). So an
incremental backup downloads the changed 64 KiB blocks, not whole chunks.
Consecutive areas continue one HTTP response (export.DiskReader).

A snapshot disk is frozen: nothing changes while it is read (check_unchanged
has nothing to check).
"""
from __future__ import annotations

import bisect

from hypersdk.protocol.chunks import ZERO_ID

MAX_RUN = 256 << 20             # bytes one Range request covers at most


class VsphereDiskSource:
    def __init__(self, reader, capacity: int, chunk_size: int, areas, *, previous=None,
                 has=lambda cid: False, read_previous=None, path: str, metadata: dict):
        """read_previous(cid) -> the plaintext of a chunk of the previous backup from
        the local store, or None (then the whole chunk is downloaded)."""
        self.reader, self.size, self.chunk_size = reader, capacity, chunk_size
        self.previous, self.has, self.path, self._meta = previous, has, path, metadata
        self.read_previous = read_previous
        self.areas = []                          # [start, end), sorted, touching ones merged
        for s, e in sorted((s, s + n) for s, n in areas if n > 0):
            if self.areas and s <= self.areas[-1][1]:
                self.areas[-1] = (self.areas[-1][0], max(e, self.areas[-1][1]))
            else:
                self.areas.append((s, e))
        self._starts = [s for s, _ in self.areas]
        n = -(-capacity // chunk_size)
        if previous is not None and len(previous) != n:
            raise ValueError(f"{len(previous)} previous chunk ids for {n} chunks")
        self.touched = bytearray(n)             # 1: some area touches the chunk
        for start, length in areas:
            if length <= 0:
                continue
            first, last = start // chunk_size, min(n - 1, (start + length - 1) // chunk_size)
            self.touched[first:last + 1] = b"\1" * (last - first + 1)
        self.prefetch = None                     # an export.Prefetch of planned_spans()

    def _prev(self, index: int) -> bytes | None:
        return None if self.previous is None else self.previous[index]

    def is_hole(self, pos: int, length: int) -> bool:
        i = pos // self.chunk_size
        if self.touched[i]:
            return False
        return self.previous is None or self.previous[i] == ZERO_ID

    def known(self, index: int, pos: int, length: int) -> bytes | None:
        cid = self._prev(index)
        if cid is None or cid == ZERO_ID or self.touched[index] or not self.has(cid):
            return None
        return cid

    def _base(self, buf, pos: int, length: int) -> bool:
        """Fill buf[:length] with what the chunk at pos was before the changed areas:
        the previous backup's chunk or zeros. False: no base, read everything."""
        cid = self._prev(pos // self.chunk_size)
        if cid is None or cid == ZERO_ID:
            memoryview(buf)[:length] = bytes(length)
            return True
        old = self.read_previous(cid) if self.read_previous is not None else None
        if old is None or len(old) != length:
            return False
        memoryview(buf)[:length] = old
        return True

    def planned_spans(self) -> list[tuple[int, int]]:
        """The (start, end) pieces read_into will ask the reader for, in order: the
        areas cut at chunk boundaries (a chunk whose previous version cannot be read
        from the store is read whole instead: the plan then differs there)."""
        out = []
        cs = self.chunk_size
        for s, e in self.areas:
            e = min(e, self.size)
            while s < e:
                cut = min(e, (s // cs + 1) * cs)
                out.append((s, cut))
                s = cut
        return out

    def _piece(self, view, s: int, n: int, run: int) -> None:
        got = self.prefetch.take(s, n) if self.prefetch is not None else None
        if got is not None:
            view[:n] = got
            self.reader.keepalive()              # the lease hears from us (this thread)
        else:
            self.reader.read_into(view, s, n, run)

    def read_into(self, buf, pos: int, length: int) -> int:
        length = max(0, min(length, self.size - pos))
        end = pos + length
        if not self._base(buf, pos, length):
            self.reader.read_into(buf, pos, length, end)
            return length
        i = max(0, bisect.bisect_right(self._starts, pos) - 1)
        view = memoryview(buf)
        try:
            while i < len(self.areas) and self.areas[i][0] < end:
                s, e = max(self.areas[i][0], pos), min(self.areas[i][1], end)
                if e > s:
                    # the request runs to the end of the area (at most MAX_RUN ahead):
                    # the next chunk's part of it continues the same response
                    run = min(self.areas[i][1], self.size, s + MAX_RUN)
                    self._piece(view[s - pos:e - pos], s, e - s, run)
                i += 1
        finally:
            view.release()
        return length

    def check_unchanged(self) -> None:
        """A snapshot is frozen."""

    def metadata(self) -> dict:
        return dict(self._meta)

    def close(self) -> None:
        if self.prefetch is not None:
            self.prefetch.close()
        self.reader.close()
