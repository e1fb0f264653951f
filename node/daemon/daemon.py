"""The node daemon: one long-running process per data dir (`hypersdk node run`).

    Daemon(data_dir, identity, listen=..., bootstrap=[...])
    await nursery.start(daemon.run)      # returns once it listens and answers

    run()  ├─ node lock        DATA/node.lock, flock'ed for the node's lifetime: one
           │                   node per data dir (a second one gets a clear error)
           ├─ P2PTransport     the identity's libp2p host; wrapped in CountingTransport
           │                   (bytes in/out per peer, for `hypersdk peers`). Its port is
           │                   bound first, exclusively (no SO_REUSEPORT): a port in use
           │                   fails the start with one line, before the store is opened
           ├─ DhtService       Contact(identity.node_id, full /p2p/ multiaddr)
           ├─ control server   DATA/control.sock (protocol: node/daemon/control.py)
           ├─ bootstrap        saved peers (DATA/peers.json) + --bootstrap addresses;
           │                   retried with exponential backoff (1 s .. 60 s) until one
           │                   answers; the node works locally meanwhile
           └─ DATA/node.addrs  our full multiaddrs, one per line, written (atomically)
                               once the control socket answers, removed on exit: a
                               script waits for this file, then talks to the node

Commands. COMMANDS maps a control command name to `async fn(daemon, args,
events) -> doc` (a JSON-able document; raise UserError for a user's mistake).
ARGS declares each command's arguments (name -> control.Arg: type, required
or default, allowed values); a request is checked against it before the
command runs, so `args` holds exactly the declared names, each of the
declared type (defaults filled in), and a bad request gets one "bad request:"
error (exit 2) without running anything. Adding a command (fetch, network
restore, a DHT debug op) is one @command entry and one ARGS entry here plus a
click command in node/cli/node_cmds.py; a command with no ARGS entry is refused.
The store commands of the
CLI (node/service/ops.py STORE_OPS) are registered automatically: the node runs the
very same function in a worker thread, with progress events streamed to the
client and the client's disconnect turned into cancellation at the op's next
progress step. The store is the node's (its data dir, under its node lock),
but each op opens its own ChunkStore handle in its thread and closes it
after, exactly as a CLI process does: a ChunkStore keeps one SQLite
connection per thread that used it and closes them only in close(), so one
long-lived handle used from trio's recycled worker threads and the ops' own
thread pools would pile up connections over a node's lifetime.

Shutdown (cancel run()): the control server stops accepting; a store op
running in a worker thread is waited for (trio threads are not abandoned),
so no committed work is lost; the transport closes every connection and
listener; the socket file, node.addrs and the lock are removed/released.
"""
from __future__ import annotations

import collections
import contextlib
import fcntl
import json
import logging
import os
import random
import socket as stdsocket
import tempfile
import time
from pathlib import Path

import trio

from hypersdk.dht.contact import Contact
from hypersdk.dht.providers import MAX_RECORDS, ProviderStore
from hypersdk.dht.routing import MAX_PER_PREFIX24
from hypersdk.node import runtime
from hypersdk.node.config import DEFAULT_ZSTD_LEVEL
from hypersdk.node.daemon import control, reputation_file
from hypersdk.node.daemon.control import Arg
from hypersdk.node.errors import UserError
from hypersdk.node.exchange.budget import DEFAULT_TOTAL as DEFAULT_SERVE_MEMORY
from hypersdk.node.exchange.budget import ServeBudget
from hypersdk.node.files import write_atomic
from hypersdk.node.net.identity import Identity
from hypersdk.node.net.peers import SavedPeers
from hypersdk.node.net.transport import TransportError
from hypersdk.protocol import codec
from hypersdk.protocol.chunks import DEFAULT_CHUNK, MAX_CHUNK, MIN_CHUNK, valid_chunk_size
from hypersdk.protocol.dht_messages import Ping
from hypersdk.protocol.errors import ProtocolError

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "/ip4/0.0.0.0/tcp/4001"
KEY_FILE = "node.key"
LOCK_FILE = "node.lock"
ADDRS_FILE = "node.addrs"
REQUEST_READ_TIMEOUT = 10.0      # a client must send its request within this
MAX_CLIENTS = 64                 # control requests running at once
# Connections that have not sent their request yet. The CLI sends its request as
# soon as it connects, so a connection still silent when MAX_PENDING others are
# is idle: at capacity, each new connection closes the oldest silent one. 1,000
# idle connections used to queue behind the 64 running slots, 10 s each, and a
# `status` behind them failed after 120 s (issue 17, attack 7).
MAX_PENDING = 128
MALLOC_ARENAS = 2                # glibc malloc arenas of a node process (tune_malloc)
TRIM_INTERVAL = 5.0              # seconds between checks for memory to give back
TRIM_AFTER = 64 << 20            # ... once this many chunk bytes were served since the last


def _libc():
    import ctypes
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:                  # not glibc: nothing to tune
        return None


def tune_malloc(arenas: int = MALLOC_ARENAS) -> bool:
    """At most `arenas` glibc malloc arenas in this process (call before threads
    start). The node reads and sends chunks from many worker threads; glibc gives
    each its own arena, whose freed 1 MiB buffers stay in the process: under a flood
    of streams that never read (issue 17, attack 1) the victim peaked at 398 MiB RSS
    with default arenas and 327 MiB with 2, holding the same 128 MiB of chunks
    (tests/node/exchange/test_flood_never_reading.py). False where there is no glibc."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(-8, arenas))      # M_ARENA_MAX


def trim_malloc() -> None:
    """Give freed heap memory back to the kernel (glibc malloc_trim)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
CONNECT_TIMEOUT = 10.0           # dialing a bootstrap / join address
BOOTSTRAP_TIMEOUT = 30.0         # one DHT bootstrap walk
BACKOFF_START, BACKOFF_MAX = 1.0, 60.0
PING_TIMEOUT = 5.0
PROGRESS_EVERY = 0.1             # seconds between coalesced progress events


# -- byte counting ---------------------------------------------------------------------------

class Tally:
    __slots__ = ("bytes_in", "bytes_out", "streams")

    def __init__(self):
        self.bytes_in = self.bytes_out = self.streams = 0


class CountingStream:
    """A Stream that adds what passes through it to a Tally."""

    def __init__(self, stream, tally: Tally):
        self._s, self._t = stream, tally
        tally.streams += 1

    async def send_all(self, data) -> None:
        await self._s.send_all(data)
        self._t.bytes_out += len(data)

    async def receive_some(self, max_bytes: int = 65536) -> bytes:
        data = await self._s.receive_some(max_bytes)
        self._t.bytes_in += len(data)
        return data

    async def aclose(self) -> None:
        await self._s.aclose()

    def __getattr__(self, name):            # reset() and anything transport-specific
        return getattr(self._s, name)


class CountingTransport:
    """A Transport wrapper counting bytes per peer (node id) in both directions."""

    def __init__(self, inner):
        self.inner = inner
        self.tallies: dict[bytes, Tally] = collections.defaultdict(Tally)

    @property
    def peer_id(self) -> bytes:
        return self.inner.peer_id

    @property
    def addr(self) -> str:
        return self.inner.addr

    async def open_stream(self, peer_id: bytes, addr: str, protocol: str):
        s = await self.inner.open_stream(peer_id, addr, protocol)
        return CountingStream(s, self.tallies[peer_id])

    def set_handler(self, protocol: str, handler) -> None:
        async def counted(stream, peer_id):
            await handler(CountingStream(stream, self.tallies[peer_id]), peer_id)
        self.inner.set_handler(protocol, counted)

    def __getattr__(self, name):            # connect, listen_addrs, connection_count...
        return getattr(self.inner, name)


# -- the lock --------------------------------------------------------------------------------

@contextlib.contextmanager
def node_lock(data_dir: Path):
    """Hold DATA/node.lock for the node's lifetime; UserError if a node holds it."""
    path = data_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise UserError(f"another node is already running on data dir {data_dir} "
                            f"(pid {pid})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)                        # releases the lock


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _is_loopback(listen: str) -> bool:
    return listen.startswith("/ip4/127.") or listen.startswith("/ip6/::1/")


def _primary_ipv4() -> str:
    """The address this host's default route leaves from (a UDP connect sends
    nothing); 127.0.0.1 when there is no route."""
    try:
        with stdsocket.socket(stdsocket.AF_INET, stdsocket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))             # TEST-NET-1: never routed anywhere
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def public_addrs(listen_addrs: list[str], announce: list[str], peer_id: str) -> list[str]:
    """The addresses we tell peers. --announce ones if given (with /p2p/ added);
    else the listen addresses, with a wildcard 0.0.0.0 replaced by the primary
    IPv4 address (a peer cannot dial 0.0.0.0; on Linux it would reach itself)."""
    if announce:
        return [a if "/p2p/" in a else f"{a.rstrip('/')}/p2p/{peer_id}" for a in announce]
    out = []
    for a in listen_addrs:
        if a.startswith("/ip4/0.0.0.0/"):
            a = f"/ip4/{_primary_ipv4()}/" + a[len("/ip4/0.0.0.0/"):]
        out.append(a)
    return out


def peer_id_of(addr: str) -> str:
    return addr.rsplit("/p2p/", 1)[-1] if "/p2p/" in addr else ""


# -- command registry ------------------------------------------------------------------------

COMMANDS: dict = {}


def _text(v: str) -> bool:
    return bool(v) and "\0" not in v


def _abs_path(v: str) -> bool:
    return _text(v) and os.path.isabs(v)    # the node's cwd is not the client's


def _key_hex(v: str) -> bool:
    try:
        return len(bytes.fromhex(v)) == 32
    except ValueError:
        return False


_REF = Arg(str, valid=_text, desc="text: NAME, NAME@N or a manifest id")
_PATH = Arg(str, valid=_abs_path, desc="an absolute path")
_FLAG = Arg(bool, required=False, default=False)
_KEY = Arg(str, valid=_key_hex, desc="64 hex digits, a 32-byte key")

# The arguments of every control command: what the click commands send (node/cli/app.py
# for the store ops, node/cli/node_cmds.py for the node's), checked before a command runs.
ARGS: dict[str, dict[str, Arg]] = {
    # store ops (node/service/ops.py STORE_OPS; backup/restore/verify also wrapped by
    # node/service/replication.py and node/service/net_verify.py with the same arguments)
    "backup": {"path": _PATH,
               "name": Arg(str, required=False, nullable=True, valid=_text),
               "chunk_size": Arg(int, required=False, default=DEFAULT_CHUNK,
                                 valid=valid_chunk_size,
                                 desc=f"a power of two from {MIN_CHUNK} to {MAX_CHUNK}"),
               "zstd_level": Arg(int, required=False, default=DEFAULT_ZSTD_LEVEL,
                                 valid=lambda n: 1 <= n <= 19, desc="an integer 1..19")},
    "backup vm": {"url": Arg(str, valid=lambda t: t.startswith("vsphere://") and _text(t)
                             and all(x.startswith("vsphere://") for x in t.split()),
                             desc="vsphere:// URLs, separated by spaces"),
                  "parallel_vms": Arg(int, required=False, default=2,
                                      valid=lambda n: 1 <= n <= 16, desc="an integer 1..16"),
                  "password": Arg(str, valid=_text, desc="the vSphere password"),
                  "name": Arg(str, required=False, nullable=True, valid=_text),
                  "quiesce": _FLAG, "insecure": _FLAG,
                  "ca_file": Arg(str, required=False, nullable=True, valid=_abs_path,
                                 desc=_PATH.desc),
                  "parallel": Arg(int, required=False, default=2, valid=lambda n: 1 <= n <= 16,
                                  desc="an integer 1..16"),
                  "chunk_size": Arg(int, required=False, default=DEFAULT_CHUNK,
                                    valid=valid_chunk_size,
                                    desc=f"a power of two from {MIN_CHUNK} to {MAX_CHUNK}"),
                  "zstd_level": Arg(int, required=False, default=DEFAULT_ZSTD_LEVEL,
                                    valid=lambda n: 1 <= n <= 19, desc="an integer 1..19")},
    "restore vm": {"ref": _REF,
                   "url": Arg(str, valid=lambda t: t.startswith("vsphere://") and _text(t),
                              desc="a vsphere:// URL"),
                   "password": Arg(str, valid=_text, desc="the vSphere password"),
                   "into": _FLAG, "insecure": _FLAG,
                   "datastore": Arg(str, required=False, nullable=True, valid=_text),
                   "ca_file": Arg(str, required=False, nullable=True, valid=_abs_path,
                                  desc=_PATH.desc)},
    "restore": {"ref": _REF, "out": _PATH, "force": _FLAG, "to_device": _FLAG,
                "follow_symlink": _FLAG,
                "umask": Arg(int, required=False, nullable=True, valid=lambda n: 0 <= n <= 0o777,
                             desc="the client's umask, an integer 0..511")},
    "verify": {"ref": Arg(str, required=False, nullable=True, valid=_text, desc=_REF.desc),
               "network": _FLAG,
               "against": Arg(str, required=False, nullable=True, valid=_abs_path,
                              desc=_PATH.desc),
               "min_holders": Arg(int, required=False, nullable=True,
                                  valid=lambda n: 1 <= n <= 64, desc="an integer 1..64"),
               # the possession sampling goal, in parts per million (msgpack ints only)
               "loss_ppm": Arg(int, required=False, nullable=True,
                               valid=lambda n: 5000 <= n <= 990000,
                               desc="an integer 5000..990000 (0.5%..99%)"),
               "confidence_ppm": Arg(int, required=False, nullable=True,
                                     valid=lambda n: 10000 <= n <= 999999,
                                     desc="an integer 10000..999999 (1%..99.9999%)")},
    "backups": {},
    "delete": {"ref": _REF},
    "forget": {"name": Arg(str, required=False, nullable=True, valid=_text,
                           desc="a backup name"),
               "all": _FLAG, "dry_run": _FLAG,
               **{f"keep_{rule}": Arg(int, required=False, default=0, valid=lambda n: n >= 0,
                                      desc="an integer >= 0")
                  for rule in ("last", "hourly", "daily", "weekly", "monthly", "yearly")}},
    "gc": {},
    "store stats": {},
    "fetch": {"ref": _REF},                 # node/service/replication.py
    # the node's own (below)
    "status": {},
    "peers": {},
    "join": {"addr": Arg(str, valid=_text, desc="a multiaddr /ip4/../tcp/../p2p/<peer id>")},
    "join network": {"token": Arg(str, valid=_text, desc="an invitation token hsdk1....")},
    "dht provide": {"key": _KEY},
    "dht find": {"key": _KEY, "count": Arg(int, required=False, default=1,
                                           valid=lambda n: 1 <= n <= 64,
                                           desc="an integer 1..64")},
}


def command(name: str):
    """Register `async fn(daemon, args, events) -> JSON-able doc` as control command name."""
    def register(fn):
        COMMANDS[name] = fn
        return fn
    return register


class Cancelled(Exception):
    """The client went away: the op stops at its next progress step."""


class Events:
    """What a command may tell its client while it runs. Thread-safe: a store
    op in a worker thread calls progress()/on_wait() directly."""

    def __init__(self, send, want_progress: bool):
        self._send = send                   # memory channel send_nowait (trio thread)
        self._token = trio.lowlevel.current_trio_token()
        self.want_progress = want_progress
        self.cancelled = False

    def emit(self, ev: dict) -> None:
        """From any thread."""
        try:
            self._token.run_sync_soon(self._send, ev)
        except trio.RunFinishedError:
            pass

    def on_wait(self, msg: str) -> None:
        self.emit({"t": "wait", "msg": msg})

    @contextlib.contextmanager
    def progress(self, total: int, label: str):
        if self.cancelled:
            raise Cancelled()
        show = self.want_progress and total > 0
        if show:
            self.emit({"t": "bar", "total": int(total), "label": label})
        pending, last = 0, time.monotonic()

        def advance(n: int) -> None:
            nonlocal pending, last
            if self.cancelled:
                raise Cancelled()
            if not show:
                return
            pending += n
            now = time.monotonic()
            if now - last >= PROGRESS_EVERY:
                self.emit({"t": "adv", "n": pending})
                pending, last = 0, now

        try:
            yield advance
        finally:
            if show:
                if pending:
                    self.emit({"t": "adv", "n": pending})
                self.emit({"t": "end"})


def _register_store_ops() -> None:
    from hypersdk.node.service import ops

    def make(name, op):
        async def run_store_op(daemon, args, events):
            def work():
                with daemon.open_store(readonly=op.readonly) as store:
                    return op.fn(store, args, events)
            # not abandon_on_cancel: shutdown waits for the op (no half-done work)
            doc, text, code = await runtime.run_sync(work)
            return CommandReply(doc, text, code)
        return run_store_op

    for name, op in ops.STORE_OPS.items():
        COMMANDS[name] = make(name, op)


class CommandReply:
    """A command result with a human text and exit code besides its document."""

    def __init__(self, doc, text: str | None = None, code: int = 0):
        self.doc, self.text, self.code = doc, text, code


@command("status")
async def _status(d: "Daemon", args, events):
    def read_stats():
        with d.open_store(readonly=True) as store:
            return store.stats()
    stats = await runtime.run_sync(read_stats)
    return {"peer_id": str(d.identity.libp2p_peer_id), "node_id": d.identity.node_id.hex(),
            "addrs": d.addrs, "data_dir": str(d.data_dir), "pid": os.getpid(),
            "control": str(control.socket_path(d.data_dir)),
            "uptime": round(trio.current_time() - d.started, 3),
            "dht": {"routing_table": len(d.dht.table),
                    "providing": len(d.dht.republisher.keys),
                    "provider_records": len(d.dht.providers),
                    "provider_records_max": d.dht.providers.max_records,
                    "provider_records_refused": d.dht.counters["provider records refused"],
                    "provider_records_evicted": d.dht.providers.evicted,
                    "provider_checks": d.dht.counters["provider checks"]},
            "store": {"chunks": stats["unique_chunks"], "stored_bytes": stats["stored_bytes"],
                      "backups": stats["backups"]},
            "bootstrap": dict(d.bootstrap_state),
            "membership": dict(d.gate.status(), renewal=d.renewal.status()),
            "reputation": reputation_file.status(d.dht.scores),
            "audit": d.audit.status() if d.audit is not None else {},
            "transfers": list(d.replication.transfers.values()),
            "replication": d.replicas.status(),
            "requests": [{"cmd": c, "seconds": round(trio.current_time() - t, 3)}
                         for c, t in d.in_flight.values()],
            "served": dict(d.served), "failed": dict(d.failed),
            "bad_requests": d.control_errors, "idle_control_closed": d.control_idle_closed,
            "serving": dict(d.serve_budget.status(), memory_trims=d.trims,
                            upload_limit=d.upload_limit,
                            refused_banned=d.replication.server.counters[
                                "streams of banned peers refused"]),
            "handshakes": d.transport.handshake_counters if d.transport is not None else {}}


@command("peers")
async def _peers(d: "Daemon", args, events):
    contacts = [c for bucket in d.dht.table.buckets() for c in bucket]
    rtts: dict[bytes, float | None] = {}

    async def ping(c: Contact):
        t0 = trio.current_time()
        with trio.move_on_after(PING_TIMEOUT):
            reply = await d.dht.request(c, Ping(d.rng.getrandbits(64), d.dht.info))
            rtts[c.id] = None if reply is None else trio.current_time() - t0

    async with trio.open_nursery() as n:
        for c in contacts:
            n.start_soon(ping, c)
    out = []
    for c in contacts:
        t = d.net.tallies.get(c.id) or Tally()
        rtt = rtts.get(c.id)
        out.append({"peer_id": peer_id_of(c.addr), "node_id": c.id.hex(), "addr": c.addr,
                    "connected": d.transport.connection_count(c.id) > 0,
                    "rtt_ms": None if rtt is None else round(rtt * 1000, 3),
                    "bytes_in": t.bytes_in, "bytes_out": t.bytes_out})
    out.sort(key=lambda p: p["node_id"])
    return out


@command("join")
async def _join(d: "Daemon", args, events):
    addr = args["addr"]
    contact = await d.dial(addr)
    with trio.move_on_after(BOOTSTRAP_TIMEOUT):
        await d.dht.bootstrap([contact])
    d.saved.add(addr)
    d.bootstrap_state["state"] = "joined"
    d.nursery.start_soon(d.replication.announce_all)     # our holdings, to the new peers
    return {"peer_id": peer_id_of(addr), "node_id": contact.id.hex(), "addr": addr,
            "routing_table": len(d.dht.table), "saved": str(d.saved.path)}


def _key(args) -> bytes:
    return bytes.fromhex(args["key"])      # ARGS checked: 64 hex digits


@command("dht provide")
async def _dht_provide(d: "Daemon", args, events):
    key = _key(args)
    t0 = trio.current_time()
    stored = await d.dht.provide(key)
    return {"key": key.hex(), "stored": stored,
            "latency": round(trio.current_time() - t0, 6)}


@command("dht find")
async def _dht_find(d: "Daemon", args, events):
    key = _key(args)
    found, stats = await d.dht.find_providers(key, args["count"])
    return {"key": key.hex(),
            "providers": [{"peer_id": peer_id_of(c.addr), "node_id": c.id.hex(), "addr": c.addr}
                          for c in found],
            "hops": stats.hops, "queries": stats.queries, "failures": stats.failures,
            "latency": round(stats.seconds, 6)}


# -- the daemon ------------------------------------------------------------------------------

class Daemon:
    def __init__(self, data_dir, identity: Identity, *, listen: str = DEFAULT_LISTEN,
                 bootstrap=(), announce=(), rng: random.Random | None = None,
                 k: int | None = None, serve_memory: int = DEFAULT_SERVE_MEMORY,
                 provider_records: int = MAX_RECORDS, replicas: int | None = None,
                 quota: int | None = None, replicate_interval: float | None = None,
                 health_interval: float | None = None, holder_grace: float | None = None,
                 orphans_after: float | None = None, keep_orphans: bool = False,
                 upload_limit: float | None = None, replicate_rate: float | None = None,
                 windows=None):
        """replicas: the default copies of our backups on other sites (None: the
        policy file's, else 2; node/replicas/policy.py); quota: the most bytes our
        store may hold when accepting copies for others (None: the disk's free space)."""
        self.data_dir = Path(data_dir).absolute()
        self.identity = identity
        self.listen = listen
        self.bootstrap = list(bootstrap)
        self.announce = list(announce)
        self.rng = rng or random.Random(int.from_bytes(os.urandom(8), "big"))
        self.k = k                          # DHT k (None: dht.lookup.K); tests shrink it
        self.provider_records = provider_records   # the DHT provider store's bound
        # what the chunk exchange may hold for peers (node/exchange/budget.py)
        self.serve_budget = ServeBudget(total=serve_memory, per_peer=serve_memory // 16)
        self.saved = SavedPeers(self.data_dir)
        self.served: collections.Counter = collections.Counter()     # completed requests
        self.failed: collections.Counter = collections.Counter()     # error replies
        self.bootstrap_state: dict = {"state": "idle", "attempts": 0}
        self.addrs: list[str] = []
        self.started = 0.0
        self.transport = self.net = self.dht = self.gate = None
        self.control_errors = 0             # malformed or refused (bad) control requests
        self.abandoned = 0                  # requests whose client went away
        self.in_flight: dict[int, tuple[str, float]] = {}   # control requests running
        self._clients = trio.CapacityLimiter(MAX_CLIENTS)
        self._silent: collections.OrderedDict = collections.OrderedDict()  # id -> CancelScope
        self.control_idle_closed = 0       # silent control connections closed (MAX_PENDING)
        self.trims = 0                      # malloc_trim calls after serving bursts
        if not COMMANDS.keys() & {"backup"}:
            _register_store_ops()
        from hypersdk.node.service import replication
        if "fetch" not in COMMANDS:
            replication.register(COMMANDS, CommandReply)
        self.replication = replication.Replication(self)
        from hypersdk.node.service import net_verify
        if "verify" in COMMANDS and not getattr(COMMANDS["verify"], "network", False):
            net_verify.register(COMMANDS, CommandReply)
        from hypersdk.node.service import enroll
        if "join network" not in COMMANDS:
            enroll.register(COMMANDS, CommandReply)
        self.enrollment = enroll.Enrollment(self)
        from hypersdk.node.replicas import health
        from hypersdk.node.replicas.release import ORPHAN_AFTER_S
        from hypersdk.node.replicas.service import INTERVAL, Replicas
        self.replicas = Replicas(self, default_replicas=replicas, quota=quota,
                                 interval=replicate_interval or INTERVAL,
                                 health_interval=health_interval or health.HEALTH_INTERVAL,
                                 grace=holder_grace or health.GRACE,
                                 orphan_after=orphans_after or ORPHAN_AFTER_S,
                                 keep_orphans=keep_orphans, rate=replicate_rate,
                                 windows=windows)
        self.upload_limit = upload_limit        # bytes/s the exchange server sends at most
        self.audit = None                   # node.service.net_verify.AuditNet once running
        self.renewal = None                 # node.service.renew.Renewal once running
        self.nursery: trio.Nursery | None = None

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED):
        from hypersdk.node.net.p2p_transport import P2PTransport
        path = control.socket_path(self.data_dir)
        if len(os.fsencode(path)) > 107:          # sun_path is 108 bytes with its NUL
            raise UserError(f"control socket path {path} is too long for a Unix socket "
                            "(at most 107 bytes): use a shorter --data-dir")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        addrs_file = self.data_dir / ADDRS_FILE
        with node_lock(self.data_dir):
            _unlink(addrs_file)             # left by a node that was killed
            self.saved.load()               # a malformed peers.json: fail now, clearly
            try:
                from hypersdk.node.net.gate import Gate
                self.gate = Gate(self.data_dir, self.identity)
                self.transport = P2PTransport(self.identity, self.listen, gate=self.gate)
                # The port first: a node whose port is taken stops here, before it
                # creates a store, a control socket or node.addrs (and it does stop:
                # node/net/p2p_transport.py binds without SO_REUSEPORT).
                try:
                    self.transport.bind()
                except TransportError as exc:
                    raise UserError(f"{exc}; choose another --listen address") from None
                self.open_store().close()  # creates the store; a bad one fails now
                self.net = CountingTransport(self.transport)
                async with trio.open_nursery() as nursery:
                    await nursery.start(self.transport.run)
                    self.addrs = public_addrs(self.transport.listen_addrs, self.announce,
                                              str(self.identity.libp2p_peer_id))
                    await self.start_services(nursery)
                    await nursery.start(self._serve_control)
                    self.started = trio.current_time()
                    write_atomic(addrs_file, "".join(a + "\n" for a in self.addrs).encode())
                    self.start_background(nursery)
                    nursery.start_soon(self._trim_when_idle)
                    task_status.started(self)
            finally:
                if self.transport is not None:
                    self.transport.close_listener()     # if run() never took it
                self.close_services()
                _unlink(addrs_file)

    async def start_services(self, nursery) -> None:
        """The node's services on self.net (a running transport; self.addrs set): the
        DHT, the chunk exchange, enrollment, replication, renewal, audit gossip.
        simnet (simnet/node_host.py) runs this very code on its in-memory transport."""
        from hypersdk.node.kademlia.service import DhtService
        own = Contact(self.identity.node_id, self.addrs[0])
        self.scores = scores = reputation_file.load(self.data_dir)   # shared by every protocol
        self.dht = DhtService(
            self.net, own, rng=random.Random(self.rng.getrandbits(64)),
            **({"k": self.k} if self.k else {}),
            providers=ProviderStore(max_records=self.provider_records),
            scores=scores,
            max_per_prefix24=None if _is_loopback(self.listen) else MAX_PER_PREFIX24)
        self.dht.author_ok = self.gate.author_ok
        await nursery.start(self.dht.run)
        self.nursery = nursery
        self.replication.start_serving()
        self.enrollment.start_serving()
        self.replicas.start_serving()
        from hypersdk.node.service.renew import Renewal
        self.renewal = Renewal(self)
        self.renewal.start_serving()
        nursery.start_soon(self.renewal.run)
        from hypersdk.node.service.net_verify import AuditNet
        self.audit = AuditNet(self)
        await self.audit.start(nursery)

    def close_services(self) -> None:
        """Close the store handles and databases the services keep open."""
        self.replication.close()
        self.replicas.close()
        if self.audit is not None:
            self.audit.close()

    def start_background(self, nursery) -> None:
        """Join the network, then announce; replication; keep the reputations saved."""
        nursery.start_soon(self._join_then_announce)
        nursery.start_soon(self.replicas.run)
        nursery.start_soon(reputation_file.keep_saved, self.data_dir, self.scores)

    def open_store(self, *, readonly: bool = False):
        """A ChunkStore handle on the node's data dir (close it; see module docstring)."""
        from hypersdk.node.store.store import ChunkStore
        try:
            return ChunkStore(self.data_dir, readonly=readonly)
        except OSError as exc:
            raise UserError(f"cannot open data dir {self.data_dir}: "
                            f"{exc.strerror or exc}") from None

    # -- peers ---------------------------------------------------------------------------
    async def dial(self, addr: str) -> Contact:
        """Connect to addr; its Contact (node id from the authenticated session)."""
        if "/p2p/" not in addr:
            raise UserError(f"peer address {addr!r} lacks /p2p/<peer id> (use an address "
                            "that `hypersdk status` or `node run` prints)")
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                nid = await self.transport.connect(addr)
        except trio.TooSlowError:
            raise UserError(f"cannot reach {addr}: no answer in {CONNECT_TIMEOUT:.0f} s") from None
        except TransportError as exc:
            raise UserError(str(exc)) from None
        return Contact(nid, addr)

    async def _join_then_announce(self) -> None:
        """Join, then announce everything the store holds (records of a previous
        run have expired or lived on nodes that may be gone)."""
        await self._bootstrap_loop()
        await self.replication.announce_all()

    async def _bootstrap_loop(self) -> None:
        delay = BACKOFF_START
        st = self.bootstrap_state
        while True:
            addrs = list(dict.fromkeys([*self.saved.load(), *self.bootstrap]))
            addrs = [a for a in addrs if peer_id_of(a) != str(self.identity.libp2p_peer_id)]
            if not addrs:
                st["state"] = "no peers"
                return
            st.update(state="joining", attempts=st["attempts"] + 1)
            contacts: list[Contact] = []

            async def one(addr):
                try:
                    contacts.append(await self.dial(addr))
                except UserError as exc:
                    log.info("bootstrap: %s", exc)
                    st["last_error"] = str(exc)

            async with trio.open_nursery() as n:
                for a in addrs:
                    n.start_soon(one, a)
            if contacts:
                with trio.move_on_after(BOOTSTRAP_TIMEOUT):
                    await self.dht.bootstrap(contacts)
                for c in contacts:
                    if c.addr in self.bootstrap:
                        self.saved.add(c.addr)
                st.update(state="joined", peers=len(contacts))
                st.pop("retry_in", None)
                return
            st.update(state="retrying", retry_in=delay)
            await trio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)

    async def _trim_when_idle(self) -> None:
        """Once no exchange stream is open and no chunk byte held, after TRIM_AFTER
        bytes were served (a burst of serving, a flood that left), give freed heap
        memory back to the kernel: the memory a flood took is returned when its peers
        leave. Never while a peer is being served (malloc_trim holds malloc's lock)."""
        b = self.serve_budget
        mark = 0
        while True:
            await trio.sleep(TRIM_INTERVAL)
            if b.used == 0 and b.streams == 0 and b.taken - mark >= TRIM_AFTER:
                mark = b.taken
                await runtime.run_sync(trim_malloc)
                self.trims += 1

    # -- control socket ------------------------------------------------------------------
    async def _serve_control(self, *, task_status=trio.TASK_STATUS_IGNORED):
        path = control.socket_path(self.data_dir)
        sock = trio.socket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
        try:
            _unlink(path)                   # stale: we hold the node lock
            # Bind inside a fresh 0700 directory, tighten to 0600, then rename into
            # place: the socket is never reachable by others, not even for the
            # moment between bind and chmod (and no process-wide umask change).
            # (".c" + 8 and "s": the same length as "control.sock", so the 107-byte
            # limit checked above holds for this path too)
            private = Path(tempfile.mkdtemp(prefix=".c", dir=self.data_dir))
            try:
                await sock.bind(str(private / "s"))
                os.chmod(private / "s", 0o600)
                os.rename(private / "s", path)
            finally:
                _unlink(private / "s")
                os.rmdir(private)
            sock.listen(MAX_CLIENTS)
            listener = trio.SocketListener(sock)
            async with trio.open_nursery() as n:
                task_status.started()
                while True:
                    conn = await listener.accept()
                    scope = trio.CancelScope()
                    if len(self._silent) >= MAX_PENDING:    # the oldest silent one goes
                        _, oldest = self._silent.popitem(last=False)
                        oldest.cancel()
                        self.control_idle_closed += 1
                    self._silent[id(scope)] = scope
                    n.start_soon(self._client, conn, scope)
        finally:
            sock.close()
            _unlink(path)

    async def _client(self, conn: trio.SocketStream, scope: trio.CancelScope) -> None:
        """One control connection: read one request, stream events, send the final
        frame. Nothing escapes: a bad request gets an error frame, a broken
        connection is dropped. Until its request is in, the connection is silent
        (self._silent: the oldest is closed when MAX_PENDING are); only then does it
        wait for one of MAX_CLIENTS running slots."""
        try:
            async with conn:
                request = None
                with scope:
                    request = await self._read_request(conn)
                self._silent.pop(id(scope), None)
                if request is None:
                    return
                async with self._clients:
                    await self._answer(conn, *request)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.debug("control client went away: %r", exc)
        except Exception:                   # a bug: keep serving the others
            log.exception("control connection failed")
            self.control_errors += 1
        finally:
            self._silent.pop(id(scope), None)

    async def _read_request(self, conn: trio.SocketStream):
        """(cmd, args, want_progress) of the connection's one request; None when
        there is none (EOF, too slow, malformed: answered with an error frame)."""
        buf = bytearray()

        async def read_exactly(n: int) -> bytes:
            while len(buf) < n:
                data = await conn.receive_some(max(n - len(buf), 1))
                if not data:
                    raise EOFError()
                buf.extend(data)
            out = bytes(buf[:n])
            del buf[:n]
            return out

        try:
            with trio.fail_after(REQUEST_READ_TIMEOUT):
                n = control.frame_length(await read_exactly(control.HEADER), control.MAX_REQUEST)
                doc = codec.decode(await read_exactly(n), max_size=control.MAX_REQUEST)
            cmd, args, want_progress = control.check_request(doc)
        except EOFError:
            return None
        except trio.TooSlowError:
            await conn.send_all(control.frame({"t": "error", "exit": 2,
                                               "msg": "control request not received in time"}))
            return None
        except ProtocolError as exc:
            self.control_errors += 1
            await conn.send_all(control.frame({"t": "error", "exit": 2,
                                               "msg": f"bad control request: {exc}"}))
            return None
        return cmd, args, want_progress

    async def _answer(self, conn: trio.SocketStream, cmd: str, args, want_progress) -> None:
        fn, schema = COMMANDS.get(cmd), ARGS.get(cmd)
        try:
            if fn is None:
                raise control.BadRequest(f"unknown node command `{cmd}`")
            if schema is None:              # a bug: never run a command unchecked
                log.error("node command %r has no ARGS entry", cmd)
                raise control.BadRequest(f"node command `{cmd}` declares no arguments "
                                         "(node/daemon/daemon.py ARGS): refused")
            args = control.check_args(cmd, schema, args)
        except control.BadRequest as exc:
            self.control_errors += 1
            await conn.send_all(control.frame({"t": "error", "exit": 2,
                                               "msg": f"bad request: {exc}"}))
            return
        await self._run_command(conn, cmd, fn, args, want_progress)

    async def _run_command(self, conn, cmd, fn, args, want_progress) -> None:
        send, receive = trio.open_memory_channel(float("inf"))
        events = Events(send.send_nowait, want_progress)
        run_scope = trio.CancelScope()
        result: list = []

        def client_gone():
            if not events.cancelled:
                self.abandoned += 1
            events.cancelled = True         # a store op stops at its next progress step
            run_scope.cancel()              # an async command stops now

        async def run():
            try:
                with run_scope:
                    result.append(("ok", await fn(self, args, events)))
                if run_scope.cancelled_caught:
                    raise Cancelled()
            except Cancelled:
                result[:] = [("error", 130, "cancelled: the client went away")]
            except Exception as exc:
                from hypersdk.node.errors import describe
                code, msg = describe(exc)
                if not isinstance(exc, (UserError, OSError, ProtocolError)):
                    log.warning("node command %s failed", cmd, exc_info=True)
                result.append(("error", code, msg))
            finally:
                # after every event the op emitted (run_sync_soon is FIFO)
                events.emit({"t": "_final"})

        async def watch_client():
            try:                            # EOF (or any byte) before the reply: gone
                await conn.receive_some(1)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
            client_gone()

        async def send(doc) -> None:
            if events.cancelled:
                return
            try:
                await conn.send_all(control.frame(doc))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                client_gone()

        self.in_flight[id(events)] = (cmd, trio.current_time())
        try:
            await self._stream_reply(cmd, watch_client, run, receive, result, send)
        finally:
            del self.in_flight[id(events)]

    async def _stream_reply(self, cmd, watch_client, run, receive, result, send) -> None:
        async with trio.open_nursery() as n:
            n.start_soon(watch_client)
            n.start_soon(run)
            async for ev in receive:
                if ev.get("t") == "_final":
                    break
                await send(ev)
            outcome = result[0]
            if outcome[0] == "ok":
                value = outcome[1]
                rep = value if isinstance(value, CommandReply) else CommandReply(value)
                self.served[cmd] += 1
                final = {"t": "done", "exit": rep.code,
                         "doc": json.dumps(rep.doc).encode(),
                         "text": None if rep.text is None else rep.text.encode()}
            else:
                self.failed[cmd] += 1
                final = {"t": "error", "exit": outcome[1], "msg": outcome[2]}
            await send(final)
            n.cancel_scope.cancel()
