"""Every committed backup / delete has exactly one audit entry, even across kill -9.

Before: the entry was appended after the catalog commit, in a second database,
so a kill -9 between the two lost it (of 4 deletes that committed under a kill
storm, only 1 had its entry). Now the operation writes an intent in its own
commit and the entry is appended from it exactly once (node/audit/intents.py).

Two kinds of test, both on real `hypersdk` processes:
  - named crash points (HYPERSDK_TEST_CRASH_AT: the process SIGKILLs itself at
    that point) hit each window between the two databases deterministically;
  - a kill storm kills backups and deletes at random moments of their run.
After every crash the next command settles what is owed, and the invariant
`check_exactly_once` must hold.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time

import pytest
from conftest import HYPERSDK, Cli, MiB, cli_env
from test_node_cli import nodes, poll  # noqa: F401  (fixture)

SEED = int(os.environ.get("HYPERSDK_CRASH_SEED", "20261207"))


def _entries(cli: Cli) -> list[dict]:
    p = cli("audit", "log", "--limit", "100000", "--json", ok=None)
    if p.returncode != 0 and "no audit log" in p.stderr:
        return []
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def check_exactly_once(cli: Cli) -> dict:
    """The invariant: each backup in the catalog has exactly one backup entry and no
    delete entry; each backup entry's manifest is either in the catalog or has
    exactly one delete entry; no delete entry names a backup still listed."""
    backups = cli.json("backups")
    entries = _entries(cli)
    listed = {b["manifest"]: b for b in backups}
    made: dict[str, int] = {}
    deleted: dict[str, list] = {}
    for e in entries:
        body = e["body"]
        if e["kind"] == "backup":
            made[body["manifest"]] = made.get(body["manifest"], 0) + 1
        elif e["kind"] == "delete":
            deleted.setdefault(body["manifest"], []).append((body["name"], body["version"]))
    for mid, n in made.items():
        assert n == 1, f"manifest {mid[:16]} has {n} backup entries"
    for mid, b in listed.items():
        assert made.get(mid) == 1, f"listed backup {b['ref']} has no backup entry"
        assert mid not in deleted, f"listed backup {b['ref']} has a delete entry"
    for mid in made:
        if mid not in listed:
            assert len(deleted.get(mid, [])) == 1, \
                f"manifest {mid[:16]} was deleted with {len(deleted.get(mid, []))} entries"
    for mid in deleted:
        assert mid in made, f"a delete entry names manifest {mid[:16]} never backed up"
    return {"backups": len(listed), "backup_entries": len(made),
            "delete_entries": sum(len(v) for v in deleted.values())}


def _image(path, seed: int, size: int = 2 * MiB):
    path.write_bytes(random.Random(seed).randbytes(size))
    return path


@pytest.mark.parametrize("point", ["backup-committed", "intent-appended"])
def test_backup_killed_between_commit_and_entry_gets_exactly_one_entry(tmp_path, point):
    cli = Cli(tmp_path / "data")
    cli("backup", _image(tmp_path / "a.img", 1))                  # an earlier backup
    p = cli("backup", _image(tmp_path / "b.img", 2), ok=None, HYPERSDK_TEST_CRASH_AT=point)
    assert p.returncode == -signal.SIGKILL
    # the backup committed: it is listed, and its entry is owed exactly once
    assert check_exactly_once(cli) == {"backups": 2, "backup_entries": 2, "delete_entries": 0}
    assert check_exactly_once(cli)["backup_entries"] == 2            # idempotent


@pytest.mark.parametrize("point", ["delete-committed", "intent-appended"])
def test_delete_killed_between_commit_and_entry_gets_exactly_one_entry(tmp_path, point):
    cli = Cli(tmp_path / "data")
    for i in range(3):
        cli("backup", _image(tmp_path / "a.img", i), "--name", "vm")
    p = cli("delete", "vm@2", ok=None, HYPERSDK_TEST_CRASH_AT=point)
    assert p.returncode == -signal.SIGKILL
    assert [b["ref"] for b in cli.json("backups")] == ["vm@1", "vm@3"]
    assert check_exactly_once(cli) == {"backups": 2, "backup_entries": 3, "delete_entries": 1}


def test_first_backup_killed_before_its_entry_creates_the_log_later(tmp_path):
    """The very first backup of a data dir: no audit log exists when it dies."""
    cli = Cli(tmp_path / "data")
    p = cli("backup", _image(tmp_path / "a.img", 1), ok=None,
            HYPERSDK_TEST_CRASH_AT="backup-committed")
    assert p.returncode == -signal.SIGKILL
    assert not (tmp_path / "data" / "audit.sqlite").exists()
    entries = _entries(cli)                     # `audit log` settles what is owed first
    assert [e["kind"] for e in entries] == ["backup"]


def _run_and_kill(args, env, delay: float, max_wait: float = 60.0) -> int | None:
    p = subprocess.Popen([str(HYPERSDK), *map(str, args)], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        p.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        p.kill()
    p.wait(timeout=max_wait)
    return p.returncode


def test_kill_storm_of_backups_and_deletes_keeps_exactly_one_entry_each(tmp_path):
    """Random kills across backups and deletes; the invariant holds after each one.
    Kill moments are drawn from the measured duration of uninterrupted runs (a
    random delay only chooses the moment; nothing waits on a sleep)."""
    rng = random.Random(SEED)
    cli = Cli(tmp_path / "data")
    env = cli_env(cli.data_dir)
    img = tmp_path / "vm.img"
    t0 = time.monotonic()
    cli("backup", _image(img, 0, 4 * MiB), "--name", "vm", "--chunk-size", "64K")
    t_backup = time.monotonic() - t0
    t0 = time.monotonic()
    cli("backup", _image(img, 1, 4 * MiB), "--name", "vm", "--chunk-size", "64K")
    cli("delete", "vm@1")
    t_delete = time.monotonic() - t0 - t_backup
    # the kill moment is drawn within twice the estimated duration of the op; the
    # estimate follows uninterrupted runs and grows after each kill, so the load of
    # the machine cannot starve either outcome (a random delay only picks the moment)
    span = {"backup": t_backup, "delete": max(t_delete, 0.05)}
    kills = completed = 0
    for i in range(120):                       # until both outcomes were seen enough
        if kills >= 8 and completed >= 4:
            break
        if rng.random() < 0.5 or len(cli.json("backups")) < 2:
            _image(img, 100 + i, 4 * MiB)
            kind, args = "backup", ["backup", img, "--name", "vm", "--chunk-size", "64K"]
        else:
            kind, args = "delete", ["delete", cli.json("backups")[0]["ref"]]
        t0 = time.monotonic()
        code = _run_and_kill(args, env, rng.uniform(0.0, 2.0 * span[kind]))
        if code == -signal.SIGKILL:
            kills += 1
            span[kind] *= 1.15
        elif code == 0:
            completed += 1
            span[kind] = 0.5 * span[kind] + 0.5 * (time.monotonic() - t0)
        check_exactly_once(cli)
    assert kills >= 8 and completed >= 4, f"kills {kills}, completed {completed}: the " \
        "storm did not exercise both outcomes"
    cli("verify")


def _restores(cli: Cli) -> list[dict]:
    return [e["body"] for e in _entries(cli) if e["kind"] == "restore"]


def _restore_killed_at(tmp_path, point: str):
    """A backup, then a restore of it that SIGKILLs itself at `point`."""
    cli = Cli(tmp_path / "data")
    img = _image(tmp_path / "a.img", 1)
    cli("backup", img)
    out = tmp_path / "out.img"
    p = cli("restore", "a.img", out, ok=None, HYPERSDK_TEST_CRASH_AT=point)
    assert p.returncode == -signal.SIGKILL
    return cli, img, out


def test_restore_killed_right_after_its_rename_gets_exactly_one_entry(tmp_path):
    cli, img, out = _restore_killed_at(tmp_path, "restore-renamed")
    assert out.read_bytes() == img.read_bytes()              # the restore committed
    assert len(_restores(cli)) == 1
    assert len(_restores(cli)) == 1                          # settled once, not again


def test_restore_killed_before_its_rename_gets_no_entry(tmp_path):
    cli, img, out = _restore_killed_at(tmp_path, "restore-noted")
    assert not out.exists()
    assert _restores(cli) == []            # its temporary file is still there: kept pending
    cli("restore", "a.img", out)           # removes the stale partial, then records itself
    assert out.read_bytes() == img.read_bytes()
    assert len(_restores(cli)) == 1
    partials = [p for p in tmp_path.iterdir() if "hypersdk-partial" in p.name]
    assert partials == []
    import sqlite3
    db = sqlite3.connect(tmp_path / "data" / "audit.sqlite")
    assert db.execute("SELECT COUNT(*) FROM restore_intents").fetchone()[0] == 0


def test_node_killed_after_committing_a_fetched_replica_records_it_once_on_restart(
        tmp_path, nodes):
    """A real fetch between two nodes; the fetching node dies (SIGKILL at the named
    point) right after the replica's catalog commit, before its `replica` entry.
    Restarted, it appends that entry at start, exactly once."""
    a = nodes(Cli(tmp_path / "a"))
    mid = a.cli.json("backup", _image(tmp_path / "img", 5, 3 * MiB), "--chunk-size",
                     "64K")["manifest"]
    e_cli = Cli(tmp_path / "e")
    e = nodes(e_cli, "--bootstrap", a.addr, env={"HYPERSDK_TEST_CRASH_AT": "replica-committed"})
    poll(lambda: e.cli.json("dht", "find", mid)["providers"], 30, "A's provider record",
         interval=0.2)
    assert e.cli("fetch", mid, ok=False).returncode != 0       # the node died under it
    assert e.proc.wait(timeout=60) == -signal.SIGKILL
    (e_cli.data_dir / "node.addrs").unlink()
    e = nodes(e_cli)                                            # restart, no crash point
    replicas = [x for x in _entries(e.cli) if x["kind"] == "replica"]
    assert [x["body"]["manifest"] for x in replicas] == [mid]
    assert [b["manifest"] for b in e.cli.json("backups")] == [mid]
    e.stop()
    assert len([x for x in _entries(e_cli) if x["kind"] == "replica"]) == 1
