"""Delta compression of a new chunk against the previous version of the image.

A VM disk backed up daily changes a few 4 KiB blocks inside a 1 MiB chunk;
content addressing then stores the whole chunk again. When a backup has a
parent (the latest backup of the same name and chunk size), a new chunk is
zstd-compressed with the parent's chunk at the same index as a raw-content
dictionary. On the benchmark image the 182 changed 1 MiB chunks of the
"next day" take 6.5 MB this way instead of 110 MB.

Record (codec ZSTD_DELTA): stored bytes = base id (32) + zstd frame (sealed
as one payload when the store seals: the base id stays in the index, in the
clear, as every chunk id is). Chunk ids stay the ids of the plaintext (plain
or keyed), so dedup, verification and the network see no difference. A sealed
delta only ever has a sealed base: after a data key is added, the first
backup of an image stores its chunks whole (sealed) rather than as deltas
against the old plaintext records, which would keep those alive forever.
Bases are always full chunks (depth 1): if the parent's chunk is itself a
delta, its base is used. The index keeps the base id so
gc keeps a base alive while a live delta needs it.
"""
from __future__ import annotations

import threading

import zstandard

from hypersdk.node.store import packfile
from hypersdk.protocol.chunks import ID_LEN, ZERO_ID
from hypersdk.protocol.errors import IntegrityError, ProtocolError
from hypersdk.protocol.manifest import LIST_ENTRIES, split_list, zero_list

MIN_DELTA_LEVEL = 3     # zstd levels 1-2 barely use a 1 MiB dictionary (measured)
MARGIN = 0.8            # a delta must beat plain zstd by 20%: it ties its chunk to a base
                        # (kept alive by gc, read on every restore); small wins don't pay


def compress_delta(base_plain: bytes, data, level: int) -> bytes:
    d = zstandard.ZstdCompressionDict(base_plain, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    frame = zstandard.ZstdCompressor(level=max(level, MIN_DELTA_LEVEL), dict_data=d).compress(data)
    return frame


def decompress_delta(base_plain: bytes, frame, raw_len: int) -> bytes:
    d = zstandard.ZstdCompressionDict(base_plain, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    return zstandard.ZstdDecompressor(dict_data=d).decompress(frame, max_output_size=raw_len)


def split_record(stored) -> tuple[bytes, memoryview]:
    """(base id, zstd frame) of a delta record's stored bytes."""
    view = memoryview(stored)
    return bytes(view[:ID_LEN]), view[ID_LEN:]


class ParentChunks:
    """The chunk ids of a parent manifest by index, one hash-list piece at a
    time (thread-safe: chunker workers ask in roughly increasing order)."""

    def __init__(self, store, manifest, sealed: bool = False):
        """sealed: the new records are sealed; then only sealed records are bases
        (a sealed backup must never keep a plaintext record alive), else only
        plaintext ones (a node without the key cannot read sealed ones)."""
        self.store = store
        self.sealed = sealed
        self.m = manifest
        self._lock = threading.Lock()
        self._pieces: dict[int, list[bytes]] = {}

    def _piece(self, k: int) -> list[bytes]:
        with self._lock:
            ids = self._pieces.get(k)
            if ids is None:
                n = self.m.list_len(k)
                lid = self.m.lists[k]
                ids = split_list(zero_list(n) if lid == ZERO_ID else self.store.read(lid), n)
                for old in [p for p in self._pieces if p < k - 1]:
                    del self._pieces[old]
                self._pieces[k] = ids
            return ids

    def base_for(self, index: int) -> bytes | None:
        """Id of a full chunk to delta against for chunk `index`, or None."""
        if index >= self.m.n_chunks:
            return None
        cid = self._piece(index // LIST_ENTRIES)[index % LIST_ENTRIES]
        if cid == ZERO_ID:
            return None
        loc = self.store.location(cid)
        if loc is None or packfile.is_sealed(loc[4]) != self.sealed:
            return None
        if packfile.inner(loc[4]) == packfile.CODEC_ZSTD_DELTA:
            return self.store.base_of(cid)
        return cid


class DeltaPolicy:
    """Stops trying deltas when they keep losing to plain zstd (an unrelated
    image backed up under an old name), but keeps sampling 1 chunk in 16 so
    it notices when they start winning again."""

    WARMUP = 16
    MIN_WIN_RATE = 0.25

    def __init__(self):
        self.tries = 0
        self.wins = 0
        self.skipped = 0

    def should_try(self) -> bool:
        if self.tries < self.WARMUP or self.wins >= self.MIN_WIN_RATE * self.tries:
            return True
        self.skipped += 1
        return self.skipped % 16 == 0

    def record(self, won: bool):
        self.tries += 1            # races between workers only blur the estimate
        self.wins += won


class DeltaSource:
    """What a chunker worker needs to delta-compress chunk `index`."""

    def __init__(self, store, parent_manifest, level: int, sealed: bool = False):
        self.store = store
        self.parent = ParentChunks(store, parent_manifest, sealed)
        self.level = level
        self.policy = DeltaPolicy()

    def try_compress(self, index: int, data):
        """(codec, stored bytes) of a delta, or None when there is no usable
        base or the policy says deltas are not paying off."""
        if not self.policy.should_try():
            return None
        try:
            base = self.parent.base_for(index)
            if base is None:
                return None
            base_plain = self.store.read(base)
        except (IntegrityError, ProtocolError, OSError):   # a damaged parent only costs the delta
            return None
        return packfile.CODEC_ZSTD_DELTA, base + compress_delta(base_plain, data, self.level)
