"""Storage as the chunk exchange sees it: a ChunkSource to serve, a ChunkSink to fill.

Two small interfaces (every method is async so that a store-backed
implementation can run its blocking SQLite / pack-file work in a thread):

    ChunkSource (server side, node/exchange/server.py)
        manifest(mid) -> bytes | None        canonical manifest encoding
        have(cids) -> list[bool]
        get(cid) -> (codec, raw_len, payload) | None
                                             payload: bytes-like (StoreSource: a
                                             memoryview of the record read, no copy);
                                             codec is exchange.CODEC_RAW, CODEC_ZSTD or
                                             CODEC_SEALED (a sealed record as stored): a
                                             delta record is decoded and re-encoded
                                             (exchange.data_from_plain), never sent as stored
        read(cid) -> bytes | None            verified plaintext (hash-list pieces)

    ChunkSink (downloader side, node/exchange/swarm.py)
        manifest(mid) -> bytes | None        a manifest held locally
        begin(manifest) -> DataKey | None    optional: the manifest to be fetched; returns
                                             the key its ids are keyed with (None: plain
                                             BLAKE3), protocol.ids.DataKeyMissing if this
                                             node lacks it
        read(cid) -> bytes | None            a chunk held locally (hash-list pieces)
        missing(cids) -> list[bytes]         those not held locally, in the given order
        put(cid, plain, wire=None)           verified plaintext (the caller checked it);
                                             wire=(codec, raw_len, payload): the verified
                                             exchange payload it came as, which a store
                                             keeps as received (no recompression)
        put_many([(cid, plain, wire), ...])  optional: several puts in one operation
        put_manifest(mid, data)              the manifest, once every chunk is in
        flush()                              make everything put so far durable

Implementations: StoreSource / StoreSink on node/store/store.py's ChunkStore and
PackWriter, and MemorySource / MemorySink (dicts) for simnet tests of many nodes.

Encryption at rest. A chunk with a keyed id only travels sealed (exchange.py
CODEC_SEALED): StoreSource sends such a record whose payload is raw or zstd as
stored (no decryption), this tenant's or one it keeps opaque for another; a
keyed delta it decodes, re-encodes and seals again. Anything else it opens and
sends as codec and payload: hash-list pieces and manifests (ids and sizes, which
a storage-only holder needs and may see), and records with plain ids.
StoreSink seals what it stores when its store has a data key: every chunk and
hash-list piece (kind from the manifest begin() named, KEYED when the manifest's
ids are) and the manifest. A CODEC_SEALED record (verified by the downloader with
this key) of the kind it would seal is stored as received: sealing is
deterministic, so it is the record sealing here would produce, and nobody
decrypts and reseals on the way (protocol/exchange.py, CODEC_SEALED). A sink
without the manifest's key keeps its records opaque (begin_opaque): the sealed
chunks as received (packfile FOREIGN), the pieces sealed under its own key.

threaded: real nodes run store work through trio.to_thread.run_sync so the
event loop never blocks on SQLite or fdatasync; threaded=False calls it
directly, which keeps simnet's virtual time exact (a thread hop would be
zero virtual time anyway, but autojump could fire while a thread works).

StoreSink and resume: put() appends records to the pack at once; every
`batch_bytes` of records is committed (fdatasync, then the index rows; when
threaded, by the PackWriter's commit thread, at most one commit in flight, so
the puts never wait for an fdatasync), and when threaded also every
`commit_seconds` (the records put since the last hand-off go to the commit
thread at the next put if it is idle), so an interrupted download keeps every
committed chunk and the next attempt asks missing() and fetches only the rest.
What a kill (-9) can cost is what is not committed yet: the batch filling
(< batch_bytes, and on a link slower than batch_bytes / commit_seconds about
commit_seconds of transfer) plus the one in the commit thread (at most as much
again). A fetch uses 16 MiB / 0.1 s (node/service/replication.py FETCH_COMMIT_BYTES):
at most 32 MiB of stored chunks lost per kill; a 16 MiB commit of records
already on the disk (O_DIRECT) is a sub-millisecond fdatasync plus one SQLite
transaction in the commit thread, nothing the puts wait for.

The sink holds the store's write lock from open() to close() (one writer per
store; gc waits, so it cannot collect the chunks of a download in progress,
which no manifest references yet). put_manifest() writes the manifests row
only when called, and the downloader calls it last: a manifest in the store
always has all its chunks (gc and verify rely on that). Until then the fetched
chunks are unreferenced: a gc run between an interruption and its resume would
collect them (a cost, not an inconsistency).
"""
from __future__ import annotations

import random
import time
from contextlib import ExitStack
from typing import Iterable, Protocol

import trio

from hypersdk.node import runtime
from hypersdk.node.config import DEFAULT_ZSTD_LEVEL
from hypersdk.node.store import catalog, packfile
from hypersdk.node.store.sealed import DataKeyNotHeld, seal_payload
from hypersdk.protocol import sealing
from hypersdk.protocol.chunks import ZERO_ID, VerifiedChunk, chunk_id
from hypersdk.protocol.errors import IntegrityError
from hypersdk.protocol.exchange import CODEC_RAW, CODEC_SEALED, CODEC_ZSTD, data_from_plain
from hypersdk.protocol.ids import id_of, scheme_key
from hypersdk.protocol.sealing import KIND_CHUNK, KIND_HASHLIST, SealError, open_record, peek_header

Stored = tuple  # (codec, raw_len, payload bytes)


class ChunkSource(Protocol):
    async def manifest(self, mid: bytes) -> bytes | None: ...

    async def have(self, cids: list[bytes]) -> list[bool]: ...

    async def get(self, cid: bytes) -> Stored | None: ...

    async def read(self, cid: bytes) -> bytes | None: ...


class ChunkSink(Protocol):
    async def manifest(self, mid: bytes) -> bytes | None: ...

    async def read(self, cid: bytes) -> bytes | None: ...

    async def missing(self, cids: list[bytes]) -> list[bytes]: ...

    async def put(self, cid: bytes, plain: bytes, wire=None) -> None: ...

    async def put_manifest(self, mid: bytes, data: bytes) -> None: ...

    async def flush(self) -> None: ...


async def _run(threaded: bool, fn, *args):
    if threaded:
        return await runtime.run_sync(fn, *args)
    await trio.lowlevel.checkpoint()
    return fn(*args)


_IN_BATCH = 500                       # ids per SQL IN (...) query


def _held(store, cids: list[bytes]) -> set[bytes]:
    out: set[bytes] = set()
    for i in range(0, len(cids), _IN_BATCH):
        part = cids[i:i + _IN_BATCH]
        q = "SELECT id FROM chunks WHERE id IN (%s)" % ",".join("?" * len(part))
        out.update(bytes(r[0]) for r in store.db.execute(q, part))
    return out


def _locations(store, cids: list[bytes]) -> dict[bytes, tuple]:
    """cid -> (pack, offset, stored_len, raw_len, codec) of those held."""
    out: dict[bytes, tuple] = {}
    for i in range(0, len(cids), _IN_BATCH):
        part = cids[i:i + _IN_BATCH]
        q = ("SELECT id, pack, offset, stored_len, raw_len, codec FROM chunks "
             "WHERE id IN (%s)" % ",".join("?" * len(part)))
        for r in store.db.execute(q, part):
            out[bytes(r[0])] = tuple(r[1:])
    return out


def _manifest_row(store, mid: bytes) -> bytes | None:
    """The manifest's canonical encoding (opened if sealed), None if not held here."""
    return catalog.manifest_body(store, mid)


def _served_manifest(store, mid: bytes) -> bytes | None:
    try:
        return _manifest_row(store, mid)
    except (IntegrityError, DataKeyNotHeld):
        return None                       # unreadable here: say "not held"


# -- store-backed ------------------------------------------------------------------------

class StoreSource:
    """Serves a ChunkStore. Records stored raw or zstd go out as stored (no
    decompression, no copy beyond the pack read); zstd deltas are decoded
    (store.read verifies them) and re-encoded with data_from_plain.

    threaded: have() also returns the locations of the chunks it finds (one
    query, in the thread it runs anyway) and keeps up to LOCATIONS of them; a
    get() of such a chunk reads its record in the event loop when every byte of
    it is in the page cache (packfile.read_record_cached: a read that never waits
    for the disk) from an already open pack, and its header matches: no thread
    hop per chunk. Anything else (not cached, a delta, a stale location) takes
    the thread path as before."""

    LOCATIONS = 1 << 17

    def __init__(self, store, *, threaded: bool = True, level: int = DEFAULT_ZSTD_LEVEL):
        self.store = store
        self.threaded = threaded
        self.level = level
        self._locs: dict[bytes, tuple] = {}
        self.served_cached = 0
        self.served_sealed = 0            # records sent as stored, CODEC_SEALED

    @staticmethod
    def _as_sealed(codec: int, stored) -> bool:
        """Whether a record of pack codec `codec` goes out as stored (CODEC_SEALED):
        a sealed chunk with a keyed id, raw or zstd inside, this tenant's or (opaque
        here) another's. A sealed hash-list piece goes out opened (its keyed ids are
        no secret, and a holder without the key needs them: protocol/exchange.py)."""
        return (codec & (packfile.SEALED | packfile.KEYED) == packfile.SEALED | packfile.KEYED
                and packfile.inner(codec) in (packfile.CODEC_RAW, packfile.CODEC_ZSTD)
                and sealing.peek_kind(stored) == KIND_CHUNK)

    async def manifest(self, mid: bytes) -> bytes | None:
        return await _run(self.threaded, _served_manifest, self.store, mid)

    async def have(self, cids: list[bytes]) -> list[bool]:
        if not self.threaded:
            held = await _run(self.threaded, _held, self.store, list(cids))
            return [c in held for c in cids]
        locs = await _run(self.threaded, _locations, self.store, list(cids))
        if len(self._locs) + len(locs) > self.LOCATIONS:
            self._locs.clear()
        if len(locs) <= self.LOCATIONS:
            self._locs.update(locs)
        return [c in locs for c in cids]

    def get_cached(self, cid: bytes):
        """get(cid) at once when its record is in the page cache (see the class
        docstring), else None (get() then takes the thread path)."""
        if not self._locs:
            return None
        loc = self._locs.get(cid)
        if loc is None or packfile.inner(loc[4]) == packfile.CODEC_ZSTD_DELTA:
            return None
        pack, offset, stored_len, raw_len, codec = loc
        fd = self.store._fds.get(pack)     # an open pack only (opening one is I/O)
        if fd is None:
            return None
        got = packfile.read_record_cached(fd, offset, cid, stored_len)
        if got is None or got[0] != codec or got[1] != raw_len:
            return None
        if self._as_sealed(codec, got[2]):
            self.served_sealed += 1
            got = (CODEC_SEALED, raw_len, got[2])
        elif packfile.is_opaque(codec):
            return None
        elif packfile.is_sealed(codec):     # opened here: AES-GCM, ~0.1 ms per MiB
            try:
                inner, payload = self.store.open_stored(cid, codec, raw_len, got[2])
            except (IntegrityError, DataKeyNotHeld):
                return None                 # the thread path says Missing
            got = (inner, raw_len, payload)
        self.served_cached += 1
        return got

    def _get(self, cid: bytes):
        loc = self.store.location(cid)
        if loc is None:
            return None
        try:
            if packfile.inner(loc[4]) == packfile.CODEC_ZSTD_DELTA:
                d = data_from_plain(0, cid, self.store.read(cid, loc), self.level)
                if packfile.is_keyed(loc[4]):     # a keyed chunk only travels sealed
                    self.served_sealed += 1
                    return CODEC_SEALED, d.raw_len, sealing.seal(
                        self.store.key, KIND_CHUNK, cid, d.codec, d.raw_len, d.payload)
                return d.codec, d.raw_len, d.payload
            codec, raw_len, stored = self.store.read_stored(cid, loc)
            if self._as_sealed(codec, stored):
                self.served_sealed += 1
                return CODEC_SEALED, raw_len, stored      # as stored: no decryption
            if packfile.is_opaque(codec):
                return None                   # not a chunk record: damaged here
            codec, stored = self.store.open_stored(cid, codec, raw_len, stored)
        except (IntegrityError, DataKeyNotHeld):
            return None                   # damaged (or sealed, no key) here: say Missing
        return codec, raw_len, stored     # a view of the record as read: no copy

    async def get(self, cid: bytes) -> Stored | None:
        if self.threaded and self._locs:
            got = self.get_cached(cid)
            if got is not None:
                await trio.lowlevel.checkpoint()
                return got
        return await _run(self.threaded, self._get, cid)

    def _read(self, cid: bytes):
        try:
            if not self.store.has(cid):
                return None
            return VerifiedChunk.of(cid, self.store.read(cid))
        except (IntegrityError, DataKeyNotHeld):
            return None

    async def read(self, cid: bytes) -> bytes | None:
        """Verified plaintext (a protocol.chunks.VerifiedChunk: checked against cid
        in its id scheme by the store), or None if not held or unreadable."""
        return await _run(self.threaded, self._read, cid)


class StoreSink:
    """Fills a ChunkStore (see the module docstring for commits and resume).

        async with StoreSink(store) as sink:     # takes the store's write lock
            ... downloader puts ...
    Leaving the block commits what was put (the chunks are verified, so even
    an interrupted download keeps them); an error while committing aborts the
    uncommitted tail instead.
    """

    needs_plain = False                   # put(cid, None, wire) stores the wire payload

    def __init__(self, store, *, threaded: bool = True, level: int = DEFAULT_ZSTD_LEVEL,
                 batch_bytes: int = 64 << 20, commit_seconds: float | None = None):
        """commit_seconds (threaded only): also commit what was put at least this
        often (see the module docstring); None: by batch_bytes only."""
        self.store = store
        self.threaded = threaded
        self.level = level
        self.batch_bytes = batch_bytes
        self.commit_seconds = commit_seconds if threaded else None
        self._commit_due = 0.0            # time.monotonic() of the next commit by time
        self._gen = 0                     # the writer's generation at the last hand-off
        self._writer = None
        self._stack: ExitStack | None = None
        self._lock = trio.Lock()          # one store operation at a time
        self._uncommitted = 0
        self.chunks_put = 0
        self.bytes_stored = 0
        self._seal = None                 # the store's data key: records are sealed with it
        self._keyed = False               # the manifest begin() named has keyed ids
        self._foreign = False             # ... keyed with a key this node lacks (opaque)
        self._lists: frozenset = frozenset()   # its hash-list ids

    def _open(self):
        stack = ExitStack()
        try:
            stack.enter_context(self.store.write_lock())
            # threaded: the writer commits every batch_bytes in its background thread;
            # else (simnet) _put commits synchronously, nothing runs behind trio's back
            # direct: what a fetch stores goes to the disk, not into fresh page-cache
            # pages (node/store/pack_direct.py)
            self._writer = stack.enter_context(self.store.writer(
                batch_bytes=self.batch_bytes if self.threaded else 1 << 62, direct=True))
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        self._seal = self.store.key
        self._gen = self._writer.generation
        if self.commit_seconds is not None:
            self._commit_due = time.monotonic() + self.commit_seconds

    async def open(self) -> None:
        await _run(self.threaded, self._open)

    def _close(self):
        w, stack = self._writer, self._stack
        self._writer = self._stack = None
        if stack is None:
            return
        try:
            w.commit()
        except BaseException:
            w.abort()
            raise
        finally:
            stack.close()

    async def close(self) -> None:
        with trio.CancelScope(shield=True):
            async with self._lock:
                await _run(self.threaded, self._close)

    async def __aenter__(self):
        await self.open()
        return self

    async def __aexit__(self, *exc):
        await self.close()

    def _need_writer(self):
        if self._writer is None:
            raise RuntimeError("StoreSink is not open (use `async with StoreSink(store)`)")
        return self._writer

    async def manifest(self, mid: bytes) -> bytes | None:
        return await _run(self.threaded, _manifest_row, self.store, mid)

    def _begin(self, m):
        key = scheme_key(m.key, self.store.key)      # DataKeyMissing: not this node's key
        self._keyed = key is not None
        self._lists = frozenset(m.lists)
        return key

    async def begin(self, m):
        """The DataKey manifest m's ids are keyed with (None: plain), or
        protocol.ids.DataKeyMissing; what is put next belongs to m."""
        return await _run(self.threaded, self._begin, m)

    async def begin_opaque(self, m) -> None:
        """What is put next belongs to m, whose ids are keyed with a data key this
        node does not hold: it keeps m's records for that key's holders (a
        storage-only member's replica). Chunks come as the tenant's sealed records
        and are stored as received (packfile FOREIGN | SEALED | KEYED: opaque here);
        hash-list pieces come opened and are stored FOREIGN (their ids cannot be
        checked here), sealed under this store's own key (DataKeyNotHeld when this
        node has none: then it keeps nothing of the backup)."""
        await trio.lowlevel.checkpoint()
        if self._seal is None:
            raise DataKeyNotHeld(f"this backup is encrypted with data key {m.key.hex()[:16]} "
                                 "and this node has no data key at all, so it cannot keep "
                                 "even the backup's metadata sealed: join a network first")
        self._keyed, self._foreign, self._lists = False, True, frozenset(m.lists)

    def _read(self, cid: bytes):
        w = self._writer
        if w is not None and (cid in w.pending or cid in w.committing):
            w.commit()                    # make it readable through the index
        try:
            return self.store.read(cid) if self.store.has(cid) else None
        except IntegrityError:
            return None

    async def read(self, cid: bytes) -> bytes | None:
        async with self._lock:
            return await _run(self.threaded, self._read, cid)

    def _missing(self, cids: list[bytes]) -> list[bytes]:
        held = _held(self.store, cids)
        w = self._writer
        if w is not None:
            held.update(c for c in cids if c in w.pending or c in w.committing)
        return [c for c in cids if c not in held]

    async def missing(self, cids: list[bytes]) -> list[bytes]:
        async with self._lock:
            return await _run(self.threaded, self._missing, list(cids))

    def _put(self, cid: bytes, plain, wire):
        w = self._need_writer()
        if self._foreign:
            return self._put_foreign(w, cid, plain, wire)
        if wire is not None and wire[0] == CODEC_SEALED:
            if self._put_sealed(w, cid, wire):
                return
            # another kind here, or no key here (plaintext store): from the payload
            # inside, or from the plaintext
            wire = self._unseal(cid, wire) if self._seal is not None else None
        if wire is not None and wire[0] in (CODEC_RAW, CODEC_ZSTD):
            # the verified wire payload (exchange codecs = pack codecs 0/1), kept as
            # received: a zstd frame that decoded to the chunk, or its plaintext
            codec, raw_len, data = wire
        elif plain is None:
            raise ValueError("StoreSink.put needs the plaintext or a raw/zstd wire payload")
        else:
            codec, data = _compress(plain, self.level)
            raw_len = len(plain)
        if self._seal is not None:
            kind = KIND_HASHLIST if cid in self._lists else KIND_CHUNK
            codec, data = seal_payload(self._seal, kind, cid, codec, raw_len, data, self._keyed)
        self._count(w, w.put(cid, raw_len, codec, data))

    def _put_sealed(self, w, cid: bytes, wire) -> bool:
        """Store a CODEC_SEALED wire record as received when this store seals with the
        key it was verified with (the downloader's, from begin(): the store's) and
        under the kind it would seal it as; False: it must be sealed here."""
        codec, raw_len, record = wire
        if self._seal is None:
            return False
        kind = KIND_HASHLIST if cid in self._lists else KIND_CHUNK
        h = peek_header(record)
        if h.kind != kind:
            return False
        flags = packfile.SEALED | (packfile.KEYED if self._keyed else 0) | h.codec
        self._count(w, w.put(cid, raw_len, flags, record))
        return True

    def _put_foreign(self, w, cid: bytes, plain, wire) -> None:
        """put() of a record of an opaque backup (begin_opaque): the downloader
        checked what it could (protocol.exchange.check_opaque, open_piece_unchecked)."""
        codec, raw_len, data = wire
        if cid not in self._lists:
            if codec != CODEC_SEALED:
                raise ValueError("an opaque backup's chunk must come sealed")
            flags = packfile.FOREIGN | packfile.SEALED | packfile.KEYED | peek_header(data).codec
        elif codec not in (CODEC_RAW, CODEC_ZSTD):
            raise ValueError("an opaque backup's hash-list piece must come opened")
        else:                             # sealed with this store's own key (begin_opaque)
            flags, data = seal_payload(self._seal, KIND_HASHLIST, cid, codec, raw_len, data,
                                       False)
            flags |= packfile.FOREIGN
        self._count(w, w.put(cid, raw_len, flags, data))

    def _unseal(self, cid: bytes, wire):
        """(inner codec, raw_len, payload) of a verified CODEC_SEALED wire record."""
        codec, raw_len, record = wire
        try:
            opened = open_record(self._seal, peek_header(record).kind, cid, record)
        except SealError as exc:
            raise ValueError(f"StoreSink.put got a sealed record it cannot open: {exc}") from None
        return opened.codec, raw_len, bytes(opened.payload)

    def _count(self, w, n: int) -> None:
        if n:
            self.chunks_put += 1
            self.bytes_stored += n
            self._uncommitted += n
            if self._uncommitted >= self.batch_bytes:
                if not self.threaded:
                    w.commit()
                self._uncommitted = 0
            if self.commit_seconds is not None:
                self._commit_by_time(w)

    def _commit_by_time(self, w):
        """Hand what was put to the commit thread once commit_seconds have passed
        since the last hand-off (by bytes or by time), if that thread is idle."""
        now = time.monotonic()
        if w.generation != self._gen:     # the writer handed a batch off by bytes
            self._gen = w.generation
            self._commit_due = now + self.commit_seconds
        elif now >= self._commit_due and w.commit_in_background():
            self._gen = w.generation
            self._commit_due = now + self.commit_seconds

    async def put(self, cid: bytes, plain: bytes, wire=None) -> None:
        async with self._lock:
            await _run(self.threaded, self._put, cid, plain, wire)

    def _put_many(self, items):
        for cid, plain, wire in items:
            self._put(cid, plain, wire)

    async def put_many(self, items) -> None:
        """put() of each (cid, plain, wire), in one store operation."""
        async with self._lock:
            await _run(self.threaded, self._put_many, list(items))

    def _put_manifest(self, mid: bytes, data: bytes):
        if chunk_id(data) != mid:
            raise ValueError("manifest bytes do not hash to its id")

        def add(db):
            catalog.put_manifest(db, mid, data, self._seal)      # sealed with the key, if any

        self._need_writer().commit(extra=add)
        self._uncommitted = 0

    async def put_manifest(self, mid: bytes, data: bytes) -> None:
        async with self._lock:
            await _run(self.threaded, self._put_manifest, mid, data)

    def _flush(self):
        self._need_writer().commit()
        self._uncommitted = 0

    async def flush(self) -> None:
        async with self._lock:
            await _run(self.threaded, self._flush)


def _compress(plain: bytes, level: int):
    from hypersdk.node.store.store import compress
    return compress(plain, level)


# -- in memory ---------------------------------------------------------------------------

class MemorySource:
    """A dict-backed ChunkSource: chunks[cid] = plaintext, manifests[mid] = bytes.

    compress=True serves zstd when it shrinks a chunk (as a store would);
    corrupt=p flips one payload byte with probability p (a bad provider; the
    rng is injected). Many nodes may share one chunks dict (no copies)."""

    def __init__(self, chunks: dict | None = None, manifests: dict | None = None, *,
                 compress: bool = False, corrupt: float = 0.0,
                 rng: random.Random | None = None, key=None):
        """key: a DataKey: add() and add_image() make keyed ids (protocol/ids.py)."""
        self.key = key
        self.chunks = chunks if chunks is not None else {}
        self.manifests = manifests if manifests is not None else {}
        self.compress = compress
        self.corrupt = corrupt
        self.rng = rng or random.Random(0)
        self.served = 0

    def add(self, plain: bytes) -> bytes:
        cid = id_of(self.key, plain)
        self.chunks[cid] = plain
        return cid

    def add_image(self, chunks: list[bytes], chunk_size: int, name: str = "img") -> bytes:
        """Store an image given as its chunks (each chunk_size bytes, the last may be
        shorter; all-zero chunks become ZERO_ID and are not stored): its hash-list
        pieces, chunks and manifest. Returns the manifest id (tests, simnet)."""
        from hypersdk.protocol.chunks import is_zero
        from hypersdk.protocol.manifest import LIST_ENTRIES, Manifest, seal_labels
        ids = [ZERO_ID if is_zero(c) else self.add(c) for c in chunks]
        lists = []
        for i in range(0, len(ids), LIST_ENTRIES):
            piece = b"".join(ids[i:i + LIST_ENTRIES])
            lists.append(ZERO_ID if piece == bytes(len(piece)) else self.add(piece))
        m = Manifest(name=name, size=sum(map(len, chunks)), chunk_size=chunk_size,
                     lists=tuple(lists), key=self.key.fingerprint if self.key else None)
        if self.key is not None:
            m = seal_labels(m, self.key)
        self.manifests[m.id] = m.encode()
        return m.id

    async def manifest(self, mid: bytes) -> bytes | None:
        await trio.lowlevel.checkpoint()
        return self.manifests.get(mid)

    async def have(self, cids: list[bytes]) -> list[bool]:
        await trio.lowlevel.checkpoint()
        return [c in self.chunks for c in cids]

    async def get(self, cid: bytes) -> Stored | None:
        await trio.lowlevel.checkpoint()
        plain = self.chunks.get(cid)
        if plain is None or cid == ZERO_ID:
            return None
        if self.compress:
            d = data_from_plain(0, cid, plain)
            codec, payload = d.codec, d.payload
        else:
            codec, payload = CODEC_RAW, plain
        if self.corrupt and self.rng.random() < self.corrupt:
            b = bytearray(payload)
            b[self.rng.randrange(len(b))] ^= 0xFF
            payload = bytes(b)
        self.served += 1
        return codec, len(plain), payload

    async def read(self, cid: bytes) -> bytes | None:
        await trio.lowlevel.checkpoint()
        return self.chunks.get(cid)


class MemorySink:
    """A dict-backed ChunkSink: chunks[cid] = plaintext. key: the DataKey this
    'node' holds (None: none), for manifests with keyed ids."""

    def __init__(self, chunks: dict | None = None, manifests: dict | None = None, *,
                 key=None):
        self.chunks = chunks if chunks is not None else {}
        self.manifests = manifests if manifests is not None else {}
        self.key = key
        self.puts = 0

    async def begin(self, m):
        await trio.lowlevel.checkpoint()
        return scheme_key(m.key, self.key)

    async def manifest(self, mid: bytes) -> bytes | None:
        await trio.lowlevel.checkpoint()
        return self.manifests.get(mid)

    async def read(self, cid: bytes) -> bytes | None:
        await trio.lowlevel.checkpoint()
        return self.chunks.get(cid)

    async def missing(self, cids: Iterable[bytes]) -> list[bytes]:
        await trio.lowlevel.checkpoint()
        return [c for c in cids if c not in self.chunks]

    async def put(self, cid: bytes, plain: bytes, wire=None) -> None:
        await trio.lowlevel.checkpoint()
        if cid not in self.chunks:
            self.chunks[cid] = plain
            self.puts += 1

    async def put_manifest(self, mid: bytes, data: bytes) -> None:
        await trio.lowlevel.checkpoint()
        self.manifests[mid] = data

    async def flush(self) -> None:
        await trio.lowlevel.checkpoint()


__all__ = ["ChunkSource", "ChunkSink", "StoreSource", "StoreSink", "MemorySource",
           "MemorySink", "CODEC_RAW", "CODEC_ZSTD"]
