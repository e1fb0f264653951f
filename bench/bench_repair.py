"""Repair after a site loss, against its floor (issue 20), real processes on loopback.

    .venv/bin/python bench/bench_repair.py [--backups 4] [--size 256M] [--grace 10]

Network: A (site hq) authors BACKUPS random (incompressible) images of SIZE with
replicas 2; nodes on sites b, c and d (one each) hold the copies. Once every copy is
confirmed, the node holding the most copies is killed (its site is lost). Measured:

    repair time    from the kill until A confirms 2 live copies of every backup again:
                   detection (--holder-grace GRACE after the last good check, checks
                   every second), placement on another site, the pulls
    floor          bytes to copy (the lost copies) / the available bandwidth, measured
                   in the same run as a plain `fetch` of one backup by a fresh member
    repair traffic bytes the new holders pulled for the repair, against the bytes the
                   lost copies held

Targets: repair time <= floor + 60 s; repair traffic <= 1.1x the bytes lost.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from node_procs import cli, random_image, start

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hypersdk.node.config import parse_size  # noqa: E402


def status(d: Path) -> dict:
    return json.loads(cli(d, "status", "--json"))["replication"]


def wait(what: str, cond, limit: float = 600.0, step: float = 0.2):
    t0 = time.monotonic()
    for _ in range(int(limit / step) + 1):
        got = cond()
        if got:
            return got
        if time.monotonic() - t0 > limit:
            break
        time.sleep(step)                    # polling pace, bounded by the limit
    raise SystemExit(f"timed out waiting for {what}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backups", type=int, default=4)
    ap.add_argument("--size", default="256M")
    ap.add_argument("--grace", type=float, default=10.0)
    args = ap.parse_args()
    size = parse_size(args.size)
    root = Path(tempfile.mkdtemp(prefix="bench-repair-"))
    procs = {}
    health = ("--holder-check", "1", "--holder-grace", str(args.grace),
              "--replicate-interval", "0.5")
    try:
        a = root / "a"
        procs["a"], addr = start(a, "--replicas", "2", *health, env={"HYPERSDK_AUDIT_SYNC": "1"})
        cli(a, "network", "create", "--name", "bench", "--site", "hq")
        dirs = {}
        def member(name, site):
            tok = json.loads(cli(a, "invite", "--site", site, "--json"))["token"]
            dirs[name] = root / name
            procs[name], _ = start(dirs[name], "--replicas", "0", *health,
                                   env={"HYPERSDK_AUDIT_SYNC": "1"})
            cli(dirs[name], "join", tok)
        for name in ("b", "c", "d"):
            member(name, name)
        ids = {n: json.loads(cli(d, "status", "--json"))["node_id"] for n, d in dirs.items()}
        mids = []
        for i in range(args.backups):
            img = random_image(root / f"img{i}", size)
            mids.append(json.loads(cli(a, "backup", img, "--name", f"vm{i}", "--json"))["manifest"])
            img.unlink()

        def placed():
            h = status(a).get("holders", {})
            return all(sum(1 for s in h.get(m, {}).values() if s == "held") == 2 for m in mids) and h
        t0 = time.monotonic()
        holders = wait("the initial placement", placed)
        print(f"initial placement of {args.backups} x {args.size}: {time.monotonic() - t0:.1f} s")
        count = {n: sum(1 for m in mids if holders[m].get(ids[n]) == "held") for n in "bcd"}
        victim = max(count, key=count.get)
        lost_copies = count[victim]
        lost_bytes = status(dirs[victim]).get("fetched_bytes", 0)
        before = {n: status(dirs[n]).get("fetched_bytes", 0) for n in "bcd" if n != victim}

        # the available bandwidth, measured now: a plain fetch by a fresh member (at the
        # author's site: never asked to hold a copy)
        member("fresh", "hq")
        t1 = time.monotonic()
        doc = json.loads(cli(dirs["fresh"], "fetch", mids[0], "--json"))
        bw = doc["bytes_fetched"] / max(1e-9, time.monotonic() - t1)
        cli(dirs["fresh"], "delete", doc["manifest"])
        procs["fresh"].terminate()
        procs["fresh"].wait(timeout=30)

        procs[victim].kill()
        procs[victim].wait(timeout=30)
        t_kill = time.monotonic()

        def repaired():
            h = status(a).get("holders", {})
            ok = all(sum(1 for hid, s in h.get(m, {}).items() if s == "held"
                         and hid != ids[victim]) == 2 for m in mids)
            return ok and h
        wait("the repair", repaired)
        took = time.monotonic() - t_kill
        pulled = sum(status(dirs[n]).get("fetched_bytes", 0) - before[n] for n in before)
        floor = lost_bytes / bw
        res = {"backups": args.backups, "size": size, "grace_s": args.grace,
               "lost_copies": lost_copies, "lost_bytes": lost_bytes,
               "available_bandwidth_Bps": round(bw), "floor_s": round(floor, 2),
               "repair_s": round(took, 2), "repair_minus_floor_s": round(took - floor, 2),
               "repair_traffic_bytes": pulled,
               "traffic_ratio": round(pulled / lost_bytes, 3) if lost_bytes else None}
        print(json.dumps(res, indent=1))
        print(f"repair {took:.1f} s against a floor of {floor:.1f} s "
              f"({lost_bytes / 2**20:.0f} MiB at {bw / 2**20:.0f} MiB/s; detection takes the "
              f"{args.grace:g} s grace): {'PASS' if took <= floor + 60 else 'FAIL'} (<= floor + 60 s)")
        print(f"repair traffic {pulled / 2**20:.0f} MiB for {lost_bytes / 2**20:.0f} MiB lost: "
              f"{res['traffic_ratio']}x, {'PASS' if pulled <= 1.1 * lost_bytes else 'FAIL'} (<= 1.1x)")
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
