"""simnet scenarios: TOML validation, and `hypersdk simnet run` as a real process."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import HYPERSDK
from conftest import REPO as ROOT  # noqa: E402

from hypersdk.node.errors import UserError
from hypersdk.simnet.scenario import load, parse

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

GOOD = """
[network]
nodes = 10
"""


def error(text: str) -> str:
    with pytest.raises(UserError) as exc:
        parse(text, src="s.toml")
    return str(exc.value)


def test_minimal_scenario_gets_defaults():
    sc = parse(GOOD, src="s.toml", default_name="s")
    assert sc.name == "s" and sc.network.nodes == 10 and sc.workload.provides == 100
    assert sc.with_overrides(nodes=7, seed=9).network.nodes == 7


@pytest.mark.parametrize("text, expected", [
    ('[workload]\nprovides = -1\n[network]\nnodes = 5',
     "s.toml: [workload] provides: must be >= 0"),
    ('[network]\nnodes = 0', "s.toml: [network] nodes: must be >= 1"),
    ('[network]\nnodes = 5\nloss = 1.5', "s.toml: [network] loss: must be < 1"),
    ('[network]\nnodes = 5\nregions = ["mars"]', "s.toml: [network] regions: unknown region 'mars'"),
    ('[network]\nnodes = 5\n[faults]\nmalicious = 1.2', "s.toml: [faults] malicious: must be <= 1"),
    ('[network]\nnodes = 5\n[faults]\nmalicious_strategy = "nice"',
     "s.toml: [faults] malicious_strategy: must be one of"),
    ('[network]\nnodes = 5\nbogus = 1', "s.toml: [network] bogus: unknown key"),
    ('colour = "red"\n[network]\nnodes = 5', "s.toml: colour: unknown key"),
    ('[network]\nnodes = "many"', "s.toml: [network] nodes: must be an integer"),
    ('[workload]\nlookups = 3', "s.toml: [network] nodes: required"),
    ('duration = 0\n[network]\nnodes = 5', "s.toml: duration: must be > 0"),
    ('[network]\nnodes = 5\nbootstrap_nodes = 6', "s.toml: [network] bootstrap_nodes: must be <="),
    ('[network]\nnodes = 5\n[churn]\nreplace_per_hour = -0.1',
     "s.toml: [churn] replace_per_hour: must be >= 0"),
    ('[network]\nnodes = 5\n[dht]\nk = 0', "s.toml: [dht] k: must be >= 1"),
    ('[network]\nnodes = 5\n[workload]\nreprovide_keys = -1',
     "s.toml: [workload] reprovide_keys: must be >= 0"),
    ('[network]\nnodes = 5\n[workload]\nreprovide_keys = 1.5',
     "s.toml: [workload] reprovide_keys: must be an integer"),
    ('[network\nnodes = 5', "s.toml: not valid TOML"),
    ('[network]\nnodes = 5\n[workload]\nprovides = 0', "s.toml: [workload] lookups: need provides"),
])
def test_bad_scenarios_name_the_key(text, expected):
    assert error(text).startswith(expected)


def test_shipped_scenarios_are_valid():
    names = {p.stem for p in (ROOT / "scenarios").glob("*.toml")}
    assert {"small", "1k", "10k", "churn", "malicious-20pct"} <= names
    for p in (ROOT / "scenarios").glob("*.toml"):
        load(p)


def simnet_run(*args, cwd):
    env = {k: v for k, v in os.environ.items() if k != "HYPERSDK_DEBUG"}
    return subprocess.run([str(HYPERSDK), "simnet", "run", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_small_scenario_runs_and_repeats_exactly(tmp_path):
    reports = []
    for i in range(2):
        out = tmp_path / f"out{i}"
        r = simnet_run(ROOT / "scenarios" / "small.toml", "--seed", 1, "--out", out, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert "find-providers success" in r.stdout
        doc = json.loads((out / "report.json").read_text())
        for name in ("lookup_hops.png", "lookup_latency_cdf.png", "success_over_time.png",
                     "reprovide_messages_per_key.png"):
            data = (out / name).read_bytes()
            assert data.startswith(PNG_MAGIC) and len(data) > 1000, name
        reports.append(doc)
    doc = reports[0]
    s = doc["summary"]
    assert s["success_rate"] == 1.0
    assert s["nodes"] == 50 and s["lookups"] == 50 and s["provides"] == 20
    for key in ("hops_median", "hops_p90", "find_latency_p50", "find_latency_p95",
                "provide_latency_median", "messages_per_lookup",
                "reprovide_messages_per_key", "handler_errors"):
        assert s[key] is not None, key
    assert s["handler_errors"] == 0
    # one node providing 1,000 keys at once: the sweep, not a walk per key
    assert s["reprovide_keys"] == 1000 and s["reprovide_messages_per_key"] <= 2
    assert s["reprovide_held_min"] == 20           # every sampled key on all its 20 closest
    assert doc["run"]["wall_seconds"] > 0 and doc["run"]["peak_rss_bytes"] > 0
    assert doc["scenario"]["seed"] == 1
    assert {"lookups", "provides", "join", "reprovide"} <= set(doc["metrics"])
    same = lambda d: {k: v for k, v in d.items() if k != "run"}
    assert same(reports[0]) == same(reports[1])


def test_bad_scenario_file_gives_one_error_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[network]\nnodes = 10\n[workload]\nprovides = -3\n")
    r = simnet_run("bad.toml", cwd=tmp_path)        # errors name the path as given
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert lines == ["hypersdk: error: bad.toml: [workload] provides: must be >= 0"], r.stderr
    assert not (tmp_path / "simnet-bad").exists()
    r = simnet_run("missing.toml", cwd=tmp_path)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == ["hypersdk: error: missing.toml: no such scenario file"]
