"""The DHT's wire I/O and peer bookkeeping, under node/kademlia/service.py: the
requesting side (`request`), the serving side (`Responder`), peer scores and
the signed-record store.

One request per stream: the requester opens a stream, sends one frame, reads
one frame back (bounded by framing.MAX_FRAME, and by a deadline its caller
sets with trio.fail_after), and closes. Anything else a peer does on a stream
is misbehaviour, which `request` reports as `RequestFailed(misbehaved=True)`
and the service turns into a penalty in `PeerScores`.

Scoring: node/net/reputation.py (PeerScores, shared by every protocol of the
node); this module reports offences by the names of its PENALTIES. A plain
timeout or unreachable peer is no offence here: that is RoutingTable.failed()'s
business (the service reports a timeout as "timeout", which cannot ban).
"""
from __future__ import annotations

import heapq
import logging

import trio

from hypersdk.dht.contact import Contact
from hypersdk.node.net.reputation import (  # noqa: F401  (re-exported: the DHT's names)
    BAN_SCORE,
    BAN_TIME,
    MAX_CREDIT,
    MAX_TRACKED,
    PENALTIES,
    REWARD,
    PeerScores,
)
from hypersdk.node.net.transport import TransportError
from hypersdk.protocol.dht_messages import (
    MAX_PEERS,
    MAX_PROVIDERS,
    RESPONSE_TYPE,
    Ack,
    AddProvider,
    AddProviders,
    FindNode,
    GetProviders,
    GetRecord,
    Nodes,
    PeerInfo,
    Ping,
    Pong,
    Providers,
    PutRecord,
    RecordFound,
    SignedRecord,
    answers,
)
from hypersdk.protocol.errors import RemoteProtocolError
from hypersdk.protocol.framing import (
    HEADER,
    MAX_FRAME,
    FrameDecoder,
    OversizedFrame,
    encode_message,
)

log = logging.getLogger(__name__)

PROTOCOL = "/hypersdk/dht/1"
CLOSE_GRACE = 1.0                 # seconds a close may take once its request is over

MAX_RECORDS = 1 << 16


# -- conversions ---------------------------------------------------------------------

# Both are immutable and converting them is the hot path (every reply carries k
# peers): conversions are cached by id (a bytes hash is computed once per
# object, a dataclass hash on every call), checked against addr and site.
# Bounded: emptied when full.
_CACHE_SIZE = 1 << 16
_INFOS: dict[bytes, PeerInfo] = {}
_CONTACTS: dict[bytes, Contact] = {}


def to_info(c: Contact) -> PeerInfo:
    p = _INFOS.get(c.id)
    if p is None or p.addr != c.addr or p.site != c.site:
        if len(_INFOS) >= _CACHE_SIZE:
            _INFOS.clear()
        p = _INFOS[c.id] = PeerInfo(c.id, c.addr, c.site)
    return p


def to_contact(p: PeerInfo) -> Contact:
    c = _CONTACTS.get(p.id)
    if c is None or c.addr != p.addr or c.site != p.site:
        if len(_CONTACTS) >= _CACHE_SIZE:
            _CONTACTS.clear()
        c = _CONTACTS[p.id] = Contact(p.id, p.addr, p.site)
    return c


# -- one request, one reply ------------------------------------------------------------

class RequestFailed(Exception):
    """A request got no usable reply. `misbehaved`: the peer broke the protocol
    (score it down), rather than being unreachable or slow."""

    def __init__(self, reason: str, misbehaved: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.misbehaved = misbehaved


class PeerClosed(Exception):
    """The stream ended cleanly before a frame began."""


class FrameReader:
    """Reads one message off a stream, never buffering more than one frame.
    `decoder`: a FrameDecoder of another protocol (DHT messages by default)."""

    def __init__(self, stream, decoder: FrameDecoder | None = None):
        self._stream = stream
        self._dec = decoder if decoder is not None else FrameDecoder()
        self._eof = False
        self.received = 0            # bytes read, to tell "stalled" from "silent"

    async def message(self):
        """The next message. RemoteProtocolError for bad bytes, PeerClosed at a clean EOF."""
        while (msg := self._dec.next_message()) is None:
            if self._eof:
                raise PeerClosed()
            data = await self._stream.receive_some(self._dec.room)
            self.received += len(data)
            self._eof = not data
            self._dec.receive_data(data)
        return msg

    @property
    def trailing(self) -> bool:
        """Bytes arrived after the message (there must be exactly one frame)."""
        return self._dec.room < self._dec.max_frame + HEADER


def offence(exc: RemoteProtocolError) -> str:
    return "oversized" if isinstance(exc, OversizedFrame) else "malformed"


async def close_quietly(stream) -> None:
    """Close the server side of a stream, bounded; never raise. (Under a cancelled
    scope this is trio's aclose_forcefully: the stream is closed, not flushed.)"""
    with trio.move_on_after(CLOSE_GRACE):
        try:
            await stream.aclose()
        except (TransportError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass


async def request(transport, contact: Contact, msg, timeout: float):
    """Send `msg` to `contact` and return its reply, or raise RequestFailed."""
    if getattr(transport, "rpc_enabled", False):
        return await _request_rpc(transport, contact, msg, timeout)
    reader = None
    try:
        with trio.fail_after(timeout):
            stream = await transport.open_stream(contact.id, contact.addr, PROTOCOL)
            try:
                await stream.send_all(encode_message(msg))
                reader = FrameReader(stream)
                reply = await reader.message()
            finally:                 # within the deadline; forceful once it has passed
                await stream.aclose()
    except trio.TooSlowError:
        if reader is not None and reader.received:
            raise RequestFailed("stalled", misbehaved=True) from None
        raise RequestFailed("timeout") from None
    except RemoteProtocolError as exc:
        raise RequestFailed(offence(exc), misbehaved=True) from None
    except (PeerClosed, TransportError, trio.BrokenResourceError, trio.ClosedResourceError):
        raise RequestFailed("unreachable") from None
    if not answers(msg, reply):
        raise RequestFailed("wrong reply", misbehaved=True)
    if reader.trailing:
        raise RequestFailed("trailing data", misbehaved=True)
    return reply


async def _request_rpc(transport, contact: Contact, msg, timeout: float):
    """`request` over a transport's one-shot request path (simnet's fast path,
    simnet/transport.py): the same frame out, the same checks on the frame back."""
    try:        # the transport enforces the deadline (no cancel scope per request)
        data = await transport.rpc(contact.id, contact.addr, PROTOCOL, encode_message(msg),
                                   timeout)
    except trio.TooSlowError:
        raise RequestFailed("timeout") from None
    except (TransportError, trio.BrokenResourceError, trio.ClosedResourceError):
        raise RequestFailed("unreachable") from None
    dec = FrameDecoder()
    try:
        dec.receive_data(data[:dec.room])
        dec.receive_data(b"")
        reply = dec.next_message()
    except RemoteProtocolError as exc:
        raise RequestFailed(offence(exc), misbehaved=True) from None
    if len(data) > MAX_FRAME + HEADER:
        raise RequestFailed("trailing data", misbehaved=True)
    if reply is None:
        raise RequestFailed("unreachable")
    if not answers(msg, reply):
        raise RequestFailed("wrong reply", misbehaved=True)
    if dec.room < MAX_FRAME + HEADER:
        raise RequestFailed("trailing data", misbehaved=True)
    return reply


# -- signed records --------------------------------------------------------------------

class RecordStore:
    """Signed records by key. A verified record replaces the stored one when it
    has the same author and a higher seq (highest seq wins); the first author to
    store a key on this node keeps it. Binding keys to authors (e.g. key =
    BLAKE3(author || name)) is the records' users' policy, not decided here."""

    def __init__(self, max_records: int = MAX_RECORDS):
        self.max_records = max_records
        self._records: dict[bytes, SignedRecord] = {}

    def put(self, record: SignedRecord) -> bool:
        """Store if newer; the caller has verified the signature."""
        old = self._records.get(record.key)
        if old is None:
            if len(self._records) >= self.max_records:
                return False
        elif old.author != record.author or record.seq < old.seq:
            return False
        elif record.seq == old.seq:
            return record == old           # the same record again: stored already
        self._records[record.key] = record
        return True

    def get(self, key: bytes) -> SignedRecord | None:
        return self._records.get(key)

    def __len__(self) -> int:
        return len(self._records)


# -- the serving side ------------------------------------------------------------------

class Responder:
    """Answers one request per stream from a DhtService's state (its routing table,
    provider store, record store, scores). Never raises out of `handle`: a bug is
    counted in svc.counters["handler errors"], kept in svc.errors, and the stream
    closed (an exception escaping a py-libp2p handler kills the host)."""

    def __init__(self, svc):
        self.svc = svc

    async def handle(self, stream, peer_id: bytes) -> None:
        svc = self.svc
        try:
            await self._serve(stream, peer_id)
        except (TransportError, trio.BrokenResourceError, trio.ClosedResourceError):
            svc.counters["inbound broken"] += 1
        except Exception as exc:                # a bug: keep it for tests, not for the peer
            svc.counters["handler errors"] += 1
            svc.errors.append(exc)
            log.exception("DHT handler failed")
        finally:
            await close_quietly(stream)

    async def _serve(self, stream, peer_id: bytes) -> None:
        svc = self.svc
        if not svc.running or svc.scores.banned(peer_id, trio.current_time()):
            svc.counters["refused"] += 1
            return
        req = None
        with trio.move_on_after(svc.request_timeout) as deadline:
            req = await self._read_request(FrameReader(stream), peer_id)
            if req is None:
                return
            now = trio.current_time()
            deadline.deadline = now + svc.request_timeout       # as long again to answer
            await stream.send_all(encode_message(self._respond(req, peer_id, now)))
        if req is None:                          # the deadline passed inside the request
            svc.penalize(peer_id, "stalled", trio.current_time())

    def handle_rpc(self, data: bytes, peer_id: bytes) -> bytes | None:
        """The synchronous form of `handle` for a transport's one-shot request
        path (simnet/transport.py, "Fast requests"): one request frame in, the
        reply frame out, or None to close without answering. Same checks, same
        penalties, same answers; never raises."""
        svc = self.svc
        now = trio.current_time()
        try:
            if not svc.running or svc.scores.banned(peer_id, now):
                svc.counters["refused"] += 1
                return None
            dec = FrameDecoder()
            try:
                if len(data) > dec.room:
                    svc.penalize(peer_id, "oversized", now)
                    return None
                dec.receive_data(data)
                dec.receive_data(b"")
                req = dec.next_message()
            except RemoteProtocolError as exc:
                svc.penalize(peer_id, offence(exc), now)
                return None
            if req is None:                      # it asked nothing
                return None
            if type(req) not in RESPONSE_TYPE:
                svc.penalize(peer_id, "not a request", now)
                return None
            if dec.room < MAX_FRAME + HEADER:
                svc.penalize(peer_id, "trailing data", now)
                return None
            return encode_message(self._respond(req, peer_id, now))
        except Exception as exc:                 # a bug: keep it for tests, not for the peer
            svc.counters["handler errors"] += 1
            svc.errors.append(exc)
            log.exception("DHT handler failed")
            return None

    def _respond(self, req, peer_id: bytes, now: float):
        svc = self.svc
        svc.counters["requests served"] += 1
        svc.providers.mark_ok(peer_id, now)     # it asked: it is alive
        if req.sender is not None and req.sender.id == peer_id:
            svc.observe(to_contact(req.sender), now)
        elif req.sender is not None:                            # a claim we cannot check
            svc.counters["false sender"] += 1
        return self._answer(req, peer_id, now)

    async def _read_request(self, reader: FrameReader, peer_id: bytes):
        """The one request of a stream, or None (the peer is penalized if it misbehaved)."""
        try:
            req = await reader.message()
        except RemoteProtocolError as exc:
            return self.svc.penalize(peer_id, offence(exc), trio.current_time())
        except PeerClosed:                       # it asked nothing
            return None
        if type(req) not in RESPONSE_TYPE:
            return self.svc.penalize(peer_id, "not a request", trio.current_time())
        if reader.trailing:
            return self.svc.penalize(peer_id, "trailing data", trio.current_time())
        return req

    def _answer(self, req, peer_id: bytes, now: float):
        svc = self.svc
        if isinstance(req, Ping):
            return Pong(req.rid)
        if isinstance(req, FindNode):
            return Nodes(req.rid, self._closer(req.target, peer_id))
        if isinstance(req, GetProviders):
            found = [] if self._malicious() is not None else svc.providers.get(req.key, now)
            return Providers(req.rid, [to_info(c) for c in found[:MAX_PROVIDERS]],
                             self._closer(req.key, peer_id))
        if isinstance(req, AddProvider):         # a peer may announce only itself
            if req.provider.id != peer_id:
                svc.counters["provider records for others refused"] += 1
                return Ack(req.rid, False)
            return Ack(req.rid, self._add_provider(req.key, to_contact(req.provider), now))
        if isinstance(req, AddProviders):        # the batch form, same rule
            if req.provider.id != peer_id:
                svc.counters["provider records for others refused"] += 1
                return Ack(req.rid, False)
            provider = to_contact(req.provider)
            # ProviderStore's rules apply key by key (dht/providers.py: a full
            # store is shared fairly, a full key keeps its live providers);
            # stored only if every key was.
            refused = sum(not self._add_provider(key, provider, now) for key in req.keys)
            if refused:
                svc.counters["batch keys refused"] += refused
            return Ack(req.rid, refused == 0)
        if isinstance(req, PutRecord):
            if not req.record.verify():
                svc.penalize(peer_id, "bad signature", now)
                return Ack(req.rid, False)
            if svc.author_ok is not None and not svc.author_ok(req.record.author):
                svc.counters["records of non-members refused"] += 1   # not stored
                return Ack(req.rid, False)
            return Ack(req.rid, svc.records.put(req.record))
        if isinstance(req, GetRecord):
            return RecordFound(req.rid, svc.records.get(req.key), self._closer(req.key, peer_id))
        raise AssertionError(f"unhandled request {type(req).__name__}")

    def _add_provider(self, key: bytes, provider: Contact, now: float) -> bool:
        svc = self.svc
        if svc.providers.add(key, provider, now):
            return True
        svc.counters["provider records refused"] += 1
        if svc.providers.waiting(key) == provider:   # a full key: check its providers
            svc.check_providers(key)
        return False

    def _closer(self, target: bytes, requester: bytes) -> list[PeerInfo]:
        """The k peers we know closest to target, minus the requester."""
        if (strategy := self._malicious()) is not None:
            return self._lies(target, strategy)
        peers = self.svc.table.closest(target, self.svc.k + 1)
        return [to_info(c) for c in peers if c.id != requester][:min(self.svc.k, MAX_PEERS)]

    def _malicious(self) -> str | None:
        """Simulation hook: None (honest), or how the network model makes us lie:
        its fault "malicious" with strategy="far-peers", "fabricated", or anything
        else for a mix. Read with getattr: a model may have neither method."""
        svc = self.svc
        model = getattr(getattr(svc.transport, "net", None), "model", None)
        if not getattr(model, "is_malicious", lambda addr: False)(svc.own.addr):
            return None
        params = getattr(model, "faults", lambda addr: {})(svc.own.addr).get("malicious")
        return str((params or {}).get("strategy", "mixed"))

    def _lies(self, target: bytes, strategy: str) -> list[PeerInfo]:
        """Real peers far from target and/or fabricated (undialable) ones; for
        "eclipse", the accomplices (the fault's parameter) closest to target, so
        that a walk that trusts us only meets liars."""
        svc, rng = self.svc, self.svc.rng
        if strategy == "eclipse":
            model = svc.transport.net.model
            accomplices = model.faults(svc.own.addr)["malicious"].get("accomplices", ())
            t = int.from_bytes(target, "big")
            near = heapq.nsmallest(svc.k + 1, accomplices,
                                   key=lambda p: t ^ int.from_bytes(p.id, "big"))
            return [p for p in near if p.id != svc.own.id][:min(svc.k, MAX_PEERS)]
        n_real = {"far-peers": svc.k, "fabricated": 0}.get(strategy, svc.k // 2)
        far = bytes(b ^ 0xFF for b in target)
        real = [to_info(c) for c in svc.table.closest(far, n_real)]
        fake = [PeerInfo(rng.randbytes(32), f"/ip4/192.0.2.{rng.randrange(256)}/tcp/4001")
                for _ in range(svc.k - len(real))]
        return (real + fake)[:MAX_PEERS]
