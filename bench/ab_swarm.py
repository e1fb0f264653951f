#!/usr/bin/env python3
"""A/B of the swarm restore (bench_swarm.py swarm) between two hypersdk builds,
alternating run by run.

    .venv/bin/python bench/ab_swarm.py --a /tmp/wt-base-venv/bin/hypersdk \
        --b .venv/bin/hypersdk --network-b [--runs 6] [--seeds 4] [--rebuild]

Issue 16's bar: the swarm restore with membership and encryption at rest (B: this
tree, --network-b) within 10% of the restore before membership (A: a checkout of
9f825a5, which has no `network` command, so it runs without --network).

First each side's seed cache is built or checked (`bench_swarm.py prepare`, not
timed; every build has its own, see bench_swarm.py --hypersdk). Then each run is
one `bench_swarm.py swarm --no-anchor --hypersdk EXE [--network]` per side, in the
order a, b, a, b, ... (so neither always follows the other); the time is that
run's wall_s (the leecher's `hypersdk restore` from start to exit, the image
written). A restore that is not byte-identical stops everything (bench_swarm.py
exits 1). Prints each time, the medians, their ranges and b/a; the whole record
goes to $BENCH_OUT/ab_swarm.json (default $BENCH_DATA/results).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCH = HERE / "bench_swarm.py"
DATA = Path(os.environ.get("BENCH_DATA", "/tmp/bench-data"))


def swarm(exe: str, network: bool, seeds: int, mode: str, out: Path | None = None,
          rebuild: bool = False) -> subprocess.CompletedProcess:
    argv = [sys.executable, str(BENCH), mode, "--hypersdk", exe, "--seeds", str(seeds)]
    if mode == "swarm":
        argv.append("--no-anchor")
    if network:
        argv.append("--network")
    if rebuild:
        argv.append("--rebuild")
    env = dict(os.environ)
    if out is not None:
        env["BENCH_OUT"] = str(out)
    p = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=3600)
    if p.returncode != 0:
        sys.stderr.write(p.stderr[-4000:])
        raise SystemExit(f"{' '.join(argv)} failed ({p.returncode})")
    return p


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--a", required=True, help="hypersdk executable A (the baseline)")
    ap.add_argument("--b", required=True, help="hypersdk executable B")
    ap.add_argument("--network-a", action="store_true", help="A runs bench_swarm --network")
    ap.add_argument("--network-b", action="store_true", help="B runs bench_swarm --network")
    ap.add_argument("--runs", type=int, default=6)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--rebuild", action="store_true",
                    help="rebuild both sides' seed caches first")
    a = ap.parse_args()
    if a.runs < 1:
        raise SystemExit("--runs must be >= 1")
    sides = {"a": (str(Path(a.a).absolute()), a.network_a),
             "b": (str(Path(a.b).absolute()), a.network_b)}
    for k, (exe, net) in sides.items():
        doc = json.loads(swarm(exe, net, a.seeds, "prepare", rebuild=a.rebuild).stdout)
        print(f"{k}: {exe}{' --network' if net else ''}; seeds {doc['seeds'][0]}...",
              flush=True)
    runs: dict[str, list[dict]] = {"a": [], "b": []}
    with tempfile.TemporaryDirectory(prefix="ab-swarm-") as work:
        for i in range(a.runs):
            for k, (exe, net) in sides.items():
                out = Path(work) / f"{k}{i}"
                swarm(exe, net, a.seeds, "swarm", out)
                r = json.loads((out / "bench_swarm.json").read_text())["runs"][0]
                h = r["hypersdk_swarm"]
                runs[k].append(h)
                s = h.get("sealed", {}).get("seed0", {})
                print(f"run {i + 1} {k}: {h['wall_s']:.2f} s (fetch {h['fetch_s']} s, "
                      f"leecher cpu {h['leecher_cpu_s']} s, seeds cpu {h['seeds_cpu_s']} s, "
                      f"rss {h['leecher_rss_MiB']:.0f} MiB, identical={h['identical']}, "
                      f"sealed chunks {s.get('chunks_sealed', 0)}/{s.get('chunks', '?')}, "
                      f"load {h['load_before']}, free 2MiB {h['free_in_2MiB_blocks_pct']}%)",
                      flush=True)
    walls = {k: [h["wall_s"] for h in v] for k, v in runs.items()}
    ma, mb = statistics.median(walls["a"]), statistics.median(walls["b"])
    print(f"A median {ma:.2f} s ({min(walls['a']):.2f}-{max(walls['a']):.2f}) "
          f"{sides['a'][0]}{' --network' if sides['a'][1] else ''}")
    print(f"B median {mb:.2f} s ({min(walls['b']):.2f}-{max(walls['b']):.2f}) "
          f"{sides['b'][0]}{' --network' if sides['b'][1] else ''}")
    ratios = [b / x for x, b in zip(walls["a"], walls["b"])]
    print(f"B/A time {mb / ma:.3f} (target <= 1.10); per run "
          f"{' '.join(f'{x:.2f}' for x in ratios)}")
    outdir = Path(os.environ.get("BENCH_OUT", DATA / "results"))
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / "ab_swarm.json").write_text(json.dumps(
        {"a": sides["a"], "b": sides["b"], "runs": runs, "median_a": ma, "median_b": mb,
         "b_over_a": mb / ma, "nproc": os.cpu_count()}, indent=1))


if __name__ == "__main__":
    main()
