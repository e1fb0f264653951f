"""In-memory Transport for simnet: many nodes in one trio run, virtual time.

A SimNetwork owns the nodes' SimTransports and delivers bytes between them
after the one-way delay its `link` model gives (default: a constant). Each
stream direction is a pipe whose chunks carry an arrival time; arrival times
on a pipe never decrease, so bytes stay in order. Run it under trio's
MockClock(autojump_threshold=0) and simulated hours take seconds.

The network model (regions, RTT matrix, bandwidth, loss, partitions, churn,
per-node faults: simnet/network.py) plugs in through `LinkModel`; this module
only asks it four things: can src dial dst, when do these bytes arrive (None:
the connection is lost; math.inf: never, the peer hangs), what bytes arrive
(`transform`, for corruption), and how long a failed dial takes.

Semantics worth knowing:
- send_all never blocks on bandwidth (an unbounded socket buffer); the model's
  arrival time already includes queueing behind earlier sends.
- A lost send breaks both directions of the stream (TransportError on both
  ends), as a TCP connection that gives up does.
- remove_node breaks every open stream of that node: a departed node's peers
  see a reset, and its own handlers end.
- Fast requests (`SimNetwork(fast_rpc=True)`, what simnet runs use): a
  one-frame request/reply protocol may register a synchronous handler with
  `set_rpc_handler`; `SimTransport.rpc` then carries a request as one
  delivery each way (sleep until the request arrives, run the handler, sleep
  until the reply arrives) instead of a stream, a handler task and a pipe
  per direction. Same model calls (arrival, transform, reachability), same
  failures (TransportError when lost, unreachable or the peer left while the
  request was out; never returns when a peer hangs): about a quarter of the
  scheduler work per request. Streams stay as they are for everything else.
- Determinism: trio shuffles tasks that become runnable together with its own
  private Random. `seed_scheduler(seed)` pins it so that a simnet run repeats
  exactly; the network model draws only from the Random it is given.
"""
from __future__ import annotations

import math
import weakref
from collections import deque
from dataclasses import dataclass, field

import trio

from hypersdk.node.net.transport import TransportError


class LinkModel:
    """Constant one-way delay, nothing lost, everyone reachable."""

    def __init__(self, delay: float = 0.025):
        self.delay = delay

    def reachable(self, src: str, dst: str) -> bool:
        return True

    def arrival(self, src: str, dst: str, nbytes: int, now: float) -> float | None:
        """When nbytes sent now from src arrive at dst (None: lost, the
        connection breaks; math.inf: never delivered, the receiver waits)."""
        return now + self.delay

    def transform(self, src: str, dst: str, data: bytes) -> bytes:
        """The bytes dst receives when src sends `data` (corruption hook)."""
        return data

    def dial_failure_delay(self, src: str, dst: str) -> float:
        """How long a dial from src to an unreachable dst takes to fail."""
        return 2 * self.delay


def seed_scheduler(seed: int) -> None:
    """Make trio's scheduling order a function of `seed`.

    trio runs the tasks that became runnable together in an order drawn from
    a private module-level Random (trio._core._run._r); pytest-trio and
    Hypothesis pin it the same way. Call before trio.run for a reproducible
    simnet run. Uses trio internals: checked by tests/test_simnet_network.py.
    """
    from trio._core import _run
    _run._ALLOW_DETERMINISTIC_SCHEDULING = True
    _run._r.seed(seed)


class _Pipe:
    """One direction of a stream: (arrival time, bytes) chunks in order."""

    def __init__(self):
        self.chunks: deque = deque()
        self.eof_at: float | None = None
        self.reset = False
        self.last = 0.0
        self.lot = trio.lowlevel.ParkingLot()

    def push(self, at: float, data: bytes):
        self.last = max(self.last, at)
        self.chunks.append((self.last, data))
        self.lot.unpark_all()

    def close(self, at: float):
        if self.eof_at is None:
            self.eof_at = max(self.last, at)
            self.lot.unpark_all()

    def break_(self):
        self.reset = True
        self.lot.unpark_all()

    async def pull(self, max_bytes: int) -> bytes:
        while True:
            if self.reset:
                raise TransportError("stream reset")
            now = trio.current_time()
            if self.chunks:
                at, data = self.chunks[0]
                if at <= now:
                    if len(data) <= max_bytes:
                        self.chunks.popleft()
                        return data
                    self.chunks[0] = (at, data[max_bytes:])
                    return data[:max_bytes]
                with trio.move_on_at(at):
                    await self.lot.park()       # a reset wakes us early
                continue
            if self.eof_at is not None:
                if self.eof_at <= now:
                    return b""
                with trio.move_on_at(self.eof_at):
                    await self.lot.park()
                continue
            await self.lot.park()


class SimStream:
    def __init__(self, net: "SimNetwork", src: str, dst: str, inbound: _Pipe, outbound: _Pipe):
        self._net, self._src, self._dst = net, src, dst
        self._in, self._out = inbound, outbound
        self._closed = False

    async def send_all(self, data: bytes) -> None:
        if self._closed:
            raise trio.ClosedResourceError("stream closed")
        if self._out.reset:
            raise TransportError("stream reset")
        await trio.lowlevel.checkpoint()
        if not data:                        # b"" on the wire would read as EOF
            return
        model = self._net.model
        at = model.arrival(self._src, self._dst, len(data), trio.current_time())
        if at is None:                      # lost: the connection breaks (TCP gives up)
            self._out.break_()
            self._in.break_()
            raise TransportError("connection lost")
        self._out.push(at, model.transform(self._src, self._dst, bytes(data)))

    async def receive_some(self, max_bytes: int = 65536) -> bytes:
        if self._closed:
            raise trio.ClosedResourceError("stream closed")
        return await self._in.pull(max_bytes)

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._out.close(self._eof_time())
        await trio.lowlevel.checkpoint()

    def _eof_time(self) -> float:
        at = self._net.model.arrival(self._src, self._dst, 0, trio.current_time())
        return at if at is not None else trio.current_time()


@dataclass(eq=False)
class SimTransport:
    net: "SimNetwork"
    peer_id: bytes
    addr: str
    handlers: dict = field(default_factory=dict)
    rpc_handlers: dict = field(default_factory=dict)
    up: bool = True

    def set_handler(self, protocol: str, handler) -> None:
        self.handlers[protocol] = handler

    def set_rpc_handler(self, protocol: str, handler) -> None:
        """handler(request_bytes, peer_id) -> reply bytes, or None to close
        without a reply; synchronous (module docstring, "Fast requests")."""
        self.rpc_handlers[protocol] = handler

    @property
    def rpc_enabled(self) -> bool:
        return self.net.fast_rpc

    async def rpc(self, peer_id: bytes, addr: str, protocol: str, data: bytes,
                  timeout: float | None = None) -> bytes:
        """One request, one reply over the fast path (module docstring).
        trio.TooSlowError once `timeout` seconds have passed without the reply
        (as trio.fail_after would raise, without a cancel scope per request)."""
        return await self.net.rpc(self, peer_id, addr, protocol, data, timeout)

    async def open_stream(self, peer_id: bytes, addr: str, protocol: str) -> SimStream:
        return await self.net.connect(self, peer_id, addr, protocol)


class SimNetwork:
    def __init__(self, model: LinkModel | None = None, *, fast_rpc: bool = False):
        self.model = model or LinkModel()
        self.fast_rpc = fast_rpc
        self.nodes: dict[str, SimTransport] = {}
        self.handler_errors: list[BaseException] = []
        self._nursery: trio.Nursery | None = None
        self._pipes: dict[str, weakref.WeakSet] = {}   # addr -> pipes of its open streams

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED):
        """Own the handler tasks of every node; runs until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def add_node(self, peer_id: bytes, addr: str) -> SimTransport:
        if addr in self.nodes:
            raise ValueError(f"address {addr} already in use")
        t = self.nodes[addr] = SimTransport(self, peer_id, addr)
        return t

    def remove_node(self, addr: str):
        t = self.nodes.pop(addr, None)
        if t is not None:
            t.up = False
        for pipe in list(self._pipes.pop(addr, ())):   # its connections reset
            pipe.break_()

    async def connect(self, src: SimTransport, peer_id: bytes, addr: str,
                      protocol: str) -> SimStream:
        await trio.lowlevel.checkpoint()
        dst = self.nodes.get(addr)
        if (not src.up or dst is None or not dst.up or dst.peer_id != peer_id
                or not self.model.reachable(src.addr, addr)):
            # unreachable: by default a dial fails after a round trip (refused /
            # no route); the model decides (NetworkModel: dial_timeout)
            await trio.sleep(self.model.dial_failure_delay(src.addr, addr))
            raise TransportError(f"cannot reach {peer_id.hex()[:12]} at {addr}")
        handler = dst.handlers.get(protocol)
        if handler is None:
            raise TransportError(f"{addr} does not speak {protocol}")
        a_to_b, b_to_a = _Pipe(), _Pipe()
        for end in (src.addr, addr):
            self._pipes.setdefault(end, weakref.WeakSet()).update((a_to_b, b_to_a))
        ours = SimStream(self, src.addr, addr, b_to_a, a_to_b)
        theirs = SimStream(self, addr, src.addr, a_to_b, b_to_a)
        self._nursery.start_soon(self._guarded, handler, theirs, src.peer_id)
        return ours

    async def rpc(self, src: SimTransport, peer_id: bytes, addr: str, protocol: str,
                  data: bytes, timeout: float | None = None) -> bytes:
        now = trio.current_time()
        deadline = math.inf if timeout is None else now + timeout

        async def sleep_until(at: float) -> None:
            if at > deadline:
                await trio.sleep_until(deadline)
                raise trio.TooSlowError
            await trio.sleep_until(at)

        dst = self.nodes.get(addr)
        model = self.model
        if (not src.up or dst is None or not dst.up or dst.peer_id != peer_id
                or not model.reachable(src.addr, addr)):
            await sleep_until(now + model.dial_failure_delay(src.addr, addr))
            raise TransportError(f"cannot reach {peer_id.hex()[:12]} at {addr}")
        handler = dst.rpc_handlers.get(protocol)
        if handler is None:
            await trio.lowlevel.checkpoint()
            raise TransportError(f"{addr} does not speak {protocol} (rpc)")
        at = model.arrival(src.addr, addr, len(data), now)
        if at is None:
            await trio.lowlevel.checkpoint()
            raise TransportError("connection lost")
        data = model.transform(src.addr, addr, bytes(data))
        await sleep_until(at)
        if not dst.up or self.nodes.get(addr) is not dst:
            raise TransportError("stream reset")        # it left while the request was out
        reply = handler(data, src.peer_id)
        if not reply:                                   # closed without answering
            at = model.arrival(addr, src.addr, 0, trio.current_time())
            if at is not None:
                await sleep_until(at)
            raise TransportError("closed without a reply")
        at = model.arrival(addr, src.addr, len(reply), trio.current_time())
        if at is None:
            raise TransportError("connection lost")
        reply = model.transform(addr, src.addr, reply)
        await sleep_until(at)
        if not dst.up or self.nodes.get(addr) is not dst:
            raise TransportError("stream reset")
        return reply

    async def _guarded(self, handler, stream, peer_id):
        """A handler's failure ends its stream, never the network (DESIGN: guard
        handlers). Unexpected exceptions are kept in handler_errors for tests."""
        try:
            await handler(stream, peer_id)
        except (TransportError, trio.ClosedResourceError, trio.BrokenResourceError):
            pass
        except Exception as exc:            # a bug in a handler: record, don't spread
            self.handler_errors.append(exc)
        finally:
            await stream.aclose()
