#!/usr/bin/env python3
"""Half-open connections (issue 17, attack 3): honest dials to a real `hypersdk node
run` with and without 500 stalled handshakes from another address, in one run.

    .venv/bin/python bench/bench_half_open.py [--dials 15] [--half-open 500]

The victim runs in no network (open). Baseline: DIALS honest dials from 127.0.0.1, one
at a time, each a fresh identity opening one exchange stream (bounded at 15 s). Attack:
this process opens HALF_OPEN TCP connections from 127.0.0.2 that send the first
multistream line and then nothing, and the same honest dials run meanwhile. Prints the
success counts and dial times side by side and the victim's handshake counters. The
issue's bar: >= 90% of honest dials succeed during the attack.
"""
from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import tempfile
import time
from pathlib import Path

import trio
from node_procs import cli, start

DIAL_LIMIT = 15.0


async def dials(work: Path, tag: str, vid: bytes, vaddr: str, n: int) -> list:
    """Seconds of each successful dial (None for a failed one)."""
    from hypersdk.node.net.gate import Gate
    from hypersdk.node.net.identity import Identity
    from hypersdk.node.net.p2p_transport import P2PTransport
    from hypersdk.protocol.exchange import PROTOCOL_ID
    out = []
    async with trio.open_nursery() as nursery:
        for i in range(n):
            ident = Identity.generate()
            t = P2PTransport(ident, gate=Gate(work / f"{tag}{i}", ident))
            await nursery.start(t.run)
            t0 = time.perf_counter()
            took = None
            with trio.move_on_after(DIAL_LIMIT):
                try:
                    s = await t.open_stream(vid, vaddr, PROTOCOL_ID)
                    await s.aclose()
                    took = time.perf_counter() - t0
                except Exception:
                    pass
            out.append(took)
        nursery.cancel_scope.cancel()
    return out


def summary(times: list) -> str:
    ok = [x for x in times if x is not None]
    med = f"{statistics.median(ok) * 1000:.1f} ms" if ok else "-"
    return f"{len(ok)}/{len(times)} succeeded, median {med}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dials", type=int, default=15)
    ap.add_argument("--half-open", type=int, default=500)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-half-open-"))
    vdir = work / "victim"
    proc, vaddr = start(vdir)
    idle = []
    try:
        vid = bytes.fromhex(json.loads(cli(vdir, "status", "--json"))["node_id"])
        port = int(vaddr.split("/tcp/")[1].split("/")[0])
        base = trio.run(dials, work, "b", vid, vaddr, a.dials)
        for _ in range(a.half_open):
            s = socket.socket()
            s.settimeout(5)
            s.bind(("127.0.0.2", 0))
            s.connect(("127.0.0.1", port))
            s.sendall(b"\x13/multistream/1.0.0\n")
            idle.append(s)
        attacked = trio.run(dials, work, "a", vid, vaddr, a.dials)
        hs = json.loads(cli(vdir, "status", "--json"))["handshakes"]
        ok = sum(x is not None for x in attacked)
        print(f"baseline       {summary(base)}")
        print(f"under attack   {summary(attacked)} ({a.half_open} stalled handshakes from "
              "127.0.0.2)")
        print(f"victim         {hs}")
        print()
        print("| measure | figure | bar | result |")
        print("|---|---|---|---|")
        print(f"| honest dials, no attack | {summary(base)} | - | baseline |")
        print(f"| honest dials during {a.half_open} stalled handshakes | {summary(attacked)} "
              f"| >= 90% | {'PASS' if ok >= 0.9 * a.dials else 'FAIL'} |")
    finally:
        for s in idle:
            s.close()
        proc.terminate()
        proc.wait(timeout=60)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
