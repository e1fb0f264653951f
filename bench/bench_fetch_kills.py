#!/usr/bin/env python3
"""Fetch resume under a kill storm, between real `hypersdk node run` processes on
127.0.0.1: what a fetch killed (-9) N times mid-transfer costs the serving node.
Measures, does not assert (tests/test_fetch_kills.py asserts <= 1.25x).

    .venv/bin/python bench/bench_fetch_kills.py [--mib 256] [--kills 10] [--rate 40M]
                                                [--runs 1] [--keep DIR]

Runs tests/fetch_storm.py's kill_storm (its docstring says how): A serves a backup
of MIB MiB of random data (1 MiB chunks) at most RATE bytes/s (the test-only cap
HYPERSDK_TEST_SERVE_RATE, so the kills land mid-transfer); E fetches it and is
killed at 1/(N+1), 2/(N+1), ... of the chunks and restarted each time, then
completes; the restore is compared with the image. Prints the bytes the fetch
needs (the image's), the bytes A sent E over the whole storm (A's `peers`
bytes_out for E: everything A wrote to E's connections) and their ratio, and the
chunks each kill cost.

Measured 2026-12-07 on the 2-core dev VM (shared with other work, load ~2.5),
256 MiB, 10 kills, 40M cap, `bench/bench_fetch_kills.py [--runs 2]`:
  before, a fetch committing every 256 MiB (HYPERSDK_COMMIT_BYTES; each kill
    lost its whole attempt): sent 1609869041 B of 268435456 B, ratio 5.997,
    chunks lost per kill 23, 46, ..., 233 (69 s)
  the same with 16 MiB steps but no commit by time: ratio 1.297 (lost 1-14
    chunks per kill)
  after (node/service/replication.py: every 16 MiB and at least every 0.1 s):
    ratio 1.121, 1.078, 1.110 (sent 300999377, 289461235, 297853238 B);
    0-5 chunks lost per kill; ~30 s per storm
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from fetch_storm import kill_storm  # noqa: E402
from test_node_cli import Node  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=256, help="image size in MiB")
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--rate", default="40M", help="the server's payload rate cap")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--keep", default=None, help="work in DIR and keep it")
    a = ap.parse_args()
    ratios = []
    for run in range(a.runs):
        work = Path(a.keep or tempfile.mkdtemp(prefix="bench-fetch-kills-")) / f"run{run}"
        work.mkdir(parents=True, exist_ok=True)
        started: list[Node] = []

        def start(cli, *extra, env=None):
            if not (cli.data_dir / "node.key").exists():
                cli("node", "init")
            n = Node(cli, *extra, env=env)
            started.append(n)
            return n.wait_ready()

        try:
            r = kill_storm(work, start, size=a.mib << 20, kills=a.kills, rate=a.rate)
        finally:
            for n in started:
                n.kill()
            if not a.keep:
                shutil.rmtree(work.parent, ignore_errors=True)
        ratios.append(r.ratio)
        print(f"run {run + 1}: needed {r.needed} B, sent {r.sent} B, ratio {r.ratio:.3f} "
              f"({a.kills} kills, {a.mib} MiB, cap {a.rate}/s, {r.seconds:.1f} s, "
              f"restore {'identical' if r.identical else 'DIFFERS'})")
        print(f"  chunks held at each kill {r.held_at_kill}")
        print(f"  chunks held at each start {r.held_at_start}")
        print(f"  chunks lost per kill {r.lost_chunks}", flush=True)
    if len(ratios) > 1:
        print(f"ratio min {min(ratios):.3f} max {max(ratios):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
