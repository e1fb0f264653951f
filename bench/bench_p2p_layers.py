#!/usr/bin/env python3
"""py-libp2p 0.8.1 security layers side by side on 127.0.0.1: (a) Noise, as
node/net/p2p_transport.py runs it today; (b) a private network (pnet, `new_host(psk=)`)
in front of that Noise; (c) libp2p TLS 1.3 (/tls/1.0.0) instead of Noise. Measures,
does not assert.

    .venv/bin/python bench/bench_p2p_layers.py                 # ~1.5 min
    .venv/bin/python -m bench.bench_p2p_layers --dials 30 --size 256 --strangers 5
    options: --inproc (both ends in one process), --only a,b

Each configuration is a P2PTransport: (a) is P2PTransport itself, unchanged; for (b)
and (c) the bench replaces its libp2p host with one built with the same arguments
(Yamux, our own listening socket, ConnectionConfig(max_connections_per_peer=1), no
dial retries) plus `psk=` (b) or with TLSTransport as the only security option (c).
The listeners of all three run in a separate process (`--serve`), as a remote node
would; the dialers and strangers in this one. Their CPU is read from /proc.

1. setup: `t.connect(addr)` = TCP dial + [pnet nonces] + multistream + security
   handshake + multistream + Yamux, until the swarm holds the connection; --dials
   times after 2 warm-up dials, a fresh connection each time (the previous one is
   closed, 50 ms pause, outside the clock). "CPU ms/dial" is both processes' CPU over
   the loop (dial and close) / dials.
2. bulk: one Yamux stream, --size MiB of incompressible data, clock from the first
   byte to the receiver's 8-byte ack (as bench_p2p_stream.py); --runs runs per config,
   interleaved (a b c a b c ...), medians printed. CPU s/GB = CPU seconds
   of the sender, the receiver and both / (bytes / 1e9).
3. stranger: a host that is not a member and does not know the peer id dials the
   listener's address with a made-up /p2p/ id (--strangers times; the pnet ones
   concurrently, they wait for a timeout). Its TCP transport records every byte its
   stack reads ("bytes read"; a pnet stranger stops reading at the garbage its wrong
   key makes of the header, so a raw TCP probe also reports all the listener sends).
   Reported: outcome, time to it, whether the listener's peer id reached it (its
   base58 in the error: the stranger's security layer authenticated the listener's
   key), whether the peer id is in cleartext on the wire, and the listener's CPU per
   attempt (/proc schedstat, all threads).
   Strangers: (a) a Noise host; (b) a Noise host with another PSK, and one holding
   the right PSK (a revoked member); (c) a TLS host.

MB = 10**6 bytes; MiB = 2**20.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import libp2p  # noqa: E402
from Crypto.Cipher import Salsa20  # noqa: E402
from libp2p.crypto.ed25519 import create_new_key_pair  # noqa: E402
from libp2p.peer.id import ID  # noqa: E402
from libp2p.security.tls.transport import PROTOCOL_ID as TLS_ID  # noqa: E402
from libp2p.security.tls.transport import TLSTransport  # noqa: E402

from hypersdk.node.net import p2p_transport as pt  # noqa: E402
from hypersdk.node.net.identity import Identity  # noqa: E402

SINK = "/bench/sink/1"
MiB = 1 << 20
KINDS = ("a", "b", "c")
LABEL = {"a": "(a) Noise", "b": "(b) pnet+Noise", "c": "(c) TLS 1.3"}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# -- py-libp2p's pnet path logs through the *root* logger (logging.warning in
# swarm_connection.get_transport_addresses), which would run logging.basicConfig and
# print to stderr. A counting handler on root keeps basicConfig out and the count.
class _RootCounter(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.counts: dict[str, int] = {}

    def emit(self, record):
        msg = record.getMessage().split(":")[0]
        self.counts[msg] = self.counts.get(msg, 0) + 1


ROOT_LOG = _RootCounter()
logging.getLogger().addHandler(ROOT_LOG)


def cpu_of(pid: int | None) -> float:
    """CPU seconds of a process so far (this one if pid is None)."""
    if pid is None:
        return time.process_time()
    total = 0                       # ns on CPU, summed over threads (/proc/stat has 10 ms ticks)
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pass                    # a thread that just ended
    return total / 1e9


# -- transports -------------------------------------------------------------------------------
class Recorder:
    """Wraps a TrioTCPStream; keeps every byte read from and written to the socket."""

    def __init__(self, inner):
        self.inner = inner
        self.rx = bytearray()
        self.tx = bytearray()

    async def read(self, n=None):
        data = await self.inner.read(n)
        self.rx += data
        return data

    async def write(self, data):
        self.tx += data
        await self.inner.write(data)

    async def close(self):
        await self.inner.close()

    def __getattr__(self, name):
        return getattr(self.inner, name)


class RecordingTCP(pt._OwnSocketTCP):
    """P2PTransport's TCP transport whose dials record their raw bytes."""

    def __init__(self):
        super().__init__()
        self.records: list[Recorder] = []

    async def dial(self, maddr):
        conn = await super().dial(maddr)
        conn.stream = Recorder(conn.stream)
        self.records.append(conn.stream)
        return conn


def make_transport(kind: str, psk: str | None = None, tcp=None) -> pt.P2PTransport:
    """kind a: Noise; b: Noise behind pnet (psk); c: TLS. (a) without tcp= is
    P2PTransport untouched; otherwise its host is rebuilt as P2PTransport.__init__
    builds it, with the differences named in the module docstring."""
    t = pt.P2PTransport(Identity.generate())
    if kind == "a" and psk is None and tcp is None:
        return t
    if tcp is not None:
        t._tcp = tcp
    kp = t.identity.libp2p_key_pair()
    if kind == "c":
        sec = {TLS_ID: TLSTransport(kp)}
    else:
        sec = {pt.NOISE_ID: pt.NoiseTransport(
            kp, noise_privkey=pt._x25519_key_pair().private_key)}
    t.host = libp2p.new_host(
        key_pair=kp, sec_opt=sec, muxer_opt={pt.YAMUX_ID: pt.Yamux},
        listen_addrs=[t._listen], transports=[t._tcp],
        connection_config=pt.ConnectionConfig(max_connections_per_peer=1), psk=psk)
    network = t.host.get_network()
    network.retry_config = pt.RetryConfig(max_retries=0)
    network.register_notifee(pt._ConnTracker(t._conns))
    return t


async def sink(stream, peer_id):
    """8-byte length, then that many bytes; answers with the count received."""
    head = b""
    while len(head) < 8:
        data = await stream.receive_some(8 - len(head))
        if not data:
            return
        head += data
    left = n = int.from_bytes(head, "big")
    while left:
        data = await stream.receive_some(min(left, MiB))
        if not data:
            raise ValueError("short upload")
        left -= len(data)
    await stream.send_all(n.to_bytes(8, "big"))


async def start_listeners(nursery, psk: str, kinds) -> dict[str, str]:
    addrs = {}
    for k in kinds:
        t = make_transport(k, psk if k == "b" else None)
        t.set_handler(SINK, sink)
        await nursery.start(t.run)
        addrs[k] = t.addr
    return addrs


# -- measurements -----------------------------------------------------------------------------
def pctl(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


async def drop_connections(t: pt.P2PTransport) -> None:
    for c in list(t.host.get_network().get_connections()):
        with trio.move_on_after(2):
            try:
                await c.close()
            except Exception:
                pass
            try:
                await c.muxed_conn.secured_conn.close()
            except Exception:
                pass


async def measure_setup(t, addr, dials, server_pid) -> dict:
    for _ in range(2):                                  # warm-up
        with trio.fail_after(15):
            await t.connect(addr)
        await drop_connections(t)
        await trio.sleep(0.05)
    times, errors = [], []
    c0, s0 = cpu_of(None), cpu_of(server_pid) if server_pid else 0.0
    deadline = trio.current_time() + 60
    for _ in range(dials):
        if trio.current_time() > deadline:
            errors.append("setup loop: 60 s budget spent")
            break
        t0 = time.perf_counter()
        try:
            with trio.fail_after(15):
                await t.connect(addr)
            times.append(time.perf_counter() - t0)
        except Exception as exc:
            errors.append(repr(exc)[:200])
        await drop_connections(t)
        await trio.sleep(0.05)
    cpu = cpu_of(None) - c0 + ((cpu_of(server_pid) - s0) if server_pid else 0.0)
    return {"dial_ms": [x * 1e3 for x in times], "errors": errors,
            "cpu_ms_per_dial": cpu * 1e3 / max(1, len(times) + len(errors))}


async def upload(stream, nbytes: int, block: bytes) -> None:
    await stream.send_all(nbytes.to_bytes(8, "big"))
    sent = i = 0
    while sent < nbytes:
        n = min(MiB, nbytes - sent)
        k = i % len(block)
        await stream.send_all((block[k:] + block[:k])[:n])
        sent += n
        i += 4099
    ack = b""
    while len(ack) < 8:
        data = await stream.receive_some(8 - len(ack))
        if not data:
            raise RuntimeError("receiver closed early")
        ack += data
    if int.from_bytes(ack, "big") != nbytes:
        raise RuntimeError(f"receiver got {int.from_bytes(ack, 'big')} of {nbytes} bytes")
    await stream.aclose()


async def measure_bulk(t, addr, nbytes, server_pid, block) -> dict:
    peer = await t.connect(addr)
    with trio.fail_after(60):                           # warm-up, 8 MiB
        await upload(await t.open_stream(peer, addr, SINK), 8 * MiB, block)
    s = await t.open_stream(peer, addr, SINK)
    c0, s0 = cpu_of(None), cpu_of(server_pid) if server_pid else None
    t0 = time.perf_counter()
    with trio.fail_after(150):
        await upload(s, nbytes, block)
    wall = time.perf_counter() - t0
    c1, s1 = cpu_of(None), cpu_of(server_pid) if server_pid else None
    gb = nbytes / 1e9
    out = {"MBps": nbytes / wall / 1e6, "wall_s": wall, "cpu_send_s_per_GB": (c1 - c0) / gb}
    if server_pid:
        out["cpu_recv_s_per_GB"] = (s1 - s0) / gb
        out["cpu_total_s_per_GB"] = (c1 - c0 + s1 - s0) / gb
    else:
        out["cpu_total_s_per_GB"] = out["cpu_send_s_per_GB"]    # both ends in this process
    await drop_connections(t)
    return out


def exc_text(exc: BaseException) -> list[str]:
    out, seen = [], 0
    while exc is not None and seen < 12:
        out.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return out


async def one_stranger(t, addr, true_b58, res) -> None:
    """Dial addr with a made-up peer id; record outcome, time and what we learned."""
    fake = ID.from_pubkey(create_new_key_pair().public_key).to_base58()
    bad = addr.replace(true_b58, fake)
    t0 = time.perf_counter()
    try:
        with trio.fail_after(20):
            await t.connect(bad)
        chain = ["connected (?)"]
    except trio.TooSlowError:
        chain = ["TooSlowError: no answer within 20 s"]
    except Exception as exc:
        chain = exc_text(exc)
    res.append({"s": time.perf_counter() - t0, "chain": chain,
                "learned": any(true_b58 in c for c in chain)})


async def raw_probe(addr: str, first: bytes, out: dict) -> None:
    """Plain TCP: send `first`, read everything the listener sends until it closes (<= 20 s)."""
    port = int(addr.split("/tcp/")[1].split("/")[0])
    got = bytearray()
    t0 = time.perf_counter()
    with trio.move_on_after(20):
        s = await trio.open_tcp_stream("127.0.0.1", port)
        try:
            await s.send_all(first)
            while True:
                data = await s.receive_some(65536)
                if not data:
                    break
                got += data
        except (trio.BrokenResourceError, OSError):
            pass
        finally:
            await s.aclose()
    out["probe_bytes"], out["probe_closed_after_s"] = bytes(got), time.perf_counter() - t0


async def measure_stranger(kind, stranger_kind, stranger_psk, addr, n, server_pid,
                           nursery, true_psk) -> dict:
    tcp = RecordingTCP()
    t = make_transport(stranger_kind, stranger_psk, tcp=tcp)
    await nursery.start(t.run)
    true_b58 = addr.rsplit("/p2p/", 1)[1]
    res: list[dict] = []
    probe: dict = {}
    s0 = cpu_of(server_pid) if server_pid else cpu_of(None)
    async def sequential():
        for _ in range(n):
            await one_stranger(t, addr, true_b58, res)
            await drop_connections(t)

    with trio.fail_after(60):
        async with trio.open_nursery() as nn:
            if kind == "b" and stranger_psk != true_psk:      # each waits for a timeout
                nn.start_soon(raw_probe, addr, os.urandom(8 + 20), probe)
                for _ in range(n):
                    nn.start_soon(one_stranger, t, addr, true_b58, res)
            else:
                if kind == "a":     # a probe that says hello and stops: how long is it kept?
                    nn.start_soon(raw_probe, addr, b"\x13/multistream/1.0.0\n", probe)
                nn.start_soon(sequential)
    s1 = cpu_of(server_pid) if server_pid else cpu_of(None)
    rx = [bytes(r.rx) for r in tcp.records]
    out = {"n": len(res), "s": [r["s"] for r in res], "learned": sum(r["learned"] for r in res),
           "last_error": res[-1]["chain"][-1] if res else "", "chain": res[-1]["chain"] if res else [],
           "rx_bytes": [len(x) for x in rx],
           "listener_cpu_ms": (s1 - s0) * 1e3 / max(1, len(res) + (1 if probe else 0)),
           "rx_head": repr(rx[0][:48]) if rx else ""}
    if probe:
        sent = "28 random bytes" if kind == "b" else "only the multistream header"
        out["probe"] = (f"raw TCP probe ({sent} sent): listener sent "
                        f"{len(probe['probe_bytes'])} bytes, closed after "
                        f"{probe['probe_closed_after_s']:.2f} s")
    true_key = bytes.fromhex(true_psk)
    if kind == "b" and rx and len(rx[0]) > 8:
        # bench-only oracle: what the listener sent, decrypted with the *real* PSK
        pt_ = Salsa20.new(key=true_key, nonce=rx[0][:8]).decrypt(rx[0][8:])
        out["rx_plain_with_true_psk"] = repr(pt_[:64])
    pid_bytes = ID.from_base58(true_b58).to_bytes()
    out["peer_id_bytes_on_wire"] = any(pid_bytes in x or pid_bytes[-32:] in x for x in rx)
    return out


STRANGERS = {            # config -> [(label, stranger kind, psk: None / "other" / "same")]
    "a": [("Noise host", "a", None)],
    "b": [("other PSK", "b", "other"), ("has the PSK (revoked member)", "b", "same")],
    "c": [("TLS host", "c", None)],
}


# -- main -------------------------------------------------------------------------------------
async def client(args, addrs: dict, psk: str, server_pid: int | None, nursery) -> dict:
    results: dict = {"setup": {}, "bulk": {}, "stranger": {}}
    block = os.urandom(MiB)
    nbytes = args.size * MiB
    members = {}
    for k in args.kinds:
        try:
            t = make_transport(k, psk if k == "b" else None)
            await nursery.start(t.run)
            members[k] = t
            log(f"{LABEL[k]}: setup ...")
            results["setup"][k] = await measure_setup(t, addrs[k], args.dials, server_pid)
        except Exception as exc:
            results["setup"][k] = {"error": exc_text(exc)}
    for run in range(args.runs):                # interleaved: a b c a b c ...
        for k in members:
            if "error" in results["bulk"].get(k, {}):
                continue
            log(f"{LABEL[k]}: bulk {args.size} MiB, run {run + 1}/{args.runs} ...")
            try:
                r = await measure_bulk(members[k], addrs[k], nbytes, server_pid, block)
                results["bulk"].setdefault(k, {"runs": []})["runs"].append(r)
            except Exception as exc:
                results["bulk"][k] = {"error": exc_text(exc)}
    other = os.urandom(32).hex()
    for k in args.kinds:
        for label, skind, which in STRANGERS[k]:
            spsk = {None: None, "other": other, "same": psk}[which]
            log(f"{LABEL[k]}: stranger ({label}) ...")
            try:
                results["stranger"][(k, label)] = await measure_stranger(
                    k, skind, spsk, addrs[k], args.strangers, server_pid, nursery, psk)
            except Exception as exc:
                results["stranger"][(k, label)] = {"error": exc_text(exc)}
    return results


def ratio(x, base):
    return f"{x / base:5.2f}x" if base else "  -  "


def report(args, res: dict, mode: str) -> None:
    print(f"\npy-libp2p {libp2p.__version__ if hasattr(libp2p, '__version__') else '0.8.1'}, "
          f"127.0.0.1, {mode}; load avg {' '.join(open('/proc/loadavg').read().split()[:3])}")
    print(f"\n1. connection setup (TCP + security + Yamux), {args.dials} dials each")
    print(f"{'config':16} {'median ms':>10} {'p95 ms':>8} {'vs (a)':>7} {'CPU ms/dial':>12} {'errors':>7}")
    base = None
    for k in args.kinds:
        r = res["setup"].get(k, {})
        if "error" in r or not r.get("dial_ms"):
            print(f"{LABEL[k]:16} FAILED: {(r.get('error') or r.get('errors') or ['?'])[-1]}")
            continue
        med = statistics.median(r["dial_ms"])
        base = med if k == "a" else base
        print(f"{LABEL[k]:16} {med:10.2f} {pctl(r['dial_ms'], 0.95):8.2f} {ratio(med, base):>7} "
              f"{r['cpu_ms_per_dial']:12.2f} {len(r['errors']):7d}")
        for e in r["errors"][:2]:
            print(f"{'':16}   error: {e}")
    print(f"\n2. bulk, one Yamux stream, {args.size} MiB; median of {args.runs} runs (MB/s range)")
    print(f"{'config':16} {'MB/s':>8} {'vs (a)':>7} {'send CPU s/GB':>14} {'recv CPU s/GB':>14} "
          f"{'total s/GB':>11} {'vs (a)':>7}  MB/s runs")
    bm = bc = None
    for k in args.kinds:
        r = res["bulk"].get(k, {})
        if "error" in r or not r.get("runs"):
            print(f"{LABEL[k]:16} FAILED: {r.get('error', ['no run'])[-1]}")
            continue
        runs = r["runs"]
        r = {f: statistics.median(x[f] for x in runs) for f in runs[0]}
        spread = ", ".join(f"{x['MBps']:.1f}" for x in runs)
        if k == "a":
            bm, bc = r["MBps"], r["cpu_total_s_per_GB"]
        recv = r.get("cpu_recv_s_per_GB")
        print(f"{LABEL[k]:16} {r['MBps']:8.1f} {ratio(r['MBps'], bm):>7} "
              f"{r['cpu_send_s_per_GB']:14.2f} "
              f"{(f'{recv:14.2f}' if recv is not None else '  (same proc)'):>14} "
              f"{r['cpu_total_s_per_GB']:11.2f} {ratio(r['cpu_total_s_per_GB'], bc):>7}  {spread}")
    print(f"\n3. stranger dials with a made-up peer id, {args.strangers} attempts each")
    print(f"{'config':16} {'stranger':30} {'median s':>9} {'bytes read':>10} {'learns id':>10} "
          f"{'listener CPU ms':>16}  outcome")
    for (k, label), r in res["stranger"].items():
        if "error" in r:
            print(f"{LABEL[k]:16} {label:30} FAILED: {r['error'][-1]}")
            continue
        rx = sorted(set(r["rx_bytes"]))
        rxs = str(rx[0]) if len(rx) == 1 else f"{rx[0]}-{rx[-1]}" if rx else "-"
        print(f"{LABEL[k]:16} {label:30} {statistics.median(r['s']):9.3f} {rxs:>10} "
              f"{r['learned']:>4}/{r['n']:<5} {r['listener_cpu_ms']:16.2f}  {r['last_error'][:90]}")
    print("\nnotes:")
    for (k, label), r in res["stranger"].items():
        if "error" in r:
            continue
        print(f"  {LABEL[k]} / {label}: first bytes received {r['rx_head']}")
        if "probe" in r:
            print(f"  {'':{len(LABEL[k])}}   {r['probe']}")
        if "rx_plain_with_true_psk" in r:
            print(f"  {'':{len(LABEL[k])}}   the same decrypted with the listener's PSK "
                  f"(bench oracle): {r['rx_plain_with_true_psk']}")
        print(f"  {'':{len(LABEL[k])}}   peer id bytes in cleartext on the wire: "
              f"{r['peer_id_bytes_on_wire']}; error chain: {' <- '.join(c[:70] for c in r['chain'][-3:])}")
    if ROOT_LOG.counts:
        print(f"  root-logger warnings from py-libp2p (dialer process): {ROOT_LOG.counts}")


async def main(args) -> None:
    psk = args.psk or os.urandom(32).hex()
    async with trio.open_nursery() as nursery:
        if args.serve:
            addrs = await start_listeners(nursery, psk, KINDS)
            print(json.dumps(addrs), flush=True)
            await trio.to_thread.run_sync(sys.stdin.read)       # until the client closes stdin
            nursery.cancel_scope.cancel()
            return
        if args.inproc:
            addrs = await start_listeners(nursery, psk, args.kinds)
            with trio.fail_after(args.budget):
                res = await client(args, addrs, psk, None, nursery)
            report(args, res, "both ends in one process (CPU figures are the sum)")
        else:
            proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve",
                                     "--psk", psk], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True)
            try:
                with trio.fail_after(60):
                    addrs = json.loads(await trio.to_thread.run_sync(proc.stdout.readline))
                with trio.fail_after(args.budget):
                    res = await client(args, addrs, psk, proc.pid, nursery)
                report(args, res, f"listeners in a separate process ({proc.pid}), "
                       "dialers and strangers in this one")
            finally:
                proc.stdin.close()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dials", type=int, default=30, help="timed dials per config (default 30)")
    ap.add_argument("--size", type=int, default=256, help="MiB for the bulk stream (default 256)")
    ap.add_argument("--runs", type=int, default=3, help="bulk runs per config (default 3)")
    ap.add_argument("--strangers", type=int, default=5, help="stranger dials per case (default 5)")
    ap.add_argument("--only", default="a,b,c", help="configs to run, e.g. a,b (default a,b,c)")
    ap.add_argument("--inproc", action="store_true", help="both ends in one process")
    ap.add_argument("--budget", type=float, default=240, help="overall time limit, s (default 240)")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--psk", help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.kinds = [k for k in KINDS if k in a.only.split(",")]
    a.dials = max(1, min(a.dials, 500))
    a.strangers = max(1, min(a.strangers, 50))
    a.runs = max(1, min(a.runs, 10))
    trio.run(main, a)
