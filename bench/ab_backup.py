#!/usr/bin/env python3
"""A/B of one backup step between two hypersdk builds, alternating run by run.

    python bench/ab_backup.py --a /path/a/.venv/bin/hypersdk --b /path/b/.venv/bin/hypersdk \
        [--image /tmp/bench-data/disk-v1.img] [--runs 6]

Each run: a fresh data dir, the image read once (page cache), `sync`, then
`hypersdk backup IMAGE` timed (wall, perf_counter). The builds alternate (a, b,
a, b, ...), so neither always follows the other. Prints each time, the medians
and b/a. Used when bench_backup.py's three runs cannot tell a small difference
from this VM's run-to-run spread (BENCHMARKS.md, "Ingest against the previous build").
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time


def one(hs: str, image: str, work: str) -> float:
    data = os.path.join(work, "data")
    shutil.rmtree(data, ignore_errors=True)
    with open(image, "rb") as f:
        while f.read(8 << 20):
            pass
    subprocess.run(["sync"], check=True)
    env = dict(os.environ, HYPERSDK_DATA_DIR=data)
    t0 = time.perf_counter()
    subprocess.run([hs, "backup", image, "--name", "d"], env=env, check=True,
                   stdout=subprocess.DEVNULL, timeout=900)
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--a", required=True, help="hypersdk executable A (the baseline)")
    ap.add_argument("--b", required=True, help="hypersdk executable B")
    ap.add_argument("--image", default="/tmp/bench-data/disk-v1.img")
    ap.add_argument("--runs", type=int, default=6)
    a = ap.parse_args()
    times = {"a": [], "b": []}
    with tempfile.TemporaryDirectory(prefix="ab-backup-") as work:
        for i in range(a.runs):
            for k in ("a", "b"):
                t = one(getattr(a, k), a.image, work)
                times[k].append(t)
                print(f"run {i + 1} {k}: {t:.3f} s", flush=True)
    ma, mb = statistics.median(times["a"]), statistics.median(times["b"])
    print(f"A median {ma:.3f} s ({min(times['a']):.2f}-{max(times['a']):.2f})")
    print(f"B median {mb:.3f} s ({min(times['b']):.2f}-{max(times['b']):.2f})")
    print(f"B/A time {mb / ma:.3f} (ingest B/A {ma / mb:.3f})")


if __name__ == "__main__":
    main()
