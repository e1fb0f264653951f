"""`hypersdk join TOKEN` between real `hypersdk node run` processes on 127.0.0.1.

A creates a network and invites; B joins with the token over libp2p and gets
its certificate, pinned to the network key the token names; the token works
once; garbage, expired and foreign tokens each get one clear line. (Refusing
non-members on every connection is the next part of issue 16.)
"""
from __future__ import annotations

import time

from conftest import Cli
from test_node_cli import nodes  # noqa: F401  (fixture)

from hypersdk.protocol import membership as ms


def _one_line(p, code: int, fragment: str):
    lines = p.stderr.strip().splitlines()
    assert p.returncode == code, p.stderr
    assert len(lines) == 1 and fragment in lines[0], p.stderr


def test_join_with_a_token_once(tmp_path, nodes):
    a = nodes(Cli(tmp_path / "a"))
    net = a.cli.json("network", "create", "--name", "acme", "--site", "hq")
    tok = a.cli.json("invite", "--site", "plant-7", "--role", "member")["token"]
    assert ms.decode_token(tok).addrs                     # the running node's addresses

    b = nodes(Cli(tmp_path / "b"))
    r = b.cli.json("join", tok)
    assert r["network"] == net["network"] and r["inviter"] in ms.decode_token(tok).addrs
    assert r["certificate"]["site"] == "plant-7" and r["certificate"]["roles"] == ["member"]
    shown = b.cli.json("network", "show")
    assert shown["network"] == net["network"] and not shown["holds_network_key"]
    b_key = shown["certificate"]["node"]
    rows = {m["node"]: m for m in a.cli.json("members")}
    assert rows[b_key]["site"] == "plant-7" and rows[b_key]["status"] == "valid"
    assert a.cli.json("status")["node_id"]                 # A still serves

    c = nodes(Cli(tmp_path / "c"))
    _one_line(c.cli("join", tok, ok=False), 1, "already used")
    _one_line(c.cli("join", "hsdk1.garbage", ok=False), 2, "not an invitation token")
    # a token for this network that A never issued (another secret): A refuses it
    t = ms.decode_token(tok)
    forged = ms.Token(t.network, bytes(32), t.site, t.roles, t.expires, t.addrs).encode()
    _one_line(c.cli("join", forged, ok=False), 1, "not known")
    # an expired token is refused before dialling
    stale = ms.Token(t.network, bytes(32), t.site, t.roles, time.time_ns() - 1, t.addrs)
    _one_line(c.cli("join", stale.encode(), ok=False), 1, "expired")
    assert c.cli.json("network", "show") == {"network": None}
    # B is in a network already
    tok2 = a.cli.json("invite", "--site", "x")["token"]
    _one_line(b.cli("join", tok2, ok=False), 1, "already in a network")


def test_a_token_of_another_network_is_refused_by_the_node_it_names(tmp_path, nodes):
    """The token names A's addresses but the network key of another network: A does
    not know the secret, and even an answer could not check against that key."""
    a = nodes(Cli(tmp_path / "a"))
    a.cli("network", "create", "--site", "hq")
    other = Cli(tmp_path / "o")
    other("network", "create", "--site", "x")
    foreign = other.json("invite", "--site", "x", "--addr", a.cli.json("status")["addrs"][0])
    b = nodes(Cli(tmp_path / "b"))
    _one_line(b.cli("join", foreign["token"], ok=False), 1, "not known")


def test_a_join_killed_between_key_and_certificate_completes_with_a_new_token(
        tmp_path, nodes):
    """The joiner installs the tenant's data key before its certificate: killed (-9)
    in between, it holds the key and is in no network; its next backup is sealed
    anyway, and a new invitation completes the join with the same key."""
    a = nodes(Cli(tmp_path / "a"))
    a.cli("network", "create", "--name", "acme", "--site", "hq")
    fp = a.cli.json("key", "show")["data_key_fingerprint"]
    b = nodes(Cli(tmp_path / "b"), env={"HYPERSDK_TEST_CRASH_AT": "join-key-installed"})
    p = b.cli("join", a.cli.json("invite", "--site", "plant")["token"], ok=None)
    assert p.returncode != 0
    b.proc.wait(timeout=30)
    assert b.proc.returncode == -9                         # killed at the crash point
    assert b.cli.json("key", "show")["data_key_fingerprint"] == fp
    assert b.cli.json("network", "show") == {"network": None}
    img = tmp_path / "img"
    img.write_bytes(bytes(range(256)) * 4096)
    b.cli.json("backup", img, "--name", "vm")              # sealed: the key is there
    from hypersdk.node.store.store import ChunkStore
    with ChunkStore(tmp_path / "b", readonly=True) as s:
        codecs = {c for (c,) in s.db.execute("SELECT codec FROM chunks")}
        assert codecs and all(c & 0x40 for c in codecs)
    (tmp_path / "b" / "node.addrs").unlink()              # the killed node's, stale
    b2 = nodes(Cli(tmp_path / "b"))
    r = b2.cli.json("join", a.cli.json("invite", "--site", "plant")["token"])
    assert r["data_key_shared"] and r["data_key_fingerprint"] == fp
    assert b2.cli.json("network", "show")["certificate"]["site"] == "plant"
