#!/usr/bin/env python3
"""A provider that accepts requests and stalls (issue 17, attack 5): restore time
from three honest seeds, without and with a staller among the providers, in one
run, against real `hypersdk node run` processes on 127.0.0.1.

    .venv/bin/python bench/bench_staller.py [--size 1G] [--runs 3] [--mode chunks]

A backs up a random (incompressible) image of SIZE; B and C fetch it. Per run, a
fresh node (its own data dir: no reputation yet) runs `hypersdk restore` of it:
  baseline  A, B and C are the providers
  staller   S joins as well: it fetched the backup honestly and serves with the
            test-only switch HYPERSDK_TEST_STALL_SERVE=MODE ("chunks": manifests and
            Have answered, chunk requests accepted and never answered; "all": no
            request answered)
The staller rows run after the baseline rows (S announces itself; a stopped S would
leave dead records, another case). The issue's bar: a restore with one staller
takes <= 1.3x its normal time; before the reputation work a staller cost ~30 s.
Prints a markdown table for BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from node_procs import HYPERSDK, cli, random_image, start

MiB = 1 << 20


def wait_providers(d: Path, mid: str, n: int) -> None:
    for _ in range(600):                        # <= 60 s
        if len(json.loads(cli(d, "dht", "find", mid, "--count", n, "--json"))["providers"]) >= n:
            return
        time.sleep(0.1)
    raise SystemExit(f"{n} providers of {mid[:12]} not found in 60 s")


def restore(work: Path, name: str, boot: str, mid: str, providers: int) -> tuple[float, dict]:
    d = work / name
    proc, _ = start(d, "--bootstrap", boot)
    try:
        wait_providers(d, mid, providers)
        out = work / f"{name}.img"
        t0 = time.perf_counter()
        doc = json.loads(cli(d, "restore", mid, out, "--json"))
        took = time.perf_counter() - t0
        rep = json.loads(cli(d, "status", "--json"))["reputation"]
        out.unlink()
        return took, dict(doc["fetched"], reputation=rep)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        shutil.rmtree(d, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--mode", choices=("chunks", "all"), default="chunks")
    a = ap.parse_args()
    from hypersdk.node.config import parse_size
    assert HYPERSDK.exists()
    work = Path(tempfile.mkdtemp(prefix="bench-staller-"))
    procs = []
    try:
        img = random_image(work / "img", parse_size(a.size))
        pa, boot = start(work / "a")
        procs.append(pa)
        mid = json.loads(cli(work / "a", "backup", img, "--name", "vm", "--json"))["manifest"]
        for name in "bc":
            p, _ = start(work / name, "--bootstrap", boot)
            procs.append(p)
            wait_providers(work / name, mid, 1)
            cli(work / name, "fetch", mid, "--json")
        rows = {"baseline": [], "staller": []}
        for r in range(a.runs):
            rows["baseline"].append(restore(work, f"base{r}", boot, mid, 3))
            print(f"baseline run {r + 1}: {rows['baseline'][-1][0]:.2f} s", flush=True)
        ps, _ = start(work / "s", "--bootstrap", boot, env={"HYPERSDK_TEST_STALL_SERVE": a.mode})
        procs.append(ps)
        wait_providers(work / "s", mid, 1)
        cli(work / "s", "fetch", mid, "--json")      # honest when it fetches
        sid = json.loads(cli(work / "s", "status", "--json"))["node_id"]
        for r in range(a.runs):
            took, doc = restore(work, f"stall{r}", boot, mid, 4)
            rows["staller"].append((took, doc))
            print(f"staller run {r + 1}: {took:.2f} s; staller sent "
                  f"{doc['bytes_by_peer'].get(sid, 0)} bytes; offences "
                  f"{doc['reputation']['offences']}", flush=True)
        base = statistics.median(t for t, _ in rows["baseline"])
        stall = statistics.median(t for t, _ in rows["staller"])
        print()
        print(f"| restore of {a.size} (median of {a.runs}) | seconds | ratio | bar |")
        print("|---|---|---|---|")
        print(f"| 3 honest seeds | {base:.2f} | 1.00x | baseline |")
        print(f"| 3 honest seeds + 1 staller ({a.mode}) | {stall:.2f} | {stall / base:.2f}x | "
              f"<= 1.3x: {'PASS' if stall / base <= 1.3 else 'FAIL'} |")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=60)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
