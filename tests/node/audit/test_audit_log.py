"""node/audit/log.py: durable own log, foreign logs, forks, concurrency, kill -9."""
from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from hypersdk.node.audit import intents as audit_intents
from hypersdk.node.audit import log as audit_log
from hypersdk.node.audit.log import AuditLog
from hypersdk.node.net.identity import Identity
from hypersdk.protocol import audit
from hypersdk.protocol.errors import ForkDetected

M = bytes(range(32))
T0 = 1_700_000_000 * 10**9
from conftest import REPO  # noqa: E402

# appends `n` restore entries to the log in argv[1]; prints one line per commit
APPENDER = """
import sys
from hypersdk.node.audit.log import AuditLog
log = AuditLog(sys.argv[1])
for i in range(int(sys.argv[2])):
    e = log.append("restore", {"manifest": bytes(32), "size": i, "chunks": int(sys.argv[3])})
    print(e.seq, flush=True)
"""


def restore_body(i=0):
    return {"manifest": M, "size": i, "chunks": i}


def test_append_reload_and_verify(tmp_path):
    with AuditLog(tmp_path) as log:
        es = [log.append("restore", restore_body(i), T0 + i) for i in range(5)]
        assert [e.seq for e in es] == list(range(5))
        assert es[1].prev == es[0].id and es[0].prev is None
    key = Identity.load(tmp_path / "node.key")                      # created on first use
    assert (os.stat(tmp_path / "node.key").st_mode & 0o777) == 0o600
    with AuditLog(tmp_path) as log:
        assert log.own_author == key.public_key == es[0].author
        assert list(log.entries(log.own_author)) == es
        assert list(log.entries(log.own_author, 1, 2)) == es[1:3]
        assert log.heads() == {key.public_key: (4, es[4].id)}
        rep = log.verify(log.own_author)
        assert rep.ok and rep.entries == 5 and rep.head == es[4]
        e5 = log.append("restore", restore_body(5), T0 + 5)
        assert e5.seq == 5 and e5.prev == es[4].id


def test_existing_node_key_is_used(tmp_path):
    ident = Identity.generate()
    ident.save(tmp_path / "node.key")
    e = audit_log.record(tmp_path, "restore", restore_body())
    assert e.author == ident.public_key


def _tamper(path, sql, *args):
    db = sqlite3.connect(path)
    with db:
        db.execute(sql, args)
    db.close()


@pytest.mark.parametrize("how", ["flip", "delete", "swap_ids", "resign"])
def test_verify_finds_the_first_break_of_a_tampered_db(tmp_path, how):
    with AuditLog(tmp_path) as log:
        es = [log.append("restore", restore_body(i), T0 + i) for i in range(6)]
    db = tmp_path / "audit.sqlite"
    if how == "flip":
        raw = bytearray(es[3].raw)
        raw[-5] ^= 1
        _tamper(db, "UPDATE entries SET raw=? WHERE seq=3", bytes(raw))
    elif how == "delete":
        _tamper(db, "DELETE FROM entries WHERE seq=3")
    elif how == "swap_ids":
        _tamper(db, "UPDATE entries SET raw=? WHERE seq=3", es[2].raw)
    else:
        # a validly signed replacement for seq 3 (the node rewrote its own log):
        # the stored id and the link from seq 4 no longer match
        ident = Identity.load(tmp_path / "node.key")
        e = audit.make_entry(ident, 3, es[2].id, T0 + 3, "restore", restore_body(99))
        _tamper(db, "UPDATE entries SET raw=?, id=? WHERE seq=3", e.raw, e.id)
    with AuditLog(tmp_path) as log:
        rep = log.verify(log.own_author)
    assert not rep.ok and rep.entries == (4 if how == "resign" else 3)
    p = rep.problems[0]
    assert p.seq == (4 if how in ("delete", "resign") else 3), p
    assert p.reason


def test_foreign_logs_replays_gaps_and_forks(tmp_path):
    a = Identity.generate()
    es, prev = [], None
    for s in range(5):
        e = audit.make_entry(a, s, prev, T0 + s, "restore", restore_body(s))
        es.append(e)
        prev = e.id
    with AuditLog(tmp_path) as log:
        r = log.add_foreign([es[3], es[0], es[1], es[2]], now_ns=T0)   # any order within a batch
        assert r.added == 4 and not r.rejected and not r.forks
        r = log.add_foreign([e.raw for e in es], now_ns=T0)          # replays + one new
        assert (r.added, r.replays) == (1, 4)
        assert log.heads()[a.public_key] == (4, es[4].id)
        # a gap is not stored: reported with the seq we lack (gossip asks for it)
        later = audit.make_entry(a, 7, bytes(32), T0, "restore", restore_body())
        r = log.add_foreign([later], now_ns=T0)
        assert r.added == 0 and r.gaps == {a.public_key: 5} and not r.rejected
        # from the future: not stored, not an offence
        fut = audit.make_entry(a, 5, es[4].id, T0 + 10**12, "restore", restore_body())
        r = log.add_foreign([fut], now_ns=T0)
        assert isinstance(r.future[0], audit.FutureEntry) and not r.rejected and r.added == 0
        # garbage
        r = log.add_foreign([b"\x00garbage"], now_ns=T0)
        assert r.rejected and r.added == 0
        # fork at seq 2: kept as proof, author flagged
        other = audit.make_entry(a, 2, es[1].id, T0 + 50, "delete",
                                 {"manifest": M, "name": "vm", "version": 1})
        r = log.add_foreign([other], now_ns=T0)
        assert len(r.forks) == 1 and r.forks[0].first == es[2] and r.forks[0].second == other
        assert [(x, f) for x, _, f in log.authors()] == [(a.public_key, True)]
        (proof,) = log.forks(a.public_key)
        assert isinstance(proof, ForkDetected) and proof.second == other
        rep = log.verify(a.public_key)
        assert not rep.ok and rep.entries == 5 and "fork" in rep.problems[0].reason
        assert list(log.entries(a.public_key)) == es          # the stored log is unchanged


def test_two_processes_appending_never_fork_the_log(tmp_path):
    audit_log.own_identity(tmp_path)          # both must sign with the same key
    n = 60
    procs = [subprocess.Popen([sys.executable, "-c", APPENDER, str(tmp_path), str(n), str(k)],
                              stdout=subprocess.PIPE, text=True, cwd=REPO) for k in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    seqs = sorted(int(x) for o in outs for x in o.split())
    assert seqs == list(range(2 * n))        # every seq taken exactly once
    with AuditLog(tmp_path) as log:
        rep = log.verify(log.own_author)
        assert rep.ok and rep.entries == 2 * n
        writers = [e.body["chunks"] for e in log.entries(log.own_author)]
        assert set(writers) == {0, 1}            # interleaved appenders


def test_two_processes_creating_the_key_agree(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", APPENDER, str(tmp_path), "5", str(k)],
                              stdout=subprocess.PIPE, text=True, cwd=REPO) for k in range(2)]
    for p in procs:
        p.communicate(timeout=120)
        assert p.returncode == 0
    with AuditLog(tmp_path) as log:
        assert [a for a, _, _ in log.authors()] == [log.own_author]
        assert log.verify(log.own_author).entries == 10


def test_kill_9_during_appends_leaves_a_valid_log(tmp_path):
    """SIGKILL real appending processes at random moments (chosen by polling how
    many commits they reported); after each kill the log verifies, holds every
    reported entry, and appending continues from the head."""
    rng = random.Random(int(os.environ.get("HYPERSDK_CRASH_SEED", "20251124")))
    audit_log.own_identity(tmp_path)
    reported = 0
    for round_ in range(6):
        p = subprocess.Popen([sys.executable, "-c", APPENDER, str(tmp_path), "100000", "0"],
                             stdout=subprocess.PIPE, text=True, cwd=REPO)
        target = rng.randint(1, 40)
        last = None
        deadline = time.monotonic() + 60
        for _ in range(target):                    # wait for `target` commits
            line = p.stdout.readline()
            assert line and time.monotonic() < deadline
            last = int(line)
        if rng.random() < 0.5:
            time.sleep(rng.random() * 0.01)        # only to pick a moment mid-commit
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
        p.stdout.close()
        reported = max(reported, last)
        with AuditLog(tmp_path) as log:
            rep = log.verify(log.own_author)
            assert rep.ok, rep.problems
            assert rep.head.seq >= reported               # every reported commit is durable
            e = log.append("restore", restore_body(round_))
            assert e.seq == rep.head.seq + 1 and e.prev == rep.head.id
            reported = e.seq


def test_reconcile_appends_the_entries_an_interrupted_op_missed(store, tmp_path):
    from hypersdk.node.service.backup import backup
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(range(256)) * 4096)
    r = backup(store, str(img), name="vm", chunk_size=64 << 10)   # no audit entry: the op
    assert len(audit_intents.reconcile(store.root, store)) == 1       # was "killed" before it
    with AuditLog(store.root) as log:
        (e,) = [x for x in log.entries(log.own_author) if x.kind == "backup"]
        assert e.body["manifest"] == r.manifest_id and e.body["name"] == "vm"
        assert e.body["size"] == 256 * 4096 and e.body["chunks"] == r.chunks
    assert audit_intents.reconcile(store.root, store) == []            # idempotent


def test_with_a_data_key_backup_and_delete_entries_seal_their_names(tmp_path):
    """A node with a data key signs backup and delete entries whose name and source
    are sealed (protocol/labels.py): the log's bytes hold neither; the key opens
    them; name resolution works with the key and finds nothing without it."""
    from hypersdk.node.net import datakey
    from hypersdk.node.service.backup import backup
    from hypersdk.node.service.ops import STORE_OPS
    from hypersdk.node.store.store import ChunkStore
    data = tmp_path / "data"
    key = datakey.create(data)
    img = tmp_path / "payroll-db.img"
    img.write_bytes(bytes(range(256)) * 4096)
    with ChunkStore(data) as store:
        r = backup(store, str(img), name="payroll-db", chunk_size=64 << 10)
        assert len(audit_intents.reconcile(store.root, store)) == 1       # the backup entry

        class Ui:                          # the delete op's user interface: silent
            on_wait = None
        STORE_OPS["delete"].fn(store, {"ref": "payroll-db@1"}, Ui())
    with AuditLog(data) as log:
        files = list(data.glob("audit.sqlite*"))           # with its WAL
        assert files and not any(b"payroll-db" in f.read_bytes() for f in files)
        got = {e.kind: e for e in log.entries(log.own_author) if e.kind in ("backup", "delete")}
        assert got.keys() == {"backup", "delete"}
        for e in got.values():
            assert "name" not in e.body and e.body["key"] == key.fingerprint
            assert audit.open_body(e.body, None) is None
        assert audit.open_body(got["backup"].body, key)["source"]["path"] == str(img)
        assert audit.open_body(got["delete"].body, key) == {
            "manifest": r.manifest_id, "name": "payroll-db", "version": 1}
        assert log.find_backup_by_name("payroll-db", key) == r.manifest_id
        assert log.find_backup_by_name("payroll-db") is None
        assert log.sealed_names(key) == 0 and log.sealed_names() == 1
