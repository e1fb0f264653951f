"""The durable side of replication: DATA/replicas.sqlite (0600).

Two tables, one per role:

    holders   (author) for each of our backups, the nodes asked to hold a copy:
              asked -> held (confirmed, `replica` entry recorded) -> lost (revoked,
              failed a check, unreachable too long: node/replicas/health.py), or
              asked -> failed (refused, lost the request); a failed or lost holder
              is never asked again for that backup
    incoming  (holder) copies other members asked us to hold: queued -> fetching
              -> held, or failed after MAX_ATTEMPTS; queued ones survive a restart
              and are fetched when the node runs again

What the author still has to do is derived, never stored twice: a backup of ours
in the catalog with fewer live holders (asked or held) than its policy wants is
in the queue, whether it was made while the node was offline, before a restart,
or lost a holder. So the queue survives restarts by construction.
"""
from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from hypersdk.node import runtime
from hypersdk.node.files import private_db, private_dir

DB_NAME = "replicas.sqlite"
MAX_ATTEMPTS = 8
SCHEMA = """
CREATE TABLE IF NOT EXISTS holders (
    manifest BLOB NOT NULL, holder BLOB NOT NULL, site TEXT NOT NULL,
    addr TEXT NOT NULL, state TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '',
    asked_ns INTEGER NOT NULL, changed_ns INTEGER NOT NULL,
    checked_ns INTEGER NOT NULL DEFAULT 0,       -- its last good check (health.py)
    PRIMARY KEY (manifest, holder));
CREATE TABLE IF NOT EXISTS incoming (
    manifest BLOB PRIMARY KEY, author BLOB NOT NULL, size INTEGER NOT NULL,
    state TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '',
    attempts INTEGER NOT NULL DEFAULT 0, next_ns INTEGER NOT NULL,
    asked_ns INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class Holder:
    manifest: bytes
    holder: bytes
    site: str
    addr: str
    state: str
    reason: str
    asked_ns: int
    changed_ns: int
    checked_ns: int


@dataclass(frozen=True)
class Incoming:
    manifest: bytes
    author: bytes
    size: int
    state: str
    reason: str
    attempts: int
    next_ns: int


class ReplicaState:
    """One connection; use from one thread at a time (the daemon's worker threads
    take turns through trio.to_thread with a lock held by the caller)."""

    def __init__(self, data_dir, *, clock=runtime.now_ns):
        d = private_dir(data_dir)
        self.clock = clock
        self.db = sqlite3.connect(d / DB_NAME, timeout=60, isolation_level=None,
                                  check_same_thread=False)
        private_db(d / DB_NAME)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- author side ------------------------------------------------------------------
    def holders(self, manifest: bytes | None = None) -> list[Holder]:
        q = "SELECT * FROM holders" + (" WHERE manifest=?" if manifest else "") + \
            " ORDER BY asked_ns, holder"
        return [Holder(bytes(r[0]), bytes(r[1]), *r[2:])
                for r in self.db.execute(q, (manifest,) if manifest else ())]

    def set_holder(self, manifest: bytes, holder: bytes, site: str, addr: str, state: str,
                   reason: str = "") -> None:
        now = self.clock()
        checked = now if state == "held" else 0          # confirmed: proven just now
        self.db.execute(
            "INSERT INTO holders VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT(manifest, holder) DO "
            "UPDATE SET state=excluded.state, reason=excluded.reason, site=excluded.site, "
            "addr=excluded.addr, changed_ns=excluded.changed_ns, checked_ns=CASE WHEN "
            "excluded.state='held' AND holders.state!='held' THEN excluded.checked_ns ELSE "
            "holders.checked_ns END",
            (manifest, holder, site, addr, state, reason, now, now, checked))

    def checked(self, manifest: bytes, holder: bytes, when_ns: int) -> None:
        self.db.execute("UPDATE holders SET checked_ns=? WHERE manifest=? AND holder=?",
                        (when_ns, manifest, holder))

    def forget_manifest(self, manifest: bytes) -> None:
        self.db.execute("DELETE FROM holders WHERE manifest=?", (manifest,))

    # -- holder side ------------------------------------------------------------------
    def incoming(self, manifest: bytes | None = None) -> list[Incoming]:
        q = "SELECT manifest, author, size, state, reason, attempts, next_ns FROM incoming" + \
            (" WHERE manifest=?" if manifest else "") + " ORDER BY asked_ns"
        return [Incoming(bytes(r[0]), bytes(r[1]), *r[2:])
                for r in self.db.execute(q, (manifest,) if manifest else ())]

    def enqueue(self, manifest: bytes, author: bytes, size: int) -> None:
        now = self.clock()
        self.db.execute("INSERT INTO incoming VALUES (?,?,?,'queued','',0,?,?) ON CONFLICT"
                        "(manifest) DO UPDATE SET state='queued', reason='', attempts=0, "
                        "next_ns=excluded.next_ns WHERE state IN ('failed', 'held')",
                        (manifest, author, size, now, now))

    def pending_bytes(self) -> int:
        (n,) = self.db.execute("SELECT COALESCE(SUM(size), 0) FROM incoming WHERE state IN "
                               "('queued', 'fetching')").fetchone()
        return n

    def set_incoming(self, manifest: bytes, state: str, reason: str = "",
                     retry_in_s: float | None = None) -> None:
        if retry_in_s is None:
            self.db.execute("UPDATE incoming SET state=?, reason=? WHERE manifest=?",
                            (state, reason, manifest))
        else:
            self.db.execute("UPDATE incoming SET state=?, reason=?, attempts=attempts+1, "
                            "next_ns=? WHERE manifest=?",
                            (state, reason, self.clock() + int(retry_in_s * 1e9), manifest))

    def due(self) -> list[Incoming]:
        """Queued copies whose next attempt is due, oldest first."""
        now = self.clock()
        return [i for i in self.incoming() if i.state in ("queued", "fetching")
                and i.next_ns <= now]

    def drop_incoming(self, manifest: bytes) -> None:
        self.db.execute("DELETE FROM incoming WHERE manifest=?", (manifest,))
