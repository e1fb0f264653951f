"""Resume: a node killed (-9) in the middle of a fetch keeps the chunks it had
committed, and the next fetch after a restart fetches only the rest; the
replica is then complete and byte-identical when restored."""
from __future__ import annotations

import json
import subprocess

from conftest import HYPERSDK, Cli, cli_env, random_image, same_bytes
from test_node_cli import nodes, poll  # noqa: F401  (fixture)

CS = 1 << 20


def test_fetch_resumes_after_the_node_is_killed(tmp_path, nodes):
    img = random_image(tmp_path / "img", 200 << 20, seed=11)
    # A serves at most 40 MiB/s (a test-only cap), so the 200 MiB fetch takes
    # >= 5 s: the kill lands mid-transfer however fast the machine is
    a = nodes(Cli(tmp_path / "a"), env={"HYPERSDK_TEST_SERVE_RATE": "40M"})
    mid = a.cli.json("backup", img, "--chunk-size", str(CS))["manifest"]
    e_cli = Cli(tmp_path / "e")
    # commits every 32 MiB (HYPERSDK_COMMIT_BYTES: the most work a crash can cost)
    small_commits = {"HYPERSDK_COMMIT_BYTES": "32M"}
    e = nodes(e_cli, "--bootstrap", a.addr, env=small_commits)
    poll(lambda: e.cli.json("dht", "find", mid)["providers"], 30, "A's provider record",
         interval=0.2)

    p = subprocess.Popen([str(HYPERSDK), "fetch", mid, "--json"], env=cli_env(e_cli.data_dir),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def half():
        t = e.cli.json("status")["transfers"]
        return (t and t[0]["phase"] == "chunks"
                and t[0]["done_chunks"] >= t[0]["needed_chunks"] * 0.4)
    poll(half, 120, "40% of the fetch", interval=0.02)
    e.kill()
    p.communicate(timeout=60)
    assert p.returncode != 0                     # the node died under it

    (e_cli.data_dir / "node.addrs").unlink()     # left by the killed node
    e = nodes(e_cli, env=small_commits)          # rejoins A from peers.json
    poll(lambda: e.cli.json("dht", "find", mid)["providers"], 30, "A again", interval=0.2)
    doc = e.cli.json("fetch", mid)
    assert not doc["already_held"], "the first fetch completed before the kill"
    total = doc["chunks_fetched"] + doc["chunks_local"]
    assert doc["chunks_local"] > 0, "nothing of the first attempt was kept"
    assert doc["chunks_fetched"] < total
    out = tmp_path / "out"
    e.cli("restore", mid, out)
    assert same_bytes(img, out)
    e.cli("verify")
