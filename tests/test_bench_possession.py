"""A tiny run of bench/bench_possession.py (80 chunks of 1 MiB, 2 frames a case, no
shaped link, no cache dropping): every case answers, the honest holder in time. The
full run (1 GiB, shaped links) and its figures are in BENCHMARKS.md."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_possession_bench_runs_tiny(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_possession.py"),
                        "--chunks", "80", "--frames", "2", "--no-netns", "--no-cold", "--json",
                        "--tmp", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    doc = json.loads(p.stdout)
    assert doc["deadline_s"] == doc["full_frame_deadline_s"] == 4.0     # 2 s + 64 MiB at 32 MiB/s
    names = [c["case"] for c in doc["cases"]]
    assert names == ["honest, page cache warm", "outsourced, loopback, one Get per frame",
                     "outsourced, loopback, one Get per chunk"]
    for c in doc["cases"]:
        assert len(c["seconds"]) == 2 and c["ids_per_frame"] == 64, c
        assert sum(c["verdicts"].values()) == 2 and set(c["verdicts"]) <= {"ok", "failed"}, c
    honest = doc["cases"][0]
    assert honest["verdicts"] == {"ok": 2} and honest["within_deadline"] == 2
    assert doc["cases"][1]["link"]["via"] == "fast channel"
    assert set(doc["skipped"]) == {"honest, page cache cold", "outsourced over a shaped link"}
    assert doc["miss_below"]["mib_per_s"] > 16          # 64 MiB / (4 s - honest overhead)
    assert list(tmp_path.iterdir()) == []               # the stores were removed
