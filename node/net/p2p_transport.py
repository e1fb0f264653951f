"""The Transport interface (node/net/transport.py) on py-libp2p 0.8.1: TCP, Noise, Yamux.

    t = P2PTransport(Identity.load(path))           # or P2PTransport() for a fresh key
    await nursery.start(t.run)                       # listens on /ip4/127.0.0.1/tcp/0
    t.addr        -> "/ip4/127.0.0.1/tcp/41234/p2p/12D3KooW..."
    node_id = await t.connect(bootstrap_addr)        # learn who lives at a multiaddr
    s = await t.open_stream(node_id, bootstrap_addr, "/hypersdk/dht/1")

Identity and authentication. The libp2p key is the node's Ed25519 identity
(node/net/identity.py), and our peer id is BLAKE3 of its raw public key. An addr
must carry /p2p/<libp2p id>: an Ed25519 libp2p id embeds the public key, so
open_stream refuses (TransportError) an addr whose key does not hash to the
peer_id asked for before dialing, Noise then proves the remote holds that key,
and the node id is checked once more against the key the secure session
authenticated. Handlers get the opener's node id from that same session key.
Only Noise is offered (py-libp2p's default list also offers TLS, SECIO and
*plaintext*, which would let a peer skip authentication).

Stream semantics (the same as simnet's SimStream; the conformance suite in
tests/test_transport.py checks both):
- send_all(b"") is a no-op; receive_some returns 1..max_bytes bytes, b"" once
  the peer has closed its side (and again on every later call);
- aclose() is a half-close (yamux FIN): the peer reads EOF but may still be
  sending; after aclose our end can neither send nor receive
  (trio.ClosedResourceError). reset() aborts both directions (peer sees
  TransportError);
- a reset stream, a lost connection or a peer that stopped: TransportError.
  py-libp2p reports a connection that went away as a clean EOF; we look at the
  yamux stream's flags and only treat a FIN as EOF.

Rules for users of a stream (py-libp2p/yamux behaviour):
- Keep reading. Yamux gives each stream a 256 KiB..16 MiB receive window; a
  writer whose peer does not read for 5 s fails (TransportError, the stream is
  dead). So never send a large reply while the other side is not reading
  (e.g. do not send everything and only then start reading the echo): run the
  reader and the writer concurrently, or keep messages small and alternate.
- Bound every wait with trio.fail_after (no timeouts in this API).
- Cancelling a send_all in the middle may leave the stream unusable; aclose()
  or reset() it afterwards.

py-libp2p quirks this module works around:
- An exception escaping a libp2p stream handler tears down the connection's
  nursery (and, through the swarm, the host): every handler runs inside
  `_serve`, which catches everything, resets the stream, and keeps unexpected
  exceptions in `handler_errors` (expected ones, TransportError and closed-
  resource errors, are only logged at debug).
- `ConnectionConfig(max_connections_per_peer=1)`: otherwise every dial_peer
  waits for the 250 ms happy-eyeballs delay hoping for a second connection.
- Dials go to the given address (`Swarm.dial_addr`), one at a time per peer
  (our own lock; dial_addr has no dedup), with no internal retries: our
  callers (DHT, swarm) have their own retry and scoring policy, and
  Swarm.dial_peer would also consult a 60 s "negative cache" of failed peers
  and pick among stale peerstore addresses.
- The Noise session's get_remote_public_key() is the peer's Noise static
  X25519 key, not its identity key: node ids come from the authenticated
  remote peer ID (an Ed25519 peer ID embeds the key; Noise verified the
  signature binding it to the session).
- Its shutdown path (cancelling host.run) awaits inside the cancelled scope,
  so listeners and connection sockets leak: run() closes every connection it
  ever saw (tracked by a notifee; the swarm forgets some too early) and the
  host itself, shielded and bounded, before leaving.
- A connection whose socket died stays registered until its yamux reader
  notices. open_stream on a reused connection that fails at the connection
  level (not e.g. "protocol not supported") discards it and dials once more.
- Its TCP listener sets SO_REUSEPORT (for DCUtR hole punching, which we do
  not use), so a second node on a port already in use "listens" too: the
  kernel spreads inbound connections between the two processes and joins
  fail at random. We bind the listening socket ourselves, without
  SO_REUSEPORT (see `_bind_listener`), and hand it to a listener of ours
  (`_OwnSocketListener`) that the swarm drives like its own.
- py-libp2p logs expected failures (a refused protocol) at ERROR through a
  logger with no handler, which Python prints to stderr: the `libp2p` loggers
  are silenced (level CRITICAL, NullHandler) unless HYPERSDK_P2P_DEBUG is set,
  in which case they log at DEBUG through the root logger.
"""
from __future__ import annotations

import collections
import errno
import logging
import os
import socket as stdsocket
import weakref
from typing import Any

import libp2p
import multiaddr
import trio
from libp2p.abc import IListener, INotifee
from libp2p.crypto.keys import KeyType
from libp2p.crypto.x25519 import create_new_key_pair as _x25519_key_pair
from libp2p.io.exceptions import IOException
from libp2p.io.trio import TrioTCPStream
from libp2p.network.config import ConnectionConfig, RetryConfig
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.id import ID
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.exceptions import MuxedConnError, MuxedStreamError
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_ID
from libp2p.transport.exceptions import OpenConnectionError
from libp2p.transport.tcp.tcp import TCP
from libp2p.utils.multiaddr_utils import multiaddr_from_socket

from hypersdk.dht.keys import node_id as _node_id
from hypersdk.node.net.gate import ENFORCE_INTERVAL, SEEN_FLUSH, MembershipRefused
from hypersdk.node.net.identity import Identity
from hypersdk.node.net.transport import Handler, TransportError
from hypersdk.node.net.yamux_guard import GuardedYamux
from hypersdk.node.net.yamux_guard import install as install_yamux_guard

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "/ip4/127.0.0.1/tcp/0"
_CLOSE_GRACE = 2.0        # seconds an aclose() may spend sending its FIN before resetting
_SHUTDOWN_GRACE = 5.0     # seconds run() may spend closing connections and listeners
_LISTEN_BACKLOG = 128     # as py-libp2p's own listener
# Inbound handshakes (TCP accepted, Noise + membership proof + yamux not done yet):
# at most PER_IP_HANDSHAKES at once from one address and MAX_HANDSHAKES in all (more
# are closed at once), each done within HANDSHAKE_DEADLINE. 500 connections from one
# address that stalled after the first multistream line made every honest dial fail
# (issue 17, attack 3: 0 of 15; tests/node/net/test_half_open.py).
PER_IP_HANDSHAKES = 16
MAX_HANDSHAKES = 512
HANDSHAKE_DEADLINE = 5.0


def configure_libp2p_logging() -> None:
    """Silence py-libp2p unless HYPERSDK_P2P_DEBUG is set (see module docstring)."""
    lg = logging.getLogger("libp2p")
    if os.environ.get("HYPERSDK_P2P_DEBUG"):
        lg.setLevel(logging.DEBUG)
        lg.propagate = True
        return
    lg.setLevel(logging.CRITICAL)
    lg.propagate = False
    if not any(isinstance(h, logging.NullHandler) for h in lg.handlers):
        lg.addHandler(logging.NullHandler())
    for name in list(logging.root.manager.loggerDict):   # children given their own level
        if name.startswith("libp2p."):
            child = logging.getLogger(name)
            if child.level and child.level < logging.CRITICAL:
                child.setLevel(logging.NOTSET)


def parse_peer_addr(addr: str):
    """(Multiaddr, libp2p ID) of a "/ip4/../tcp/../p2p/12D3KooW..." string.
    TransportError if it is malformed or has no /p2p/ part."""
    try:
        maddr = multiaddr.Multiaddr(addr)
        p2p = maddr.value_for_protocol("p2p")
    except Exception as exc:
        raise TransportError(f"bad peer address {addr!r}: {exc}") from None
    if not p2p:
        raise TransportError(f"peer address {addr!r} lacks /p2p/<peer id>")
    try:
        pid = ID.from_base58(p2p)
    except Exception as exc:
        raise TransportError(f"bad peer id in {addr!r}: {exc}") from None
    return maddr, pid


def node_id_of_libp2p_key(public_key: Any) -> bytes:
    """Our node id for a libp2p public key; TransportError unless it is Ed25519."""
    if public_key is None or public_key.get_type() != KeyType.Ed25519:
        raise TransportError("peer does not use an Ed25519 key")
    return _node_id(public_key.to_bytes())


def _conn_node_id(muxed_conn: Any) -> bytes:
    """Node id of the identity key the secure session of this connection
    authenticated. Not get_remote_public_key(): py-libp2p's Noise session puts
    the remote's Noise static (X25519) key there. The remote peer ID was derived
    from the identity key whose signature over that static key Noise verified,
    and an Ed25519 peer ID embeds the key itself."""
    try:
        key = muxed_conn.secured_conn.get_remote_peer().extract_public_key()
    except Exception as exc:
        raise TransportError(f"no authenticated key on connection: {exc}") from exc
    return node_id_of_libp2p_key(key)


_CONNECTION_FAILURES = (IOException, MuxedConnError, MuxedStreamError, OSError,
                        trio.BrokenResourceError, trio.ClosedResourceError)


def _connection_failed(exc: BaseException) -> bool:
    """Does this failure come from the connection (socket, session, muxer)
    rather than from the peer's answer (e.g. an unsupported protocol)?"""
    seen = 0
    while exc is not None and seen < 20:
        if isinstance(exc, _CONNECTION_FAILURES):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def _safe_node_id(conn: Any) -> bytes | None:
    try:
        return _conn_node_id(conn.muxed_conn)
    except TransportError:
        return None


def _usable(conn: Any, dead=()) -> bool:
    """Is this swarm connection still worth opening streams on? py-libp2p
    keeps a connection registered for a while after its socket died (until
    its yamux reader notices), so `dead` lists those we saw fail."""
    if conn.is_closed or conn in dead:
        return False
    mc = getattr(conn, "muxed_conn", None)
    ev = getattr(mc, "event_shutting_down", None)
    return not (ev is not None and ev.is_set()) and not getattr(mc, "is_closed", False)


class P2PStream:
    """One libp2p (yamux) stream, with SimStream's semantics. See module docstring."""

    def __init__(self, net_stream: Any):
        self._s = net_stream
        self._closed = False

    @property
    def libp2p_stream(self) -> Any:
        return self._s

    async def send_all(self, data: bytes) -> None:
        if self._closed:
            raise trio.ClosedResourceError("stream closed")
        if not data:
            await trio.lowlevel.checkpoint()
            return
        try:
            await self._s.write(bytes(data))
        except Exception as exc:
            raise TransportError(f"send failed: {exc!r}") from exc

    async def receive_some(self, max_bytes: int = 65536) -> bytes:
        if self._closed:
            raise trio.ClosedResourceError("stream closed")
        if max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        try:
            data = await self._s.read(max_bytes)
        except StreamEOF:
            data = b""
        except Exception as exc:
            raise TransportError(f"receive failed: {exc!r}") from exc
        if not data and not self._clean_eof():
            raise TransportError("connection lost")
        return data

    def _clean_eof(self) -> bool:
        """Did the peer close its side (FIN)? py-libp2p also reports a connection
        that died, or is shutting down, as EOF; only a FIN is a clean end."""
        ms = getattr(self._s, "muxed_stream", None)
        if ms is None:
            return True
        return bool(getattr(ms, "recv_closed", True)) and not getattr(ms, "reset_received", False)

    async def aclose(self) -> None:
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        with trio.CancelScope(shield=True):
            with trio.move_on_after(_CLOSE_GRACE) as scope:
                try:
                    await self._s.close()
                except Exception as exc:
                    log.debug("stream close: %r", exc)
            if scope.cancelled_caught:
                await self._reset()

    async def reset(self) -> None:
        """Abort the stream in both directions; the peer gets TransportError."""
        self._closed = True
        with trio.CancelScope(shield=True):
            await self._reset()

    async def _reset(self) -> None:
        try:
            await self._s.reset()
        except Exception as exc:
            log.debug("stream reset: %r", exc)


class _ConnTracker(INotifee):
    """Remembers every connection so that run() can close its socket."""

    def __init__(self, conns: set, on_disconnect=None, on_connect=None):
        self.conns = conns
        self.on_disconnect = on_disconnect
        self.on_connect = on_connect

    async def connected(self, network, conn) -> None:
        for old in [c for c in self.conns if getattr(c.muxed_conn, "is_closed", False)]:
            self.conns.discard(old)
        self.conns.add(conn)
        if self.on_connect is not None:
            self.on_connect(conn)

    async def disconnected(self, network, conn) -> None:
        if self.on_disconnect is not None:
            self.on_disconnect(conn)

    async def opened_stream(self, network, stream) -> None:
        pass

    async def closed_stream(self, network, stream) -> None:
        pass

    async def listen(self, network, multiaddr) -> None:
        pass

    async def listen_close(self, network, multiaddr) -> None:
        pass


class _GatedNoise(NoiseTransport):
    """Noise, then the membership proof exchange (node/net/gate.py) on the secured
    connection, before py-libp2p negotiates the muxer: a refused connection never
    gets a stream, so no protocol handler ever runs for it."""

    def __init__(self, key_pair, noise_privkey, gate):
        super().__init__(key_pair, noise_privkey=noise_privkey)
        self.gate = gate

    async def secure_inbound(self, conn):
        return await self._prove(await super().secure_inbound(conn), initiator=False)

    async def secure_outbound(self, conn, peer_id):
        return await self._prove(await super().secure_outbound(conn, peer_id), initiator=True)

    async def _prove(self, secured, *, initiator: bool):
        try:
            key = secured.get_remote_peer().extract_public_key()
            node_id_of_libp2p_key(key)                # Ed25519 only
            await self.gate.exchange(secured, key.to_bytes(), initiator=initiator)
        except BaseException:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                try:
                    await secured.close()
                except Exception as exc:
                    log.debug("closing a refused connection: %r", exc)
            raise
        return secured


def _refusal_in(exc: BaseException | None) -> BaseException | None:
    """The MembershipRefused somewhere in exc's chain (py-libp2p wraps dial errors)."""
    for _ in range(20):
        if exc is None:
            return None
        if isinstance(exc, MembershipRefused):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


# -- the listening socket ---------------------------------------------------------------------
#
# Why we bind it ourselves. py-libp2p 0.8.1 (libp2p/transport/tcp/tcp.py,
# `_open_reuseport_listeners`) sets SO_REUSEADDR *and* SO_REUSEPORT on every
# TCP listener, so that DCUtR hole punching can dial from the listen port. With
# SO_REUSEPORT a second process of the same user binds and listens on a port
# that is already in use without any error, and the kernel then balances
# inbound connections between the two: each node gets some of the other's
# peers. We never hole-punch, so our listener does without SO_REUSEPORT.
#
# Alternatives rejected: probing the port with a bind of our own and then
# letting py-libp2p bind it races with any other process between the probe
# and the real bind (and a probe can only ever see the past); clearing
# SO_REUSEPORT on py-libp2p's socket after it is bound is too late (both
# processes are already bound by then); patching py-libp2p's module function
# would change every TCP transport in the process. Binding once, without the
# option, and serving that very socket has no window at all: bind() + listen()
# are atomic in the kernel, and while we hold the socket no other bind to the
# port succeeds, whatever options it sets (SO_REUSEPORT sharing needs the
# option on every socket of the group).
#
# SO_REUSEADDR stays: on Linux it only lets us bind over connections of a
# previous run still in TIME_WAIT (a restarted node gets its port back at
# once); it never allows two listeners on one port.

def _tcp_endpoint(maddr: multiaddr.Multiaddr) -> tuple[int, str, int]:
    """(address family, ip, port) of "/ip4/<ip>/tcp/<port>" or "/ip6/<ip>/tcp/<port>"."""
    names = [p.name for p in maddr.protocols()]
    if len(names) == 2 and names[0] in ("ip4", "ip6") and names[1] == "tcp":
        ip, port = maddr.value_for_protocol(names[0]), maddr.value_for_protocol("tcp")
        try:
            port_n = int(port)
        except (TypeError, ValueError):
            port_n = -1
        if ip and 0 <= port_n <= 65535:
            family = stdsocket.AF_INET if names[0] == "ip4" else stdsocket.AF_INET6
            return family, str(ip), port_n
    raise TransportError(f"cannot listen on {maddr}: expected /ip4/<ip>/tcp/<port> "
                         "or /ip6/<ip>/tcp/<port>")


def _bind_listener(maddr: multiaddr.Multiaddr) -> trio.socket.SocketType:
    """A TCP socket bound to maddr and listening, without SO_REUSEPORT (see above).
    TransportError naming the address if it is taken (or not ours to bind)."""
    family, ip, port = _tcp_endpoint(maddr)
    sock = stdsocket.socket(family, stdsocket.SOCK_STREAM)
    try:
        sock.setsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_REUSEADDR, 1)
        sock.bind((ip, port))
        sock.listen(_LISTEN_BACKLOG)    # also refused if another socket listens there
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise TransportError(f"cannot listen on {maddr}: address in use (another "
                                 "program is listening on that port)") from None
        raise TransportError(f"cannot listen on {maddr}: "
                             f"{(exc.strerror or str(exc)).lower()}") from None
    return trio.socket.from_stdlib_socket(sock)


class _OwnSocketListener(IListener):
    """py-libp2p listener serving sockets P2PTransport bound itself (`_bind_listener`),
    taken from its `_OwnSocketTCP` by listen address. The accept loop runs in the
    transport's own nursery (structured: cancelling run() stops it), not in a
    trio system task as py-libp2p's TCPListener does."""

    def __init__(self, handler, tcp: "_OwnSocketTCP"):
        self._handler = handler             # the swarm's: upgrades an inbound connection
        self._tcp = tcp
        self._listeners: list[trio.SocketListener] = []
        self._scopes: list[trio.CancelScope] = []

    async def listen(self, maddr: multiaddr.Multiaddr) -> None:
        sock = self._tcp.bound.pop(str(maddr), None)
        if sock is None or self._tcp.nursery is None:
            raise OpenConnectionError(f"no socket was bound for {maddr}")
        listener = trio.SocketListener(sock)
        self._listeners.append(listener)
        await self._tcp.nursery.start(self._serve, listener)

    async def _serve(self, listener: trio.SocketListener, *,
                     task_status=trio.TASK_STATUS_IGNORED) -> None:
        scope = trio.CancelScope()
        self._scopes.append(scope)
        with scope:
            try:
                await trio.serve_listeners(self._accepted, [listener],
                                           task_status=task_status)
            except trio.ClosedResourceError:     # close() closed it under accept()
                pass

    async def _accepted(self, stream: trio.SocketStream) -> None:
        """One inbound connection's handshake, within the caps and deadline above.
        It counts against its address from accept until the connection is up (the
        swarm's connected notification: _ConnTracker calls tcp.upgraded) or gone;
        the swarm's handler itself runs on a little longer (Identify)."""
        tcp = self._tcp
        try:
            addr = tuple(stream.socket.getpeername()[:2])
        except OSError:
            addr = ("?", 0)
        ip = addr[0]
        if tcp.handshaking[ip] >= PER_IP_HANDSHAKES or \
                sum(tcp.handshaking.values()) >= MAX_HANDSHAKES:
            tcp.counters["refused: too many handshakes from one address"
                         if tcp.handshaking[ip] >= PER_IP_HANDSHAKES else
                         "refused: too many handshakes"] += 1
            with trio.move_on_after(1):
                await stream.aclose()
            return
        tcp.handshaking[ip] += 1
        done = trio.Event()

        def release() -> None:
            if not done.is_set():
                done.set()
                tcp.handshaking[ip] -= 1
                if tcp.handshaking[ip] <= 0:
                    del tcp.handshaking[ip]
                if tcp.pending.get(addr) is release:
                    del tcp.pending[addr]

        tcp.pending[addr] = release
        timed_out = False
        try:
            async with trio.open_nursery() as n:
                async def deadline():
                    nonlocal timed_out
                    with trio.move_on_after(HANDSHAKE_DEADLINE):
                        await done.wait()
                        return
                    timed_out = True
                    n.cancel_scope.cancel()

                n.start_soon(deadline)
                await self._handler(TrioTCPStream(stream))
                n.cancel_scope.cancel()
            if timed_out:
                tcp.counters["handshake timeouts"] += 1
                with trio.move_on_after(1):
                    await stream.aclose()
        except Exception as exc:            # one bad inbound connection: drop it only
            log.debug("inbound connection failed: %r", exc)
        finally:
            release()

    def get_addrs(self) -> tuple[multiaddr.Multiaddr, ...]:
        return tuple(multiaddr_from_socket(lst.socket) for lst in self._listeners)

    async def close(self) -> None:
        for scope in self._scopes:
            scope.cancel()
        for lst in self._listeners:
            await lst.aclose()


class _OwnSocketTCP(TCP):
    """py-libp2p's TCP transport (dialing unchanged) whose listeners serve the
    sockets P2PTransport bound: `bound` maps a listen multiaddr (str) to its
    socket, `nursery` is where the accept loops run."""

    def __init__(self) -> None:
        super().__init__()
        self.bound: dict[str, trio.socket.SocketType] = {}
        self.nursery: trio.Nursery | None = None
        self.handshaking: collections.Counter = collections.Counter()   # ip -> in progress
        self.pending: dict = {}            # (ip, port) -> release(), until connected
        self.counters: collections.Counter = collections.Counter()

    def upgraded(self, conn) -> None:
        """The swarm says conn is up: its handshake no longer counts (_accepted)."""
        try:
            addr = conn.muxed_conn.secured_conn.get_remote_address()
        except Exception:
            return
        release = self.pending.get(tuple(addr)[:2]) if addr else None
        if release is not None:
            release()

    def create_listener(self, handler_function) -> _OwnSocketListener:
        return _OwnSocketListener(handler_function, self)


class P2PTransport:
    """Transport on py-libp2p. Construct, set handlers, then `nursery.start(t.run)`."""

    def __init__(self, identity: Identity | None = None, listen: str = DEFAULT_LISTEN,
                 gate=None):
        configure_libp2p_logging()
        install_yamux_guard()             # receive windows enforced (node/net/yamux_guard.py)
        self.gate = gate                  # node/net/gate.Gate, or None: no membership check
        self.on_cut: list = []            # callbacks(node_id) when a peer is cut off
        self.identity = identity or Identity.generate()
        self.peer_id: bytes = self.identity.node_id
        self.libp2p_peer_id = self.identity.libp2p_peer_id
        self.handler_errors: list[BaseException] = []
        self._listen = multiaddr.Multiaddr(listen)
        self._handlers: dict[str, Handler] = {}
        self._dial_locks: dict[Any, trio.Lock] = {}
        self._running = False
        self._addrs: list[str] = []
        self._tcp = _OwnSocketTCP()
        self._sock: trio.socket.SocketType | None = None   # bind()'s listening socket
        key_pair = self.identity.libp2p_key_pair()
        noise_key = _x25519_key_pair().private_key
        self.host = libp2p.new_host(
            key_pair=key_pair,
            sec_opt={NOISE_ID: (NoiseTransport(key_pair, noise_privkey=noise_key) if gate is None
                                else _GatedNoise(key_pair, noise_key, gate))},
            muxer_opt={YAMUX_ID: GuardedYamux},      # receive windows enforced
            listen_addrs=[self._listen],
            transports=[self._tcp],
            connection_config=ConnectionConfig(max_connections_per_peer=1),
        )
        network = self.host.get_network()
        network.retry_config = RetryConfig(max_retries=0)
        self._conns: set = set()          # every connection, until run() closes it
        self._dead: weakref.WeakSet = weakref.WeakSet()   # failed under us, closing
        self._nursery: trio.Nursery | None = None
        network.register_notifee(_ConnTracker(self._conns, self._disconnected,
                                              on_connect=self._tcp.upgraded))

    @property
    def handshake_counters(self) -> dict:
        """Inbound handshakes refused or timed out (PER_IP_HANDSHAKES, ...)."""
        return dict(self._tcp.counters, in_progress=sum(self._tcp.handshaking.values()))

    # -- addresses ----------------------------------------------------------
    @property
    def listen_addrs(self) -> list[str]:
        """Our full multiaddrs (with /p2p/...): empty until run() has started,
        then the addresses we listened on (kept after run() ends, as a
        departed node's address stays what it was)."""
        return list(self._addrs)

    @property
    def addr(self) -> str:
        addrs = self.listen_addrs
        if not addrs:
            raise RuntimeError("P2PTransport is not running (start run() first)")
        return addrs[0]

    def connection_count(self, peer_id: bytes | None = None) -> int:
        """Open connections, to one node (by node id) or in total."""
        conns = self.host.get_network().get_connections()
        if peer_id is None:
            return sum(1 for c in conns if _usable(c, self._dead))
        return sum(1 for c in conns if _usable(c, self._dead) and _safe_node_id(c) == peer_id)

    # -- lifetime -----------------------------------------------------------
    def bind(self) -> None:
        """Bind and listen on the listen address now (run() does it if not done):
        TransportError "cannot listen on ADDR: address in use" if another process
        listens there. Lets a caller fail before it creates anything else; the
        socket is closed by run() or close_listener()."""
        if self._sock is None:
            self._sock = _bind_listener(self._listen)

    def close_listener(self) -> None:
        """Close the listening socket (idempotent; for a bind() never run())."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Listen until cancelled; on exit every listener and connection is closed."""
        self.bind()
        try:
            async with trio.open_nursery() as accepting:    # our listener's accept loop
                self._tcp.nursery = accepting
                self._tcp.bound[str(self._listen)] = self._sock
                async with self.host.run(listen_addrs=[self._listen]), \
                        trio.open_nursery() as nursery:
                    self._nursery = nursery
                    self._running = True
                    self._addrs = [str(a) for a in self.host.get_addrs()]
                    try:
                        if not self._addrs:     # the swarm only logs a failed listen
                            raise TransportError(f"cannot listen on {self._listen}")
                        task_status.started()
                        if self.gate is not None:
                            await self._enforce_loop()
                        await trio.sleep_forever()
                    finally:
                        self._nursery = None
                        self._running = False
                        # py-libp2p's own shutdown path runs its awaits inside the
                        # cancelled scope, so the first await raises Cancelled and
                        # the listeners and connection sockets leak. Close
                        # explicitly, shielded and bounded.
                        with trio.CancelScope(shield=True):
                            with trio.move_on_after(_SHUTDOWN_GRACE):
                                await self._close_host()
                accepting.cancel_scope.cancel()
        finally:
            self._running = False
            self._tcp.nursery = None
            self._tcp.bound.clear()
            self.close_listener()

    # -- membership ---------------------------------------------------------------
    async def _enforce_loop(self) -> None:
        """Cut off peers whose admission stopped holding (revoked, expired, another
        network), every ENFORCE_INTERVAL; remember who was seen."""
        last_flush = trio.current_time()
        while True:
            self.cut_off_now()
            if trio.current_time() - last_flush >= SEEN_FLUSH:
                last_flush = trio.current_time()
                try:
                    self.gate.flush_seen()
                except OSError as exc:
                    log.warning("cannot write the members seen: %s", exc)
            await trio.sleep(ENFORCE_INTERVAL)

    def cut_off_now(self) -> int:
        """Apply the gate now: close every connection of a peer it no longer admits."""
        if self.gate is None:
            return 0
        cut = self.gate.enforce()
        for nid, _why in cut:
            self.disconnect(nid)
        return len(cut)

    def disconnect(self, peer_id: bytes) -> int:
        """Close every connection to a node (in the background); how many."""
        n = 0
        for conn in list(self.host.get_network().get_connections()):
            if _safe_node_id(conn) == peer_id:
                self._discard(conn)
                n += 1
        for cb in self.on_cut:
            try:
                cb(peer_id)
            except Exception as exc:
                log.debug("on_cut callback: %r", exc)
        return n

    def _disconnected(self, conn) -> None:
        if self.gate is None:
            return
        try:
            nid = _conn_node_id(conn.muxed_conn)
        except TransportError:
            return
        if not any(_usable(c, self._dead) for c in self.host.get_network().get_connections()
                   if c is not conn and _safe_node_id(c) == nid):
            self.gate.forget(nid)

    async def _close_host(self) -> None:
        async def close(conn):
            try:
                await conn.close()
            except Exception as exc:
                log.debug("closing connection: %r", exc)

            # SwarmConn.close() returns at once if it was already "closing", even
            # when that close was cancelled before it reached the socket
            try:
                await conn.muxed_conn.secured_conn.close()
            except Exception as exc:
                log.debug("closing socket: %r", exc)

        # All connections we ever saw (the swarm forgets some before their
        # sockets are closed), in parallel: each SwarmConn.close() sleeps 0.1 s.
        conns = self._conns | set(self.host.get_network().get_connections())
        self._conns.clear()
        async with trio.open_nursery() as n:
            for conn in conns:
                n.start_soon(close, conn)
        try:
            await self.host.close()
        except Exception as exc:
            log.debug("closing host: %r", exc)

    # -- Transport ----------------------------------------------------------
    def set_handler(self, protocol: str, handler: Handler) -> None:
        first = protocol not in self._handlers
        self._handlers[protocol] = handler
        if first:
            async def serve(net_stream, _protocol=protocol):
                await self._serve(_protocol, net_stream)
            self.host.set_stream_handler(protocol, serve)

    async def connect(self, addr: str) -> bytes:
        """Connect to the node at addr (must end in /p2p/<libp2p id>) and return
        its node id, from the key the secure session authenticated."""
        maddr, pid = parse_peer_addr(addr)
        conn, _ = await self._connection(pid, maddr)
        return _conn_node_id(conn.muxed_conn)

    async def open_stream(self, peer_id: bytes, addr: str, protocol: str) -> P2PStream:
        maddr, pid = parse_peer_addr(addr)
        if node_id_of_libp2p_key(pid.extract_public_key()) != peer_id:
            raise TransportError(f"{addr} is not node {peer_id.hex()[:12]}")
        for attempt in (1, 2):
            conn, fresh = await self._connection(pid, maddr)
            try:
                net_stream = await self.host.new_stream(pid, [protocol])
                break
            except Exception as exc:
                if fresh or attempt == 2 or not _connection_failed(exc):
                    raise TransportError(f"cannot open {protocol} to {addr}: {exc}") from exc
                # a reused connection whose socket had died unnoticed (the
                # peer restarted, say): drop it and dial once more
                log.debug("stale connection to %s: %r", addr, exc)
                self._discard(conn)
        stream = P2PStream(net_stream)
        try:
            remote = _conn_node_id(net_stream.muxed_conn)
        except TransportError:
            await stream.reset()
            raise
        if remote != peer_id:                 # belt and braces: Noise checked the libp2p id
            await stream.reset()
            raise TransportError(f"{addr} authenticated as {remote.hex()[:12]}, "
                                 f"not {peer_id.hex()[:12]}")
        return stream

    # -- internals ----------------------------------------------------------
    def _live_connection(self, pid):
        for c in self.host.get_network().get_connections(pid):
            if _usable(c, self._dead):
                return c
        return None

    async def _connection(self, pid, maddr):
        if not self._running:
            raise TransportError("transport is not running")
        if pid == self.libp2p_peer_id:
            raise TransportError("cannot dial ourselves")
        conn = self._live_connection(pid)
        if conn is not None:
            return conn, False
        lock = self._dial_locks.setdefault(pid, trio.Lock())
        try:
            async with lock:
                conn = self._live_connection(pid)
                if conn is not None:
                    return conn, False
                try:
                    return await self.host.get_network().dial_addr(maddr, pid), True
                except Exception as exc:
                    refused = _refusal_in(exc)
                    if refused is not None:
                        raise MembershipRefused(f"{maddr}: {refused}", refused.reason) from None
                    raise TransportError(f"cannot reach {maddr}: {exc}") from exc
        finally:
            if not lock.statistics().tasks_waiting:
                self._dial_locks.pop(pid, None)

    def _discard(self, conn) -> None:
        """Stop using a connection that failed under us; close it in the background."""
        if conn in self._dead:
            return
        self._dead.add(conn)
        if self._nursery is not None:
            async def close():
                with trio.move_on_after(_SHUTDOWN_GRACE):
                    try:
                        await conn.close()
                    except Exception as exc:
                        log.debug("closing failed connection: %r", exc)
            self._nursery.start_soon(close)

    async def _serve(self, protocol: str, net_stream: Any) -> None:
        """Run the handler for one inbound stream. Nothing may escape: an exception
        out of a libp2p stream handler takes the connection (and host) down."""
        stream = P2PStream(net_stream)
        try:
            handler = self._handlers[protocol]
            remote = _conn_node_id(net_stream.muxed_conn)
        except Exception as exc:
            log.debug("refusing %s stream: %r", protocol, exc)
            await stream.reset()
            return
        if self.gate is not None and not self.gate.allows(remote, protocol):
            self.gate.counters["streams refused"] += 1
            log.info("refusing a %s stream of node %s: not admitted to it", protocol,
                     remote.hex()[:12])
            await stream.reset()
            return
        try:
            await handler(stream, remote)
        except (TransportError, trio.ClosedResourceError, trio.BrokenResourceError) as exc:
            log.debug("%s handler for %s ended: %r", protocol, remote.hex()[:12], exc)
            await stream.reset()
        except Exception as exc:            # a bug in a handler: record, don't spread
            log.debug("%s handler for %s failed", protocol, remote.hex()[:12], exc_info=True)
            self.handler_errors.append(exc)
            await stream.reset()
        else:
            await stream.aclose()
