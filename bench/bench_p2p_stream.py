#!/usr/bin/env python3
"""Stream throughput of node/net/p2p_transport.py (py-libp2p: TCP + Noise + Yamux) on 127.0.0.1.

Measures, does not assert. Two cases, each `--runs` times (median printed):
  1 stream : --size MiB (default 256) uploaded on one stream;
  4 streams: the same total split over 4 concurrent streams on the one connection.
The clock runs from the first byte sent until the receiver's 8-byte ack (it has
received everything), so the figure is end to end. The payload is a fixed random
MiB rotated per MiB (incompressible; nothing compresses anyway).

By default the receiver is a separate process (`--serve`), as two nodes would
be; `--inproc` runs both transports in one trio run (they then share one core,
so expect a lower figure). MB = 10**6 bytes.

    .venv/bin/python bench/bench_p2p_stream.py
    .venv/bin/python bench/bench_p2p_stream.py --size 64 --runs 1 --inproc
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hypersdk.node.net.identity import Identity  # noqa: E402
from hypersdk.node.net.p2p_transport import P2PTransport  # noqa: E402

SINK = "/bench/sink/1"
MiB = 1 << 20


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


async def upload(t: P2PTransport, peer_id: bytes, addr: str, nbytes: int, block: bytes):
    s = await t.open_stream(peer_id, addr, SINK)
    await s.send_all(nbytes.to_bytes(8, "big"))
    sent = 0
    i = 0
    while sent < nbytes:
        n = min(MiB, nbytes - sent)
        k = i % len(block)
        await s.send_all((block[k:] + block[:k])[:n])
        sent += n
        i += 4099
    ack = b""
    while len(ack) < 8:
        data = await s.receive_some(8 - len(ack))
        assert data, "receiver closed early"
        ack += data
    assert int.from_bytes(ack, "big") == nbytes
    await s.aclose()


async def measure(t, peer_id, addr, total, streams, block) -> float:
    t0 = time.perf_counter()
    async with trio.open_nursery() as n:
        for _ in range(streams):
            n.start_soon(upload, t, peer_id, addr, total // streams, block)
    return total / (time.perf_counter() - t0) / 1e6


async def client(addr: str, total: int, runs: int, nursery) -> None:
    t = P2PTransport()
    await nursery.start(t.run)
    peer_id = await t.connect(addr)
    block = os.urandom(MiB)
    await measure(t, peer_id, addr, 8 * MiB, 1, block)             # warm-up
    for streams in (1, 4):
        rates = [await measure(t, peer_id, addr, total, streams, block) for _ in range(runs)]
        print(f"{streams} stream{'s' if streams > 1 else ' '}: {total // MiB} MiB total, "
              f"median {statistics.median(rates):7.1f} MB/s  "
              f"(runs: {', '.join(f'{r:.1f}' for r in rates)})", flush=True)


async def main(args) -> None:
    total = args.size * MiB
    async with trio.open_nursery() as nursery:
        if args.serve:
            server = P2PTransport(Identity.generate())
            server.set_handler(SINK, sink)
            await nursery.start(server.run)
            print(server.addr, flush=True)
            await trio.to_thread.run_sync(sys.stdin.read)       # until the client closes stdin
        elif args.inproc:
            server = P2PTransport()
            server.set_handler(SINK, sink)
            await nursery.start(server.run)
            print("receiver: same process")
            await client(server.addr, total, args.runs, nursery)
        else:
            proc = subprocess.Popen([sys.executable, __file__, "--serve"], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True)
            try:
                with trio.fail_after(30):
                    addr = (await trio.to_thread.run_sync(proc.stdout.readline)).strip()
                print(f"receiver: separate process {proc.pid} at {addr}")
                with trio.fail_after(600):
                    await client(addr, total, args.runs, nursery)
            finally:
                proc.stdin.close()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256, help="MiB per case (default 256)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--inproc", action="store_true", help="both ends in one process")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    trio.run(main, ap.parse_args())
