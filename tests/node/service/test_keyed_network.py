"""Encryption at rest between real `hypersdk node run` processes on 127.0.0.1: A and
B share a data key (two sites of one tenant), C has none. B restores A's keyed
backup over the network byte for byte and keeps it sealed; `verify --network` at B
proves A's and B's possession over keyed ids; C, with no data key at all, asked to
fetch or restore, gets one clear line and stores nothing. Every wait is a bounded poll."""
from __future__ import annotations

import json

from conftest import Cli, mixed_image, same_bytes
from test_node_cli import nodes, poll  # noqa: F401  (fixture)

from hypersdk.node.net import datakey
from hypersdk.node.store import packfile
from hypersdk.node.store.store import ChunkStore

CS = 64 << 10
FAST = {"HYPERSDK_AUDIT_SYNC": "1"}


def test_two_sites_sharing_a_key_restore_over_the_network(tmp_path, nodes):
    img = mixed_image(tmp_path / "img", 12 << 20, seed=6, chunk=CS)
    key = datakey.create(tmp_path / "a")
    datakey.install(tmp_path / "b", key.secret)
    a = nodes(Cli(tmp_path / "a"), env=FAST)
    b, c = (nodes(Cli(tmp_path / n), "--bootstrap", a.addr, env=FAST) for n in "bc")
    mid = a.cli.json("backup", img, "--chunk-size", str(CS), "--name", "vm1")["manifest"]
    poll(lambda: b.cli.json("dht", "find", mid)["providers"], 30, "A's provider record",
         interval=0.2)

    out = tmp_path / "out-b"
    doc = b.cli.json("restore", mid, out)
    assert same_bytes(img, out)
    assert doc["fetched"]["chunks_fetched"] > 0 and doc["fetched"]["bad_chunks"] == 0
    with ChunkStore(tmp_path / "b", readonly=True) as s:      # B keeps it sealed
        codecs = {c for (c,) in s.db.execute("SELECT codec FROM chunks")}
        assert codecs and all(x & 0x60 == packfile.SEALED | packfile.KEYED for x in codecs)
        (fp,) = s.db.execute("SELECT key FROM manifests").fetchone()
        assert bytes(fp) == key.fingerprint
    b.cli("verify", mid[:16])

    # possession over keyed ids: B challenges A (and itself is a holder too)
    ids = {n: n.cli.json("status")["node_id"] for n in (a, b)}

    def b_knows_a():
        p = b.cli("audit", "log", ids[a][:16], "--json", ok=None)
        return p.returncode == 0 and "backup" in {e["kind"] for e in json.loads(p.stdout)}
    poll(b_knows_a, 60, "A's backup entry at B", interval=0.5)
    v = b.cli.json("verify", mid, "--network")
    assert v["ok"] is True, v
    holders = {h["node_id"]: h for h in v["holders"]}
    assert ids[a] in holders
    assert all(h["result"] == "ok" and h["proven"] == h["asked"] > 0 for h in holders.values())

    # C has no data key at all (in no network): one clear line each, nothing stored; it
    # cannot even keep the backup sealed for others (a storage-only member has a key)
    p = c.cli("fetch", mid, ok=False)
    assert (f"this backup is encrypted with data key {key.fingerprint.hex()[:16]} and this "
            "node has no data key at all" in p.stderr)
    assert len(p.stderr.strip().splitlines()) == 1
    line = (f"this backup is encrypted with data key {key.fingerprint.hex()[:16]}; "
            "this node does not have it")
    p = c.cli("restore", mid, tmp_path / "out-c", ok=False)
    assert line in p.stderr and not (tmp_path / "out-c").exists()
    assert c.cli.json("backups") == []

    # verify --network from a key holder that holds nothing of the backup (it fetches
    # the hash lists and reference chunks, keyed), and from C, which has no key
    datakey.install(tmp_path / "d", key.secret)
    d = nodes(Cli(tmp_path / "d"), "--bootstrap", a.addr, env=FAST)
    ids[d] = d.cli.json("status")["node_id"]

    def knows_a(n):
        p = n.cli("audit", "log", ids[a][:16], "--json", ok=None)
        return p.returncode == 0 and "backup" in {e["kind"] for e in json.loads(p.stdout)}
    poll(lambda: knows_a(d) and knows_a(c), 60, "A's backup entry at C and D", interval=0.5)
    v = d.cli.json("verify", mid, "--network")
    assert v["ok"] is True and v["manifest_check"]["ok"], v
    assert d.cli.json("backups") == []                     # it verified without keeping
    p = c.cli("verify", mid, "--network", "--json", ok=False)
    assert line in json.loads(p.stdout)["manifest_check"]["reason"]
