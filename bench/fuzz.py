#!/usr/bin/env python3
"""Coverage-guided fuzzing of every decoder (issue 17): atheris (libFuzzer).

    .venv/bin/python bench/fuzz.py [--runs 1000000] [--max-len 4096] [TARGET ...]

Each target (bench/fuzz_targets.py: wire framing and codec, DHT, chunk exchange,
audit entries and gossip, possession, the control socket, backup certificates,
member certificates and the other membership messages, manifests, sealed records)
runs in its own process for RUNS inputs: libFuzzer mutates a corpus seeded with
valid messages, guided by the coverage of the instrumented hypersdk modules. A
target may raise only the decoders' typed errors (ProtocolError, IntegrityError);
anything else escaping is a crash: libFuzzer stops, writes the input to
crash-* in the work directory (printed), and this script exits 1.

Prints one row per target (inputs, seconds, inputs/s, coverage edges, result) as
a markdown table for BENCHMARKS.md. tests/test_fuzz.py runs a short version.

    .venv/bin/python bench/fuzz.py --one TARGET --runs N --work DIR   (internal)
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ALLOWED_NAMES = "ProtocolError, IntegrityError"


def one(name: str, runs: int, work: Path, max_len: int) -> None:
    """Fuzz one target in this process (atheris takes it over and exits)."""
    import atheris
    sys.path.insert(0, str(HERE))
    with atheris.instrument_imports(include=["hypersdk", "fuzz_targets"]):
        import fuzz_targets

        from hypersdk.node.daemon import control, daemon  # noqa: F401  (the control target)
    target, seeds, _ = fuzz_targets.TARGETS[name]
    allowed = fuzz_targets.ALLOWED
    corpus = work / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for i, seed in enumerate(seeds()):
        (corpus / f"seed{i}").write_bytes(seed)

    def test_one(data: bytes) -> None:
        try:
            target(data)
        except allowed:
            pass

    sys.setrecursionlimit(10_000)
    atheris.Setup([sys.argv[0], str(corpus), f"-runs={runs}", f"-max_len={max_len}",
                   f"-artifact_prefix={work}/", "-print_final_stats=1", "-rss_limit_mb=2048",
                   "-timeout=10"], test_one)
    atheris.Fuzz()


_DONE = re.compile(r"#(\d+)\s+DONE\s+cov: (\d+)\s+ft: (\d+)")
_EXEC = re.compile(r"exec/s: (\d+)")


def run_target(name: str, runs: int, max_len: int, keep: Path | None) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"fuzz-{name}-", dir=keep))
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, __file__, "--one", name, "--runs", str(runs),
                        "--max-len", str(max_len), "--work", str(work)],
                       capture_output=True, text=True)
    took = time.perf_counter() - t0
    out = p.stdout + p.stderr
    done = _DONE.findall(out)
    crashes = sorted(work.glob("crash-*")) + sorted(work.glob("timeout-*")) \
        + sorted(work.glob("oom-*"))
    row = {"name": name, "rc": p.returncode, "seconds": took,
           "inputs": int(done[-1][0]) if done else 0,
           "cov": int(done[-1][1]) if done else 0, "ft": int(done[-1][2]) if done else 0,
           "crashes": [str(c) for c in crashes], "log": out, "work": str(work)}
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("targets", nargs="*", metavar="TARGET", help="default: all")
    ap.add_argument("--runs", type=int, default=1_000_000)
    ap.add_argument("--max-len", type=int, default=4096)
    ap.add_argument("--keep", metavar="DIR", help="keep each target's work dir (corpus, "
                    "crashes) under DIR")
    ap.add_argument("--one", metavar="TARGET", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        one(a.one, a.runs, Path(a.work), a.max_len)
        return 0                                   # not reached: atheris exits
    from fuzz_targets import TARGETS  # (not instrumented here: only listed)
    NAMES = list(TARGETS)
    names = a.targets or NAMES
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        ap.error(f"unknown target {unknown[0]} (known: {', '.join(NAMES)})")
    keep = Path(a.keep) if a.keep else None
    if keep:
        keep.mkdir(parents=True, exist_ok=True)
    rows, failed = [], False
    for n in names:
        r = run_target(n, a.runs, a.max_len, keep)
        ok = r["rc"] == 0 and not r["crashes"] and r["inputs"] >= a.runs
        failed |= not ok
        rows.append((r, ok))
        print(f"{n}: {r['inputs']} inputs in {r['seconds']:.0f} s, cov {r['cov']}, "
              f"{'ok' if ok else 'FAILED'}", file=sys.stderr, flush=True)
        if not ok:
            print(r["log"][-4000:], file=sys.stderr)
            print(f"crash inputs: {r['crashes'] or 'none written'}", file=sys.stderr)
        elif not keep:
            import shutil
            shutil.rmtree(r["work"], ignore_errors=True)
    print("\n| decoder | inputs | seconds | inputs/s | coverage (edges / features) | "
          "escaped errors |")
    print("|---|---|---|---|---|---|")
    for r, ok in rows:
        rate = r["inputs"] / r["seconds"] if r["seconds"] else 0
        print(f"| {r['name']} | {r['inputs']:,} | {r['seconds']:.0f} | {rate:,.0f} | "
              f"{r['cov']} / {r['ft']} | {'none (only ' + ALLOWED_NAMES + ')' if ok else 'CRASH'} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
