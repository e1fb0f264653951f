#!/usr/bin/env python3
"""How fast a member node refuses a stranger, and what the membership proof costs a
member, against a real `hypersdk node run` process on 127.0.0.1.

    .venv/bin/python bench/bench_refusal.py [--dials 40] [--keep DIR]

One node M runs as its own process, in a network (`network create`). This process
dials it over libp2p (TCP, Noise, then the membership proof of node/net/gate.py)
as: a stranger (fresh key, in no network), a member of another network, and a
member of M's network (a certificate issued by M's network key), and, as the
baseline, a dial without the gate to a listener without it (a bare P2PTransport in
its own process: what every dial cost before the gate). For each: the time from the TCP dial to
the refusal the dialer gets (strangers) or to the connection ready for streams
(members), median and p95 over DIALS fresh connections, one at a time.

The issue's bar: a stranger refused in <= 100 ms.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio
from node_procs import cli, start

REPO = Path(__file__).resolve().parents[1]
HYPERSDK = Path(sys.executable).parent / "hypersdk"
S = 10**9


def _cli(data_dir: Path, *args) -> str:
    return cli(data_dir, *args, timeout=120)


_start = start


_PLAIN = """
import sys, trio
from hypersdk.node.net.p2p_transport import P2PTransport
async def main():
    t = P2PTransport(listen="/ip4/127.0.0.1/tcp/0")
    async with trio.open_nursery() as n:
        await n.start(t.run)
        print(t.addr, flush=True)
        await trio.sleep(3600)
trio.run(main)
"""


def _start_plain() -> tuple[subprocess.Popen, str]:
    """A listener without the gate, in its own process (the baseline: no proof)."""
    proc = subprocess.Popen([sys.executable, "-c", _PLAIN], stdout=subprocess.PIPE, text=True)
    return proc, proc.stdout.readline().strip()


def _member_dir(root: Path, name: str, admin_dir: Path, *, foreign: bool = False):
    """A data dir whose gate holds a certificate (of M's network, or another one)."""
    from hypersdk.node.net import membership
    from hypersdk.node.net.identity import Identity
    from hypersdk.protocol import membership as ms
    d = root / name
    ident = Identity.generate()
    now = time.time_ns()
    issuer = admin_dir
    if foreign:
        issuer = root / f"{name}-net"
        membership.create(issuer, Identity.generate(), name="other", site="x", now=now)
    tok = membership.invite(issuer, site="bench", roles=["member"], expires_in=600 * S,
                            addrs=["/ip4/127.0.0.1/tcp/1"], now=now)
    cert = membership.redeem(issuer, tok.secret, ident.public_key, now=now)
    membership.enroll(d, tok, ms.JoinAnswer(cert.raw, tok.network, (), "bench"), ident, now=now)
    return d, ident


async def _dials(ident, data_dir, addr: str, n: int) -> tuple[list[float], list[str]]:
    """data_dir None: a transport without the gate (as before membership)."""
    from hypersdk.node.net.gate import Gate
    from hypersdk.node.net.p2p_transport import P2PTransport
    from hypersdk.node.net.transport import TransportError
    times, outcomes = [], []
    for _ in range(n):
        t = P2PTransport(ident, "/ip4/127.0.0.1/tcp/0",
                         gate=None if data_dir is None else Gate(data_dir, ident))
        async with trio.open_nursery() as nursery:
            await nursery.start(t.run)
            t0 = time.perf_counter()
            try:
                with trio.fail_after(30):
                    await t.connect(addr)
                outcomes.append("connected")
            except TransportError as exc:
                outcomes.append(str(exc).split(": ", 1)[-1][:60])
            times.append(time.perf_counter() - t0)
            nursery.cancel_scope.cancel()
    return times, outcomes


def _row(label: str, times: list[float], outcomes: list[str]) -> str:
    ms_ = sorted(x * 1000 for x in times)
    p95 = ms_[min(len(ms_) - 1, round(0.95 * (len(ms_) - 1)))]
    common = max(set(outcomes), key=outcomes.count)
    return (f"{label:<34} {statistics.median(ms_):>8.1f} {p95:>8.1f} {ms_[-1]:>8.1f}   "
            f"{outcomes.count(common)}/{len(outcomes)} {common}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dials", type=int, default=40)
    ap.add_argument("--keep", type=Path, default=None, help="work in DIR and keep it")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from hypersdk.node.net.identity import Identity
    root = args.keep or Path(tempfile.mkdtemp(prefix="bench-refusal-"))
    root.mkdir(parents=True, exist_ok=True)
    procs = []
    try:
        m_dir = root / "m"
        _cli(m_dir, "node", "init")
        _cli(m_dir, "network", "create", "--name", "bench", "--site", "hq")
        pm, m_addr = _start(m_dir)
        po, o_addr = _start_plain()
        procs += [pm, po]
        member_dir, member = _member_dir(root, "member", m_dir)
        foreign_dir, foreign = _member_dir(root, "foreign", m_dir, foreign=True)
        stranger = Identity.generate()
        n = args.dials
        print(f"{n} dials each, one at a time, 127.0.0.1; times in ms from the TCP dial")
        print(f"{'dialer -> node':<34} {'median':>8} {'p95':>8} {'max':>8}   outcome")
        rows = [
            ("stranger -> member node", stranger, root / "stranger", m_addr),
            ("other network's member -> member", foreign, foreign_dir, m_addr),
            ("member -> member node", member, member_dir, m_addr),
            ("no gate -> listener without gate", member, None, o_addr),
        ]
        for label, ident, d, addr in rows:
            times, outcomes = trio.run(_dials, ident, d, addr, n)
            print(_row(label, times, outcomes), flush=True)
    finally:
        for p in procs:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
