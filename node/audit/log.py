"""Durable audit logs: this node's own signed log and copies of other authors' logs.

Storage: DATA/audit.sqlite (SQLite, WAL, synchronous=FULL), separate from the
chunk index because the store's index is opened read-only for restore and
verify (and must work on a full disk) while those ops still append entries,
and because foreign logs have nothing to do with chunks.

Why SQLite rather than append-only files: the log is read by (author, seq), by
manifest id (certificates) and by author prefix, it holds logs of many authors
plus fork proofs, and an append has to be serialised between two processes
(the CLI and the daemon) together with the seq assignment. SQLite gives all of
that with a commit that is atomic and durable, recovery that is tested far
beyond anything we would write for a torn file tail, and the cross-process
write lock we need. One entry row is small (~250 bytes), so a commit per entry
costs one WAL fsync, which is nothing next to the backup it records.

Crash safety of an own append (append()):
    BEGIN IMMEDIATE            -- takes SQLite's write lock: no other process
                                  can read-then-write the head until we commit
    read head (seq, id)        -- inside the lock, so seq/prev cannot race
    sign the entry in memory   -- complete signed bytes before any write
    INSERT the row; COMMIT     -- one atomic, fsynced transaction
A kill -9 before COMMIT leaves nothing (the uncommitted WAL frames are
discarded on the next open); after COMMIT the whole signed entry is there. So
no torn, half-written or unsigned entry can exist, and two appenders can never
both take seq N (PRIMARY KEY (author, seq) would refuse it anyway).

Entries of operations that commit (backup, delete, fetched replica, restore)
are owed by an intent written in the same commit as the operation and turned
into an entry exactly once, even across kill -9 (node/audit/intents.py says
how). Verify entries are appended after the check (record_after_op); a full
disk makes that append fail with a warning, and the check's result stands.
reconcile() (node/audit/intents.py) flushes pending intents and then appends the backup / replica
entry of any catalog backup our log lacks (a store written by a hypersdk from
before intents).

Own identity: the node key DATA/node.key (node/net/identity.py). If it does not
exist, the first append creates it in the format of `hypersdk node init`; the
key is linked into place with link(2), which never replaces an existing file,
so two processes racing to create it end up using the same key.

Foreign logs (add_foreign): entries are checked with protocol.audit.LogView
against what we already hold (signature, seq order, prev link). A replay is a
no-op; a gap or bad link is rejected (part 2's anti-entropy fetches missing
ranges first); two validly signed entries for one (author, seq) are kept in
`forks` as proof and the author is flagged forked.
"""
from __future__ import annotations

import os
import sqlite3
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from hypersdk.dht.keys import node_id as node_id_of
from hypersdk.node import runtime
from hypersdk.node.errors import UserError
from hypersdk.node.files import private_db, private_dir
from hypersdk.node.net.identity import Identity
from hypersdk.protocol import audit, codec
from hypersdk.protocol.errors import AuditChainBroken, ForkDetected, RemoteProtocolError

DB_NAME = "audit.sqlite"
KEY_FILE = "node.key"
SCHEMA_VERSION = 5     # 2: witnessed heads and contradicted witnesses; 3: intents;
                       # 4: member certificates (for audit certificates); 5: witnessed_by
SCHEMA = """
CREATE TABLE IF NOT EXISTS authors(
    author BLOB PRIMARY KEY, node_id BLOB NOT NULL, forked INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS entries(
    author BLOB NOT NULL, seq INTEGER NOT NULL, id BLOB NOT NULL, kind TEXT NOT NULL,
    manifest BLOB, time INTEGER NOT NULL, raw BLOB NOT NULL,
    PRIMARY KEY(author, seq)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS entries_manifest ON entries(manifest);
CREATE TABLE IF NOT EXISTS forks(
    author BLOB NOT NULL, seq INTEGER NOT NULL, id_a BLOB NOT NULL, raw_a BLOB NOT NULL,
    id_b BLOB NOT NULL, raw_b BLOB NOT NULL, found INTEGER NOT NULL,
    PRIMARY KEY(author, seq, id_b)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS members(
    node BLOB PRIMARY KEY, serial INTEGER NOT NULL, raw BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS witnessed(
    author BLOB NOT NULL, seq INTEGER NOT NULL, id BLOB NOT NULL,
    witness BLOB NOT NULL, witness_seq INTEGER NOT NULL,
    PRIMARY KEY(author, seq, witness, witness_seq)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS witnessed_by ON witnessed(witness, author);   -- our cosigns
CREATE TABLE IF NOT EXISTS contradictions(
    author BLOB NOT NULL, seq INTEGER NOT NULL, id BLOB NOT NULL,
    witness BLOB NOT NULL, witness_seq INTEGER NOT NULL, witnessed_id BLOB NOT NULL,
    found INTEGER NOT NULL,
    PRIMARY KEY(author, seq, witness, witness_seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS intents_applied(id BLOB PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS restore_intents(
    id BLOB PRIMARY KEY, body BLOB NOT NULL, out TEXT NOT NULL, tmp TEXT NOT NULL,
    dev INTEGER NOT NULL, ino INTEGER NOT NULL, mtime INTEGER NOT NULL) WITHOUT ROWID;
"""


def own_identity(data_dir) -> Identity:
    """The node key DATA/node.key, created (mode 0600, raw 32 bytes) if absent."""
    data_dir = Path(data_dir)
    key = data_dir / KEY_FILE
    if os.path.lexists(key):
        return Identity.load(key)
    private_dir(data_dir)
    ident = Identity.generate()
    tmp = data_dir / f".{KEY_FILE}.new{os.getpid()}"
    ident.save(tmp)                   # atomic, fsynced, 0600
    try:
        os.link(tmp, key)             # never replaces a key another process made
    except FileExistsError:
        ident = None
    finally:
        os.unlink(tmp)
    dfd = os.open(data_dir, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return ident or Identity.load(key)


@dataclass
class Break:
    """One problem found by verify(): the first break of a chain, or a fork."""
    author: bytes
    seq: int
    reason: str
    entry_id: bytes | None = None

    def to_json(self) -> dict:
        return {"author": self.author.hex(), "node_id": node_id_of(self.author).hex(),
                "seq": self.seq, "reason": self.reason,
                "entry_id": self.entry_id.hex() if self.entry_id else None}


@dataclass
class VerifyReport:
    author: bytes
    entries: int = 0                  # entries checked and valid (before the first break)
    head: audit.Entry | None = None
    problems: list[Break] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict:
        return {"author": self.author.hex(), "node_id": node_id_of(self.author).hex(),
                "entries_checked": self.entries, "ok": self.ok,
                "head": {"seq": self.head.seq, "id": self.head.id.hex()} if self.head else None,
                "problems": [p.to_json() for p in self.problems],
                "seconds": round(self.seconds, 3)}


def damage_in(rep: VerifyReport) -> int | None:
    """The first seq where a verify() report shows our stored copy damaged (a
    break of the chain as stored), or None: forks and witnessed rewrites are the
    author's doing, not damage of ours."""
    if any(not p.reason.startswith(("fork:", "rewritten:")) for p in rep.problems):
        return rep.entries
    return None


class NameConflict(UserError):
    """Several authors' logs name a backup `name`: which one is meant is the
    user's call (by manifest id), never the claimed times'."""

    def __init__(self, name: str, entries):
        self.entries = entries
        who = ", ".join(f"{node_id_of(e.author).hex()[:16]} (manifest "
                        f"{e.body['manifest'].hex()[:16]})" for e in entries)
        super().__init__(f"backup name {name!r} is claimed by {len(entries)} authors: {who}; "
                         "give the manifest id")


@dataclass
class AddResult:
    added: int = 0
    replays: int = 0
    forks: list[ForkDetected] = field(default_factory=list)        # new fork proofs
    rejected: list[Exception] = field(default_factory=list)        # invalid: an offence
    new: list[audit.Entry] = field(default_factory=list)           # the entries added
    gaps: dict[bytes, int] = field(default_factory=dict)           # author -> seq we lack
    future: list[Exception] = field(default_factory=list)          # too far ahead of us
    contradictions: int = 0                                         # witnesses contradicted
    repaired: int = 0           # our own copy was damaged there; the valid entry replaced it
    diverged: dict[bytes, int] = field(default_factory=dict)  # author -> a seq where it
                                # signed another entry than ours (fetch it: a fork proof)
    unplaced: list[Exception] = field(default_factory=list)  # our copy is damaged around it:
                                                             # neither stored nor blamed


class AuditLog:
    """The audit database of one data dir. One instance per thread/process."""

    def __init__(self, data_dir, *, identity: Identity | None = None):
        """data_dir None: a private in-memory log (simnet nodes, tests); then
        `identity` is required."""
        self._identity = identity
        if data_dir is None:
            if identity is None:
                raise ValueError("an in-memory AuditLog needs its identity")
            self.data_dir = None
            self.db = sqlite3.connect(":memory:", isolation_level=None,
                                      check_same_thread=False)
            self.db.executescript(f"BEGIN; {SCHEMA} PRAGMA user_version={SCHEMA_VERSION}; "
                                  "COMMIT;")
            return
        self.data_dir = private_dir(data_dir)
        self.db = sqlite3.connect(self.data_dir / DB_NAME, timeout=60,
                                  isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA synchronous=FULL")
        private_db(self.data_dir / DB_NAME)
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise UserError(f"audit log {self.data_dir / DB_NAME} has schema {version}, this "
                            f"hypersdk knows {SCHEMA_VERSION}: upgrade hypersdk")
        if version < SCHEMA_VERSION:
            # Two processes creating the db at once: switching to WAL can fail with
            # "database is locked" without waiting on the busy timeout, so creation
            # runs under a file lock and re-checks the version inside it.
            from hypersdk.node.files import flock
            with flock(self.data_dir / "audit.lock", exclusive=True):
                version = self.db.execute("PRAGMA user_version").fetchone()[0]
                if version < SCHEMA_VERSION:
                    self.db.execute("PRAGMA journal_mode=WAL")
                    # executescript runs outside Python's transaction handling: one
                    # explicit transaction makes the schema appear all at once
                    self.db.executescript(f"BEGIN IMMEDIATE; {SCHEMA}")
                    try:
                        if version == 1:          # index the witness entries we hold
                            for (raw,) in self.db.execute(
                                    "SELECT raw FROM entries WHERE kind='witness'").fetchall():
                                self._index_witness(audit.decode_entry(bytes(raw), verify=False),
                                                    0)
                        self.db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                        self.db.execute("COMMIT")
                    except BaseException:
                        self.db.execute("ROLLBACK")
                        raise

    def close(self):
        self.db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def identity(self) -> Identity:
        if self._identity is None:
            self._identity = own_identity(self.data_dir)
        return self._identity

    @property
    def own_author(self) -> bytes:
        return self.identity.public_key

    # -- writes -----------------------------------------------------------------
    def _insert(self, e: audit.Entry, now_ns: int | None = None) -> int:
        """Store one checked entry; returns how many witness contradictions it
        revealed (see _index_witness)."""
        manifest = e.body.get("manifest")
        self.db.execute("INSERT OR IGNORE INTO authors(author, node_id) VALUES (?,?)",
                        (e.author, node_id_of(e.author)))
        self.db.execute("INSERT INTO entries(author, seq, id, kind, manifest, time, raw) "
                        "VALUES (?,?,?,?,?,?,?)",
                        (e.author, e.seq, e.id, e.kind, manifest, e.time, e.raw))
        found = runtime.now_ns() if now_ns is None else now_ns
        n = 0
        # a witness that saw this (author, seq) as another entry: the log was rewritten
        for w, ws, wid in self.db.execute(
                "SELECT witness, seq, id FROM witnessed WHERE author=? AND seq=? AND id!=?",
                (e.author, e.seq, e.id)).fetchall():
            n += self._contradiction(e.author, e.seq, e.id, bytes(w), ws, bytes(wid), found)
        if e.kind == "witness":
            n += self._index_witness(e, found)
        return n

    def _index_witness(self, w: audit.Entry, found: int) -> int:
        n = 0
        for a, seq, hid in audit.witness_heads(w):
            self.db.execute("INSERT OR IGNORE INTO witnessed VALUES (?,?,?,?,?)",
                            (a, seq, hid, w.author, w.seq))
            r = self.db.execute("SELECT id FROM entries WHERE author=? AND seq=?",
                                (a, seq)).fetchone()
            if r is not None and bytes(r[0]) != hid:
                n += self._contradiction(a, seq, bytes(r[0]), w.author, w.seq, hid, found)
        return n

    def _contradiction(self, author, seq, held_id, witness, witness_seq, witnessed_id,
                       found) -> int:
        """Witness `witness` (its entry witness_seq) signed that author's entry seq
        was witnessed_id; the log we hold has held_id there: proof that the log
        was rewritten after it was witnessed (or that the witness lied, which it
        signed). Kept, and reported by verify()."""
        cur = self.db.execute("INSERT OR IGNORE INTO contradictions VALUES (?,?,?,?,?,?,?)",
                              (author, seq, held_id, witness, witness_seq, witnessed_id, found))
        return cur.rowcount

    def append(self, kind: str, body: dict, now_ns: int | None = None) -> audit.Entry:
        """Sign and durably append one entry to our own log (see the module doc)."""
        with self._immediate() as db:
            return self._append_locked(db, kind, body, now_ns)

    def _append_locked(self, db, kind: str, body: dict, now_ns: int | None) -> audit.Entry:
        ident = self.identity
        now_ns = runtime.now_ns() if now_ns is None else now_ns
        head = db.execute("SELECT seq, id, time FROM entries WHERE author=? ORDER BY seq DESC "
                          "LIMIT 1", (ident.public_key,)).fetchone()
        seq, prev = (head[0] + 1, bytes(head[1])) if head else (0, None)
        if head is not None:            # never backwards, even when our clock was set back
            now_ns = max(now_ns, head[2])
        e = audit.make_entry(ident, seq, prev, now_ns, kind, body)
        self._insert(e, now_ns)
        return e

    # -- intents (node/audit/intents.py): an operation's entry exactly once ---------
    def append_intent(self, iid: bytes, kind: str, body: dict, key=None) -> audit.Entry | None:
        """Append the entry an index intent owes and mark it applied, in one
        transaction; None when it was applied already (a flush killed before it
        deleted the intent). key: the store's data key, which seals the labels."""
        ident = self.identity                 # before the transaction: may create the key
        with self._immediate() as db:
            if db.execute("SELECT 1 FROM intents_applied WHERE id=?", (iid,)).fetchone():
                return None
            e = self._append_locked(db, kind, entry_body(kind, body, ident, key), None)
            db.execute("INSERT INTO intents_applied(id) VALUES (?)", (iid,))
        return e

    def forget_intent(self, iid: bytes) -> None:
        self.db.execute("DELETE FROM intents_applied WHERE id=?", (iid,))

    def begin_restore(self, body: dict, out: str, tmp: str, dev: int, ino: int,
                      mtime_ns: int) -> bytes:
        """Durably note, before OUT is renamed into place, the restore entry owed
        once OUT is the temporary file tmp: its inode (dev, ino), with the mtime
        its last write gave it (so a later file that reuses the inode number of
        a killed restore's removed temporary file is not taken for it)."""
        rid = uuid.uuid4().bytes
        self.identity                         # create the key now, not after the rename
        with self._immediate() as db:
            db.execute("INSERT INTO restore_intents(id, body, out, tmp, dev, ino, mtime) "
                       "VALUES (?,?,?,?,?,?,?)",
                       (rid, codec.encode(body), out, tmp, dev, ino, mtime_ns))
        return rid

    def finish_restore(self, rid: bytes) -> audit.Entry | None:
        """OUT was renamed into place: append the restore entry, exactly once."""
        with self._immediate() as db:
            row = db.execute("SELECT body FROM restore_intents WHERE id=?", (rid,)).fetchone()
            if row is None:
                return None                   # settled by another process already
            db.execute("DELETE FROM restore_intents WHERE id=?", (rid,))
            return self._append_locked(db, "restore", codec.decode(bytes(row[0])), None)

    def abandon_restore(self, rid: bytes) -> None:
        """The rename did not happen: no restore to record."""
        self.db.execute("DELETE FROM restore_intents WHERE id=?", (rid,))

    def settle_restores(self) -> list[audit.Entry]:
        """Restore intents left by killed processes: OUT is the temporary file's
        inode -> the rename happened, append the entry; neither OUT nor the
        temporary file is that inode -> it can no longer happen, drop the intent;
        the temporary file still exists -> a restore may still be running (or a
        stale partial awaits cleanup): keep it."""
        out = []
        for rid, path, tmp, *ident in self.db.execute(
                "SELECT id, out, tmp, dev, ino, mtime FROM restore_intents").fetchall():
            rid = bytes(rid)
            if _is_file(path, *ident):
                e = self.finish_restore(rid)
                if e is not None:
                    out.append(e)
            elif not _is_file(tmp, *ident):
                self.abandon_restore(rid)
        return out

    @contextmanager
    def _immediate(self):
        """A BEGIN IMMEDIATE transaction (SQLite's write lock at once: see the module
        doc), committed on exit, rolled back on any exception."""
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def witness(self, now_ns: int | None = None, refresh_ns: int | None = None
                ) -> audit.Entry | None:
        """Append a witness entry naming heads of other authors' logs that we hold
        and have not witnessed at that seq yet, and (refresh_ns given) heads whose
        last cosign by us (the time of our newest witness entry naming the author)
        is refresh_ns old or older; at most MAX_WITNESS_HEADS, or None when there
        are none. refresh_ns=0: every head (protocol/audit.py's refresh). Fair,
        not by claimed time: the authors we witnessed longest ago (or never) come
        first, so authors flooding entries or dated ahead cannot crowd anybody out
        of the witness entries for longer than one round. The gossip
        (node/audit/gossip.py) calls this at its witness ticks."""
        now_ns = runtime.now_ns() if now_ns is None else now_ns
        cutoff = -1 if refresh_ns is None else now_ns - refresh_ns
        rows = self._cosign_candidates(
            "w.seen IS NULL OR w.seen < e.seq OR o.time <= ?", (cutoff,),
            audit.MAX_WITNESS_HEADS)
        if not rows:
            return None
        heads = sorted([bytes(a), s, bytes(i)] for a, s, i in rows)
        return self.append("witness", {"heads": heads}, now_ns)

    def cosign_due(self, now_ns: int, refresh_ns: int) -> bool:
        """Is the head of some other author's log not cosigned by us in the last
        refresh_ns (or never)?"""
        return bool(self._cosign_candidates("o.time IS NULL OR o.time <= ?",
                                            (now_ns - refresh_ns,), 1))

    def _cosign_candidates(self, where: str, args: tuple, limit: int) -> list:
        """(author, seq, id) of the other authors' heads matching `where`, least
        recently witnessed by us first. In `where`: e = the head, w.seen / w.last =
        the highest seq of it / our highest witness seq that our witness entries
        named, o = our newest witness entry naming the author (o.time)."""
        own = self.own_author
        return self.db.execute(
            "SELECT e.author, e.seq, e.id FROM entries e JOIN (SELECT author, MAX(seq) m "
            "FROM entries WHERE author != ? GROUP BY author) h ON e.author=h.author AND "
            "e.seq=h.m LEFT JOIN (SELECT author, MAX(witness_seq) last, MAX(seq) seen FROM "
            "witnessed WHERE witness=? GROUP BY author) w ON w.author=e.author "
            "LEFT JOIN entries o ON o.author=? AND o.seq=w.last "
            f"WHERE {where} ORDER BY COALESCE(w.last, -1), e.author LIMIT ?",
            (own, own, own, *args, limit)).fetchall()

    def add_foreign(self, entries, *, now_ns: int | None = None,
                    max_skew: int = audit.DEFAULT_MAX_SKEW_NS) -> AddResult:
        """Check and store entries of other authors (any order within an author
        is fine: they are applied by seq). Never raises for bad entries: they are
        reported in the result (rejected / forks / gaps: where our copy of an
        author's log ends when an entry could not be attached)."""
        now_ns = runtime.now_ns() if now_ns is None else now_ns
        res = AddResult()
        by_author: dict[bytes, list[audit.Entry]] = {}
        for e in entries:
            if not isinstance(e, audit.Entry):
                try:
                    e = audit.decode_entry(e, verify=False)
                except RemoteProtocolError as exc:
                    res.rejected.append(exc)
                    continue
            by_author.setdefault(e.author, []).append(e)
        for author, es in by_author.items():
            es.sort(key=lambda x: x.seq)
            with self._immediate():
                view = self._view(author, max_skew)
                for e in es:
                    if e.seq > view.next_seq:
                        res.gaps[author] = view.next_seq     # not an offence: ask for it
                        break
                    try:
                        if view.append(e, now=now_ns):
                            res.contradictions += self._insert(e, now_ns)
                            res.added += 1
                            res.new.append(e)
                        else:
                            res.replays += 1
                    except audit.HeldEntryMissing:
                        self._repair(e, view, res)        # a hole in our copy
                    except ForkDetected as fork:
                        # re-verify what we hold before blaming the author: an altered
                        # row of ours is local damage, which the valid entry repairs
                        if not self._held_valid(fork.first, author, e.seq):
                            self._repair(e, view, res)
                        elif self._record_fork(fork, now_ns):
                            res.forks.append(fork)
                    except audit.FutureEntry as exc:
                        res.future.append(exc)
                        break
                    except audit.LinkBroken:
                        # validly signed, but its prev is not our entry seq - 1: the
                        # author signed two histories (whoever relays it is no liar)
                        if self._held_valid(view.entry_at(e.seq - 1), author, e.seq - 1):
                            res.diverged[author] = e.seq - 1
                        else:                     # our entry seq - 1 is damaged
                            res.unplaced.append(AuditChainBroken(
                                author, e.seq, "our copy is damaged before this entry",
                                entry_id=e.id))
                        break
                    except (AuditChainBroken, RemoteProtocolError) as exc:
                        res.rejected.append(exc)
                        break         # later entries of this author cannot link either
        return res

    def _held_valid(self, held: audit.Entry | None, author: bytes, seq: int) -> bool:
        """Is our stored entry at (author, seq) intact: present, decoding, signed by
        the author, for that seq, and its row's id its own?"""
        if held is None:
            return False
        row = self.db.execute("SELECT id, raw FROM entries WHERE author=? AND seq=?",
                              (author, seq)).fetchone()
        if row is None:
            return False
        try:
            e = audit.decode_entry(bytes(row[1]), verify=True)
        except RemoteProtocolError:
            return False
        return e.author == author and e.seq == seq and e.id == bytes(row[0])

    def _repair(self, e: audit.Entry, view: audit.LogView, res: AddResult) -> None:
        """Put the valid entry e (signature checked) where our copy is damaged, if it
        links with the intact neighbours we hold; else leave it (no blame: the damage
        is ours, anti-entropy's repair pulls the range again, node/audit/gossip.py)."""
        before = view.id_at(e.seq - 1) if e.seq else None
        after = self.entry(e.author, e.seq + 1)
        if (e.seq and (before is None or e.prev != before)) or \
                (after is not None and after.prev != e.id):
            res.unplaced.append(AuditChainBroken(e.author, e.seq, "our copy is damaged here "
                                                 "and the entry does not link with what we hold",
                                                 entry_id=e.id))
            return
        self.db.execute("DELETE FROM entries WHERE author=? AND seq=?", (e.author, e.seq))
        self._insert(e)
        res.repaired += 1

    def keep_member_certs(self, raws) -> int:
        """Keep member certificates (raw, already checked against our network by the
        caller: node/net/gate.py) of authors, the newest serial per node, so that
        `audit certificate` can put the author's and witnesses' in a certificate."""
        from hypersdk.protocol import membership as ms
        n = 0
        with self._immediate() as db:
            for raw in raws:
                c = ms.decode_certificate(raw)
                cur = db.execute("INSERT INTO members VALUES (?,?,?) ON CONFLICT(node) DO "
                                 "UPDATE SET serial=excluded.serial, raw=excluded.raw WHERE "
                                 "excluded.serial > members.serial", (c.node, c.serial, c.raw))
                n += cur.rowcount
        return n

    def member_certs(self, keys) -> list[bytes]:
        return [bytes(r[0]) for k in keys for r in self.db.execute(
            "SELECT raw FROM members WHERE node=?", (k,))]

    def damaged(self, authors=None) -> dict[bytes, int]:
        """author -> the first seq where our stored copy of its log is damaged (a
        missing row, an entry that does not decode, verify or link): where a repair
        starts (node/audit/gossip.py pulls from there). Our own log is not listed.
        authors: only these (default: every author held)."""
        own, out = self.own_author_if_any(), {}
        if authors is None:
            authors = [a for a, _, _ in self.authors()]
        for author in authors:
            if author == own:
                continue
            first = damage_in(self.verify(author))
            if first is not None:
                out[author] = first
        return out

    def own_author_if_any(self) -> bytes | None:
        if self._identity is not None:
            return self._identity.public_key
        if self.data_dir is not None and os.path.lexists(self.data_dir / KEY_FILE):
            return self.own_author
        return None

    def _view(self, author: bytes, max_skew: int) -> audit.LogView:
        """A LogView positioned at our stored head of author (trusted: verify()
        is what re-checks stored entries). The ids of earlier entries are read
        from the database only when needed (a replay or a fork)."""
        view = audit.LogView(author, lookup=lambda s: self.entry(author, s), max_skew=max_skew)
        head = self.db.execute("SELECT seq, raw FROM entries WHERE author=? ORDER BY seq "
                               "DESC LIMIT 1", (author,)).fetchone()
        if head:
            view._ids = _StoredIds(self.db, author, head[0] + 1)
            view.head = audit.decode_entry(bytes(head[1]), verify=False)
        return view

    def add_fork_proof(self, first, second, *, now_ns: int | None = None) -> ForkDetected | None:
        """Check a fork proof (two validly signed entries of one author and seq
        with different ids) and keep it; the author is flagged forked. Returns
        the fork if it is new here, None if already held. InvalidEntry if the
        entries do not prove a fork."""
        a, b = audit.decode_entry(first), audit.decode_entry(second)
        if a.author != b.author or a.seq != b.seq or a.id == b.id:
            raise audit.InvalidEntry("a fork proof needs two different entries of one author "
                                     "and seq")
        now_ns = runtime.now_ns() if now_ns is None else now_ns
        with self._immediate() as db:
            held = db.execute("SELECT 1 FROM forks WHERE author=? AND seq=? AND ((id_a=? AND "
                              "id_b=?) OR (id_a=? AND id_b=?))",
                              (a.author, a.seq, a.id, b.id, b.id, a.id)).fetchone()
            fork = None if held else ForkDetected(a, b)
            if fork is not None:
                self._record_fork(fork, now_ns)
        return fork

    def _record_fork(self, fork: ForkDetected, now_ns: int) -> bool:
        """Keep a fork proof; True if it is new."""
        a, b = fork.first, fork.second
        cur = self.db.execute("INSERT OR IGNORE INTO forks VALUES (?,?,?,?,?,?,?)",
                              (a.author, a.seq, a.id, a.raw, b.id, b.raw, now_ns))
        self.db.execute("INSERT OR IGNORE INTO authors(author, node_id) VALUES (?,?)",
                        (a.author, node_id_of(a.author)))
        self.db.execute("UPDATE authors SET forked=1 WHERE author=?", (a.author,))
        return cur.rowcount > 0

    # -- reads ------------------------------------------------------------------
    def authors(self) -> list[tuple[bytes, bytes, bool]]:
        """(public key, node id, forked) of every author we hold entries of."""
        return [(bytes(a), bytes(n), bool(f)) for a, n, f in self.db.execute(
            "SELECT author, node_id, forked FROM authors ORDER BY node_id")]

    def find_author(self, prefix: str) -> bytes:
        """The author whose node id (or public key) hex starts with prefix."""
        p = prefix.lower()
        hits = [a for a, n, _ in self.authors() if n.hex().startswith(p) or a.hex().startswith(p)]
        if not hits and not os.path.lexists(self.data_dir / KEY_FILE):
            raise UserError(f"no audit log of an author {prefix!r} (this node has no log yet)")
        if not hits:
            own = self.own_author
            if node_id_of(own).hex().startswith(p) or own.hex().startswith(p):
                return own
            raise UserError(f"no audit log of an author {prefix!r}")
        if len(hits) > 1:
            raise UserError(f"author prefix {prefix!r} is ambiguous ({len(hits)} authors)")
        return hits[0]

    def heads(self) -> dict[bytes, tuple[int, bytes]]:
        """author -> (seq, id) of the last entry we hold."""
        return {bytes(a): (s, bytes(i)) for a, s, i in self.db.execute(
            "SELECT e.author, e.seq, e.id FROM entries e JOIN (SELECT author, MAX(seq) m "
            "FROM entries GROUP BY author) h ON e.author=h.author AND e.seq=h.m")}

    def head_seq(self, author: bytes) -> int | None:
        r = self.db.execute("SELECT MAX(seq) FROM entries WHERE author=?", (author,)).fetchone()
        return r[0]

    def head(self, author: bytes) -> audit.Entry | None:
        r = self.db.execute("SELECT raw FROM entries WHERE author=? ORDER BY seq DESC LIMIT 1",
                            (author,)).fetchone()
        return audit.decode_entry(bytes(r[0])) if r else None

    def entry(self, author: bytes, seq: int) -> audit.Entry | None:
        r = self.db.execute("SELECT raw FROM entries WHERE author=? AND seq=?",
                            (author, seq)).fetchone()
        return audit.decode_entry(bytes(r[0]), verify=False) if r else None

    def raw_rows(self, author: bytes, from_seq: int = 0, to_seq: int | None = None):
        """(seq, stored id, raw) rows in seq order, unchecked."""
        to_seq = audit.MAX_SEQ if to_seq is None else to_seq
        return self.db.execute("SELECT seq, id, raw FROM entries WHERE author=? AND seq>=? "
                               "AND seq<=? ORDER BY seq", (author, from_seq, to_seq))

    def entries(self, author: bytes, from_seq: int = 0, to_seq: int | None = None,
                *, verify: bool = True):
        """The stored entries of author in [from_seq, to_seq], decoded (and their
        signatures checked unless verify=False); InvalidEntry if one is damaged."""
        for _, _, raw in self.raw_rows(author, from_seq, to_seq):
            yield audit.decode_entry(bytes(raw), verify=verify)

    def forks(self, author: bytes | None = None) -> list[ForkDetected]:
        q = "SELECT raw_a, raw_b FROM forks" + (" WHERE author=?" if author else "") + \
            " ORDER BY author, seq"
        return [ForkDetected(audit.decode_entry(bytes(a), verify=False),
                             audit.decode_entry(bytes(b), verify=False))
                for a, b in self.db.execute(q, (author,) if author else ())]

    def find_backup_entries(self, manifest_id: bytes) -> list[audit.Entry]:
        """Every backup entry of the manifest, by author then seq (never ordered by
        the time an author claims: callers report several authors as a conflict)."""
        return [audit.decode_entry(bytes(r[0])) for r in self.db.execute(
            "SELECT raw FROM entries WHERE manifest=? AND kind='backup' ORDER BY author, seq",
            (manifest_id,))]

    def witnesses_of(self, author: bytes, min_seq: int) -> list[audit.Entry]:
        """Witness entries by other authors naming a head of author at seq >= min_seq."""
        out = []
        for w, ws in self.db.execute(
                "SELECT DISTINCT witness, witness_seq FROM witnessed WHERE author=? AND seq>=? "
                "AND witness!=? ORDER BY witness, witness_seq", (author, min_seq, author)
                ).fetchall():
            e = self.entry(bytes(w), ws)
            if e is not None:
                out.append(audit.decode_entry(e.raw))
        return out

    def newest_cosigns(self, author: bytes, ids: dict[int, bytes],
                       limit: int = audit.MAX_CERT_WITNESSES) -> list[audit.Entry]:
        """For a certificate of author's chain `ids` (seq -> id, from the backup
        entry to the head): per other author, its newest witness entry that attests
        the chain (it names a seq of the chain with the chain's id there, and no head
        of author past the chain or contradicting it); newest = naming the highest
        seq, then dated latest. Newest first, at most `limit` distinct witnesses."""
        lo, hi = min(ids), max(ids)
        best: dict[bytes, tuple] = {}
        for w, ws, s, t in self.db.execute(
                "SELECT w.witness, w.witness_seq, w.seq, o.time FROM witnessed w JOIN entries o "
                "ON o.author=w.witness AND o.seq=w.witness_seq WHERE w.author=? AND w.seq>=? "
                "AND w.seq<=? AND w.witness!=? ORDER BY w.witness, w.seq DESC, o.time DESC, "
                "w.witness_seq DESC", (author, lo, hi, author)):
            w = bytes(w)
            if w in best:
                continue
            e = self.entry(w, ws)
            if e is None:
                continue
            if all(s2 <= hi and ids.get(s2, h) == h
                   for a, s2, h in audit.witness_heads(e) if a == author):
                best[w] = (s, t, w, audit.decode_entry(e.raw))
        return [x[3] for x in sorted(best.values(), key=lambda x: x[:3], reverse=True)[:limit]]

    def contradictions(self, author: bytes | None = None) -> list[dict]:
        """Witnesses contradicted by the log we hold (see _contradiction)."""
        q = ("SELECT author, seq, id, witness, witness_seq, witnessed_id FROM contradictions"
             + (" WHERE author=?" if author else "") + " ORDER BY author, seq")
        return [{"author": bytes(a), "seq": s, "held_id": bytes(i), "witness": bytes(w),
                 "witness_seq": ws, "witnessed_id": bytes(wi)}
                for a, s, i, w, ws, wi in self.db.execute(q, (author,) if author else ())]

    def raw_range(self, author: bytes, start: int, count: int,
                  max_bytes: int | None = None) -> list[bytes]:
        """Signed entries of author from seq start: at most count, and at most
        max_bytes in all (at least one entry if any)."""
        out, total = [], 0
        for (raw,) in self.db.execute("SELECT raw FROM entries WHERE author=? AND seq>=? "
                                      "ORDER BY seq LIMIT ?", (author, start, count)):
            raw = bytes(raw)
            if out and max_bytes is not None and total + len(raw) > max_bytes:
                break
            out.append(raw)
            total += len(raw)
        return out

    def find_backup_by_name(self, name: str, key=None, *, version: int | None = None
                            ) -> bytes | None:
        """The manifest of the latest (highest seq) backup entry named `name` in the
        one log that uses the name, or of its `version`-th (NAME@N: an author's
        catalog numbers versions in creation order). NameConflict when several
        authors use it: a name is never resolved by the time an author claims.
        Sealed names count only when `key` (a DataKey) opens them."""
        latest: dict[bytes, audit.Entry] = {}
        nth: dict[bytes, int] = {}
        for (raw,) in self.db.execute("SELECT raw FROM entries WHERE kind='backup' ORDER BY "
                                      "author, seq"):
            e = audit.decode_entry(bytes(raw), verify=False)
            body = audit.open_body(e.body, key)
            if body is not None and body["name"] == name:
                nth[e.author] = nth.get(e.author, 0) + 1
                if version is None or nth[e.author] == version:
                    latest[e.author] = e
        if len(latest) > 1:
            raise NameConflict(name, sorted(latest.values(), key=lambda x: x.author))
        return next(iter(latest.values())).body["manifest"] if latest else None

    def sealed_names(self, key=None) -> int:
        """How many backup entries held here have names `key` does not open."""
        return sum(audit.open_body(audit.decode_entry(bytes(raw), verify=False).body, key) is None
                   for (raw,) in self.db.execute("SELECT raw FROM entries WHERE kind='backup'"))

    def sole_author(self, manifest_id: bytes) -> bytes | None:
        """The key of the one author whose backup entry names the manifest; None when
        no log held here has one, or several authors claim it."""
        authors = {bytes(a) for (a,) in self.db.execute(
            "SELECT DISTINCT author FROM entries WHERE manifest=? AND kind='backup' LIMIT 2",
            (manifest_id,))}
        return authors.pop() if len(authors) == 1 else None

    def replica_holders(self, manifest_id: bytes) -> list[bytes]:
        """Node ids that replica entries (in any log held) name as holders."""
        out = set()
        for (raw,) in self.db.execute("SELECT raw FROM entries WHERE manifest=? AND "
                                      "kind='replica'", (manifest_id,)):
            out.add(audit.decode_entry(bytes(raw), verify=False).body["holder"])
        return sorted(out)

    def has_news(self, author: bytes, after_seq: int) -> bool:
        """Does author's log hold an entry after after_seq that is not a witness?"""
        return self.db.execute("SELECT 1 FROM entries WHERE author=? AND seq>? AND "
                               "kind!='witness' LIMIT 1", (author, after_seq)).fetchone() is not None

    def fork_authors(self) -> set[bytes]:
        return {bytes(a) for (a,) in self.db.execute("SELECT author FROM authors WHERE forked")}

    # -- verification -------------------------------------------------------------
    def verify(self, author: bytes) -> VerifyReport:
        """Re-check every stored entry of author: decoding, signature, the stored
        id and seq columns, seq order and links. Reports the first break of the
        chain, then every recorded fork of that author."""
        t0 = time.perf_counter()
        rep = VerifyReport(author)
        view = audit.LogView(author, lookup=lambda s: self.entry(author, s),
                             max_skew=audit.MAX_TIME)
        for seq, sid, raw in self.raw_rows(author):
            try:
                e = audit.decode_entry(bytes(raw), verify=False)
            except RemoteProtocolError as exc:
                rep.problems.append(Break(author, seq, f"entry does not decode: {exc}"))
                break
            if e.seq != seq:
                rep.problems.append(Break(author, seq, f"row for seq {seq} holds entry "
                                                      f"{e.seq}", e.id))
                break
            if bytes(sid) != e.id:
                rep.problems.append(Break(author, seq, "stored id does not match the entry "
                                          "(the entry bytes were changed)", e.id))
                break
            try:
                view.append(e)
            except (AuditChainBroken, ForkDetected) as exc:
                rep.problems.append(Break(author, seq, getattr(exc, "reason", str(exc)), e.id))
                break
            rep.entries += 1
            rep.head = e
        for f in self.forks(author):
            rep.problems.append(Break(author, f.seq, f"fork: two signed entries "
                                      f"{f.first.id.hex()[:16]} and {f.second.id.hex()[:16]}",
                                      f.second.id))
        for c in self.contradictions(author):
            rep.problems.append(Break(
                author, c["seq"], f"rewritten: witness {node_id_of(c['witness']).hex()[:16]} "
                f"(its entry {c['witness_seq']}) signed that entry {c['seq']} was "
                f"{c['witnessed_id'].hex()[:16]}, the log holds {c['held_id'].hex()[:16]}",
                c["held_id"]))
        rep.seconds = time.perf_counter() - t0
        return rep


class _StoredIds:
    """The ids of an author's stored entries 0..n-1 as a LogView wants them
    (len, [i], [-1], append), read from the database on demand: checking one
    new entry against a long log costs a query, not a scan of the log."""

    def __init__(self, db, author: bytes, n: int):
        self.db, self.author, self.n = db, author, n
        self.extra: list[bytes] = []

    def __len__(self):
        return self.n + len(self.extra)

    def __getitem__(self, i: int) -> bytes:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        if i >= self.n:
            return self.extra[i - self.n]
        row = self.db.execute("SELECT id FROM entries WHERE author=? AND seq=?",
                              (self.author, i)).fetchone()
        return None if row is None else bytes(row[0])    # None: a hole in our copy

    def append(self, i: bytes) -> None:
        self.extra.append(i)


def _is_file(path: str, dev: int, ino: int, mtime_ns: int) -> bool:
    if not path:
        return False
    try:
        st = os.stat(path)
    except OSError:
        return False
    return (st.st_dev, st.st_ino, st.st_mtime_ns) == (dev, ino, mtime_ns)


def entry_body(kind: str, body: dict, ident: Identity, key=None) -> dict:
    """An operation's body as its entry needs it: bounded source; our node id as the
    holder of a replica we fetched; with a data key (`key`), the labels of a backup
    or delete sealed (protocol/labels.py: a member without the key learns no name
    or source from our log)."""
    if kind == "backup":
        body = dict(body, source=bounded_source(body.get("source", {})),
                    name=body["name"][:audit.MAX_NAME])
    if kind == "replica" and body.get("holder") is None:
        return dict(body, holder=ident.node_id)
    if key is not None:
        body = audit.seal_body(key, kind, body)
    return body


# -- hooks for the store ops ---------------------------------------------------------
def record(data_dir, kind: str, body: dict, now_ns: int | None = None) -> audit.Entry:
    """Append one entry to the node's own log in data_dir."""
    with AuditLog(data_dir) as log:
        return log.append(kind, body, now_ns)


def bounded_source(source: dict) -> dict:
    """A manifest's source metadata cut to the bounds of a backup entry."""
    out = {}
    for k, v in sorted(source.items())[:audit.MAX_MAP]:
        k = k[:64]
        if isinstance(v, bool) or not isinstance(v, (int, str)):
            v = str(v)
        if isinstance(v, str):
            v = v[:audit.MAX_TEXT]
        elif not -audit.MAX_SEQ <= v <= audit.MAX_SEQ:
            v = str(v)[:audit.MAX_TEXT]
        out[k] = v
    return out


def record_after_op(data_dir, kind: str, body: dict, warn=None) -> audit.Entry | None:
    """The verify op's hook: append an entry once the check is done (operations
    that commit owe theirs through intents instead: node/audit/intents.py). The
    check's result stands even if the append fails (e.g. a full disk); then
    `warn` gets one line and None is returned."""
    try:
        if kind == "verify" and body.get("holder") is None:
            body = dict(body, holder=own_identity(data_dir).node_id)
        return record(data_dir, kind, body)
    except (OSError, sqlite3.Error, UserError) as exc:
        if warn:
            warn(f"warning: the {kind} was not recorded in the audit log: {exc}")
        return None
