#!/usr/bin/env python3
"""The disk write paths a network restore uses, measured on this machine. Measures,
does not assert (BENCHMARKS.md, swarm section, says what the figures explain).

    .venv/bin/python bench/bench_write_paths.py pagecache [--mb 700] [--runs 3] [--wait 20]
    .venv/bin/python bench/bench_write_paths.py mix [--runs 3] [--image-threads 3] [--no-packs]

pagecache: the same MB written into a new file two ways, --runs times, --wait s
apart; wall time and CPU time (this process) of each:
  buffered   os.write of 1 MiB blocks into the page cache, then fdatasync;
  direct     O_DIRECT 4 MiB writes from one reused aligned buffer (what
             node/store/pack_direct.py does for fetched chunks), then fdatasync.
  The buffered CPU time depends on the state of the VM's free memory: the first
  touch of a page the host has taken back (virtio-balloon free page reporting is
  on here) is a host fault. It cannot be forced from inside the VM, hence repeats.
mix: what one 2 GiB swarm restore writes, at once: 1,250 O_DIRECT 1 MiB writes at
random positions of a sparse 2 GiB file by --image-threads threads (default 3, as
node/service/restore.py StagedImage) and 166 sequential O_DIRECT 4 MiB writes by one thread
(the packs; --no-packs leaves them out), each file fsync'ed; wall time and MB/s of
the whole: the disk's floor for a restore's writes. Files go to $BENCH_DATA (default
/tmp/bench-data).
"""
from __future__ import annotations

import argparse
import mmap
import os
import random
import threading
import time
from pathlib import Path

MiB = 1 << 20
DATA = Path(os.environ.get("BENCH_DATA", "/tmp/bench-data"))


def _block(n: int) -> mmap.mmap:
    buf = mmap.mmap(-1, n)
    buf.write(os.urandom(n))
    return buf


def _timed_write(path: Path, flags: int, block, count: int) -> dict:
    """Write `block` count times into a new file opened with flags, then fdatasync."""
    t, c = time.perf_counter(), time.process_time()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flags, 0o600)
    try:
        for _ in range(count):
            os.write(fd, block)
        w, wc = time.perf_counter() - t, time.process_time() - c
        os.fdatasync(fd)
    finally:
        os.close(fd)
    return {"write_s": round(w, 3), "write_cpu_s": round(wc, 3),
            "with_fdatasync_s": round(time.perf_counter() - t, 3)}


def buffered(path: Path, mb: int) -> dict:
    return _timed_write(path, 0, os.urandom(MiB), mb)


def direct(path: Path, mb: int) -> dict:
    return _timed_write(path, os.O_DIRECT, _block(4 * MiB), mb // 4)


def cmd_pagecache(a) -> None:
    DATA.mkdir(parents=True, exist_ok=True)
    p = DATA / "write-paths.tmp"
    try:
        for run in range(1, a.runs + 1):
            if run > 1:
                time.sleep(a.wait)       # the measured condition, not synchronisation
            print(f"run {run} buffered", buffered(p, a.mb), flush=True)
            p.unlink()
            print(f"run {run} direct  ", direct(p, a.mb), flush=True)
            p.unlink()
    finally:
        p.unlink(missing_ok=True)


def _drain(fd: int, view, size: int, queue: list, lock) -> None:
    """Write `view` at position*size for positions taken from the shared queue."""
    while True:
        with lock:
            if not queue:
                return
            p = queue.pop()
        os.pwrite(fd, view[:size], p * size)


def cmd_mix(a) -> None:
    DATA.mkdir(parents=True, exist_ok=True)
    buf = _block(4 * MiB)
    view = memoryview(buf)
    for run in range(1, a.runs + 1):
        # (name, file, write size, threads, positions: pop() takes the last first)
        jobs = [("image", DATA / "mix-image.tmp", MiB, a.image_threads,
                 random.Random(run).sample(range(2048), 1250))]
        if not a.no_packs:                       # sequential appends
            jobs.append(("packs", DATA / "mix-packs.tmp", 4 * MiB, 1, list(range(166))[::-1]))
        fds = [os.open(j[1], os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o600)
               for j in jobs]
        try:
            t = time.perf_counter()
            threads = []
            for fd, (_, _, size, n, queue) in zip(fds, jobs):
                lock = threading.Lock()          # one queue and lock per file
                threads += [threading.Thread(target=_drain, args=(fd, view, size, queue, lock))
                            for _ in range(n)]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            for fd in fds:
                os.fsync(fd)
            wall = time.perf_counter() - t
        finally:
            for fd, j in zip(fds, jobs):
                os.close(fd)
                j[1].unlink(missing_ok=True)
        mb = (1250 * MiB + (0 if a.no_packs else 166 * 4 * MiB)) / 1e6
        print(f"run {run}: {' + '.join(f'{j[0]} ({j[3]} thread(s))' for j in jobs)}: "
              f"{wall:.2f} s, {mb / wall:.0f} MB/s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pagecache")
    p.add_argument("--mb", type=int, default=700)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--wait", type=float, default=20.0)
    p.set_defaults(fn=cmd_pagecache)
    m = sub.add_parser("mix")
    m.add_argument("--runs", type=int, default=3)
    m.add_argument("--image-threads", type=int, default=3,
                   help="image writer threads (node/service/restore.py StagedImage.WRITERS)")
    m.add_argument("--no-packs", action="store_true", help="the image writes alone")
    m.set_defaults(fn=cmd_mix)
    a = ap.parse_args()
    a.fn(a)


if __name__ == "__main__":
    main()
