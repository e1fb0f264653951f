"""Bad input around the network commands, with real processes: malformed
multiaddrs, a REF the network does not know, a disk filling up during a fetch.
(An unreachable bootstrap address and a second `node run` on one data dir are
in tests/test_node_cli.py.)"""
from __future__ import annotations

import pytest
from conftest import Cli, random_image, same_bytes
from test_cli import one_error_line
from test_enospc import assert_no_space_error, tmpfs  # noqa: F401  (fixture)
from test_node_cli import nodes, poll  # noqa: F401  (fixture)


@pytest.mark.parametrize("args, fragment", [
    (("--bootstrap", "/ip4/x/p2p/y"), "--bootstrap: bad peer address"),
    (("--bootstrap", "/ip4/127.0.0.1/tcp/4001"), "lacks /p2p/"),
    (("--listen", "/ip4/1.2.3/tcp/x"), "--listen '/ip4/1.2.3/tcp/x' is not a multiaddr"),
])
def test_malformed_multiaddrs_are_refused_before_starting(cli, args, fragment):
    cli("node", "init")
    p = cli("node", "run", *args, ok=False, timeout=30)
    one_error_line(p, fragment)
    assert p.returncode == 2
    assert not (cli.data_dir / "node.addrs").exists()


def test_join_garbage_and_unknown_network_ref(tmp_path, nodes):
    a = nodes(Cli(tmp_path / "a"))
    b = nodes(Cli(tmp_path / "b"), "--bootstrap", a.addr)
    one_error_line(b.cli("join", "garbage", ok=False), "lacks /p2p/")
    unknown = "ab" * 32
    p = b.cli("fetch", unknown, ok=False)
    one_error_line(p, "not found on the network", "asked 1 peer(s)")
    one_error_line(b.cli("restore", unknown, tmp_path / "out", ok=False),
                   "not found on the network")
    assert not (tmp_path / "out").exists()
    one_error_line(b.cli("fetch", "no-such-name", ok=False), "no backup matches REF")
    assert b.cli.json("status")["transfers"] == []          # the node is unaffected


def test_disk_full_during_fetch_stops_cleanly(tmp_path, tmpfs, nodes):
    img = random_image(tmp_path / "img", 48 << 20, seed=21)
    a = nodes(Cli(tmp_path / "a"))
    mid = a.cli.json("backup", img)["manifest"]
    small = Cli(tmpfs("small", "24m") / "data")
    s = nodes(small, "--bootstrap", a.addr)
    poll(lambda: s.cli.json("dht", "find", mid)["providers"], 30, "A's record", interval=0.2)

    assert_no_space_error(s.cli("fetch", mid, ok=None), "fetch onto a full disk")
    assert s.proc.poll() is None                             # the node keeps running
    v = s.cli("verify", ok=None)
    assert v.returncode == 0 and "OK: store is consistent" in v.stdout, v.stdout + v.stderr
    assert s.cli.json("backups") == []                       # no half replica listed
    # the node still serves and fetches what fits
    small_img = random_image(tmp_path / "small.img", 1 << 20, seed=22)
    mid2 = a.cli.json("backup", small_img)["manifest"]
    poll(lambda: s.cli.json("dht", "find", mid2)["providers"], 30, "the small backup",
         interval=0.2)
    s.cli("fetch", mid2)
    s.cli("restore", mid2, tmp_path / "out")
    assert same_bytes(small_img, tmp_path / "out")
