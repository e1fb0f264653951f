#!/usr/bin/env python3
"""Proof of possession: the answer deadline against a holder that fetches the chunks
from another replica when challenged ("outsourcing").

The issue's demand: "an answer must come within a deadline that fetching the chunks
from another replica cannot meet (measure both and record them)". The deadline is
node/audit/possession.py answer_deadline(ids, chunk size) = ANSWER_BASE + ids x chunk
size / ANSWER_RATE (4 s for a full frame of 64 ids of 1 MiB chunks). Measures, does
not assert. One run, real libp2p (node/net/p2p_transport.py), 1 MiB chunks
(protocol/chunks.py DEFAULT_CHUNK) of random data, `--chunks` of them (default 1024:
a 1 GiB backup) stored by `backup` in two ChunkStores in a temporary directory: the
honest holder's and the replica's.

Per case `--frames` frames (default 10), each a fresh random sample of 64 of the
backup's chunk ids sent by a verifier with prove_holders(..., chunk_bytes=1 MiB), one
frame per call; the time is the verifier's (HolderResult.slowest: from sending the
challenge until the whole proof arrived; the dial is not in it) and the verdict its
own ("ok", or "failed" with reason "late: ..." after the deadline). One uncounted
1-id challenge first in each case (connections up, replica dialled).

  honest, warm    a holder answering from its own store (PossessionServer over
                  StoreSource(threaded=True)), the chunks in the page cache;
  honest, cold    the same after `echo 3 > /proc/sys/vm/drop_caches` before every
                  frame (root only; skipped with the reason otherwise, or --no-cold);
  outsourced      a holder with no chunk at all: its PossessionServer's source
                  fetches each challenged chunk from the replica over the chunk
                  exchange (one long-lived node/exchange/client.py ExchangeSession,
                  over the fast channel as a node's fetch runs, node/net/
                  fast_channel.py; --no-fast: a libp2p stream; each chunk verified
                  with protocol/exchange.py open_data) before hashing it. Two
                  cheaters: "one Get per chunk" (the PossessionServer unchanged,
                  read(cid) fetches) and "one Get per frame" (a server that first
                  fetches the frame's 64 ids in one pipelined Get: the fastest an
                  outsourcer gets with this protocol; its fetch time shown apart).

The replica is a separate process (`--serve-replica`: an ExchangeServer over its
store, offering the fast channel), as another node would be, so that its serving does
not share the verifier's and the cheater's event loop; its store is read once before
(page cache warm: the cheater's best case). Links to it:
  loopback        127.0.0.1;
  shaped          unless --no-netns: the replica runs in a network namespace behind
                  a veth pair (10.77.0.1 here, 10.77.0.2 there) with, on both ends,
                  `tc` tbf at each `--rates` rate (default 100mbit, 150mbit, 200mbit
                  and 1gbit) and netem `--delay-ms` (default 10 ms each way, a 20 ms
                  round trip; without sch_netem in the kernel, rate only, said so).
                  Needs root, `ip` and `tc`; skipped with the reason otherwise; the
                  namespace and the veth pair are removed in any case.
The verifier and both holders run in this process on 127.0.0.1 (the
verifier-to-holder round trip is not shaped: it would add to honest and cheating
holders alike).

Last, the speed below which an outsourcer misses the deadline: 64 MiB /
(deadline - the honest warm median), the honest answer standing for what an
outsourcer pays besides the transfer (round trip, hashing).

    .venv/bin/python bench/bench_possession.py                  # 1 GiB, 10 frames a case
    .venv/bin/python bench/bench_possession.py --chunks 80 --frames 2 --no-netns --no-cold
    .venv/bin/python bench/bench_possession.py --json           # the figures as one document
                                                 (--json-out FILE: the summary and the file)

Addresses: 127.0.0.1 and the namespace's 10.77.0.1/2 only. Every wait is bounded
(--timeout per frame; the replica's start, stop and lifetime).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hypersdk.dht.contact import Contact  # noqa: E402
from hypersdk.node.audit.possession import (  # noqa: E402
    ANSWER_BASE,
    ANSWER_RATE,
    PROTOCOL_ID,
    PossessionServer,
    answer_deadline,
    prove_holders,
)
from hypersdk.node.exchange.chunk_source import StoreSource  # noqa: E402
from hypersdk.node.exchange.client import ChunkData, ChunkMissing, ExchangeSession  # noqa: E402
from hypersdk.node.exchange.server import ExchangeServer  # noqa: E402
from hypersdk.node.net.fast_channel import OFFER_PROTOCOL, FastChannelServer, FastDialer  # noqa: E402
from hypersdk.node.net.p2p_transport import P2PTransport  # noqa: E402
from hypersdk.node.service.backup import backup  # noqa: E402
from hypersdk.node.store.store import ChunkStore  # noqa: E402
from hypersdk.protocol.chunks import DEFAULT_CHUNK, chunk_id  # noqa: E402
from hypersdk.protocol.exchange import MAX_GET_IDS, open_data  # noqa: E402
from hypersdk.protocol.exchange import PROTOCOL_ID as EXCHANGE_ID  # noqa: E402
from hypersdk.protocol.possession import MAX_SAMPLE, sample  # noqa: E402

MiB = 1 << 20
LOOPBACK = "127.0.0.1"
HOST_IP, NS_IP = "10.77.0.1", "10.77.0.2"      # the veth pair's ends (namespace-private)
REPLICA_START = 60.0          # seconds for the replica process to print its address
REPLICA_STOP = 10.0           # seconds for it to leave once its stdin closed
REPLICA_LIFETIME = 3600.0     # it leaves by itself after this long whatever happens
CMD_TIMEOUT = 20.0            # seconds for one ip / tc command
DROP_CACHES = "/proc/sys/vm/drop_caches"


# -- the replica: another node serving the chunks over the exchange ----------------------

def serve_replica(store_dir: str, listen_ip: str, lifetime: float) -> None:
    """Serve `store_dir` over the chunk exchange on listen_ip; print {"id", "addr"} as
    one JSON line; leave when stdin closes or after `lifetime` seconds."""
    async def main():
        with ChunkStore(Path(store_dir), readonly=True) as store:
            t = P2PTransport(listen=f"/ip4/{listen_ip}/tcp/0")
            server = ExchangeServer(StoreSource(store, threaded=True))
            t.set_handler(EXCHANGE_ID, server.handle)
            fast = FastChannelServer(t.identity, server.handle, host=listen_ip)
            t.set_handler(OFFER_PROTOCOL, fast.offer_handler)
            async with trio.open_nursery() as n:
                await n.start(fast.run)
                await n.start(t.run)
                print(json.dumps({"id": t.peer_id.hex(), "addr": t.addr}), flush=True)
                with trio.move_on_after(lifetime):
                    await trio.to_thread.run_sync(sys.stdin.buffer.read, abandon_on_cancel=True)
                n.cancel_scope.cancel()
    trio.run(main)


class Replica:
    """The replica process (optionally inside a network namespace)."""

    def __init__(self, store_dir: Path, listen_ip: str, log_path: Path, netns: str | None):
        self.cmd = [sys.executable, str(Path(__file__).resolve()), "--serve-replica",
                    "--store", str(store_dir), "--listen-ip", listen_ip,
                    "--lifetime", str(REPLICA_LIFETIME)]
        if netns:
            self.cmd = ["ip", "netns", "exec", netns, *self.cmd]
        self.log_path = log_path
        self.proc = None
        self.contact = None

    async def start(self) -> Contact:
        self._log = open(self.log_path, "ab")
        self.proc = await trio.lowlevel.open_process(self.cmd, stdin=subprocess.PIPE,
                                                     stdout=subprocess.PIPE, stderr=self._log)
        buf = b""
        with trio.move_on_after(REPLICA_START):
            for _ in range(1000):                  # bounded: the line is ~150 bytes
                data = await self.proc.stdout.receive_some(4096)
                if not data:
                    break
                buf += data
                if b"\n" in buf:
                    break
        if b"\n" not in buf:
            await self.stop()
            tail = self.log_path.read_bytes()[-2000:].decode(errors="replace")
            raise RuntimeError(f"the replica did not start: {buf!r}\n{tail}")
        doc = json.loads(buf.split(b"\n", 1)[0])
        self.contact = Contact(bytes.fromhex(doc["id"]), doc["addr"])
        return self.contact

    async def stop(self) -> None:
        if self.proc is None:
            return
        with trio.move_on_after(REPLICA_STOP):
            try:
                await self.proc.stdin.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
            await self.proc.wait()
        if self.proc.returncode is None:
            self.proc.kill()                       # our own child, by its handle
            with trio.move_on_after(REPLICA_STOP):
                await self.proc.wait()
        self._log.close()
        self.proc = None


# -- the cheating holder's source: no chunks, fetches them when challenged ---------------

class FetchingSource:
    """A ChunkSource holding nothing: read(cid) fetches the chunk from the replica (one
    Get of one id) and returns the verified plaintext; prefetch(ids) fetches a whole
    frame in one Get first (PrefetchingServer). One long-lived exchange session to the
    replica (connect()), over the fast channel as a real node fetches (node/net/
    fast_channel.py; a libp2p stream when fast=False or the replica offers none)."""

    threaded = True                                # PossessionServer hashes in a thread

    def __init__(self, net, identity, *, fast: bool = True, timeout: float = 120.0):
        self.net = net
        self.dialer = FastDialer(identity, net) if fast else None
        self.timeout = timeout
        self.via_fast = False
        self._session = None
        self._events = None
        self._lock = trio.Lock()                   # one Get in flight: events in order
        self._got: dict = {}                       # prefetched: cid -> plaintext
        self.fetch_times: list[float] = []         # seconds of each prefetch

    async def connect(self, nursery, replica: Contact) -> None:
        await self.close()
        send, recv = trio.open_memory_channel(MAX_GET_IDS)
        s = ExchangeSession(self.net, replica, events=send, fast=self.dialer)
        with trio.fail_after(self.timeout):
            await s.connect()
        await nursery.start(s.run)
        self._session, self._events, self.via_fast = s, recv, s.via_fast

    async def close(self) -> None:
        if self._session is not None:
            await self._session.aclose()
            await self._events.aclose()            # its reader's last send fails, not blocks
            self._session = self._events = None

    async def _fetch(self, cids) -> dict:
        out: dict = {}
        async with self._lock:
            if self._session is None or self._session.closed:
                return out
            with trio.move_on_after(self.timeout) as scope:
                await self._session.get(list(cids))
                for _ in cids:
                    ev = await self._events.receive()
                    if type(ev) is ChunkData:
                        out[ev.data.id] = ev.data
                    elif type(ev) is not ChunkMissing:
                        break                      # SessionFailed
            if scope.cancelled_caught:             # answers may still come: not reusable
                await self.close()
        return out

    async def prefetch(self, cids) -> None:
        t0 = trio.current_time()
        self._got = {}
        for cid, data in (await self._fetch(cids)).items():
            self._got[cid] = await trio.to_thread.run_sync(open_data, data)
        self.fetch_times.append(trio.current_time() - t0)

    async def read(self, cid: bytes):
        if cid in self._got:
            return self._got.pop(cid)
        data = (await self._fetch([cid])).get(cid)
        return None if data is None else await trio.to_thread.run_sync(open_data, data)

    async def get(self, cid: bytes):
        return None                                # the sealed form is not benchmarked

    async def have(self, cids):
        return [False] * len(cids)

    async def manifest(self, mid: bytes):
        return None


class PrefetchingServer(PossessionServer):
    """A cheater that fetches a challenge's ids in one Get, then answers as usual."""

    async def _prove(self, ch):
        await self.source.prefetch(list(ch.ids))
        return await super()._prove(ch)


def possession_server(source, timeout: float, cls=PossessionServer):
    # no rate limit in the way: the bench asks far more than one verification's burst
    return cls(source, rate=1e9, burst=1 << 30, answer_timeout=timeout)


# -- the shaped link: a network namespace behind a veth pair -----------------------------

def _sh(*cmd, check=True) -> subprocess.CompletedProcess:
    p = subprocess.run(list(cmd), capture_output=True, text=True, timeout=CMD_TIMEOUT)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {p.stderr.strip() or p.returncode}")
    return p


class Netns:
    def __init__(self):
        tag = os.getpid() % 100000
        self.ns = f"hsdk-poss-{tag}"
        self.va, self.vb = f"hpb{tag}a", f"hpb{tag}b"   # <= 15 characters
        self.made = False

    def why_not(self) -> str | None:
        """Why the shaped link cannot be made here, or None."""
        if os.geteuid() != 0:
            return "not root (ip netns and tc need it)"
        for tool in ("ip", "tc"):
            if shutil.which(tool) is None:
                return f"no `{tool}` on PATH"
        if "10.77.0." in _sh("ip", "-4", "addr", check=False).stdout:
            return "10.77.0.0/24 is already in use on this machine"
        return None

    def up(self) -> None:
        self.made = True
        _sh("ip", "netns", "add", self.ns)
        _sh("ip", "link", "add", self.va, "type", "veth", "peer", "name", self.vb)
        _sh("ip", "link", "set", self.vb, "netns", self.ns)
        _sh("ip", "addr", "add", f"{HOST_IP}/24", "dev", self.va)
        _sh("ip", "link", "set", self.va, "up")
        inside = ("ip", "netns", "exec", self.ns)
        _sh(*inside, "ip", "addr", "add", f"{NS_IP}/24", "dev", self.vb)
        _sh(*inside, "ip", "link", "set", self.vb, "up")
        _sh(*inside, "ip", "link", "set", "lo", "up")
        if shutil.which("ethtool"):                 # whole packets through tbf, not 64 KiB GSO ones
            for pre, dev in (((), self.va), (inside, self.vb)):
                _sh(*pre, "ethtool", "-K", dev, "tso", "off", "gso", "off", "gro", "off",
                    check=False)

    def shape(self, rate: str, delay_ms: float) -> tuple[float, str]:
        """tbf at `rate` with a netem delay of delay_ms under it, on both ends.
        (the delay applied each way, and why it is 0 when it could not be)."""
        bits = _rate_bits(rate)
        burst = max(32 << 10, int(bits / 8 / 250))   # 4 ms of the rate
        applied, note = delay_ms, ""
        for pre, dev in (((), self.va), (("ip", "netns", "exec", self.ns), self.vb)):
            _sh(*pre, "tc", "qdisc", "del", "dev", dev, "root", check=False)
            _sh(*pre, "tc", "qdisc", "add", "dev", dev, "root", "handle", "1:", "tbf", "rate",
                rate, "burst", str(burst), "latency", "100ms")
            if applied > 0:
                p = _sh(*pre, "tc", "qdisc", "add", "dev", dev, "parent", "1:1", "handle", "10:",
                        "netem", "delay", f"{delay_ms}ms", "limit", "100000", check=False)
                if p.returncode != 0:
                    applied = 0.0
                    note = (f"no delay: netem refused ({p.stderr.strip()[:120]}); a kernel "
                            "without sch_netem (CONFIG_NET_SCH_NETEM) has none")
        if not applied:                            # both ends alike: rate only
            for pre, dev in (((), self.va), (("ip", "netns", "exec", self.ns), self.vb)):
                _sh(*pre, "tc", "qdisc", "del", "dev", dev, "parent", "1:1", check=False)
        return applied, note

    def down(self) -> None:
        if not self.made:
            return
        _sh("ip", "netns", "del", self.ns, check=False)     # takes its end of the pair along
        if self.va in _sh("ip", "-o", "link", check=False).stdout:
            _sh("ip", "link", "del", self.va, check=False)
        self.made = False


def _rate_bits(rate: str) -> float:
    r = rate.lower().strip()
    for suffix, mult in (("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3), ("bit", 1.0)):
        if r.endswith(suffix):
            return float(r[:-len(suffix)]) * mult
    raise ValueError(f"rate {rate!r}: expected e.g. 100mbit or 1gbit")


# -- the backup --------------------------------------------------------------------------

def build_stores(root: Path, n_chunks: int, chunk: int) -> tuple[bytes, list[bytes], float]:
    """(manifest id, chunk ids, seconds): one image of random chunks backed up into
    root/holder and root/replica."""
    t0 = time.perf_counter()
    img = root / "disk.img"
    ids = []
    with open(img, "wb") as f:
        for _ in range(n_chunks):
            c = os.urandom(chunk)
            ids.append(chunk_id(c))
            f.write(c)
    mids = []
    for name in ("holder", "replica"):       # (the manifests differ in their times only)
        with ChunkStore(root / name) as store:
            mids.append(backup(store, str(img), name="vm", chunk_size=chunk).manifest_id)
    img.unlink()
    return mids[0], ids, time.perf_counter() - t0


def warm_up(root: Path) -> int:
    """Read every file under root once (the backup wrote its packs with O_DIRECT, past
    the page cache); the bytes read."""
    total = 0
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        with open(path, "rb", buffering=0) as f:
            for _ in range(1 << 20):               # bounded: 4 TiB a file
                got = f.read(4 * MiB)
                if not got:
                    break
                total += len(got)
    return total


def drop_caches() -> None:
    os.sync()
    with open(DROP_CACHES, "w") as f:
        f.write("3\n")


def storage_read_bytes() -> int | None:
    """Bytes this process caused to be read from storage (/proc/self/io), or None."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def cold_why_not() -> str | None:
    try:
        drop_caches()
    except OSError as exc:
        return f"cannot drop the page cache ({DROP_CACHES}: {exc.strerror or exc})"
    return None


# -- one case ----------------------------------------------------------------------------

async def run_case(name: str, verifier, holder: Contact, mid: bytes, ids, reader, *, frames: int,
                   chunk: int, rng: random.Random, timeout: float, cold: bool = False,
                   source: FetchingSource | None = None, link: dict | None = None) -> dict:
    n = min(MAX_SAMPLE, len(ids))
    # uncounted: the connections up (verifier -> holder, and the cheater -> replica)
    await prove_holders(verifier, [holder], mid, sample(ids, 1, rng), reader, rng=rng,
                        timeout=timeout, chunk_bytes=chunk, threaded=True)
    if source is not None:
        source.fetch_times.clear()
    times, verdicts, late, reasons, disk = [], [], 0, [], []
    for _ in range(frames):
        part = sample(ids, n, rng)
        if cold:
            await trio.to_thread.run_sync(drop_caches)
        before = storage_read_bytes()
        res = (await prove_holders(verifier, [holder], mid, part, reader, rng=rng,
                                   timeout=timeout, chunk_bytes=chunk, threaded=True))[0]
        if before is not None and source is None:
            disk.append((storage_read_bytes() - before) / MiB)
        verdicts.append(res.result)
        if res.frames:
            times.append(res.slowest)
            late += res.late
        if res.result != "ok":
            reasons.append(res.reason)
    deadline = answer_deadline(n, chunk)
    out = {"case": name, "frames": frames, "ids_per_frame": n, "frame_mib": n * chunk / MiB,
           "seconds": [round(t, 4) for t in times], "deadline_s": deadline,
           "within_deadline": sum(t <= deadline for t in times), "late": late,
           "verdicts": {v: verdicts.count(v) for v in sorted(set(verdicts))},
           "reasons": reasons[:3]}
    if times:
        med = statistics.median(times)
        out.update(median_s=round(med, 4), max_s=round(max(times), 4), min_s=round(min(times), 4),
                   mib_per_s=round(n * chunk / MiB / med, 1))
    if disk:
        # what this process read from the disk per frame (the holder's reads, and the
        # verifier's reference reads of the same chunks after the answer)
        out["disk_read_mib_median"] = round(statistics.median(disk), 1)
    if source is not None and source.fetch_times:
        ft = statistics.median(source.fetch_times)
        out.update(fetch_median_s=round(ft, 4), fetch_mib_per_s=round(n * chunk / MiB / ft, 1))
    if link is not None:
        out["link"] = link
    return out


# -- the run -----------------------------------------------------------------------------

async def bench(args, root: Path, mid: bytes, ids: list[bytes], say) -> dict:
    chunk = args.chunk_size
    rng = random.Random(args.seed)
    cases: list[dict] = []
    skipped: dict[str, str] = {}
    notes: set[str] = set()
    cold_reason = "--no-cold" if args.no_cold else cold_why_not()
    if cold_reason:
        skipped["honest, page cache cold"] = cold_reason
    netns = Netns()
    ns_reason = "--no-netns" if args.no_netns else netns.why_not()
    if ns_reason:
        skipped["outsourced over a shaped link"] = ns_reason

    def record(case: dict) -> None:
        cases.append(case)
        say(_line(case))

    with ChunkStore(root / "holder") as store:
        reader = StoreSource(store, threaded=True).read        # the verifier's copy
        verifier = P2PTransport(listen=f"/ip4/{LOOPBACK}/tcp/0")
        honest = P2PTransport(listen=f"/ip4/{LOOPBACK}/tcp/0")
        per_chunk = P2PTransport(listen=f"/ip4/{LOOPBACK}/tcp/0")
        per_frame = P2PTransport(listen=f"/ip4/{LOOPBACK}/tcp/0")
        fast = not args.no_fast
        src_chunk = FetchingSource(per_chunk, per_chunk.identity, fast=fast, timeout=args.timeout)
        src_frame = FetchingSource(per_frame, per_frame.identity, fast=fast, timeout=args.timeout)
        honest.set_handler(PROTOCOL_ID, possession_server(StoreSource(store, threaded=True),
                                                          args.timeout).handle)
        per_chunk.set_handler(PROTOCOL_ID, possession_server(src_chunk, args.timeout).handle)
        per_frame.set_handler(PROTOCOL_ID, possession_server(src_frame, args.timeout,
                                                             PrefetchingServer).handle)
        async with trio.open_nursery() as n:
            for t in (verifier, honest, per_chunk, per_frame):
                await n.start(t.run)
            c_honest = Contact(honest.peer_id, honest.addr)
            c_chunk = Contact(per_chunk.peer_id, per_chunk.addr)
            c_frame = Contact(per_frame.peer_id, per_frame.addr)
            kw = dict(frames=args.frames, chunk=chunk, rng=rng, timeout=args.timeout)

            await trio.to_thread.run_sync(warm_up, root / "holder")
            record(await run_case("honest, page cache warm", verifier, c_honest, mid, ids, reader,
                                  **kw))
            if not cold_reason:
                record(await run_case("honest, page cache cold (drop_caches before each frame)",
                                      verifier, c_honest, mid, ids, reader, cold=True, **kw))

            async def outsourced(where: str, replica: Contact, link: dict) -> None:
                await trio.to_thread.run_sync(warm_up, root / "replica")
                for src in (src_frame, src_chunk):
                    await src.connect(n, replica)
                link = dict(link, via="fast channel" if src_frame.via_fast else "libp2p stream")
                record(await run_case(f"outsourced, {where}, one Get per frame", verifier,
                                      c_frame, mid, ids, reader, source=src_frame, link=link,
                                      **kw))
                record(await run_case(f"outsourced, {where}, one Get per chunk", verifier,
                                      c_chunk, mid, ids, reader, source=src_chunk, link=link,
                                      **kw))
                for src in (src_frame, src_chunk):
                    await src.close()

            rep = Replica(root / "replica", LOOPBACK, root / "replica-loopback.log", None)
            try:
                await outsourced("loopback", await rep.start(), {"kind": "loopback"})
            finally:
                await rep.stop()

            if not ns_reason:
                try:
                    netns.up()
                    rep = Replica(root / "replica", NS_IP, root / "replica-netns.log", netns.ns)
                    try:
                        contact = await rep.start()
                        for rate in args.rates:
                            delay, note = netns.shape(rate, args.delay_ms)
                            if note:
                                notes.add(note)
                            link = {"kind": "netns veth, tc tbf", "rate": rate,
                                    "delay_ms_each_way": delay, "added_rtt_ms": 2 * delay}
                            where = f"veth {rate}" + (f" + {2 * delay:g} ms RTT" if delay else "")
                            await outsourced(where, contact, link)
                    finally:
                        await rep.stop()
                except RuntimeError as exc:
                    skipped["outsourced over a shaped link"] = f"failed: {exc}"
                    say(f"shaped link: {exc}")
                finally:
                    netns.down()
            n.cancel_scope.cancel()

    deadline = answer_deadline(min(MAX_SAMPLE, len(ids)), chunk)
    doc = {"chunk_bytes": chunk, "chunks": len(ids), "backup_mib": len(ids) * chunk / MiB,
           "frames_per_case": args.frames, "answer_base_s": ANSWER_BASE,
           "answer_rate_mib_s": ANSWER_RATE / MiB, "deadline_s": deadline,
           "full_frame_deadline_s": answer_deadline(MAX_SAMPLE, DEFAULT_CHUNK),
           "cases": cases, "skipped": skipped, "notes": sorted(notes)}
    warm = cases[0].get("median_s")
    if warm is not None and warm < deadline:
        mib = min(MAX_SAMPLE, len(ids)) * chunk / MiB
        speed = mib / (deadline - warm)
        doc["miss_below"] = {"mib_per_s": round(speed, 1),
                             "mbit_per_s": round(speed * MiB * 8 / 1e6),
                             "formula": f"{mib:g} MiB / ({deadline:.2f} s - {warm:.3f} s honest "
                                        "warm median)"}
    return doc


def _line(c: dict) -> str:
    if "median_s" not in c:
        return f"{c['case']}: no answer ({c['verdicts']}; {'; '.join(c['reasons'])})"
    s = (f"{c['case']}: median {c['median_s']:.3f} s, max {c['max_s']:.3f} s "
         f"({c['mib_per_s']:g} MiB/s); within the {c['deadline_s']:.2f} s deadline "
         f"{c['within_deadline']}/{len(c['seconds'])}; verdicts "
         + ", ".join(f"{k} x{v}" for k, v in c["verdicts"].items()))
    if "disk_read_mib_median" in c:
        s += f"; read from the disk per frame: {c['disk_read_mib_median']:g} MiB"
    if "fetch_median_s" in c:
        s += f"; the fetch alone: median {c['fetch_median_s']:.3f} s ({c['fetch_mib_per_s']:g} MiB/s)"
    return s


def summary(doc: dict) -> str:
    mib = doc["cases"][0]["frame_mib"] if doc["cases"] else 0
    out = [f"proof of possession vs outsourcing: {doc['chunks']} chunks of "
           f"{doc['chunk_bytes'] // 1024} KiB ({doc['backup_mib']:g} MiB of random data), "
           f"{doc['frames_per_case']} frames a case",
           f"deadline for a full frame (64 ids of 1 MiB): {doc['full_frame_deadline_s']:.2f} s "
           f"({doc['answer_base_s']:g} s + 64 MiB / {doc['answer_rate_mib_s']:g} MiB/s); "
           f"this run's frames: {mib:g} MiB, {doc['deadline_s']:.2f} s", ""]
    out.append("| case | median | max | MiB/s | within deadline | verdicts | fetch alone |")
    out.append("|---|---|---|---|---|---|---|")
    for c in doc["cases"]:
        if "median_s" not in c:
            out.append(f"| {c['case']} | - | - | - | 0/{c['frames']} | {c['verdicts']} | |")
            continue
        fetch = (f"{c['fetch_median_s']:.3f} s ({c['fetch_mib_per_s']:g} MiB/s)"
                 if "fetch_median_s" in c else "")
        verdicts = ", ".join(f"{k} x{v}" for k, v in c["verdicts"].items())
        out.append(f"| {c['case']} | {c['median_s']:.3f} s | {c['max_s']:.3f} s | "
                   f"{c['mib_per_s']:g} | {c['within_deadline']}/{len(c['seconds'])} | "
                   f"{verdicts} | {fetch} |")
    out.append("")
    for what, why in doc["skipped"].items():
        out.append(f"skipped: {what}: {why}")
    for note in doc["notes"]:
        out.append(f"shaped link: {note}")
    if "miss_below" in doc:
        m = doc["miss_below"]
        out.append(f"an outsourcer misses the deadline on a link slower than {m['formula']} = "
                   f"{m['mib_per_s']:g} MiB/s = {m['mbit_per_s']} Mbit/s")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chunks", type=int, default=1024, help="chunks in the backup (1024: 1 GiB)")
    ap.add_argument("--frames", type=int, default=10, help="timed frames per case")
    ap.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK, help=argparse.SUPPRESS)
    ap.add_argument("--rates", default="100mbit,150mbit,200mbit,1gbit",
                    help="shaped link rates (tc syntax)")
    ap.add_argument("--delay-ms", type=float, default=10.0, help="netem delay each way")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per frame at most")
    ap.add_argument("--seed", type=int, default=1, help="sample and rid seed")
    ap.add_argument("--no-netns", action="store_true", help="skip the shaped link")
    ap.add_argument("--no-cold", action="store_true", help="skip the cold page cache case")
    ap.add_argument("--no-fast", action="store_true",
                    help="the cheater fetches over libp2p streams, not the fast channel")
    ap.add_argument("--tmp", default=None, help="where the stores go (default: the temp dir)")
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON document")
    ap.add_argument("--json-out", default=None, help="also write that document to this file")
    ap.add_argument("--serve-replica", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--store", help=argparse.SUPPRESS)
    ap.add_argument("--listen-ip", default=LOOPBACK, help=argparse.SUPPRESS)
    ap.add_argument("--lifetime", type=float, default=REPLICA_LIFETIME, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve_replica:
        serve_replica(args.store, args.listen_ip, args.lifetime)
        return 0
    if not 1 <= args.chunks <= 1 << 20 or not 1 <= args.frames <= 10_000:
        ap.error("--chunks 1..1048576, --frames 1..10000")
    args.rates = [r.strip() for r in args.rates.split(",") if r.strip()]
    for r in args.rates:
        _rate_bits(r)

    def say(line: str) -> None:
        print(line, file=sys.stderr if args.json else sys.stdout, flush=True)

    root = Path(tempfile.mkdtemp(prefix="bench-possession-", dir=args.tmp))
    try:
        mid, ids, took = build_stores(root, args.chunks, args.chunk_size)
        say(f"backed up {args.chunks} random chunks into the holder's and the replica's "
            f"stores in {took:.1f} s")
        doc = trio.run(bench, args, root, mid, ids, say)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    doc["command"] = "bench/bench_possession.py " + " ".join(argv if argv is not None
                                                             else sys.argv[1:])
    doc["date_utc"] = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(doc, indent=1) + "\n")
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        print()
        print(summary(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
