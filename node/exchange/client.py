"""The requesting side of the chunk exchange: one long-lived stream per peer.

    async with open_session(transport, contact, events=send_channel) as s:
        m = await s.get_manifest(mid)            # ManifestData (verify: open_manifest)
        bits = await s.have(mid, start, count)   # HaveBits
        await s.get(ids)                         # returns once the Get is sent

or, under a nursery the caller owns: `s = ExchangeSession(...); await nursery.start(s.run)`.

Pipelining. Requests are written as they come (a lock keeps frames whole and
the queue of expected answers in the order the requests were written); the
server answers in order, so one reader task matches every response to the
head of that queue. Answers to get_manifest/have wake their caller. Answers
to get(ids) are delivered, one per id in request order, as events on the
`events` channel the session was given (several sessions may share one):

    ChunkData(peer, data, at)    an unverified exchange.Data: use open_data();
                                 at: trio.current_time() when its last byte was read
    ChunkMissing(peer, cid)
    SessionFailed(peer, error)   the session is over (TransportError or
                                 RemoteProtocolError); every get() still
                                 unanswered is lost with it (sent once, last)

The reader blocks on a full events channel, so a slow consumer stops the
reader, the transport's flow control stops the server, and memory stays
bounded by the channel size plus what the caller chose to request (the swarm
plan's windows).

Transport: a libp2p stream (PROTOCOL_ID), or, given a FastDialer, a
node/net/fast_channel.py channel (same protocol, fewer Python layers; libp2p is the
fallback when the peer offers none).

Errors: anything the stream raises becomes TransportError; a response that
does not decode or does not answer the request at the head of the queue is
RemoteProtocolError; either closes the session and fails every waiter.
"""
from __future__ import annotations

import itertools
import logging
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from hypersdk.node.net.transport import TransportError
from hypersdk.protocol.errors import RemoteProtocolError
from hypersdk.protocol.exchange import (
    MAX_GET_IDS,
    PROTOCOL_ID,
    Cancel,
    Data,
    Get,
    GetManifest,
    Have,
    HaveBits,
    ManifestData,
    Missing,
)
from hypersdk.protocol.exchange_framing import ExchangeDecoder, encode_message

log = logging.getLogger(__name__)

RECV_MAX = 4 << 20


@dataclass(frozen=True)
class ChunkData:
    peer: bytes
    data: Data
    at: float          # when it arrived; the swarm measures the peer's rate with it, not
                       # with the later time its batch of events is verified and applied


@dataclass(frozen=True)
class ChunkMissing:
    peer: bytes
    cid: bytes


@dataclass(frozen=True)
class SessionFailed:
    peer: bytes
    error: Exception


class _Waiter:
    __slots__ = ("request", "event", "result", "error")

    def __init__(self, request):
        self.request = request
        self.event = trio.Event()
        self.result = None
        self.error: Exception | None = None


class _GetState:
    __slots__ = ("request", "next")

    def __init__(self, request: Get):
        self.request = request
        self.next = 0


class ExchangeSession:
    def __init__(self, transport, contact, *, events: trio.MemorySendChannel | None = None,
                 fast=None):
        """contact: anything with .id (node id) and .addr (dht.contact.Contact).
        fast: a node.net.fast_channel.FastDialer: the session then runs over a fast
        channel to the peer when it can open one, else over a libp2p stream."""
        self.transport = transport
        self.fast = fast
        self.via_fast = False
        self.contact = contact
        self.peer = contact.id
        self.events = events
        self._stream = None
        self._queue: deque = deque()              # _Waiter | _GetState, in send order
        self._send_lock = trio.Lock()
        self._rids = itertools.count(1)
        self._closed = False
        self.error: Exception | None = None
        self._done = trio.Event()
        self.bytes_received = 0

    # -- lifecycle -----------------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Open the stream, then read responses until the session ends.
        An open failure raises TransportError from nursery.start."""
        if self._stream is None:
            await self.connect()
        task_status.started()
        try:
            try:
                await self._read_loop()
                err = self.error or TransportError("session closed")
            except (TransportError, RemoteProtocolError) as exc:
                err = exc
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                err = TransportError("session closed: nobody takes its events")
            await self._fail(err)
            if self.events is not None:
                try:
                    await self.events.send(SessionFailed(self.peer, self.error))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
        finally:
            with trio.CancelScope(shield=True):
                await self._fail(TransportError("session closed"))

    async def connect(self) -> None:
        """Open the stream (run() does it if not done); TransportError on failure."""
        if self.fast is not None:
            try:
                self._stream = await self.fast.open(self.contact.id, self.contact.addr)
                self.via_fast = True
                return
            except TransportError:
                pass                      # no fast channel: the libp2p stream will do
        try:
            self._stream = await self.transport.open_stream(
                self.contact.id, self.contact.addr, PROTOCOL_ID)
        except (TransportError, trio.BrokenResourceError, OSError) as exc:
            raise TransportError(f"cannot open exchange stream to "
                                 f"{self.peer.hex()[:12]}: {exc}") from None

    async def aclose(self) -> None:
        """Close the stream; the reader ends and every waiter fails."""
        if not self._closed:
            await self._fail(TransportError("session closed"))

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def outstanding(self) -> int:
        """Requests written and not fully answered."""
        return len(self._queue)

    # -- requests ------------------------------------------------------------------------

    async def get_manifest(self, mid: bytes) -> ManifestData:
        return await self._call(GetManifest(next(self._rids), mid))

    async def have(self, mid: bytes, start: int, count: int) -> HaveBits:
        return await self._call(Have(next(self._rids), mid, start, count))

    async def get(self, ids) -> None:
        """Ask for chunks (at most MAX_GET_IDS per Get; longer lists are split);
        answers come on the events channel."""
        if self.events is None:
            raise RuntimeError("get() needs a session created with an events channel")
        ids = list(ids)
        for i in range(0, len(ids), MAX_GET_IDS):
            req = Get(next(self._rids), tuple(ids[i:i + MAX_GET_IDS]))
            await self._send(req, _GetState(req))

    async def cancel(self, ids) -> None:
        """Tell the peer not to send these chunks of our earlier get()s (another
        peer's copy arrived first): those it has not sent yet are answered with
        ChunkMissing instead of ChunkData. Best effort: a copy already on its way
        still arrives; a session that is closed ignores it."""
        ids = list(ids)
        for i in range(0, len(ids), MAX_GET_IDS):
            async with self._send_lock:
                if self._closed:
                    return
                try:
                    await self._write(encode_message(Cancel(tuple(ids[i:i + MAX_GET_IDS]))))
                except TransportError:
                    return                # the session has failed; its reader says so

    async def _call(self, req):
        w = _Waiter(req)
        await self._send(req, w)
        await w.event.wait()
        if w.error is not None:
            raise w.error
        return w.result

    async def _send(self, req, entry) -> None:
        async with self._send_lock:
            if self._closed:
                raise self.error or TransportError("session closed")
            self._queue.append(entry)
            await self._write(encode_message(req))

    async def _write(self, frame: bytes) -> None:
        """Write one frame (the caller holds the send lock); a failure fails the
        session and raises TransportError."""
        try:
            await self._stream.send_all(frame)
        except (TransportError, trio.BrokenResourceError, trio.ClosedResourceError,
                OSError) as exc:
            err = TransportError(f"send to {self.peer.hex()[:12]} failed: {exc}")
            await self._fail(err)
            raise err from None

    # -- the reader ----------------------------------------------------------------------

    async def _read_loop(self) -> None:
        dec = ExchangeDecoder()
        stream = self._stream
        while not self._closed:
            msg = dec.next_message()
            if msg is None:
                if dec.room == 0:
                    raise TransportError(f"{self.peer.hex()[:12]} closed the stream")
                try:
                    data = await stream.receive_some(min(dec.room, RECV_MAX))
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    raise TransportError(f"receive from {self.peer.hex()[:12]}: {exc}") from None
                self.bytes_received += len(data)
                dec.receive_data(data)
                continue
            await self._deliver(msg)

    async def _deliver(self, msg) -> None:
        if not self._queue:
            raise RemoteProtocolError(f"unsolicited {type(msg).__name__}")
        head = self._queue[0]
        if type(head) is _GetState:
            req = head.request
            want = req.ids[head.next]
            if type(msg) not in (Data, Missing) or msg.rid != req.rid or msg.id != want:
                raise RemoteProtocolError(
                    f"expected the answer for chunk {want.hex()[:16]} of get {req.rid}, "
                    f"got {msg!r:.120}")
            head.next += 1
            if head.next == len(req.ids):
                self._queue.popleft()
            ev = (ChunkData(self.peer, msg, trio.current_time()) if type(msg) is Data
                  else ChunkMissing(self.peer, msg.id))
            await self.events.send(ev)
            return
        req = head.request
        ok = msg.rid == req.rid and (
            (type(req) is GetManifest and type(msg) is ManifestData
             and msg.manifest_id == req.manifest_id)
            or (type(req) is Have and type(msg) is HaveBits
                and (msg.manifest_id, msg.start, msg.count)
                == (req.manifest_id, req.start, req.count)))
        if not ok:
            raise RemoteProtocolError(f"{msg!r:.120} does not answer {req!r:.120}")
        self._queue.popleft()
        head.result = msg
        head.event.set()

    async def _fail(self, exc: Exception) -> None:
        if self._closed:
            return
        self._closed = True
        self.error = exc
        for e in self._queue:
            if type(e) is _Waiter:
                e.error = exc
                e.event.set()
        self._queue.clear()
        if self._stream is not None:
            with trio.CancelScope(shield=True):
                try:
                    await self._stream.aclose()
                except Exception:
                    pass
        self._done.set()


@asynccontextmanager
async def open_session(transport, contact, *, events=None, fast=None):
    """An ExchangeSession with its reader running; closed on exit."""
    s = ExchangeSession(transport, contact, events=events, fast=fast)
    await s.connect()                     # a failure raises here, not in a group
    async with trio.open_nursery() as nursery:
        await nursery.start(s.run)
        try:
            yield s
        finally:
            await s.aclose()
            nursery.cancel_scope.cancel()


async def get_some(transport, contact, cids) -> dict:
    """{cid: Data} of what `contact` sends for one Get of `cids` (1..MAX_GET_IDS
    distinct ids): the chunks it holds, unverified (the caller checks them). A
    failure (unreachable, a broken session) ends it with what arrived so far; the
    caller bounds the time (trio.fail_after)."""
    out: dict = {}
    send, recv = trio.open_memory_channel(len(cids))
    try:
        async with open_session(transport, contact, events=send) as s:
            await s.get(list(cids))
            for _ in cids:
                ev = await recv.receive()
                if type(ev) is ChunkData:
                    out[ev.data.id] = ev.data
                elif type(ev) is not ChunkMissing:
                    break
    except (TransportError, RemoteProtocolError, trio.BrokenResourceError,
            trio.ClosedResourceError, OSError) as exc:
        log.info("chunks from %s: %s", contact.id.hex()[:12], exc)
    return out


__all__ = ["ExchangeSession", "open_session", "get_some", "ChunkData", "ChunkMissing",
           "SessionFailed"]
