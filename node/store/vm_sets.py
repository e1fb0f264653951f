"""VM backup sets: one backup of a whole VM (every disk plus its configuration).

A set NAME@N records, in the store's index database, the VM's configuration and
for each disk the disk's own backup (an ordinary backup named NAME/LABEL, so
restore, verify, replication, certificates and gc treat it as any image backup),
the CBT changeId of the snapshot it was read from and how it was read. The set
row and its disks' backup rows are written in one transaction: a VM backup is
recorded whole or not at all.

Set names share the backup namespace: a name is either a VM's or an image's.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from hypersdk.node.errors import UsageError, UserError

TABLE = """
CREATE TABLE IF NOT EXISTS vm_sets(
    name TEXT NOT NULL, version INTEGER NOT NULL, created INTEGER NOT NULL,
    doc TEXT NOT NULL, PRIMARY KEY(name, version));
"""


@dataclass(frozen=True)
class VmSet:
    name: str
    version: int
    created: int
    doc: dict                   # {"vm": config, "source": url, "disks": [...]}

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def disk(self, key: int) -> dict | None:
        return next((d for d in self.doc["disks"] if d["key"] == key), None)

    def to_json(self) -> dict:
        return {"name": self.name, "version": self.version, "ref": self.ref, "kind": "vm",
                "created_ns": self.created, "vm": self.doc["vm"]["name"],
                "source": self.doc["source"],
                "size": sum(d["capacity"] for d in self.doc["disks"]),
                "disks": [{k: d[k] for k in ("label", "ref", "capacity", "change_id", "mode",
                                             "manifest")} for d in self.doc["disks"]]}


def _row(r) -> VmSet:
    return VmSet(r[0], r[1], r[2], json.loads(r[3]))


def ensure(db) -> None:
    db.executescript(TABLE)


def next_version(db, name: str) -> int:
    (last,) = db.execute("SELECT COALESCE(MAX(version), 0) FROM vm_sets WHERE name=?",
                         (name,)).fetchone()
    return last + 1


def add(db, name: str, version: int, created: int, doc: dict) -> None:
    db.execute("INSERT INTO vm_sets(name, version, created, doc) VALUES (?,?,?,?)",
               (name, version, created, json.dumps(doc, sort_keys=True)))


def latest(db, name: str) -> VmSet | None:
    r = db.execute("SELECT name, version, created, doc FROM vm_sets WHERE name=? ORDER BY "
                   "version DESC LIMIT 1", (name,)).fetchone()
    return _row(r) if r else None


def list_sets(db) -> list[VmSet]:
    return [_row(r) for r in db.execute(
        "SELECT name, version, created, doc FROM vm_sets ORDER BY name, version")]


def is_image_name(db, name: str) -> bool:
    return db.execute("SELECT 1 FROM backups WHERE name=? LIMIT 1", (name,)).fetchone() \
        is not None


def resolve(db, ref: str) -> VmSet | None:
    """The set REF (NAME or NAME@N) names, None when NAME is no VM's; UserError for
    a version that does not exist."""
    name, _, ver = ref.rpartition("@") if "@" in ref else (ref, "", "")
    if not db.execute("SELECT 1 FROM vm_sets WHERE name=? LIMIT 1", (name,)).fetchone():
        return None
    if not ver:
        return latest(db, name)
    if not ver.isdigit() or int(ver) < 1:
        raise UsageError(f"bad REF {ref!r}: the version after @ must be a number >= 1")
    r = db.execute("SELECT name, version, created, doc FROM vm_sets WHERE name=? AND "
                   "version=?", (name, int(ver))).fetchone()
    if r is None:
        have = [v for (v,) in db.execute("SELECT version FROM vm_sets WHERE name=? ORDER BY "
                                         "version", (name,))]
        raise UserError(f"no VM backup {ref!r} (versions: {', '.join(map(str, have))})")
    return _row(r)
