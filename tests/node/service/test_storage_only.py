"""A storage-only member between real `hypersdk node run` processes on 127.0.0.1.

A creates a network (and its tenant data key) at site "hq" and backs up a
realistic disk image; H joins at site "vault" with `invite --no-data-key` (a key of
its own, not the tenant's); K joins at site "dr" with the tenant's key. H fetches
A's backup: it keeps the sealed records, reads none (restore: one clear line),
checks what it can (`verify`), and a scan of every file of its data dir finds none
of 256 random 64-byte samples of the image, nor the backup's name or source path
(sealed in the manifest and in A's audit entries: protocol/labels.py). A stops; K restores the image from H
alone, byte for byte, and `verify --network` at K proves H's possession with the
sealed form of the challenge. Every wait is a bounded poll.
"""
from __future__ import annotations

import json

from conftest import Cli, realistic_image, same_bytes
from test_at_rest_scan import found_in, samples_of
from test_node_cli import nodes, poll  # noqa: F401  (fixture)

FAST = {"HYPERSDK_AUDIT_SYNC": "1"}
NAME = "payroll-db-primary"


def test_a_storage_only_member_holds_what_it_cannot_read(tmp_path, nodes):
    img = realistic_image(tmp_path / "disk.img", "64M", seed=5)
    samples = samples_of(img)
    a = nodes(Cli(tmp_path / "a"), env=FAST)
    a.cli("network", "create", "--name", "acme", "--site", "hq")

    def member(name, site, *flags):
        tok = a.cli.json("invite", "--site", site, *flags)["token"]
        n = nodes(Cli(tmp_path / name), env=FAST)
        n.cli.json("join", tok)
        return n

    h = member("h", "vault", "--no-data-key")
    k = member("k", "dr")
    fps = {n: n.cli.json("key", "show")["data_key_fingerprint"] for n in (a, h, k)}
    assert fps[a] == fps[k] != fps[h]

    mid = a.cli.json("backup", img, "--name", NAME)["manifest"]
    poll(lambda: h.cli.json("dht", "find", mid)["providers"], 60, "A's provider record at H",
         interval=0.2)
    text = h.cli("fetch", mid).stdout
    assert f"held sealed    for the holders of data key {fps[a][:16]}; this node cannot read " \
           "it" in text
    rows = h.cli.json("backups")
    assert [(r["name"], r.get("opaque"), r.get("replica")) for r in rows] == [
        (f"sealed-{mid[:16]}", True, True)]
    text = h.cli("backups").stdout
    assert "(held sealed for others)" in text and "1970" not in text    # no time it cannot know
    p = h.cli("restore", mid, tmp_path / "h.img", ok=False)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and f"data key {fps[a][:16]}" in lines[0], p.stderr
    assert not (tmp_path / "h.img").exists()
    assert "OK: store is consistent" in h.cli("verify").stdout

    found, files = found_in(h.cli.data_dir, samples)
    assert any(f.startswith("packs/pack-") for f in files)
    assert found == set(), f"{len(found)} of {len(samples)} samples found at the holder"

    # nor what the backup is called or where it came from, once A's log reached H
    ids = {n: n.cli.json("status")["node_id"] for n in (a, h, k)}
    labels = [NAME.encode(), str(img).encode()]

    def knows_a(n):
        p = n.cli("audit", "log", ids[a][:16], "--json", ok=None)
        return p.returncode == 0 and "backup" in {e["kind"] for e in json.loads(p.stdout)}
    poll(lambda: knows_a(h), 60, "A's backup entry at H", interval=0.5)
    entry = next(e for e in h.cli.json("audit", "log", ids[a][:16]) if e["kind"] == "backup")
    assert "name" not in entry["body"] and entry["opened"] is None
    assert found_in(h.cli.data_dir, labels)[0] == set()
    assert found_in(a.cli.data_dir, labels)[0] == set(labels)   # the scan does find them
    p = h.cli("verify", NAME, "--network", ok=False)
    assert "unknown backup" in p.stderr and "sealed" in p.stderr

    # H announced what it holds; A stops; K restores from H alone
    poll(lambda: ids[h] in {p["node_id"] for p in k.cli.json("dht", "find", mid)["providers"]},
         60, "H's provider record at K", interval=0.2)
    poll(lambda: knows_a(k), 60, "A's backup entry at K", interval=0.5)
    entry = next(e for e in k.cli.json("audit", "log", ids[a][:16]) if e["kind"] == "backup")
    assert entry["opened"] == {"name": NAME, "source": entry["opened"]["source"]}
    assert entry["opened"]["source"]["path"] == str(img)     # K holds the key: it reads them
    a.stop()
    out = tmp_path / "k.img"
    r = k.cli.json("restore", mid, out)
    assert same_bytes(img, out)
    assert set(r["fetched"]["bytes_by_peer"]) == {ids[h]} and r["fetched"]["bad_chunks"] == 0

    v = k.cli("verify", NAME, "--network", "--json", ok=None)    # by its sealed name
    doc = json.loads(v.stdout)
    assert doc["manifest"] == mid and doc["backup_entry"]["name"] == NAME
    rows = {x["node_id"]: x for x in doc["holders"]}
    assert rows[ids[h]]["result"] == "ok" and rows[ids[h]]["proven"] > 0, doc
    assert rows[ids[a]]["result"] == "unreachable"          # stopped: the only failure
