"""Whole nodes on simnet: the daemon's own services on an in-memory network.

    world = World(SimNetwork(model, fast_rpc=True), root_dir)
    node = SimNode(world, data_dir, identity, addr, bootstrap=[...], replicas=3)
    await nursery.start(node.run)            # inside runtime.simulated(clock, epoch)

SimNode is node/daemon/daemon.py's Daemon with two things swapped: its transport
(SimHost, below, instead of libp2p) and no control socket, fast channel or
malloc trimming. Everything else is the production code a node process runs:
Daemon.start_services (the DHT, the chunk exchange, enrollment, replication and
its health checks and repair, certificate renewal, audit gossip, possession
challenges) and Daemon.start_background (join, announce, the replication loops),
on a real data dir (ChunkStore, audit log, replicas.sqlite), with virtual time
(node/runtime.py: the wall clock follows the virtual one and worker-thread work
runs inline, taking no virtual time).

SimHost models what libp2p's upgrade gives a node: before the first stream or
request between two nodes, the real membership handshake (Gate.exchange, both
sides, node/net/gate.py) runs over an in-memory channel; a refusal fails the
dial with MembershipRefused, as over libp2p, and an inbound stream or request
from a peer the gate has not admitted is closed before its handler runs.
Addresses are /ip4/.../tcp/4001/p2p/<peer id>, so `join`, saved peers and the
addresses in DHT records work unchanged.
"""
from __future__ import annotations

import trio

from hypersdk.node.daemon.daemon import CountingTransport, Daemon
from hypersdk.node.net.gate import Gate
from hypersdk.node.net.transport import TransportError


class World:
    """The nodes of one simulation: address -> SimNode (the running ones)."""

    def __init__(self, net):
        self.net = net
        self.hosts: dict[str, "SimNode"] = {}
        self.by_peer: dict[str, str] = {}           # libp2p peer id (text) -> address


class _Pipe:
    """One direction of the in-memory channel a handshake runs on."""

    def __init__(self, send, receive):
        self.send, self.receive = send, receive

    async def write(self, data: bytes) -> None:
        await self.send.send(bytes(data))

    async def read(self) -> bytes:
        try:
            return await self.receive.receive()
        except (trio.EndOfChannel, trio.BrokenResourceError):
            raise TransportError("the handshake channel closed") from None


class SimHost:
    """The transport a SimNode's services use (see the module docstring)."""

    def __init__(self, world: World, node: "SimNode", inner):
        self.world, self.node, self.inner = world, node, inner
        self.on_cut: list = []
        self.handshake_counters: dict = {}

    # what the daemon reads of its transport (peer_id, addr, rpc_enabled: the inner one's)
    def __getattr__(self, name):
        return getattr(self.inner, name)

    @property
    def listen_addrs(self) -> list[str]:
        return [self.inner.addr]

    def connection_count(self, nid: bytes) -> int:
        return int(self.node.gate.is_member(nid))

    def close_listener(self) -> None:
        pass

    def cut_off_now(self) -> None:
        for nid, _why in self.node.gate.enforce():
            for cut in list(self.on_cut):
                cut(nid)

    # dialing
    async def connect(self, addr: str) -> bytes:
        """Dial addr (with /p2p/): the node id the handshake proved."""
        peer = self.world.hosts.get(addr)
        if peer is None or not peer.up:
            await trio.sleep(self.world.net.model.dial_failure_delay(self.addr, addr))
            raise TransportError(f"cannot reach {addr}")
        await self._admit(peer)
        return peer.identity.node_id

    async def _admit(self, peer: "SimNode") -> None:
        """The membership handshake with peer, unless both sides admitted each other."""
        me = self.node
        if (me.gate.admitted.get(peer.identity.node_id) is not None
                and peer.gate.admitted.get(me.identity.node_id) is not None
                and me.gate.is_member(peer.identity.node_id)
                and peer.gate.is_member(me.identity.node_id)):
            return
        if not self.world.net.model.reachable(self.addr, peer.addr):
            await trio.sleep(self.world.net.model.dial_failure_delay(self.addr, peer.addr))
            raise TransportError(f"cannot reach {peer.addr}")
        a_send, b_recv = trio.open_memory_channel(4)
        b_send, a_recv = trio.open_memory_channel(4)
        errors: list[BaseException] = []

        async def side(gate, pipe, key, initiator, done):
            try:
                await gate.exchange(pipe, key, initiator=initiator)
            except TransportError as exc:
                errors.append(exc)
            finally:
                await done.aclose()
        async with trio.open_nursery() as n:
            n.start_soon(side, me.gate, _Pipe(a_send, a_recv), peer.identity.public_key, True,
                         a_send)
            n.start_soon(side, peer.gate, _Pipe(b_send, b_recv), me.identity.public_key,
                         False, b_send)
        if errors:
            raise errors[0]

    def _peer_at(self, addr: str):
        peer = self.world.hosts.get(addr)
        return peer if peer is not None and peer.up else None

    async def open_stream(self, peer_id: bytes, addr: str, protocol: str):
        peer = self._peer_at(addr)
        if peer is not None and peer.identity.node_id == peer_id:
            await self._admit(peer)
        return await self.inner.open_stream(peer_id, addr, protocol)

    async def rpc(self, peer_id: bytes, addr: str, protocol: str, data: bytes,
                  timeout: float | None = None) -> bytes:
        peer = self._peer_at(addr)
        if peer is not None and peer.identity.node_id == peer_id:
            await self._admit(peer)
        return await self.inner.rpc(peer_id, addr, protocol, data, timeout)

    # serving: only what the gate admitted reaches a handler
    def set_handler(self, protocol: str, handler) -> None:
        gate = self.node.gate

        async def gated(stream, peer_id):
            if not gate.allows(peer_id, protocol) or gate.admitted.get(peer_id) is None:
                return                                  # SimNetwork closes the stream
            await handler(stream, peer_id)
        self.inner.set_handler(protocol, gated)

    def set_rpc_handler(self, protocol: str, handler) -> None:
        gate = self.node.gate

        def gated(data, peer_id):
            if not gate.allows(peer_id, protocol) or gate.admitted.get(peer_id) is None:
                return None
            return handler(data, peer_id)
        self.inner.set_rpc_handler(protocol, gated)


class SimNode(Daemon):
    """A Daemon on simnet (module docstring). `up` is False once stopped."""

    fast_channel = False            # Replication: every exchange on the transport's streams
    # seconds between looks for revocations issued here (1 s in a node process; a look
    # a second on every simulated node was a third of a run's CPU)
    enforce_interval = 60.0

    def __init__(self, world: World, data_dir, identity, addr: str, *,
                 audit_timing: dict | None = None, **kw):
        super().__init__(data_dir, identity, listen=addr, **kw)
        self.world = world
        self.addr = addr
        self.up = False
        self.audit_timing = audit_timing
        self.scope: trio.CancelScope | None = None

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED):
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.saved.load()
        self.gate = Gate(self.data_dir, self.identity)
        self.open_store().close()
        inner = self.world.net.add_node(self.identity.node_id, self.addr)
        self.transport = SimHost(self.world, self, inner)
        self.net = CountingTransport(self.transport)
        self.addrs = [self.addr]
        self.world.hosts[self.addr] = self
        self.world.by_peer[str(self.identity.libp2p_peer_id)] = self.addr
        self.up = True
        try:
            with trio.CancelScope() as self.scope:
                async with trio.open_nursery() as nursery:
                    await self.start_services(nursery)
                    self.started = trio.current_time()
                    self.start_background(nursery)
                    task_status.started(self)
        finally:
            self.up = False
            self.world.hosts.pop(self.addr, None)
            self.world.net.remove_node(self.addr)
            self.close_services()

    def stop(self) -> None:
        """Take the node down now (a crash or a site lost: nothing is flushed)."""
        self.up = False
        self.world.net.remove_node(self.addr)
        if self.scope is not None:
            self.scope.cancel()
