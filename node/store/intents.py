"""Audit intents, the store's half: the entries operations owe, kept in the index.

An operation that commits (a backup, a delete, a fetched replica) calls add()
in its own transaction; node/audit/intents.py turns pending intents into
signed audit entries exactly once (its docstring says how). Kept here because
the table is part of the store's schema and the store must not import the
audit layer above it.
"""
from __future__ import annotations

import sqlite3
import uuid

from hypersdk.protocol import codec

TABLE = """
CREATE TABLE IF NOT EXISTS audit_intents(
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id BLOB NOT NULL UNIQUE,
    kind TEXT NOT NULL, body BLOB NOT NULL);
"""


def add(conn, kind: str, body: dict) -> bytes:
    """Record that the caller's transaction owes an audit entry; returns its id."""
    iid = uuid.uuid4().bytes
    conn.execute("INSERT INTO audit_intents(id, kind, body) VALUES (?,?,?)",
                 (iid, kind, codec.encode(body)))
    return iid


def pending(store) -> list[tuple[bytes, str, dict]]:
    """The intents not yet applied, in commit order."""
    try:
        rows = store.db.execute("SELECT id, kind, body FROM audit_intents ORDER BY seq")
        return [(bytes(i), k, codec.decode(bytes(b))) for i, k, b in rows.fetchall()]
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):       # a store from before intents, opened read-only
            return []
        raise


def done(store, iid: bytes) -> None:
    """The intent's entry is in the audit log: forget the intent."""
    db = store.db
    with db:
        db.execute("DELETE FROM audit_intents WHERE id=?", (iid,))
