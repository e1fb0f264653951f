"""Audit intents: an operation and its audit entry are one atomic step.

The chunk index (index.sqlite) and the audit log (audit.sqlite) are two
databases, and no commit spans both atomically (SQLite in WAL mode is atomic
per database file only). So a store operation that commits (a backup, a
delete, a fetched replica) writes an *intent* -- the kind and body of the
audit entry it owes -- into the index in the same transaction as the change
itself. After the commit, flush() turns pending intents into signed entries:

    for each pending intent, in commit order (under DATA/intents.lock):
        audit.sqlite: append the entry and mark the intent id applied,
                      in one transaction (AuditLog.append_intent)
        index.sqlite: delete the intent
        audit.sqlite: forget the applied mark

A kill -9 at any point leaves either the intent pending (the entry was never
appended: the next flush appends it) or the intent pending and marked applied
(the next flush only deletes it), so every committed operation ends up with
exactly one entry. flush() runs right after each operation, when the store is
opened for an operation, and when the node starts. The lock serialises
flushers (the CLI and a node sharing a data dir): two processes never append
the same intent.

Restores commit with a rename, not with an index transaction, so their intent
lives in audit.sqlite (AuditLog.begin_restore): it names OUT and the inode of
the temporary file; after a crash the rename happened exactly when OUT is
that file (settle_restores: same inode and mtime).
"""
from __future__ import annotations

import os
import sqlite3

from hypersdk.node.files import flock
from hypersdk.node.store.intents import done, pending

# the audit log (and with it cryptography, ~20 ms) is imported where an entry is
# actually owed: every store command flushes first, and almost always finds nothing
DB_NAME = "audit.sqlite"                  # = hypersdk.node.audit.log.DB_NAME

LOCK = "intents.lock"
CRASH_ENV = "HYPERSDK_TEST_CRASH_AT"


def crash_point(name: str) -> None:
    """TEST-ONLY: kill this process with SIGKILL at the named point when
    HYPERSDK_TEST_CRASH_AT names it (tests/test_audit_intents.py uses it to
    crash in each window between the two databases)."""
    if os.environ.get(CRASH_ENV) == name:
        import signal
        os.kill(os.getpid(), signal.SIGKILL)


def flush(store, warn=None) -> list:
    """Append the entry of every pending intent (see the module doc); returns the
    entries appended. A failure (e.g. a full disk) leaves the rest pending for
    the next flush and, with `warn`, says so in one line."""
    out = []
    if not pending(store) and not _restores_owed(store.root / DB_NAME):
        return out
    from hypersdk.node.audit.log import AuditLog
    try:
        with flock(store.root / LOCK, exclusive=True), AuditLog(store.root) as log:
            for iid, kind, body in pending(store):
                e = log.append_intent(iid, kind, body, store.key)
                if e is not None:
                    out.append(e)
                crash_point("intent-appended")
                done(store, iid)
                log.forget_intent(iid)
            out += log.settle_restores()
    except (OSError, sqlite3.Error) as exc:
        if warn is None:
            raise
        warn(f"warning: audit entries wait to be recorded ({exc}); they are appended "
             "when the store is next opened")
    return out


def _restores_owed(db_path) -> bool:
    """Whether the audit log holds restore intents (a read-only look, no AuditLog)."""
    if not db_path.exists():
        return False
    try:
        db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=60)
        try:
            return db.execute("SELECT 1 FROM restore_intents LIMIT 1").fetchone() is not None
        finally:
            db.close()
    except sqlite3.Error:
        return True                       # an older schema, or busy: let flush() look


def restore_recorder(data_dir, warn=None):
    """restore()'s before_commit hook: note the restore entry owed before the
    rename (AuditLog.begin_restore), append it after (finish_restore), or drop
    it if the rename did not happen. If the log cannot be written (a full
    disk), the restore goes on and `warn` says the entry is missing."""
    from hypersdk.node.audit.log import AuditLog

    def before_commit(m, out: str, tmp: str, st):
        body = {"manifest": m.id, "size": m.size, "chunks": m.n_chunks}
        try:
            with AuditLog(data_dir) as log:
                rid = log.begin_restore(body, out, tmp, st.st_dev, st.st_ino, st.st_mtime_ns)
        except (OSError, sqlite3.Error) as exc:
            if warn:
                warn(f"warning: the restore was not recorded in the audit log: {exc}")
            return lambda committed: None
        crash_point("restore-noted")

        def after(committed: bool) -> None:
            crash_point("restore-renamed")
            try:
                with AuditLog(data_dir) as log:
                    if committed:
                        log.finish_restore(rid)
                    else:
                        log.abandon_restore(rid)
            except (OSError, sqlite3.Error) as exc:
                if warn:
                    warn(f"warning: the restore entry waits to be recorded ({exc})")
        return after
    return before_commit


def reconcile(data_dir, store) -> list:
    """Append the backup (or, for a fetched replica, replica) entry of every
    catalog backup our own log lacks: an op killed between its commit and its
    audit append. Returns the entries appended."""
    from hypersdk.dht.keys import node_id
    from hypersdk.node.audit.log import AuditLog, entry_body
    from hypersdk.node.store import catalog
    out = flush(store)
    with AuditLog(data_dir) as log:
        own = log.own_author
        have = {(bytes(m), k) for m, k in log.db.execute(
            "SELECT manifest, kind FROM entries WHERE author=? AND kind IN ('backup', "
            "'replica')", (own,))}
        for b in catalog.list_backups(store):
            if b.stats.get("replica"):
                if (b.manifest_id, "replica") not in have:
                    out.append(log.append("replica", {"manifest": b.manifest_id,
                                                      "holder": node_id(own)}))
            elif (b.manifest_id, "backup") not in have:
                m = catalog.load_manifest(store, b.manifest_id)
                out.append(log.append("backup", entry_body("backup", {
                    "manifest": b.manifest_id, "name": b.name, "size": m.size,
                    "chunks": m.n_chunks, "source": m.source}, log.identity, store.key)))
            have.add((b.manifest_id, "replica" if b.stats.get("replica") else "backup"))
    return out
