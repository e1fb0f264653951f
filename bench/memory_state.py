#!/usr/bin/env python3
"""The state of this machine's free memory, which both sides of bench_swarm.py depend
on, and a way to put the machine in its fragmented state on purpose.

Why it matters: on this VM, libtorrent's 4 seeds -> 1 restore of the 2 GiB image took
2.3-2.8 s while the free memory lay in large blocks and 4.2-6.2 s while this module's
`fragment` held it in scattered 4 KiB pages (BENCHMARKS.md, swarm section, 2026-11-25
10:21). Likely (not traced in the kernel): Linux 6.18 gives a file's page cache large
folios only from large free blocks, and libtorrent writes its download through the
page cache (mmap). hypersdk's restore writes with O_DIRECT and moved less (1.35-1.5 s
against 1.7-1.8 s). Fragmentation is not the only slow mode: the page cache a
test-suite run leaves behind made libtorrent take 3.1-4.2 s with 84-90% of the free
memory in large blocks (cause not known; `echo 1 > /proc/sys/vm/drop_caches` clears it).

    python bench/memory_state.py                     # print the state (JSON)
    python bench/memory_state.py fragment [--fraction 0.85]
        # map fraction x MemAvailable, touch it, give back every other 4 KiB page,
        # print "ready", hold until stdin closes (bench_swarm.py --fragment uses this)
"""
from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import select
import subprocess
import sys

PAGE = os.sysconf("SC_PAGE_SIZE")
LARGE_ORDER = 9                      # 2 MiB blocks with 4 KiB pages: a large folio
MADV_DONTNEED = 4
DEFAULT_FRACTION = 0.85            # of MemAvailable mapped by `fragment` (half is kept)


def free_memory_state() -> dict:
    """Free memory and the share of it in blocks of >= 2 MiB (/proc/buddyinfo)."""
    total = large = 0
    with open("/proc/buddyinfo") as f:
        for line in f:
            counts = [int(x) for x in line.split()[4:]]
            for order, n in enumerate(counts):
                b = n * (PAGE << order)
                total += b
                if order >= LARGE_ORDER:
                    large += b
    return {"free_MiB": total >> 20,
            "free_in_2MiB_blocks_pct": round(100 * large / total) if total else 0}


def fragment(fraction: float) -> None:
    """Leave the free memory in single pages: take fraction of MemAvailable, touch it
    all, then give every other page back. Holds the rest until stdin reaches EOF."""
    avail = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    n = int(avail * fraction) // (2 * PAGE) * (2 * PAGE)
    m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf = (ctypes.c_char * n).from_buffer(m)
    base = ctypes.addressof(buf)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    ctypes.memset(base, 1, n)
    for off in range(0, n, 2 * PAGE):
        libc.madvise(base + off, PAGE, MADV_DONTNEED)
    print("ready", json.dumps({"held_MiB": n // 2 >> 20, **free_memory_state()}),
          flush=True)
    sys.stdin.read()


class Fragmented:
    """with Fragmented(): ... runs the block with the free memory fragmented
    (a `fragment` child process holds it; it ends when the block does)."""

    def __init__(self, fraction: float = DEFAULT_FRACTION, timeout: float = 300.0):
        self.fraction = fraction
        self.timeout = timeout
        self.proc = None
        self.info: dict = {}

    def __enter__(self):
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "fragment",
             "--fraction", str(self.fraction)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout)
        line = self.proc.stdout.readline() if ready else ""  # "ready {...}" once it holds
        if not line.startswith("ready"):
            self.__exit__(None, None, None)
            raise SystemExit(f"memory_state fragment did not get ready: {line!r}")
        self.info = json.loads(line.split(" ", 1)[1])
        return self

    def __exit__(self, *exc):
        if self.proc is not None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
            self.proc = None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mode", nargs="?", choices=["state", "fragment"], default="state")
    ap.add_argument("--fraction", type=float, default=DEFAULT_FRACTION)
    a = ap.parse_args()
    if a.mode == "fragment":
        if not 0 < a.fraction <= 0.9:
            raise SystemExit("--fraction must be in (0, 0.9]")
        fragment(a.fraction)
    else:
        print(json.dumps(free_memory_state()))


if __name__ == "__main__":
    main()
