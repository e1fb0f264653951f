"""`hypersdk audit ...` and the automatic entries, with real `hypersdk` processes."""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import time

import pytest
from conftest import HYPERSDK, Cli, cli_env
from test_node_cli import nodes  # noqa: F401  (fixture: real `hypersdk node run`)

from hypersdk.node.audit.log import AuditLog
from hypersdk.node.net.identity import Identity
from hypersdk.protocol import audit, codec

CS = 64 << 10


def image(path, size=5 * CS + 7, seed=1):
    import random
    path.write_bytes(random.Random(seed).randbytes(size))
    return path


def kinds(cli):
    return [e["kind"] for e in cli.json("audit", "log")]


@pytest.fixture
def made(cli, tmp_path):
    """backup, verify, restore, backup v2, delete v2: five own entries."""
    src = image(tmp_path / "disk.img")
    b = cli.json("backup", src, "--chunk-size", "64K")
    cli("verify", "disk.img")
    cli("restore", "disk.img", tmp_path / "out.img")
    image(src, seed=2)
    b2 = cli.json("backup", src, "--chunk-size", "64K")
    cli("delete", "disk.img@2")
    return b, b2


def test_ops_append_entries_and_log_json(cli, made, tmp_path):
    b, b2 = made
    log = cli.json("audit", "log")
    assert [e["kind"] for e in log] == ["backup", "verify", "restore", "backup", "delete"]
    assert [e["seq"] for e in log] == list(range(5))
    assert all(log[i]["prev"] == log[i - 1]["id"] for i in range(1, 5)) and log[0]["prev"] is None
    key = Identity.load(cli.data_dir / "node.key")
    assert {e["author"] for e in log} == {key.public_key.hex()}
    source = log[0]["body"]["source"]
    assert log[0]["body"] == {"manifest": b["manifest"], "name": "disk.img",
                              "size": 5 * CS + 7, "chunks": 6,
                              "source": {"kind": "file", "path": str(tmp_path / "disk.img"),
                                         "mode": 0o644, "mtime_ns": source["mtime_ns"]}}
    assert isinstance(source["mtime_ns"], int) and source["mtime_ns"] > 0
    assert log[1]["body"]["result"] == "ok" and log[1]["body"]["holder"] == key.node_id.hex()
    assert log[2]["body"]["manifest"] == b["manifest"]
    assert log[4]["body"] == {"manifest": b2["manifest"], "name": "disk.img", "version": 2}
    text = cli("audit", "log").stdout.splitlines()
    assert "5 entries" in text[0] and len(text) == 6 and "delete" in text[-1]
    assert len(cli.json("audit", "log", "--limit", "2")) == 2
    # by author prefix (node id)
    assert cli.json("audit", "log", key.node_id.hex()[:8]) == log
    # failed ops append nothing
    cli("restore", "nosuch", tmp_path / "x.img", ok=False)
    cli("verify", "nosuch", ok=False)
    assert len(cli.json("audit", "log")) == 5
    # node init on a data dir whose key the audit log created shows that identity
    r = cli.json("node", "init")
    assert r["existing"] is True
    assert r["node_id"] == Identity.load(cli.data_dir / "node.key").node_id.hex()


def test_verify_ok_then_break_after_tampering(cli, made):
    p = cli("audit", "verify")
    assert p.stdout.startswith("OK") and "5 entries" in p.stdout
    db = sqlite3.connect(cli.data_dir / "audit.sqlite")
    (raw,) = db.execute("SELECT raw FROM entries WHERE seq=2").fetchone()
    raw = bytearray(raw)
    raw[len(raw) // 2] ^= 0x40
    with db:
        db.execute("UPDATE entries SET raw=? WHERE seq=2", (bytes(raw),))
    db.close()
    p = cli("audit", "verify", ok=False)
    assert p.returncode == 3
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 1 and "BROKEN" in lines[0] and "seq 2" in lines[0], p.stdout
    doc = json.loads(cli("audit", "verify", "--json", ok=False).stdout)
    assert doc[0]["problems"][0]["seq"] == 2 and doc[0]["entries_checked"] == 2


def test_verify_reports_deleted_entry_at_next_seq(cli, made):
    db = sqlite3.connect(cli.data_dir / "audit.sqlite")
    with db:
        db.execute("DELETE FROM entries WHERE seq=1")
    db.close()
    p = cli("audit", "verify", ok=False)
    assert p.returncode == 3 and "seq 2" in p.stdout and "gap" in p.stdout


def test_certificate_export_and_offline_check(cli, made, tmp_path):
    b, _ = made
    cert = tmp_path / "c.cert"
    with open(cert, "wb") as f:
        p = subprocess.run([str(HYPERSDK), "audit", "certificate", "disk.img@1"], stdout=f,
                           stderr=subprocess.PIPE, text=False, env=cli_env(cli.data_dir),
                           timeout=60)
    assert p.returncode == 0 and b"no witness yet" in p.stderr
    # offline: another data dir, no store, no node
    other = Cli(tmp_path / "elsewhere")
    r = other("audit", "check-certificate", cert)
    assert r.stdout.startswith("VALID") and "WARNING: no witness yet" in r.stdout
    doc = other.json("audit", "check-certificate", cert)
    assert doc["ok"] and doc["manifest"] == b["manifest"] and doc["chain_entries"] == 5
    assert not doc["witnessed"]
    assert other("audit", "check-certificate", cert, "--require-witness", ok=False).returncode == 4
    assert not (tmp_path / "elsewhere").exists()
    # -o FILE and a manifest-id REF give the same certificate
    cli("audit", "certificate", b["manifest"][:12], "-o", tmp_path / "c2.cert")
    assert (tmp_path / "c2.cert").read_bytes() == cert.read_bytes()
    # a deleted backup keeps its entry: certificate by manifest id still works
    cli("delete", "disk.img@1")
    cli("audit", "certificate", b["manifest"], "-o", tmp_path / "c3.cert")
    assert other.json("audit", "check-certificate", tmp_path / "c3.cert")["chain_entries"] == 6


@pytest.mark.parametrize("how", ["truncate", "flip", "drop_entry", "empty", "swap_manifest"])
def test_altered_certificate_is_rejected_with_a_reason(cli, made, tmp_path, how):
    cert = tmp_path / "c.cert"
    cli("audit", "certificate", "disk.img@1", "-o", cert)
    data = bytearray(cert.read_bytes())
    if how == "truncate":
        data = data[:len(data) - 40]
    elif how == "flip":
        data[len(data) // 2] ^= 1
    elif how == "drop_entry":
        doc = codec.decode(bytes(data))
        del doc["chain"][2]
        data = codec.encode(doc)
    elif how == "empty":
        data = b""
    else:
        doc = codec.decode(bytes(data))
        doc["manifest"] = bytes(32)
        data = codec.encode(doc)
    cert.write_bytes(bytes(data))
    p = Cli(tmp_path / "elsewhere")("audit", "check-certificate", cert, ok=False)
    assert p.returncode == 3
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "INVALID certificate" in lines[0], p.stderr
    reason = {"truncate": "truncated", "flip": "", "drop_entry": "gap", "empty": "truncated",
              "swap_manifest": "names manifest"}[how]
    assert reason in lines[0]


def log_entries(data_dir, author):
    with AuditLog(data_dir) as log:
        return list(log.entries(author))


def test_certificate_carries_a_witness_from_another_node(cli, made, tmp_path):
    b, _ = made
    own = Identity.load(cli.data_dir / "node.key")
    with AuditLog(cli.data_dir) as log:
        head = log.head(own.public_key)
    # node W (its own data dir) witnesses our head; its log reaches us (part 2: gossip)
    with AuditLog(tmp_path / "w") as wlog:
        wlog.append("restore", {"manifest": bytes(32), "size": 0, "chunks": 0})
        assert wlog.witness() is None                      # nothing foreign to witness yet
        wlog.add_foreign(list(log_entries(cli.data_dir, own.public_key)))
        w = wlog.witness()
        assert audit.witness_heads(w) == [(own.public_key, head.seq, head.id)]
        w_entries = list(wlog.entries(wlog.own_author))
    with AuditLog(cli.data_dir) as log:
        r = log.add_foreign(w_entries)
        assert r.added == 2 and not r.rejected and r.replays == 0
    cert = tmp_path / "c.cert"
    cli("audit", "certificate", "disk.img@1", "-o", cert)
    doc = Cli(tmp_path / "x").json("audit", "check-certificate", cert, "--require-witness")
    assert doc["witnessed"] and doc["witnessed_seq"] == head.seq
    assert doc["witnesses"] == [{"author": w.author.hex(), "seq": w.seq, "id": w.id.hex()}]
    assert "witnessed up to seq 4 by 1 distinct node(s)" in Cli(tmp_path / "x")(
        "audit", "check-certificate", cert).stdout
    # one witness entry repeated is one witness (issue 18, finding 1: it was listed and
    # counted as many): --min-witnesses counts distinct nodes
    from hypersdk.protocol import codec
    doc = codec.decode(cert.read_bytes())
    doc["witnesses"] = doc["witnesses"] * 5
    cert5 = tmp_path / "c5.cert"
    cert5.write_bytes(codec.encode(doc))
    x = Cli(tmp_path / "x")
    rep = x.json("audit", "check-certificate", cert5, "--min-witnesses", "1")
    assert len(rep["witnesses"]) == 5 and rep["witness_keys"] == [w.author.hex()]
    p = x("audit", "check-certificate", cert5, "--min-witnesses", "2", ok=False)
    assert p.returncode == 4 and "1 distinct witness(es), 2 required" in p.stderr
    # audit verify --all checks both logs
    out = cli("audit", "verify", "--all").stdout.splitlines()
    assert len(out) == 2 and all(line.startswith("OK") for line in out)


def test_certificate_of_an_unknown_ref_is_one_clear_line(cli, made):
    p = cli("audit", "certificate", "nosuch", ok=False)
    assert "nosuch" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_audit_commands_before_any_log(cli):
    p = cli("audit", "log", ok=False)
    assert "no audit log" in p.stderr


def test_ops_through_a_running_node_append_to_the_same_log(cli, nodes, tmp_path):  # noqa: F811
    n = nodes(cli)
    src = image(tmp_path / "disk.img")
    cli("backup", src, "--chunk-size", "64K")
    cli("verify", "disk.img")
    assert cli.json("status")["served"].get("backup") == 1      # ran inside the daemon
    cli("restore", "disk.img", tmp_path / "o.img")
    assert kinds(cli) == ["backup", "verify", "restore"]
    assert n.stop() == 0
    cli("delete", "disk.img")                                    # and without the node
    assert kinds(cli) == ["backup", "verify", "restore", "delete"]
    assert cli("audit", "verify").stdout.startswith("OK")
    key = Identity.load(cli.data_dir / "node.key")
    assert {e["author"] for e in cli.json("audit", "log")} == {key.public_key.hex()}
    assert os.stat(cli.data_dir / "node.key").st_mode & 0o777 == 0o600


def test_certificate_states_its_freshness_and_a_forked_author_gets_none(cli, made, tmp_path):
    """Issue 18, finding 5: the check prints the time the certificate is valid as
    of and --fresh-within fails an old one; export refuses an author whose log
    this node holds a fork proof against."""
    cert = tmp_path / "c.cert"
    cli("audit", "certificate", "disk.img@1", "-o", cert)
    x = Cli(tmp_path / "x")
    out = x("audit", "check-certificate", cert).stdout
    assert "valid as of " in out and "a delete, are not in this certificate" in out
    doc = x.json("audit", "check-certificate", cert, "--fresh-within", "1h")
    assert doc["as_of_ns"] >= doc["head_time_ns"] > 0
    # a certificate of a log dated November 2023 is not fresh within a week
    ident = Identity.from_private_bytes(b"q" * 32)
    old = audit.make_entry(ident, 0, None, 1_700_000_000 * 10**9, "backup", {
        "manifest": bytes(range(32)), "name": "vm", "size": 1, "chunks": 1, "source": {}})
    (tmp_path / "old.cert").write_bytes(audit.build_certificate(bytes(range(32)), [old], []))
    p = x("audit", "check-certificate", tmp_path / "old.cert", "--fresh-within", "7d", ok=False)
    assert p.returncode == 4 and "2023-11-14" in p.stderr and "older than 7d" in p.stderr
    p = x("audit", "check-certificate", cert, "--fresh-within", "soon", ok=False)
    assert p.returncode == 2 and "cannot read duration" in p.stderr
    # a fork proof against our own log (two entries of seq 0): no certificate
    own = Identity.load(cli.data_dir / "node.key")
    with AuditLog(cli.data_dir) as log:
        first = log.entry(own.public_key, 0)
        other = audit.make_entry(own, 0, None, first.time, first.kind, dict(first.body))
        if other.id == first.id:                     # identical bytes: vary the time
            other = audit.make_entry(own, 0, None, first.time + 1, first.kind,
                                     dict(first.body))
        assert log.add_fork_proof(first.raw, other.raw) is not None
    p = cli("audit", "certificate", "disk.img@1", "-o", tmp_path / "f.cert", ok=False)
    assert p.returncode == 1 and "proven fork" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_a_certificate_made_in_a_network_pins_it_and_vouches_for_its_author(cli, tmp_path):
    """Issue 18, finding 1: a node in a network exports certificates pinned to the
    network key, with its member certificate; check-certificate prints the network
    to compare, checks it against --network-key (hex or the key file), and refuses
    a certificate pinned to another network."""
    net = cli.json("network", "create", "--name", "acme", "--site", "hq")
    src = image(tmp_path / "disk.img")
    cli.json("backup", src, "--chunk-size", "64K")      # made in the network
    cert = tmp_path / "c.cert"
    cli("audit", "certificate", "disk.img", "-o", cert)
    x = Cli(tmp_path / "x")
    pub = cli.data_dir / "network" / "network.pub"
    doc = x.json("audit", "check-certificate", cert, "--network-key", pub)
    assert doc["network"] == pub.read_bytes().hex() and doc["author_member"] is True
    out = x("audit", "check-certificate", cert, "--network-key", pub.read_bytes().hex()).stdout
    assert f"network {net['network']}" in out and "the author is a member" in out
    other = Identity.generate().public_key.hex()
    p = x("audit", "check-certificate", cert, "--network-key", other, ok=False)
    assert p.returncode == 3 and "pinned to network" in p.stderr
    p = x("audit", "check-certificate", cert, "--network-key", "nonsense", ok=False)
    assert p.returncode == 2 and "--network-key nonsense" in p.stderr


# -- issue 18, finding 7: regular cosigning; certificates say when they are old -------------

S = 10**9
M7 = bytes(range(32))


def _backup_body():
    return {"manifest": M7, "name": "vm", "size": 1, "chunks": 1, "source": {}}


def test_certificate_carries_the_newest_cosign_of_each_distinct_witness(tmp_path):
    """Three witnesses cosign our log over 100 minutes (w0 three times, w1 twice,
    w2 once): the certificate carries one entry per witness, its newest, newest
    first (it carried all six, ordered by witness key)."""
    data, refresh = tmp_path / "data", audit.COSIGN_REFRESH_S * S
    base = time.time_ns() - 2 * 3600 * S
    with AuditLog(data) as log:
        log.append("backup", _backup_body(), base)
        own = list(log.entries(log.own_author))
    ws = [AuditLog(None, identity=Identity.from_private_bytes(bytes([0x50 + i]) * 32))
          for i in range(3)]
    for w in ws:
        w.add_foreign([e.raw for e in own], now_ns=base)
        w.witness(base + 600 * S, refresh)                # each: seq 0, at 10 min
    with AuditLog(data) as log:
        v = log.append("verify", {"manifest": M7, "holder": bytes(32), "result": "ok",
                                  "summary": {}}, base + 1200 * S)
    ws[0].add_foreign([v.raw], now_ns=base + 1800 * S)
    ws[0].witness(base + 1800 * S, refresh)               # w0: seq 1 (changed), 30 min
    ws[1].witness(base + 5400 * S, refresh)               # w1: seq 0 again (refresh), 90 min
    ws[0].witness(base + 6000 * S, refresh)               # w0: seq 1 again (refresh), 100 min
    with AuditLog(data) as log:
        for w in ws:
            raws = w.raw_range(w.own_author, 0, 100)
            assert log.add_foreign(raws).added == len(raws)
    cert = tmp_path / "c.cert"
    Cli(data)("audit", "certificate", M7.hex()[:16], "-o", cert)
    doc = Cli(tmp_path / "x").json("audit", "check-certificate", cert)
    assert [(w["author"], w["seq"]) for w in doc["witnesses"]] == [
        (ws[0].own_author.hex(), 2), (ws[1].own_author.hex(), 1), (ws[2].own_author.hex(), 0)]
    assert doc["witnessed_seq"] == 1 and doc["as_of_ns"] == base + 6000 * S
    assert doc["older_than_cosign_interval"] is False          # cosigned 20 min ago


def test_check_certificate_notes_a_certificate_older_than_the_cosigning_interval(tmp_path):
    """A certificate of a backup made 3 h ago, last cosigned 2 h ago, is older than
    the cosigning interval: a NOTE says entries signed since may be missing (exit 0:
    --fresh-within is the error). Cosigned 5 min ago (the refresh), it is fresh."""
    author = Identity.from_private_bytes(b"q" * 32)
    wit = Identity.from_private_bytes(b"w" * 32)
    now = time.time_ns()
    b = audit.make_entry(author, 0, None, now - 3 * 3600 * S, "backup", _backup_body())
    x = Cli(tmp_path / "x")
    out = {}
    for name, age in (("old", 2 * 3600), ("fresh", 300)):
        w = audit.make_entry(wit, 0, None, now - age * S, "witness",
                             {"heads": [[author.public_key, 0, b.id]]})
        f = tmp_path / f"{name}.cert"
        f.write_bytes(audit.build_certificate(M7, [b], [w]))
        out[name] = (x("audit", "check-certificate", f).stdout,
                     x.json("audit", "check-certificate", f))
    text, doc = out["old"]
    assert ("NOTE: valid as of " in text and "older than the cosigning interval (1 h 20 min)"
            in text and "may be missing" in text and "--fresh-within" in text)
    assert doc["older_than_cosign_interval"] is True and doc["ok"]
    assert doc["cosign_interval_s"] == audit.COSIGN_INTERVAL_S == 4800
    assert 2 * 3600 <= doc["age_s"] < 2 * 3600 + 600
    text, doc = out["fresh"]
    assert "NOTE" not in text and "VALID" in text
    assert doc["older_than_cosign_interval"] is False and doc["age_s"] < 1200
    assert doc["dated_in_the_future"] is False
    assert x("audit", "check-certificate", tmp_path / "fresh.cert", "--fresh-within", "1h"
             ).returncode == 0


def test_a_cosign_dated_in_the_future_does_not_make_a_certificate_fresh(tmp_path):
    """A witness that dates its cosign an hour ahead would make any certificate look
    fresh: check-certificate warns, and --fresh-within fails it (exit 4)."""
    author = Identity.from_private_bytes(b"q" * 32)
    wit = Identity.from_private_bytes(b"w" * 32)
    now = time.time_ns()
    b = audit.make_entry(author, 0, None, now - 3 * 3600 * S, "backup", _backup_body())
    w = audit.make_entry(wit, 0, None, now + 3600 * S, "witness",
                         {"heads": [[author.public_key, 0, b.id]]})
    f = tmp_path / "ahead.cert"
    f.write_bytes(audit.build_certificate(M7, [b], [w]))
    x = Cli(tmp_path / "x")
    text = x("audit", "check-certificate", f).stdout
    assert "WARNING: valid as of" in text and "in the future" in text
    assert x.json("audit", "check-certificate", f)["dated_in_the_future"] is True
    p = x("audit", "check-certificate", f, "--fresh-within", "1d", ok=False)
    assert p.returncode == 4 and "in the future" in p.stderr
