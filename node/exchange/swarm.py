"""The swarm downloader: the I/O glue around node/exchange/swarm_plan.py's SwarmPlan.

    dl = Downloader(transport, sink, finder=dht, peers=[contact, ...], rng=rng,
                    progress=callback)
    result = await dl.download(manifest_id)      # DownloadResult, or DownloadError

Steps of one download (every wait bounded):
1. Peers: the explicit contacts plus up to `max_providers` from
   finder.find_providers(manifest_id, count) (DhtService satisfies it).
   One ExchangeSession (one stream) per peer, opened concurrently; a peer that
   cannot be reached within `open_timeout` is simply not used.
2. Manifest: from the sink if held, else the first peer whose ManifestData
   verifies (open_manifest: BLAKE3(data) == id; a peer sending a wrong one is
   scored down and skipped). Hedged: the next peer is asked as soon as one
   answers without it, or after MANIFEST_HEDGE s, so a peer that accepts the
   request and stalls costs at most that. Its id scheme: a manifest with keyed ids
   (protocol/ids.py) needs the data key it names, which the sink has or not
   (sink.begin(m) returns it; without it the download fails at once with
   "this backup is encrypted with data key ...; this node does not have it");
   every chunk and hash-list piece is then checked against its keyed id.
3. Hash lists: the manifest's list pieces are chunks too. Pieces not held
   locally are fetched first with a SwarmPlan in which every peer is assumed
   to hold them (a peer that does not answers Missing), verified like every
   chunk, and put into the sink.
4. The ordered list of distinct non-zero chunk ids (a chunk repeated in the
   image is fetched once); the sink says which are missing (a chunk held
   locally is never fetched).
5. Have: each peer is asked for its bits over the manifest's positions
   (Have ranges of MAX_HAVE, in parallel across peers); the chunk phase starts
   when all answered, or max(HAVE_SHORT, 2 e) after the first answered (in e
   seconds): a later answer joins it (HaveLate, plan.add_peer), a peer still
   silent max(HAVE_GRACE, 4 e) after the first is left out (a stall).
6. The plan loop (SwarmPlan's docstring, "The glue loop"): expire(now);
   send a Cancel for each copy plan.take_cancelled() names (another peer's
   copy arrived first: the peer answers Missing for it if it has not sent it
   yet, so a slow peer's queue does not hold the download's tail; copies
   already in the socket buffers still arrive, as duplicates);
   send next_requests(now) as Get batches on each peer's session; wait for
   the next event or deadline; for each Data: open_data_into (verify; a
   new chunk then goes to the tee) -> sink.put -> plan.on_data (given the
   event's arrival time, ChunkData.at, for the peer's rate);
   ChunkHashMismatch or an undecodable payload -> plan.on_bad (the plan
   bans after max_bad) and the DHT's scores are told
   (`scores.penalize(peer, "malformed", now)`, if given); Missing ->
   plan.on_missing; a session that fails -> plan.remove_peer (only its
   in-flight chunks go back to the pool). Requests that expire (the plan's
   deadlines: about 2 s for a peer that delivered nothing while others
   deliver) count in the node's reputation (node/net/reputation.py): a peer
   whose session received nothing since is a staller ("silent"), else slow
   ("timeout", which cannot ban); a peer the reputation bans leaves the
   download at once (plan.ban). Peers the reputation has banned are not
   contacted at all (`scores`: the node's PeerScores).
7. sink.put_manifest (the manifest is written last: a manifest held locally
   always has all its chunks) and sink.flush().

Bounds. Per-peer outstanding requests are the plan's window (chunks of about
chunk_size each, at most max_window); all sessions deliver into one events
channel of EVENT_BUFFER entries whose reader blocks when it is full, so memory
is bounded by windows x chunk size. The whole download is bounded by
`stall_timeout`: no newly verified chunk for that long -> DownloadError
naming the chunks still missing. plan.stuck() (nothing in flight, no usable
holder for anything pending) fails at once with the unavailable chunks:
a chunk no provider holds is an error, never a hang.

Time is trio.current_time() (virtual under simnet's MockClock); verification
and MemorySink/StoreSink(threaded=False) are synchronous there, so simulated
throughput is exact. Real nodes pass verify_in_thread=True: the Data events of a
batch (up to VERIFY_BATCH) are verified by up to VERIFY_THREADS worker threads (one
thread hop each; each takes the next message when it gets free; BLAKE3 and zstd
release the GIL), so the session readers keep the sockets drained meanwhile. A
zstd payload is decompressed into a reusable page-aligned buffer
(protocol.exchange.open_data_into): the thread's scratch buffer, or for a new
chunk of a restore one of the tee's pool buffers, which goes to the tee's writer
thread once verified (O_DIRECT straight from it; verifying never waits for the
disk unless the pool is used up). No per-chunk plaintext allocation; the
plaintext is only copied out when the sink or the phase needs it
(sink.needs_plain, hash lists). The sink is given the verified wire payload
(sink.put(cid, plain, wire=...)): a store keeps it as received instead of
compressing the plaintext again; it stores batches in the background while the
next ones are verified (up to PUT_DEPTH batches queued).
"""
from __future__ import annotations

import mmap
import os
import random
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable

import trio

from hypersdk.node import runtime
from hypersdk.node.exchange.client import ChunkData, ChunkMissing, ExchangeSession, SessionFailed
from hypersdk.node.exchange.swarm_plan import SwarmPlan, Tunables
from hypersdk.node.net.transport import TransportError
from hypersdk.protocol.chunks import ID_LEN, ZERO_ID
from hypersdk.protocol.errors import ChunkHashMismatch, RemoteProtocolError
from hypersdk.protocol.exchange import (
    CODEC_RAW,
    MAX_HAVE,
    check_opaque,
    open_data_into,
    open_manifest,
    open_piece_unchecked,
)
from hypersdk.protocol.ids import DataKeyMissing, scheme_key
from hypersdk.protocol.manifest import Manifest, decode_manifest, split_list

EVENT_BUFFER = 256
VERIFY_BATCH = 32        # events applied together (bounds the payloads held at once)
VERIFY_THREADS = max(2, min(4, os.cpu_count() or 2))
PUT_DEPTH = 2            # verified batches that may wait to be stored (each <= VERIFY_BATCH)
MANIFEST_HEDGE = 0.25    # s before the next peer is asked for the manifest as well
HAVE_SHORT = 0.1         # s (at least) the chunk phase waits for more Have answers ...
HAVE_GRACE = 1.0         # ... and a peer has to answer at all, after the first answer


@dataclass(frozen=True)
class HaveLate:
    """A peer's Have answer that came after the chunk phase started."""
    peer: bytes
    have: frozenset
_PAGE = mmap.PAGESIZE
_tls = threading.local()


def _scratch(n: int) -> mmap.mmap:
    """This thread's page-aligned plaintext buffer, of at least n bytes. Reused for
    every chunk the thread verifies: a fresh 1 MiB plaintext per chunk cost a page
    fault per 4 KiB (glibc hands freed thread-arena memory back to the kernel)."""
    buf = getattr(_tls, "buf", None)
    if buf is None or len(buf) < n:
        buf = _tls.buf = mmap.mmap(-1, -(-n // _PAGE) * _PAGE)
    return buf


_OPAQUE_LIST = "opaque hash list"       # `key` of _open_batch for an opaque backup (below)
_OPAQUE_CHUNK = "opaque chunk"


def _open_opaque(msg, phase: str, sizes: dict):
    """A Data message of an opaque backup (Downloader opaque_ok): what a holder
    without the key can check: the length the manifest gives its position, then
    a sealed chunk record's header (check_opaque) or a hash-list piece's decoding
    (open_piece_unchecked: its plaintext); RemoteProtocolError otherwise."""
    if msg.raw_len != sizes.get(msg.id):
        raise RemoteProtocolError(f"chunk {msg.id.hex()[:16]} of {msg.raw_len} bytes, its "
                                  f"manifest says {sizes.get(msg.id)}")
    if phase == _OPAQUE_CHUNK:
        check_opaque(msg)
        return True
    return bytes(open_piece_unchecked(msg))


def _open_batch(msgs, writes, tee, keep: bool, order=None, out=None, key=None,
                sizes=None) -> list:
    """Verify Data messages in this thread: out[i] becomes the
    ChunkHashMismatch / RemoteProtocolError open_data_into raised for msgs[i],
    else its plaintext bytes (keep) or True. writes[i]: msgs[i] is a new chunk
    whose verified plaintext goes into the tee (the image): decoded straight into
    one of the tee's pool buffers (tee.buffer) and submitted to its writer thread
    (or, for a tee without a pool, written with tee.write_many).
    order: an iterator of indices shared by the threads verifying one batch (each
    takes the next index when it is free, so they finish together); default all.
    key: the DataKey of keyed ids (protocol/ids.py), None for plain BLAKE3, or
    _OPAQUE_LIST / _OPAQUE_CHUNK for an opaque backup (_open_opaque, with `sizes`)."""
    if out is None:
        out = [None] * len(msgs)
    pooled = hasattr(tee, "submit")
    for i in (range(len(msgs)) if order is None else order):
        msg, write = msgs[i], writes[i]
        if type(key) is str:
            try:
                out[i] = _open_opaque(msg, key, sizes)
            except RemoteProtocolError as exc:
                out[i] = exc
            continue
        raw = msg.codec == CODEC_RAW
        own = None                        # a tee pool buffer this message holds
        if write and pooled and msg.raw_len <= tee.chunk_size:
            own = buf = tee.buffer(msg.raw_len)
        else:
            buf = None if raw else _scratch(msg.raw_len + _PAGE)
        try:
            plain = open_data_into(msg, buf, key)
        except (ChunkHashMismatch, RemoteProtocolError) as exc:
            if own is not None:
                tee.release(own)
            out[i] = exc
            continue
        out[i] = (msg.payload if raw else bytes(plain)) if keep else True
        if write:
            if own is not None:
                if raw:
                    tee.fill(own, msg.payload)
                plain.release()
                tee.submit(msg.id, own, msg.raw_len)   # the writer thread owns it now
            else:
                tee.write_many([(msg.id, plain)])
        plain.release()
    return out


class DownloadError(Exception):
    """A download cannot complete; `missing` lists the chunk ids it lacks."""

    def __init__(self, message: str, *, manifest_id: bytes = b"",
                 missing: Iterable[bytes] = ()):
        self.manifest_id = manifest_id
        self.missing = tuple(missing)
        if self.missing:
            shown = ", ".join(c.hex() for c in self.missing[:8])
            more = f" and {len(self.missing) - 8} more" if len(self.missing) > 8 else ""
            message = f"{message}: {len(self.missing)} chunk(s) unavailable: {shown}{more}"
        super().__init__(message)


@dataclass(frozen=True)
class DownloadProgress:
    phase: str                    # "lists" (hash-list pieces) or "chunks"
    done_chunks: int
    needed_chunks: int
    done_bytes: int               # plaintext bytes of the verified new chunks (the unit
                                  # of needed_bytes: a bar of needed_bytes ends full)
    needed_bytes: int             # plaintext bytes of the chunks needed
    bytes_by_peer: dict           # peer id -> verified new wire bytes it served (all phases)
    banned: tuple = ()
    wire_bytes: int = 0           # wire bytes of the verified new chunks (compressed or not)


@dataclass
class DownloadResult:
    manifest_id: bytes
    manifest: Manifest
    chunks_total: int = 0         # non-zero positions of the image
    chunks_distinct: int = 0      # distinct non-zero chunk ids
    chunks_repeated: int = 0      # positions repeating an earlier chunk (fetched once)
    chunks_local: int = 0         # distinct chunks (and list pieces) already held
    chunks_fetched: int = 0       # chunks and list pieces fetched and verified
    bytes_fetched: int = 0        # their wire bytes
    bytes_by_peer: dict = field(default_factory=dict)
    duplicate_bytes: int = 0      # wire bytes of copies that arrived second
    bad_chunks: int = 0           # responses that failed verification
    banned: list = field(default_factory=list)
    failed_peers: list = field(default_factory=list)
    seconds: float = 0.0          # trio clock (virtual under simnet)
    chunk_seconds: float = 0.0    # of which the chunk phase
    rate_by_peer: dict = field(default_factory=dict)   # bytes/s each peer delivered at
    slow_peers: list = field(default_factory=list)     # peers slow at the end (held at 1)
    opaque: bool = False          # kept for the holders of a data key this node lacks


@dataclass(frozen=True)
class _Peer:
    """A contact as the session wants it (id, addr)."""
    id: bytes
    addr: str


class Downloader:
    def __init__(self, transport, sink, *, finder=None, peers: Iterable = (),
                 rng: random.Random, progress: Callable[[DownloadProgress], None] | None = None,
                 tunables: Tunables = Tunables(), stall_timeout: float = 60.0,
                 scores=None, max_providers: int = 32, open_timeout: float = 10.0,
                 request_timeout: float = 30.0, verify_in_thread: bool = False,
                 fast=None, tee=None, opaque_ok: bool = False):
        self.transport = transport
        # tee: gets every position's chunk id (tee.begin(manifest, ids)) and, right
        # after its check (in a worker thread when verify_in_thread), the verified
        # plaintext of each new chunk: with a buffer pool (node.service.restore_staged.StagedImage:
        # buffer/submit/release, written by its own writer thread) the chunk is
        # decoded straight into a pool buffer and submitted; else
        # tee.write_many([(cid, plain)]). tee.finish() (if it has one) at the end of
        # the chunk phase waits for the queued writes and raises a write error.
        # StagedImage writes the image while it downloads.
        self.tee = tee
        # opaque_ok: a manifest keyed with a data key this node lacks is still fetched,
        # as records kept for that key's holders (sink.begin_opaque; a fetch by a
        # storage-only member), instead of failing; never with a tee (nothing here can
        # read such a backup)
        self.opaque_ok = opaque_ok and tee is None
        self._opaque = False
        self.fast = fast                  # node.net.fast_channel.FastDialer, or None
        self.verify_in_thread = verify_in_thread
        self.sink = sink
        self.finder = finder
        self.peers = list(peers)
        self.rng = rng
        self.progress = progress
        self.tunables = tunables
        self.stall_timeout = stall_timeout
        self.scores = scores
        self.max_providers = max_providers
        self.open_timeout = open_timeout
        self.request_timeout = request_timeout
        self._sessions: dict[bytes, ExchangeSession] = {}
        self._failed: dict[bytes, str] = {}
        self._banned: set[bytes] = set()
        self._by_peer: dict[bytes, int] = {}
        self._nursery = None
        self._put_evs: deque = deque()    # trio.Events of the batches being stored
        self._put_error: Exception | None = None
        self._key = None                  # the DataKey of the manifest's keyed ids, or None
        self._send = None                 # the download's event channel (late Have answers)

    # -- the download ----------------------------------------------------------------------

    async def download(self, manifest_id: bytes) -> DownloadResult:
        t0 = trio.current_time()
        send, recv = trio.open_memory_channel(EVENT_BUFFER)
        self._send = send
        self._sessions, self._failed, self._banned, self._by_peer = {}, {}, set(), {}
        self._put_evs, self._put_error = deque(), None
        error: Exception | None = None
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                with send, recv:
                    contacts = await self._contacts(manifest_id)
                    await self._open_sessions(nursery, contacts, send)
                    data, m = await self._manifest(manifest_id)
                    self._key = await self._id_key(manifest_id, m)
                    res = DownloadResult(manifest_id, m, opaque=self._opaque)
                    ids = await self._chunk_ids(manifest_id, m, recv, res)
                    t1 = trio.current_time()
                    await self._chunks(manifest_id, m, ids, recv, res)
                    res.chunk_seconds = trio.current_time() - t1
                    await self.sink.put_manifest(manifest_id, data)
                    await self.sink.flush()
            except Exception as exc:      # raised below, not wrapped in the nursery's group
                error = exc
            finally:
                nursery.cancel_scope.cancel()
        if error is not None:
            raise error
        res.bytes_by_peer = dict(self._by_peer)
        res.banned = sorted(self._banned)
        res.failed_peers = sorted(self._failed)
        res.seconds = trio.current_time() - t0
        return res

    # -- peers -----------------------------------------------------------------------------

    async def _contacts(self, mid: bytes) -> list:
        found: dict[bytes, object] = {}
        for c in self.peers:
            found.setdefault(c.id, c)
        if self.finder is not None and len(found) < self.max_providers:
            try:
                with trio.move_on_after(self.request_timeout):
                    contacts, _ = await self.finder.find_providers(mid, self.max_providers)
                    for c in contacts:
                        found.setdefault(c.id, c)
            except TransportError:
                pass
        found.pop(self.transport.peer_id, None)
        for pid in [p for p in found if self._reputation_banned(p)]:
            del found[pid]                    # banned by the node: asked for nothing
            self._banned.add(pid)
        return list(found.values())[:max(self.max_providers, len(self.peers))]

    def _reputation_banned(self, peer: bytes) -> bool:
        if self.scores is None:
            return False
        try:
            return self.scores.banned(peer, trio.current_time())
        except Exception:              # scoring is advice; never fail a download on it
            return False

    async def _open_sessions(self, nursery, contacts, send) -> None:
        async def one(c):
            s = ExchangeSession(self.transport, _Peer(c.id, c.addr), events=send.clone(),
                               fast=self.fast)
            try:
                with trio.fail_after(self.open_timeout):
                    await nursery.start(s.run)
            except (TransportError, trio.TooSlowError) as exc:
                self._failed[c.id] = str(exc) or "timeout"
                return
            self._sessions[c.id] = s

        async with trio.open_nursery() as n:
            for c in contacts:
                n.start_soon(one, c)

    def _live(self) -> list[bytes]:
        return [p for p, s in self._sessions.items() if not s.closed and p not in self._failed]

    def _drop(self, peer: bytes, why: str) -> None:
        self._failed.setdefault(peer, why)
        s = self._sessions.get(peer)
        if s is not None and not s.closed and self._nursery is not None:
            self._nursery.start_soon(s.aclose)    # its reader then ends on its own

    def _penalize(self, peer: bytes, reason: str = "malformed") -> None:
        if self.scores is not None:
            try:
                self.scores.penalize(peer, reason, trio.current_time())
            except Exception:          # scoring is advice; never fail a download on it
                pass

    # -- manifest and hash lists -----------------------------------------------------------

    async def _id_key(self, mid: bytes, m: Manifest):
        """The DataKey m's ids are keyed with (None: plain BLAKE3), from the sink
        (sink.begin(m), which also learns which ids are hash lists); a manifest keyed
        with a key this node lacks ends the download here, before any chunk is asked."""
        begin = getattr(self.sink, "begin", None)
        self._opaque = False
        try:
            return await begin(m) if begin is not None else scheme_key(m.key, None)
        except DataKeyMissing as exc:
            opaque = getattr(self.sink, "begin_opaque", None)
            if not self.opaque_ok or opaque is None:
                raise DownloadError(str(exc), manifest_id=mid) from None
        await opaque(m)
        self._opaque = True
        return None

    async def _manifest(self, mid: bytes) -> tuple[bytes, Manifest]:
        data = await self.sink.manifest(mid)
        if data is not None:
            return data, decode_manifest(data)
        found: list = []

        async def ask(peer, answered: trio.Event):
            s = self._sessions[peer]
            try:
                with trio.fail_after(self.request_timeout):
                    msg = await s.get_manifest(mid)
                m = open_manifest(msg)
            except (ChunkHashMismatch, RemoteProtocolError) as exc:
                self._penalize(peer, "wrong bytes")
                self._drop(peer, f"bad manifest: {exc}")
                return
            except (TransportError, trio.TooSlowError) as exc:
                self._drop(peer, str(exc) or "timeout")
                return
            finally:
                answered.set()                # the next peer is asked at once
            if m is not None and not found:
                found.append((msg.data, m))
                n.cancel_scope.cancel()       # the others' answers are not needed

        # hedged: the next peer is asked when the one before answered without it,
        # or after MANIFEST_HEDGE seconds (a peer that accepts and stalls costs that)
        async with trio.open_nursery() as n:
            for peer in self._live():
                answered = trio.Event()
                n.start_soon(ask, peer, answered)
                with trio.move_on_after(MANIFEST_HEDGE):
                    await answered.wait()
        if found:
            return found[0]
        raise DownloadError(f"manifest {mid.hex()} not found: none of "
                            f"{len(self._sessions) + len(self._failed)} peer(s) has it",
                            manifest_id=mid)

    async def _chunk_ids(self, mid: bytes, m: Manifest, recv, res: DownloadResult) -> list:
        """Every position's chunk id (ZERO_ID for zero chunks), fetching the
        hash-list pieces not held locally."""
        lids = list(dict.fromkeys(l for l in m.lists if l != ZERO_ID))
        need = await self.sink.missing(lids) if lids else []
        res.chunks_local += len(lids) - len(need)
        pieces: dict[bytes, bytes] = {}
        if need:
            sizes = {}
            for li, l in enumerate(m.lists):
                sizes.setdefault(l, m.list_len(li) * ID_LEN)
            everyone = {p: (lambda c: True) for p in self._live()}

            def keep(cid, plain):
                pieces[cid] = plain

            await self._swarm("lists", mid, need, sizes, everyone, recv, res, keep)
        ids: list[bytes] = []
        for li, l in enumerate(m.lists):
            n = m.list_len(li)
            if l == ZERO_ID:
                ids.extend([ZERO_ID] * n)
                continue
            plain = pieces.get(l)
            if plain is None:
                plain = await self.sink.read(l)
            if plain is None:
                raise DownloadError("hash list piece vanished from the sink",
                                    manifest_id=mid, missing=[l])
            try:
                ids.extend(split_list(plain, n))
            except RemoteProtocolError as exc:     # verified bytes, wrong length: bad manifest
                raise DownloadError(f"manifest {mid.hex()} is inconsistent: {exc}",
                                    manifest_id=mid) from None
        return ids

    # -- chunks ----------------------------------------------------------------------------

    async def _chunks(self, mid: bytes, m: Manifest, ids: list, recv, res) -> None:
        first: dict[bytes, int] = {}
        total = 0
        for i, c in enumerate(ids):
            if c != ZERO_ID:
                total += 1
                first.setdefault(c, i)
        res.chunks_total = total
        res.chunks_distinct = len(first)
        res.chunks_repeated = total - len(first)
        need = await self.sink.missing(list(first)) if first else []
        res.chunks_local += len(first) - len(need)
        if self.tee is not None:
            self.tee.begin(m, ids)
        if need:
            sizes = {c: m.chunk_len(first[c]) for c in need}
            haves = await self._haves(mid, ids, set(need))
            await self._swarm("chunks", mid, need, sizes, haves, recv, res, None)
        finish = getattr(self.tee, "finish", None)
        if finish is not None:                # the image's queued writes are done
            if self.verify_in_thread:
                await runtime.run_sync(finish)
            else:
                finish()

    async def _haves(self, mid: bytes, ids: list, need: set) -> dict:
        """Every live peer's holdings among `need`, asked in parallel. Returned once
        all answered, or once the first answered (in e seconds) and max(HAVE_SHORT,
        2 e) more passed: the chunk phase starts then, and a later answer joins it
        as a HaveLate event (plan.add_peer). A peer that has not answered
        max(HAVE_GRACE, 4 e) after the first is left out: silent (its session
        received nothing meanwhile: a staller) or too slow ("timeout")."""
        out: dict[bytes, set] = {}
        t0 = trio.current_time()
        first, settled = trio.Event(), trio.Event()
        peers = self._live()
        pending = set(peers)
        scopes = {peer: trio.CancelScope() for peer in peers}
        marks = {peer: self._sessions[peer].bytes_received for peer in peers}
        returned = [False]
        send = self._send.clone()          # closed once every ask has ended

        def finished(peer):
            pending.discard(peer)
            if not pending:
                settled.set()
                send.close()

        async def ask(peer):
            s = self._sessions[peer]
            held: set[bytes] = set()
            try:
                with scopes[peer]:
                    try:
                        with trio.fail_after(self.request_timeout):
                            for start in range(0, len(ids), MAX_HAVE):
                                bits = await s.have(mid, start,
                                                    min(MAX_HAVE, len(ids) - start))
                                for pos in bits.positions():
                                    if pos < len(ids) and ids[pos] in need:
                                        held.add(ids[pos])
                    except RemoteProtocolError as exc:
                        self._penalize(peer)
                        self._drop(peer, f"bad have: {exc}")
                        return
                    except (TransportError, trio.TooSlowError) as exc:
                        self._drop(peer, str(exc) or "timeout")
                        return
                    if not returned[0]:
                        out[peer] = held
                        if not first.is_set():
                            first.set()
                            self._nursery.start_soon(grace, trio.current_time() - t0)
                    else:
                        with trio.move_on_after(self.request_timeout):
                            await send.send(HaveLate(peer, frozenset(held)))
                    return
                silent = s.bytes_received == marks[peer]   # cancelled by grace()
                self._penalize(peer, "silent" if silent else "timeout")
                self._drop(peer, "silent: no Have answer" if silent else "too slow to answer")
            finally:
                finished(peer)

        async def grace(e: float):
            await trio.sleep(max(HAVE_GRACE, 4 * e))
            for peer in list(pending):
                scopes[peer].cancel()

        for peer in peers:
            self._nursery.start_soon(ask, peer)
        async with trio.open_nursery() as w:
            async def all_answered():
                await settled.wait()
                w.cancel_scope.cancel()

            async def first_and_short_grace():
                await first.wait()
                await trio.sleep(max(HAVE_SHORT, 2 * (trio.current_time() - t0)))
                w.cancel_scope.cancel()
            if peers:
                w.start_soon(all_answered)
                w.start_soon(first_and_short_grace)
            else:
                send.close()
        returned[0] = True
        return dict(out)

    async def _swarm(self, phase: str, mid: bytes, need: list, sizes: dict, haves: dict,
                     recv, res: DownloadResult, on_chunk) -> None:
        plan = SwarmPlan(need, sizes, self.rng, self.tunables)
        for peer, have in haves.items():
            if peer in self._banned:          # banned in an earlier phase: stays banned
                continue
            if peer in self._sessions and not self._sessions[peer].closed:
                plan.add_peer(peer, have)
        needed = set(need)
        keep_plain = getattr(self.sink, "needs_plain", True) or on_chunk is not None
        tee = self.tee if phase == "chunks" else None
        key = self._key
        if self._opaque:
            key = _OPAQUE_CHUNK if phase == "chunks" else _OPAQUE_LIST
        done: set[bytes] = set()
        needed_bytes = sum(sizes[c] for c in need)
        done_bytes = wire_bytes = 0
        last_progress = trio.current_time()

        def report():
            if self.progress is not None:
                self.progress(DownloadProgress(
                    phase, len(done), len(needed), done_bytes, needed_bytes,
                    dict(self._by_peer), tuple(sorted(self._banned)), wire_bytes))

        async def handle_batch(evs) -> bool:
            """Apply events in order; the Data ones are verified first (and, when
            new, written into the tee right after their check, from the buffer they
            were decoded into), in up to VERIFY_THREADS worker threads when
            verify_in_thread, each taking the next message when it is free; their
            puts go to the sink as one batch. True when a chunk completed."""
            datas = [i for i, ev in enumerate(evs) if type(ev) is ChunkData]
            results: dict[int, object] = {}
            if datas:
                msgs = [evs[i].data for i in datas]
                writes = []
                if tee is not None:
                    claimed = set()          # the first copy of a new chunk is written
                    for msg in msgs:
                        cid = msg.id
                        w = cid in needed and cid not in done and cid not in claimed
                        if w:
                            claimed.add(cid)
                        writes.append(w)
                else:
                    writes = [False] * len(msgs)
                k = min(VERIFY_THREADS, len(msgs)) if self.verify_in_thread else 1
                if k > 1:
                    out = [None] * len(msgs)
                    order = iter(range(len(msgs)))      # shared: next() holds the GIL
                    errors: list = []

                    async def one():
                        try:
                            await runtime.run_sync(
                                _open_batch, msgs, writes, tee, keep_plain, order, out, key,
                                sizes)
                        except Exception as exc:    # raised below as itself
                            errors.append(exc)

                    async with trio.open_nursery() as n:
                        for _ in range(k):
                            n.start_soon(one)
                    if errors:
                        raise errors[0]
                elif self.verify_in_thread:
                    out = await runtime.run_sync(
                        _open_batch, msgs, writes, tee, keep_plain, None, None, key, sizes)
                else:
                    out = _open_batch(msgs, writes, tee, keep_plain, key=key, sizes=sizes)
                results = dict(zip(datas, out))
            puts: list = []
            progressed = False
            for i, ev in enumerate(evs):
                progressed |= handle(ev, results.get(i), puts)
            if puts:
                if self.verify_in_thread and self._nursery is not None:
                    # this batch is stored while the next ones are verified (at most
                    # PUT_DEPTH batches queued: a slow write or commit does not stall
                    # verifying at once)
                    await self._put_wait(PUT_DEPTH - 1)
                    ev = trio.Event()
                    self._put_evs.append(ev)
                    self._nursery.start_soon(self._put_bg, puts, ev)
                else:
                    await self._sink_put(puts)
            return progressed

        def handle(ev, verified, puts) -> bool:
            """Apply one event (Data: already verified, `verified` is the plaintext
            (keep_plain), True, or the exception); True when it completed a chunk."""
            nonlocal done_bytes, wire_bytes
            now = trio.current_time()
            peer = ev.peer
            if type(ev) is SessionFailed:
                plan.remove_peer(peer)
                if isinstance(ev.error, RemoteProtocolError):
                    self._penalize(peer)
                self._failed.setdefault(peer, str(ev.error))
                return False
            if type(ev) is ChunkMissing:
                plan.on_missing(peer, ev.cid)
                return False
            if type(ev) is HaveLate:
                s = self._sessions.get(peer)
                if phase == "chunks" and peer not in self._banned and s is not None \
                        and not s.closed:
                    try:
                        plan.add_peer(peer, set(ev.have))
                    except ValueError:        # known already: nothing to add
                        return False
                    marks[peer] = s.bytes_received
                return False
            msg = ev.data
            cid = msg.id
            plain = verified                  # late and extra copies too: a liar is a liar
            if isinstance(plain, Exception):
                res.bad_chunks += 1
                plan.on_bad(peer, cid, now)
                self._penalize(peer, "wrong bytes")
                if plan.is_banned(peer):
                    self._banned.add(peer)
                return False
            if cid not in needed or cid in done:
                plan.on_data(peer, cid, len(msg.payload), ev.at)   # a late or extra copy
                return False
            puts.append((cid, plain if keep_plain else None,
                         (msg.codec, msg.raw_len, msg.payload)))
            if on_chunk is not None:
                on_chunk(cid, plain)
            plan.on_data(peer, cid, len(msg.payload), ev.at)
            done.add(cid)
            done_bytes += sizes[cid]          # = msg.raw_len (verified)
            wire_bytes += len(msg.payload)
            res.chunks_fetched += 1
            res.bytes_fetched += len(msg.payload)
            self._by_peer[peer] = self._by_peer.get(peer, 0) + len(msg.payload)
            return True

        marks = {p: s.bytes_received for p, s in self._sessions.items()}
        while not plan.finished:
            now = trio.current_time()
            for peer in dict.fromkeys(p for p, _ in plan.expire(now)):
                self._expired(plan, peer, marks)
            await self._cancel(plan.take_cancelled())
            for peer, batch in plan.next_requests(now):
                s = self._sessions.get(peer)
                try:
                    if s is None:
                        raise TransportError("no session")
                    await s.get(batch)
                except TransportError as exc:
                    plan.remove_peer(peer)
                    self._failed.setdefault(peer, str(exc))
            if plan.stuck(now):
                raise DownloadError(f"cannot download {phase} of manifest {mid.hex()}",
                                    manifest_id=mid, missing=plan.unavailable())
            stall_at = last_progress + self.stall_timeout
            deadline = plan.next_deadline(now)
            wake = stall_at if deadline is None else min(deadline, stall_at)
            evs = []
            with trio.move_on_at(wake):
                evs.append(await recv.receive())
            for _ in range(VERIFY_BATCH - 1):      # drain what is ready, bounded
                try:
                    evs.append(recv.receive_nowait())
                except trio.WouldBlock:
                    break
            progressed = await handle_batch(evs) if evs else False
            for peer in list(self._sessions):
                if plan.is_banned(peer):
                    self._banned.add(peer)
            if progressed:
                last_progress = trio.current_time()
                report()
            elif trio.current_time() >= stall_at and not plan.finished:
                left = [c for c in need if c not in done]
                raise DownloadError(f"download of manifest {mid.hex()} stalled: no chunk "
                                    f"arrived for {self.stall_timeout:g} s",
                                    manifest_id=mid, missing=left)
        await self._put_wait()
        report()
        now = trio.current_time()
        for peer in plan.peers():             # asked, and answered nothing to the end
            sent = plan.first_request(peer)
            s = self._sessions.get(peer)
            if sent is not None and now - sent >= self.tunables.min_timeout \
                    and s is not None and s.bytes_received == marks.get(peer):
                self._penalize(peer, "silent")
        res.duplicate_bytes += plan.progress().duplicate_bytes
        if phase == "chunks":
            for peer in plan.peers():
                if plan.rate(peer) is not None:
                    res.rate_by_peer[peer] = plan.rate(peer)
                if plan.is_slow(peer):
                    res.slow_peers.append(peer)

    def _expired(self, plan: SwarmPlan, peer: bytes, marks: dict) -> None:
        """A peer's requests expired (swarm_plan rule 4). If its session received
        nothing since the last time (a request accepted and never answered) that
        is a stall, else a timeout (a slow link); both count in the node's
        reputation, and a peer it bans now leaves this download too."""
        s = self._sessions.get(peer)
        got = None if s is None else s.bytes_received
        stalled = got is not None and got == marks.get(peer)
        marks[peer] = got
        self._penalize(peer, "silent" if stalled else "timeout")
        if self._reputation_banned(peer):
            plan.ban(peer)
            self._banned.add(peer)

    async def _cancel(self, redundant) -> None:
        """Cancel the copies another peer's answer made redundant (endgame): a copy
        its peer has not sent yet costs a Missing frame instead of the chunk."""
        by_peer: dict[bytes, list] = {}
        for peer, cid in redundant:
            by_peer.setdefault(peer, []).append(cid)
        for peer, ids in by_peer.items():
            s = self._sessions.get(peer)
            if s is not None and not s.closed:
                await s.cancel(ids)

    # -- sink writes ---------------------------------------------------------------------

    async def _sink_put(self, puts) -> None:
        put_many = getattr(self.sink, "put_many", None)
        if put_many is not None:
            await put_many(puts)
        else:
            for cid, plain, wire in puts:
                await self.sink.put(cid, plain, wire=wire)

    async def _put_bg(self, puts, ev) -> None:
        try:
            await self._sink_put(puts)
        except Exception as exc:          # surfaced by the next _put_wait
            self._put_error = exc
        finally:
            ev.set()

    async def _put_wait(self, keep: int = 0) -> None:
        """Wait until at most `keep` batches are being stored in the background
        (the oldest first: the sink's lock stores them in order); raise an error
        one of them hit."""
        while len(self._put_evs) > keep:
            await self._put_evs[0].wait()
            self._put_evs.popleft()
        if self._put_error is not None:
            raise self._put_error


__all__ = ["Downloader", "DownloadResult", "DownloadProgress", "DownloadError", "EVENT_BUFFER"]
