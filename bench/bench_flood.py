#!/usr/bin/env python3
"""Streams that never read (issue 17, attack 1): the victim's memory and an honest
download, with and without the flood, in one run, against real `hypersdk node run`
processes on 127.0.0.1.

    .venv/bin/python bench/bench_flood.py [--size 512M] [--runs 3] [--keep DIR]

The victim V backs up a random (incompressible) image of SIZE. Per run, one honest
node (a fresh data dir each time) runs `hypersdk fetch` of it from V alone:
  baseline  nothing else going on
  flood     while this process holds 4 identities x 250 exchange streams open at V,
            each having sent one Get for 64 of V's chunks and never reading
and V's RSS is sampled every 50 ms (peak) with its `status` serving counters.
The issue's bars: RSS <= 400 MB under the flood, the honest download <= 1.5x its
baseline. Prints a markdown table for BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import trio
from node_procs import cli, random_image, start

MiB = 1 << 20
IDENTITIES, STREAMS, IDS = 4, 250, 64


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def honest_fetch(work: Path, name: str, vaddr: str, mid: str) -> float:
    d = work / name
    proc, _ = start(d, "--bootstrap", vaddr)
    try:
        for _ in range(300):                   # the provider record: <= 30 s
            if json.loads(cli(d, "dht", "find", mid, "--json"))["providers"]:
                break
            time.sleep(0.1)
        t0 = time.perf_counter()
        doc = json.loads(cli(d, "fetch", mid, "--json"))
        took = time.perf_counter() - t0
        assert doc["bad_chunks"] == 0 and doc["chunks_fetched"] > 0, doc
        return took
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        shutil.rmtree(d, ignore_errors=True)


async def flood_then(work: Path, vpid: int, vid: bytes, vaddr: str, ids: list, fn) -> tuple:
    """Hold the flood open, run fn() in a thread meanwhile; (fn's result, peak RSS,
    streams opened)."""
    from hypersdk.node.net.gate import Gate
    from hypersdk.node.net.identity import Identity
    from hypersdk.node.net.p2p_transport import P2PTransport
    from hypersdk.protocol.exchange import PROTOCOL_ID, Get
    from hypersdk.protocol.exchange_framing import encode_message
    peak, held = [rss(vpid)], []

    async def watch():
        while True:
            peak[0] = max(peak[0], rss(vpid))
            await trio.sleep(0.05)

    async def attack(t):
        for i in range(STREAMS):
            try:
                s = await t.open_stream(vid, vaddr, PROTOCOL_ID)
                await s.send_all(encode_message(Get(i, tuple(ids))))
                held.append(s)
            except Exception:
                pass

    async with trio.open_nursery() as n:
        n.start_soon(watch)
        ts = []
        for i in range(IDENTITIES):
            ident = Identity.generate()
            t = P2PTransport(ident, gate=Gate(work / f"attacker{i}", ident))
            await n.start(t.run)
            ts.append(t)
        with trio.fail_after(600):
            async with trio.open_nursery() as a:
                for t in ts:
                    a.start_soon(attack, t)
            result = await trio.to_thread.run_sync(fn)
        n.cancel_scope.cancel()
    return result, peak[0], len(held)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="512M")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--keep", metavar="DIR", help="work here and keep it")
    a = ap.parse_args()
    from hypersdk.node.config import parse_size
    from hypersdk.node.store import catalog
    from hypersdk.node.store.store import ChunkStore
    from hypersdk.protocol.chunks import ZERO_ID
    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="bench-flood-"))
    work.mkdir(parents=True, exist_ok=True)
    img = random_image(work / "img", parse_size(a.size))
    vdir = work / "victim"
    vproc, vaddr = start(vdir)
    try:
        mid = json.loads(cli(vdir, "backup", img, "--name", "vm", "--json"))["manifest"]
        vid = bytes.fromhex(json.loads(cli(vdir, "status", "--json"))["node_id"])
        with ChunkStore(vdir, readonly=True) as s:
            m = catalog.load_manifest(s, bytes.fromhex(mid))
            ids = [c for _, c in catalog.iter_chunk_ids(s, m) if c != ZERO_ID][:IDS]
        base_rss = rss(vproc.pid)
        rows = []
        for r in range(a.runs):
            base = honest_fetch(work, f"h{r}a", vaddr, mid)
            flood, peak, opened = trio.run(
                flood_then, work, vproc.pid, vid, vaddr, ids,
                lambda r=r: honest_fetch(work, f"h{r}b", vaddr, mid))
            st = st2 = json.loads(cli(vdir, "status", "--json"))["serving"]
            for _ in range(600):               # the flood's streams and bytes go: <= 60 s
                st2 = json.loads(cli(vdir, "status", "--json"))["serving"]
                if st2["bytes_held"] == 0 and st2["streams"] == 0:
                    break
                time.sleep(0.1)
            trims = st2["memory_trims"]
            for _ in range(300):               # the node gives memory back: <= 30 s
                if json.loads(cli(vdir, "status", "--json"))["serving"]["memory_trims"] > trims:
                    break
                time.sleep(0.1)
            after = rss(vproc.pid)
            rows.append((base, flood, peak, opened, st, after))
            print(f"run {r + 1}: baseline {base:.2f} s, under flood {flood:.2f} s "
                  f"({flood / base:.2f}x), victim RSS peak {peak / MiB:.0f} MiB "
                  f"(before {base_rss / MiB:.0f}, after {after / MiB:.0f}), streams opened "
                  f"{opened}, refused {st.get('streams refused: per peer', 0)}, "
                  f"budget high water {st['high_water'] / MiB:.0f} MiB", flush=True)
        med = lambda i: statistics.median(x[i] for x in rows)
        ratio = statistics.median(x[1] / x[0] for x in rows)
        print()
        print("| measure | median of runs | bar | result |")
        print("|---|---|---|---|")
        print(f"| honest fetch of {a.size}, no attack | {med(0):.2f} s | - | baseline |")
        print(f"| honest fetch under the flood | {med(1):.2f} s ({ratio:.2f}x) | <= 1.5x | "
              f"{'PASS' if ratio <= 1.5 else 'FAIL'} |")
        pk = max(x[2] for x in rows)
        print(f"| victim RSS peak under the flood | {pk / MiB:.0f} MiB (max of runs; "
              f"{base_rss / MiB:.0f} before) | <= 400 MB | "
              f"{'PASS' if pk <= 400e6 else 'FAIL'} |")
        print(f"| victim RSS after the flood left | {med(5) / MiB:.0f} MiB | - | - |")
    finally:
        vproc.terminate()
        vproc.wait(timeout=60)
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
