"""The tenant data key (node/net/datakey.py) and its commands: `network create` makes
one and warns to export it; `key export` / `key import` round-trip it through a text
file, refusing damaged copies; `join` receives it, or not with `invite --no-data-key`
(then the joiner gets a key of its own). Real processes for the CLI."""
from __future__ import annotations

import os
import stat

import pytest
from conftest import Cli
from test_node_cli import nodes  # noqa: F401  (fixture)

from hypersdk.node.errors import UserError
from hypersdk.node.net import datakey


def test_export_import_round_trip_and_damaged_copies(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    k = datakey.create(a)
    assert stat.S_IMODE(os.stat(datakey.path(a)).st_mode) == 0o600
    with pytest.raises(UserError, match="already has a data key"):
        datakey.create(a)
    out = tmp_path / "key.txt"
    datakey.export(a, out)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    assert datakey.import_(b, out) == k and datakey.load(b) == k
    assert datakey.import_(b, out) == k                      # the same key again: fine
    with pytest.raises(UserError, match="exists"):
        datakey.export(a, out)
    text = out.read_text()
    flipped = text.replace("key " + k.secret.hex(), "key " + ("0" if k.secret.hex()[0] != "0"
                                                              else "1") + k.secret.hex()[1:])
    for bad, why in ((flipped, "fingerprint does not match"), ("garbage", "not an exported"),
                     (text.replace("\nkey ", "\nkey zz"), "damaged")):
        (tmp_path / "bad").write_text(bad)
        with pytest.raises(UserError, match=why):
            datakey.import_(tmp_path / "c", tmp_path / "bad")
        assert datakey.load(tmp_path / "c") is None              # nothing half-installed
    other = datakey.create(tmp_path / "d")
    datakey.export(tmp_path / "d", tmp_path / "other.txt")
    with pytest.raises(UserError, match="another data key"):
        datakey.import_(a, tmp_path / "other.txt")
    assert datakey.load(a) == k != other
    datakey.path(tmp_path / "e").parent.mkdir(parents=True)
    datakey.path(tmp_path / "e").write_bytes(b"short")
    with pytest.raises(UserError, match="damaged"):
        datakey.load(tmp_path / "e")


def test_create_warns_join_shares_or_not_and_the_key_never_prints(tmp_path, nodes):
    a = nodes(Cli(tmp_path / "a"))
    made = a.cli("network", "create", "--site", "hq")
    assert "WARNING: backups are encrypted with the data key" in made.stdout
    fp = a.cli.json("key", "show")["data_key_fingerprint"]
    secret = datakey.load(tmp_path / "a").secret.hex()
    assert fp and secret not in made.stdout

    b = nodes(Cli(tmp_path / "b"))
    joined = b.cli("join", a.cli.json("invite", "--site", "hq")["token"])
    assert f"data key {fp[:16]} received" in joined.stdout and secret not in joined.stdout
    assert b.cli.json("key", "show")["data_key_fingerprint"] == fp

    c = nodes(Cli(tmp_path / "c"))
    tok = a.cli.json("invite", "--site", "storage", "--no-data-key")["token"]
    joined = c.cli("join", tok)
    assert "shares no data key" in joined.stdout
    own = c.cli.json("key", "show")["data_key_fingerprint"]
    assert own and own != fp

    exported = b.cli("key", "export", tmp_path / "b.key")
    assert secret not in exported.stdout and secret in (tmp_path / "b.key").read_text()
    fresh = Cli(tmp_path / "fresh")
    fresh("key", "import", tmp_path / "b.key")
    assert fresh.json("key", "show")["data_key_fingerprint"] == fp
    bad = fresh("key", "import", tmp_path / "nope", ok=False)
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1
    assert Cli(tmp_path / "none").json("key", "show") == {"data_key_fingerprint": None}
