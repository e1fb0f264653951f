"""A short pass of bench/fuzz.py: every decoder under coverage-guided fuzzing
(atheris), a few thousand inputs each, only typed errors escaping. The full run
(1,000,000 inputs per decoder) is in BENCHMARKS.md."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = 3000


def test_every_decoder_survives_a_short_fuzzing_pass(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "fuzz.py"), "--runs", str(RUNS),
                        "--keep", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    rows = [line for line in p.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    names = [r.split("|")[1].strip() for r in rows[1:]]
    sys.path.insert(0, str(ROOT / "bench"))
    from fuzz_targets import TARGETS
    assert names == list(TARGETS)
    for r in rows[1:]:
        cells = [c.strip() for c in r.split("|")[1:-1]]
        assert int(cells[1].replace(",", "")) >= RUNS and cells[5].startswith("none"), r
        assert int(cells[4].split("/")[0]) > 0, r          # the decoder was instrumented
    assert not list(tmp_path.glob("*/crash-*"))
