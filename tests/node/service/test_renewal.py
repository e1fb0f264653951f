"""Certificates renew before they expire, without downtime: real `hypersdk node run`
processes on 127.0.0.1, in a network whose certificates live 30 s (they renew after
20 s). A holds the network key and renews its own; B asks A (an admin, connected)
for its new one. Past the first certificates' expiry both are still members of each
other, nothing was cut off, and B still fetches from A."""
from __future__ import annotations

import time

import pytest
from conftest import Cli, mixed_image
from test_node_cli import nodes, poll  # noqa: F401  (fixture)

CS = 64 << 10
LIFETIME = 30


@pytest.mark.slow
def test_certificates_renew_without_cutting_anyone_off(tmp_path, nodes):
    a = nodes(Cli(tmp_path / "a"))
    a.cli("network", "create", "--site", "hq", "--cert-lifetime", f"{LIFETIME}s")
    b = nodes(Cli(tmp_path / "b"))
    b.cli.json("join", a.cli.json("invite", "--site", "plant")["token"])
    first = {n: n.cli.json("network", "show")["certificate"] for n in (a, b)}
    img = mixed_image(tmp_path / "img", 1 << 20, seed=3, chunk=CS)
    mid = a.cli.json("backup", img, "--chunk-size", str(CS), "--name", "vm")["manifest"]
    poll(lambda: b.cli.json("dht", "find", mid)["providers"], 30, "A's record at B",
         interval=0.2)
    expiry = max(c["expires_ns"] for c in first.values())
    for n in (a, b):
        poll(lambda n=n: n.cli.json("status")["membership"]["renewal"]["renewed"] >= 1,
             LIFETIME + 30, "a renewal", interval=0.5)
        now = n.cli.json("network", "show")["certificate"]
        assert now["serial"] > first[n]["serial"] and now["expires_ns"] > first[n]["expires_ns"]
        assert (now["site"], now["roles"]) == (first[n]["site"], first[n]["roles"])
    poll(lambda: time.time_ns() > expiry + 2 * 10**9, LIFETIME + 10, "the old expiry",
         interval=0.5)
    for n in (a, b):
        counters = n.cli.json("status")["membership"]["counters"]
        # (B's joining connection was cut when B became a member: "the network changed")
        assert "cut off: certificate expired" not in counters, counters
        assert "refused: certificate expired" not in counters, counters
    b.cli.json("fetch", mid)                     # still a member to A, on the same terms
    b.cli("restore", mid, tmp_path / "out.img")
    assert (tmp_path / "out.img").read_bytes() == img.read_bytes()
