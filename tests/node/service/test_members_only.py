"""Only members get in: real `hypersdk node run` processes on 127.0.0.1.

Three members on two sites (A and B at "hq", C at "plant") and R (at "plant",
revoked later) join A's network with invitation tokens; S is a stranger with a
fresh key (in no network) and F a member of another network. A backs up; B
fetches it and restores it byte-identical. S and F are refused at the
handshake with one clear line, learn no DHT answer, no audit entry, no chunk.
A revokes R: the revocation reaches B and C by the audit gossip, every node
cuts R off, and R can fetch nothing more. Every wait is a bounded poll.
"""
from __future__ import annotations

import os
import stat

import pytest
from conftest import Cli, mixed_image
from test_node_cli import nodes, poll  # noqa: F401  (fixture)

CS = 64 << 10
FAST = {"HYPERSDK_AUDIT_SYNC": "1"}


def _one_line(p, fragment: str):
    lines = p.stderr.strip().splitlines()
    assert p.returncode != 0 and len(lines) == 1 and fragment in lines[0], p.stderr


def _logs(n) -> list:
    """The audit logs a node holds (its own, and those gossiped to it)."""
    return n.cli.json("audit", "verify", "--all")


@pytest.mark.slow
def test_members_share_backups_strangers_foreigners_and_the_revoked_get_nothing(
        tmp_path, nodes):
    img = mixed_image(tmp_path / "img", 4 << 20, seed=7, chunk=CS)
    a = nodes(Cli(tmp_path / "a"), env=FAST)
    a.cli("network", "create", "--name", "acme", "--site", "hq")

    def member(name, site, env=FAST):
        tok = a.cli.json("invite", "--site", site)["token"]
        n = nodes(Cli(tmp_path / name), env=env)
        n.cli.json("join", tok)
        return n

    # R cosigns the logs it holds every second (its cosign of A's log is in A's
    # certificate until A revokes R)
    b, c = member("b", "hq"), member("c", "plant")
    r = member("r", "plant", env=dict(FAST, HYPERSDK_AUDIT_WITNESS="1"))
    ids = {n: n.cli.json("status")["node_id"] for n in (a, b, c, r)}
    keys = {n: n.cli.json("network", "show")["certificate"]["node"] for n in (a, b, c, r)}
    st = b.cli.json("status")["membership"]
    assert st["mode"] == "members only" and st["site"] == "hq"

    mid = a.cli.json("backup", img, "--chunk-size", str(CS), "--name", "vm1")["manifest"]
    poll(lambda: b.cli.json("dht", "find", mid)["providers"], 60, "A's provider record at B",
         interval=0.2)
    b.cli.json("fetch", mid)
    b.cli("restore", mid, tmp_path / "b.img")
    assert (tmp_path / "b.img").read_bytes() == img.read_bytes()
    r.cli.json("fetch", mid)                          # R is still a member here

    # a stranger and a member of another network: refused at the handshake, one line
    s = nodes(Cli(tmp_path / "s"), env=FAST)
    assert s.cli.json("status")["membership"]["mode"] == "open"
    assert "in no network and works alone" in s.cli("status").stdout
    assert "members only: network" in a.cli("status").stdout
    f = nodes(Cli(tmp_path / "f"), env=FAST)
    f.cli("network", "create", "--name", "other", "--site", "x")
    for peer in (a, b, c):
        _one_line(s.cli("join", peer.addr, ok=False), "not a member of this network")
        _one_line(f.cli("join", peer.addr, ok=False), "a member of another network")
    for outsider in (s, f):
        assert outsider.cli.json("dht", "find", mid)["providers"] == []
        outsider.cli("fetch", mid, ok=False)
        assert outsider.cli.json("status")["store"]["chunks"] == 0
        assert len(_logs(outsider)) <= 1              # its own log at most: no gossip
    refused = a.cli.json("status")["membership"]["counters"]
    assert refused["refused: not a member of this network"] >= 1
    assert refused["refused: a member of another network"] >= 1

    cert = tmp_path / "vm1.cert"
    poll(lambda: keys[r] in a.cli.json("audit", "certificate", "vm1", "-o", cert)
         ["member_witness_keys"], 60, "R's cosign of A's log in A's certificate", interval=0.5)

    # A revokes R: B and C learn it by gossip and cut R off; R fetches nothing more
    a.cli("revoke", keys[r], "--reason", "laptop stolen")
    for n in (a, b, c):
        poll(lambda n=n: n.cli.json("status")["membership"]["revocations"] == 1, 60,
             "the revocation at every member", interval=0.2)
    poll(lambda: a.cli.json("status")["membership"]["counters"].get("cut off: revoked", 0)
         >= 1, 30, "A cutting R's open connection", interval=0.2)
    _one_line(r.cli("join", a.addr, ok=False), "revoked")
    _one_line(r.cli("join", c.addr, ok=False), "revoked")
    # A's certificate now carries the revocation: R's cosign no longer counts offline
    a.cli("audit", "certificate", "vm1", "-o", cert)
    doc = Cli(tmp_path / "offline").json("audit", "check-certificate", cert)
    assert doc["revoked"][keys[r]]["reason"] == "laptop stolen"
    assert keys[r] in doc["witness_keys"] and keys[r] not in doc["member_witness_keys"]
    text = Cli(tmp_path / "offline")("audit", "check-certificate", cert).stdout
    assert "(revoked)" in text
    rows = {m["node"]: m for m in a.cli.json("members")}
    assert rows[keys[r]]["revoked"] and rows[keys[r]]["status"] == "revoked"
    assert rows[keys[b]]["status"] == rows[keys[c]]["status"] == "valid"
    for n in (a, b, c):
        assert ids[r] not in {x["node_id"] for x in n.cli.json("peers") if x["connected"]}

    # every data dir of the network is private while its node runs: dirs 0700, files
    # (keys, certificates, the store, logs, sockets) 0600 or tighter
    for n in (a, b, r):
        root = n.cli.data_dir
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames + ["."]:
                p = os.path.join(dirpath, name)
                mode = os.lstat(p).st_mode
                assert stat.S_IMODE(mode) & 0o077 == 0, f"{p} is {oct(stat.S_IMODE(mode))}"
        assert (root / "network" / "data.key").exists()
