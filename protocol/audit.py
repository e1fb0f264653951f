"""Signed, hash-chained audit entries and the sans-I/O chain checker.

Goals: any peer can check what a node says it did (backups, replicas,
verifications, restores, deletions, witnessed heads of other logs) without
trusting that node; a rewrite of history is either a broken chain (detected at
the precise entry) or two validly signed entries for one (author, seq): a fork,
kept as proof. Non-goals here: storage, gossip, clocks (time is an argument).

Encoding (all canonical msgpack, protocol/codec.py):

    payload = encode({"v": 1, "author": <32-byte Ed25519 public key>,
                      "seq": <int >= 0>, "prev": <32-byte entry id> | None,
                      "time": <ns since the Unix epoch, int>, "kind": <str>,
                      "body": <map, schema per kind>})
    signed  = encode({"entry": payload, "sig": Ed25519(author, SIG_DOMAIN + payload)})
    id      = BLAKE3-256(signed)

What is signed: exactly the bytes SIG_DOMAIN || payload (the domain string keeps
an audit signature from ever being valid for another purpose of the same key).
What is hashed: exactly the full signed encoding, signature included, so the id
names one byte string and `prev` commits to the previous entry's signature too.
The payload travels as a msgpack bin inside `signed`, so verifying never
re-encodes anything: decode the outer map, verify the signature over the bytes
as received, decode the payload (codec.decode already insists the bytes are
canonical, so one entry has exactly one encoding and one id).

seq 0 has prev None; every later entry has prev = id of the author's entry at
seq - 1. Two different entries with the same author and seq are a fork.

Rules of LogView (the chain checker for one author):
  - an entry by another author, a bad signature, a seq gap, or a prev that does
    not name the previous entry: AuditChainBroken (position = seq, reason);
  - the same entry again (same id): a no-op (replays are harmless);
  - a different, validly signed entry at a seq already held: ForkDetected,
    carrying both entries;
  - an entry whose time is more than max_skew ahead of `now`: FutureEntry
    (not stored; it may be accepted later).

Cosigning (witness entries; node/audit/gossip.py runs it, AuditLog.witness picks
the heads). An entry its author never publishes is undetectable except through
witnesses, and an old certificate looks like a fresh one unless someone vouches
for the log after it. So, as Certificate Transparency witnesses do, every node
cosigns the heads of the other logs it holds at a regular interval:
  - news: when some log gained an entry other than a witness entry, the node
    appends, at its next tick (every WITNESS_INTERVAL_S, jittered 0.75-1.25x), a
    witness entry naming the changed heads (and heads due for a refresh);
  - refresh: when the node's last cosign of some head is older than
    COSIGN_REFRESH_S, it appends, at most once per COSIGN_REFRESH_S, a witness
    entry naming every head it holds (an unchanged head too), so all its cosigns
    stay in step and fall due together.
Every witness entry names at most MAX_WITNESS_HEADS heads, least recently
cosigned first (never by the time an author claims: authors flooding entries or
dating them ahead cannot crowd others out). A log that only grew by witness
entries is no news (witnesses of witnesses would never end); it is cosigned at
the refresh. So with up to 65 nodes, every node cosigns every head at least every
COSIGN_INTERVAL_S (the refresh, plus up to 1.25 ticks, plus gossip), and the
newest cosign a certificate can carry is younger than that while the log is
live; a certificate whose as_of is older says so (CertificateReport.stale).
In larger networks a node cosigns 64 heads per refresh in turn, so each head
still gets ~64 cosigns per refresh, from distinct nodes.

Cost of the refresh, and why 1 h: an idle node appends at most one witness entry
per hour; a 64-head entry is ~4.9 KB (a 19-head one ~1.6 KB). Every node holds
every log, so with 1,000 nodes each node stores ~1,000 x 4.9 KB = 4.9 MB/h
(~120 MB/day) and, the push path delivering ~5 copies of an entry (BENCHMARKS.md),
receives ~25 MB/h (~7 KB/s); with 65 nodes, 0.3 MB/h; with 20 nodes, 32 KB/h.
News witnessing already costs up to six times the 1,000-node figure in a busy
network (one entry per 10 min), so the refresh adds at most a sixth of it, and
an hour is the freshness a certificate checker can then rely on. A network far
beyond 1,000 nodes would lengthen the refresh (AuditGossip's cosign_refresh).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import blake3
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from . import codec, labels
from . import membership as ms
from .errors import (
    AuditChainBroken,
    ForkDetected,
    IntegrityError,
    LocalProtocolError,
    RemoteProtocolError,
)
from .sealing import SealError

VERSION = 1
SIG_DOMAIN = b"hypersdk/audit-entry/v1\x00"
KEY_LEN = 32
ID_LEN = 32
SIG_LEN = 64
MAX_ENTRY = 16 << 10            # bytes of one signed entry
MAX_PAYLOAD = MAX_ENTRY - 96    # room for the signature and the outer map
MAX_NAME = 255
MAX_TEXT = 1024                 # any other string in a body
MAX_MAP = 32                    # entries of a source / summary map
MAX_WITNESS_HEADS = 64          # heads per witness entry (~4.9 KB)
WITNESS_INTERVAL_S = 600        # a node's witness ticks (jittered 0.75-1.25x): news is cosigned
COSIGN_REFRESH_S = 3600         # an unchanged head is cosigned again once its cosign is this old
# the newest cosign of a live log (<= 65 nodes) is younger than this: the refresh,
# the next tick (<= 1.25 intervals) and gossip; an older certificate says so
COSIGN_INTERVAL_S = COSIGN_REFRESH_S + 2 * WITNESS_INTERVAL_S
MAX_SEQ = (1 << 63) - 1
MAX_TIME = (1 << 63) - 1
DEFAULT_MAX_SKEW_NS = 10 * 60 * 10**9   # entries may be 10 minutes ahead of our clock

VERIFY_RESULTS = ("ok", "damaged", "missing", "unreachable", "failed")
_ENTRY_KEYS = frozenset({"v", "author", "seq", "prev", "time", "kind", "body"})


class InvalidEntry(RemoteProtocolError):
    """An audit entry that does not decode or does not validate."""


class BadSignature(InvalidEntry):
    """The entry's signature does not verify under its author's key."""


class FutureEntry(InvalidEntry):
    """The entry is dated further ahead of our clock than the allowed skew."""

    def __init__(self, entry: "Entry", now: int, max_skew: int):
        self.entry = entry
        super().__init__(f"entry {entry.seq} of {entry.author.hex()[:16]} is dated "
                         f"{(entry.time - now) / 1e9:.1f} s in the future "
                         f"(allowed skew {max_skew / 1e9:.0f} s)")


# -- body schemas ------------------------------------------------------------------
def _id(v) -> bool:
    return type(v) is bytes and len(v) == ID_LEN


def _uint(v) -> bool:
    return type(v) is int and 0 <= v <= MAX_SEQ


def _name(v) -> bool:
    return type(v) is str and 0 < len(v) <= MAX_NAME


def _small_map(v) -> bool:
    """text -> text | int, bounded (manifest source, verify summary)."""
    if type(v) is not dict or len(v) > MAX_MAP:
        return False
    for k, x in v.items():
        if type(k) is not str or len(k) > 64:
            return False
        if type(x) is str:
            if len(x) > MAX_TEXT:
                return False
        elif type(x) is not int or not -MAX_SEQ <= x <= MAX_SEQ:
            return False
    return True


def _heads(v) -> bool:
    if type(v) is not list or len(v) > MAX_WITNESS_HEADS:
        return False
    for h in v:
        if (type(h) is not list or len(h) != 3 or type(h[0]) is not bytes
                or len(h[0]) != KEY_LEN or not _uint(h[1]) or not _id(h[2])):
            return False
    return True


# kind -> {field: check}; a body must have exactly these fields
SCHEMAS = {
    # a backup this node made: manifest id, NAME, image size, chunk count, source
    "backup": {"manifest": _id, "name": _name, "size": _uint, "chunks": _uint,
               "source": _small_map},
    # `holder` (a node id) holds a full replica of the manifest
    "replica": {"manifest": _id, "holder": _id},
    # this node checked the manifest's chunks at `holder`: result + counts
    "verify": {"manifest": _id, "holder": _id,
               "result": lambda v: v in VERIFY_RESULTS and type(v) is str,
               "summary": _small_map},
    # this node restored the manifest: image size, chunk count
    "restore": {"manifest": _id, "size": _uint, "chunks": _uint},
    # this node deleted backup NAME@VERSION (its manifest)
    "delete": {"manifest": _id, "name": _name, "version": _uint},
    # heads (author public key, seq, entry id) of other logs this node has seen
    "witness": {"heads": _heads},
    # a revocation signed by the network key (protocol/membership.py), carried by
    # the audit gossip to every member; the carrier's own authority does not matter
    "revoke": {"revocation": lambda v: type(v) is bytes and 0 < len(v) <= 2048},
}
KINDS = tuple(SCHEMAS)


def _labels(v) -> bool:
    return type(v) is bytes and 0 < len(v) <= labels.MAX_RECORD


# a node with a data key seals the labels (name, and a backup's source) of its
# backup and delete entries under it (protocol/labels.py): `key` is the key's
# fingerprint, `labels` the sealed record, under the manifest id
SEALED_SCHEMAS = {
    "backup": {"manifest": _id, "key": _id, "labels": _labels, "size": _uint, "chunks": _uint},
    "delete": {"manifest": _id, "key": _id, "labels": _labels, "version": _uint},
}
_LABEL_FIELDS = {"backup": frozenset({"name", "source"}), "delete": frozenset({"name"})}


def seal_body(key, kind: str, body: dict) -> dict:
    """A plaintext backup or delete body in its sealed form under `key` (a DataKey):
    name (and source) sealed under the manifest id; other kinds unchanged."""
    fields = _LABEL_FIELDS.get(kind)
    if fields is None:
        return body
    doc = {f: body[f] for f in fields}
    out = {k: v for k, v in body.items() if k not in fields}
    return dict(out, key=key.fingerprint,
                labels=labels.seal_labels(key, body["manifest"], doc))


def open_body(body: dict, key=None) -> dict | None:
    """A backup or delete body with its labels readable: the body itself when they
    are not sealed, else opened under `key` (a DataKey); None when they are sealed
    and key is None, another key, or they do not open (nothing to show)."""
    if "labels" not in body:
        return body
    if key is None or key.fingerprint != body.get("key"):
        return None
    kind = "backup" if "chunks" in body else "delete"
    try:
        doc = labels.open_labels(key, body["manifest"], body["labels"], _LABEL_FIELDS[kind])
    except SealError:
        return None
    if kind == "backup" and not (_name(doc["name"]) and _small_map(doc["source"])):
        return None
    if kind == "delete" and not _name(doc["name"]):
        return None
    out = {k: v for k, v in body.items() if k not in ("key", "labels")}
    return dict(out, **doc)


def body_problem(kind, body) -> str | None:
    schema = SCHEMAS.get(kind) if type(kind) is str else None
    if schema is None:
        return f"unknown entry kind {kind!r}"
    if type(body) is not dict:
        return f"{kind} body is not a map"
    if "labels" in body and kind in SEALED_SCHEMAS:
        schema = SEALED_SCHEMAS[kind]
    if body.keys() != schema.keys():
        return f"{kind} body has fields {sorted(body)}, expected {sorted(schema)}"
    for k, check in schema.items():
        if not check(body[k]):
            return f"{kind} body field {k!r} is invalid or out of bounds"
    return None


# -- entries -----------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Entry:
    """One signed entry. `raw` is the signed encoding; `id` = BLAKE3(raw)."""
    author: bytes
    seq: int
    prev: bytes | None
    time: int
    kind: str
    body: dict
    sig: bytes
    raw: bytes = field(repr=False)
    id: bytes
    payload: bytes = field(repr=False)

    def __eq__(self, other):
        return isinstance(other, Entry) and self.raw == other.raw

    def __hash__(self):
        return hash(self.id)

    def to_json(self) -> dict:
        def j(v):
            if type(v) is bytes:
                return v.hex()
            if type(v) is list:
                return [j(x) for x in v]
            if type(v) is dict:
                return {k: j(x) for k, x in v.items()}
            return v
        return {"id": self.id.hex(), "author": self.author.hex(), "seq": self.seq,
                "prev": self.prev.hex() if self.prev else None, "time_ns": self.time,
                "kind": self.kind, "body": j(self.body)}


def entry_id(raw: bytes) -> bytes:
    return blake3.blake3(raw).digest()


def _payload_problem(author, seq, prev, time, kind, body) -> str | None:
    if type(author) is not bytes or len(author) != KEY_LEN:
        return "author must be a 32-byte Ed25519 public key"
    if not _uint(seq):
        return f"seq {seq!r} out of range"
    if seq == 0:
        if prev is not None:
            return "entry 0 must have no prev"
    elif not _id(prev):
        return f"entry {seq} must have a 32-byte prev id"
    if type(time) is not int or not 0 <= time <= MAX_TIME:
        return f"time {time!r} out of range"
    return body_problem(kind, body)


def make_entry(signer, seq: int, prev: bytes | None, time: int, kind: str,
               body: dict) -> Entry:
    """Sign a new entry. signer has .public_key (32 raw bytes) and .sign(bytes)
    (node.net.identity.Identity). LocalProtocolError if any field is invalid."""
    author = signer.public_key
    problem = _payload_problem(author, seq, prev, time, kind, body)
    if problem:
        raise LocalProtocolError(problem)
    payload = codec.encode({"v": VERSION, "author": author, "seq": seq, "prev": prev,
                            "time": time, "kind": kind, "body": body})
    if len(payload) > MAX_PAYLOAD:
        raise LocalProtocolError(f"entry payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    sig = signer.sign(SIG_DOMAIN + payload)
    raw = codec.encode({"entry": payload, "sig": sig})
    # decode back: the entry we hand out is exactly what a peer will see
    return decode_entry(raw, verify=False)


_KEY_CACHE: dict[bytes, Ed25519PublicKey] = {}


def _public_key(author: bytes) -> Ed25519PublicKey:
    k = _KEY_CACHE.get(author)
    if k is None:
        try:
            k = Ed25519PublicKey.from_public_bytes(author)
        except ValueError:
            raise BadSignature(f"author {author.hex()[:16]} is not a valid Ed25519 key") from None
        if len(_KEY_CACHE) > 4096:
            _KEY_CACHE.clear()
        _KEY_CACHE[author] = k
    return k


def verify_signature(e: Entry) -> None:
    try:
        _public_key(e.author).verify(e.sig, SIG_DOMAIN + e.payload)
    except InvalidSignature:
        raise BadSignature(f"entry {e.seq} of {e.author.hex()[:16]}: signature does not "
                           "verify under its author's key") from None


def decode_entry(raw, *, verify: bool = True) -> Entry:
    """Parse (and by default signature-check) one signed entry.
    Raises only InvalidEntry / RemoteProtocolError subclasses."""
    if type(raw) is not bytes:
        if not isinstance(raw, (bytearray, memoryview)):
            raise InvalidEntry("entry is not bytes")
        raw = bytes(raw)
    if len(raw) > MAX_ENTRY:
        raise InvalidEntry(f"entry of {len(raw)} bytes exceeds {MAX_ENTRY}")
    outer = codec.decode(raw, max_size=MAX_ENTRY)
    if type(outer) is not dict or outer.keys() != {"entry", "sig"}:
        raise InvalidEntry("signed entry must be a map of exactly 'entry' and 'sig'")
    payload, sig = outer["entry"], outer["sig"]
    if type(payload) is not bytes or type(sig) is not bytes or len(sig) != SIG_LEN:
        raise InvalidEntry("signed entry needs a bin payload and a 64-byte signature")
    if len(payload) > MAX_PAYLOAD:
        raise InvalidEntry(f"entry payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    doc = codec.decode(payload, max_size=MAX_PAYLOAD)
    if type(doc) is not dict or doc.keys() != _ENTRY_KEYS:
        raise InvalidEntry(f"entry fields must be {sorted(_ENTRY_KEYS)}")
    if doc["v"] != VERSION or type(doc["v"]) is not int:
        raise InvalidEntry(f"unsupported entry version {doc['v']!r}")
    problem = _payload_problem(doc["author"], doc["seq"], doc["prev"], doc["time"],
                               doc["kind"], doc["body"])
    if problem:
        raise InvalidEntry(problem)
    e = Entry(doc["author"], doc["seq"], doc["prev"], doc["time"], doc["kind"],
              doc["body"], sig, raw, entry_id(raw), payload)
    if verify:
        verify_signature(e)
    return e


# -- chain checking ------------------------------------------------------------------
class LinkBroken(AuditChainBroken):
    """A validly signed entry whose `prev` is not the entry we hold before it: its
    author signed another entry at seq - 1 than ours (a fork; the caller can fetch
    that entry to prove it), or our copy is damaged there."""


class HeldEntryMissing(IntegrityError):
    """LogView's lookup found no entry where its ids say one is held: the caller's
    own copy of the log is damaged (not the author's fault). Carries the valid
    entry that arrived for that place."""

    def __init__(self, entry):
        self.entry = entry
        super().__init__(f"our copy of {entry.author.hex()[:16]}'s log lacks entry {entry.seq}")


class LogView:
    """What one author's log looks like to us, checked entry by entry (sans-I/O).

    Start empty (the log must begin at seq 0) or from a trusted `anchor` entry
    (a certificate's chain starts at its backup entry). Only ids are kept; to
    prove a fork against an earlier entry the view asks `lookup(seq) -> Entry`,
    or keeps the entries itself when no lookup is given (keep=True).
    """

    def __init__(self, author: bytes, *, anchor: Entry | None = None, lookup=None,
                 max_skew: int = DEFAULT_MAX_SKEW_NS):
        self.author = author
        self.max_skew = max_skew
        self._lookup = lookup
        self._kept: list[Entry] | None = [] if lookup is None else None
        self.first_seq = 0
        self._ids: list[bytes] = []
        self.head: Entry | None = None
        if anchor is not None:
            self._check_author_and_sig(anchor, 0)
            self.first_seq = anchor.seq
            self._push(anchor)

    @property
    def next_seq(self) -> int:
        return self.first_seq + len(self._ids)

    def id_at(self, seq: int) -> bytes | None:
        i = seq - self.first_seq
        return self._ids[i] if 0 <= i < len(self._ids) else None

    def entry_at(self, seq: int) -> Entry | None:
        i = seq - self.first_seq
        if not 0 <= i < len(self._ids):
            return None
        return self._kept[i] if self._kept is not None else self._lookup(seq)

    def _push(self, e: Entry):
        self._ids.append(e.id)
        if self._kept is not None:
            self._kept.append(e)
        self.head = e

    def _check_author_and_sig(self, e: Entry, index: int):
        if e.author != self.author:
            raise AuditChainBroken(self.author, e.seq, f"entry is signed by another author "
                                   f"{e.author.hex()[:16]}", entry_id=e.id, index=index)
        try:
            verify_signature(e)
        except BadSignature:
            raise AuditChainBroken(self.author, e.seq, "bad signature", entry_id=e.id,
                                   index=index) from None

    def append(self, e: Entry, *, now: int | None = None, index: int | None = None) -> bool:
        """Check and take the next entry. True if new, False for a replay.
        `index` is the entry's position in the caller's input (for reports)."""
        if now is not None and e.time > now + self.max_skew:
            raise FutureEntry(e, now, self.max_skew)
        nxt = self.next_seq
        if self.first_seq <= e.seq < nxt and e.author == self.author \
                and self.id_at(e.seq) == e.id:
            return False              # a replay: the same bytes, already checked
        self._check_author_and_sig(e, index)
        if e.seq < nxt:
            if e.seq < self.first_seq:
                return False          # before our window: nothing to compare with
            if self.id_at(e.seq) == e.id:
                return False          # replay
            held = self.entry_at(e.seq)
            if held is None:          # the caller's stored copy has a hole here
                raise HeldEntryMissing(e)
            raise ForkDetected(held, e)
        if e.seq > nxt:
            raise AuditChainBroken(self.author, e.seq, f"gap: expected seq {nxt}, got {e.seq}",
                                   entry_id=e.id, index=index)
        if nxt and e.prev != self._ids[-1]:
            raise LinkBroken(
                self.author, e.seq, f"prev {e.prev.hex()[:16] if e.prev else None} does not "
                f"link to entry {nxt - 1} ({self._ids[-1].hex()[:16]})", entry_id=e.id, index=index)
        if self.head is not None and self.head.seq == nxt - 1 and e.time < self.head.time:
            raise AuditChainBroken(self.author, e.seq, f"time goes back: {e.time} after "
                                   f"{self.head.time} (an author's clock never runs backwards "
                                   "in its log)", entry_id=e.id, index=index)
        self._push(e)
        return True


def check_chain(entries, *, author: bytes | None = None, anchored: bool = False,
                now: int | None = None, max_skew: int = DEFAULT_MAX_SKEW_NS) -> LogView:
    """Check a sequence of entries of one author (from seq 0, or from the first
    entry when anchored); raises the first AuditChainBroken / ForkDetected."""
    view = None
    for i, e in enumerate(entries):
        if view is None:
            a = author if author is not None else e.author
            if anchored:
                if now is not None and e.time > now + max_skew:
                    raise FutureEntry(e, now, max_skew)
                view = LogView(a, max_skew=max_skew)
                view._check_author_and_sig(e, i)
                view.first_seq = e.seq
                view._push(e)
                continue
            view = LogView(a, max_skew=max_skew)
        view.append(e, now=now, index=i)
    return view if view is not None else LogView(author or bytes(KEY_LEN))


def witness_heads(e: Entry) -> list[tuple[bytes, int, bytes]]:
    return [(h[0], h[1], h[2]) for h in e.body["heads"]] if e.kind == "witness" else []


# -- certificates -------------------------------------------------------------------
# A certificate proves, offline, that `author` recorded a backup of `manifest`
# and has not rewritten its log since (up to the witnessed head):
#
#   encode({"v": 1, "type": "hypersdk-audit-certificate",
#           "manifest": <32-byte manifest id>,
#           "chain": [signed entry, ...],   # the author's backup entry first, then
#                                           # every later entry up to its head, in seq order
#           "witnesses": [signed entry, ...],  # witness entries by *other* authors that
#                                              # name a head (author, seq, id) of this chain
#           "keys": [32-byte public key, ...]})   # sorted: the chain's author and
#                                                 # every witness author, nothing else
#
# check_certificate verifies every signature, every link from the backup entry
# to the head, that the first entry is a backup entry for `manifest`, and that
# every witness names an (author, seq) of the chain with exactly the chain's id
# there (a witness naming another id is proof of a rewrite). "No witness yet"
# is a valid, flagged state (witnessed_seq None): it proves the author signed
# the backup, not that it cannot later rewrite its log unnoticed.
CERT_TYPE = "hypersdk-audit-certificate"
MAX_CERT_CHAIN = 100_000
MAX_CERT_WITNESSES = 64
_CERT_KEYS = frozenset({"v", "type", "manifest", "chain", "witnesses", "keys"})
# a certificate of a backup made in a network pins the network's public key and carries
# the member certificates (protocol/membership.py) of its author and witnesses
_NET_KEYS = _CERT_KEYS | {"network", "members"}
# ... and may carry the network's revocations (protocol/membership.py) of its author and
# witnesses: a revoked key's signatures may have been made with the key stolen, at any
# date it chose, so a revoked witness never counts and a revoked author is reported
_REV_KEYS = _NET_KEYS | {"revocations"}
MAX_CERT_MEMBERS = MAX_CERT_WITNESSES + 1


class InvalidCertificate(RemoteProtocolError):
    """A certificate that is malformed, truncated, altered or does not prove its claim."""


@dataclass
class CertificateReport:
    manifest: bytes
    author: bytes
    backup: Entry
    head: Entry
    witnesses: list[Entry]
    witnessed_seq: int | None       # the highest seq of the chain a (member) witness attests
    network: bytes | None = None    # the network public key the file pins
    members: frozenset = frozenset()  # keys with a valid member certificate in the file
    revoked: dict = field(default_factory=dict)   # key -> membership.Revocation in the file

    @property
    def member_witness_keys(self) -> list[bytes]:
        """The distinct witnesses that count: members of the pinned network, or (no
        network pinned: nothing can vet them) every witness."""
        keys = self.witness_keys
        return keys if self.network is None else [k for k in keys if k in self.members]

    @property
    def witnessed(self) -> bool:
        return self.witnessed_seq is not None

    @property
    def as_of(self) -> int:
        """The newest time the certificate vouches for (ns): its head's time, or a
        counted witness entry's if later (a witness saw the chain no earlier than it
        signed; in a network, only members' witness entries count)."""
        counted = set(self.member_witness_keys)
        return max([self.head.time, *(w.time for w in self.witnesses if w.author in counted)])

    def age_ns(self, now_ns: int) -> int:
        """How long ago (ns) the certificate was valid as of (0 when dated ahead)."""
        return max(0, now_ns - self.as_of)

    def stale(self, now_ns: int, interval_s: int = COSIGN_INTERVAL_S) -> bool:
        """Older than the cosigning interval: a live log's head would have been
        cosigned since (see the module doc), so entries its author signed later,
        e.g. a delete, may be missing from this certificate."""
        return self.age_ns(now_ns) > interval_s * 10**9

    @property
    def witness_keys(self) -> list[bytes]:
        """The distinct authors of the witness entries (one witness entry repeated
        is one witness)."""
        return sorted({w.author for w in self.witnesses})

    def to_json(self) -> dict:
        return {"manifest": self.manifest.hex(), "author": self.author.hex(),
                "backup_entry": self.backup.to_json(),
                "head": {"seq": self.head.seq, "id": self.head.id.hex()},
                "chain_entries": self.head.seq - self.backup.seq + 1,
                "witnesses": [{"author": w.author.hex(), "seq": w.seq, "id": w.id.hex()}
                              for w in self.witnesses],
                "witness_keys": [k.hex() for k in self.witness_keys],
                "head_time_ns": self.head.time, "as_of_ns": self.as_of,
                "network": self.network.hex() if self.network else None,
                "author_member": (self.author in self.members) if self.network else None,
                "revoked": {k.hex(): r.to_json() for k, r in self.revoked.items()},
                "member_witness_keys": [k.hex() for k in self.member_witness_keys],
                "witnessed": self.witnessed, "witnessed_seq": self.witnessed_seq}


def build_certificate(manifest: bytes, chain: list[Entry], witnesses: list[Entry], *,
                      network: bytes | None = None, members=(), revocations=()) -> bytes:
    """Encode a certificate (LocalProtocolError if chain/witnesses do not form one:
    the result is checked with check_certificate before it is returned). network:
    the public key of the backup's network, pinned in the file, with `members`, the
    member certificates (raw) of the author and witnesses."""
    keys = sorted({e.author for e in chain} | {w.author for w in witnesses})
    doc = {"v": VERSION, "type": CERT_TYPE, "manifest": manifest,
           "chain": [e.raw for e in chain], "witnesses": [w.raw for w in witnesses],
           "keys": keys}
    if network is not None:
        doc.update(network=network, members=list(members)[:MAX_CERT_MEMBERS])
        if revocations:
            doc["revocations"] = list(revocations)[:MAX_CERT_MEMBERS]
    data = codec.encode(doc)
    try:
        check_certificate(data)
    except (RemoteProtocolError, AuditChainBroken, ForkDetected) as exc:
        raise LocalProtocolError(f"not a valid certificate: {exc}") from None
    return data


def check_certificate(data: bytes, *, network_key: bytes | None = None) -> CertificateReport:
    """Verify a certificate offline. Raises InvalidCertificate (or
    AuditChainBroken for a break inside the chain) with the reason. network_key:
    the network the checker expects; the file must pin it. In a file that pins a
    network, only witnesses with a valid member certificate of it count
    (witnessed_seq, member_witness_keys)."""
    try:
        doc = codec.decode(data)
    except RemoteProtocolError as exc:
        raise InvalidCertificate(f"not a certificate (truncated or altered?): {exc}") from None
    if type(doc) is not dict or doc.keys() not in (_CERT_KEYS, _NET_KEYS, _REV_KEYS):
        raise InvalidCertificate("not a certificate: wrong fields")
    if doc["type"] != CERT_TYPE or doc["v"] != VERSION or type(doc["v"]) is not int:
        raise InvalidCertificate(f"unsupported certificate type/version {doc['type']!r} "
                                 f"{doc['v']!r}")
    manifest, chain_raw, wit_raw, keys = (doc["manifest"], doc["chain"], doc["witnesses"],
                                          doc["keys"])
    if not _id(manifest):
        raise InvalidCertificate("manifest id must be 32 bytes")
    if type(chain_raw) is not list or not 0 < len(chain_raw) <= MAX_CERT_CHAIN:
        raise InvalidCertificate("the chain must hold 1..100000 entries")
    if type(wit_raw) is not list or len(wit_raw) > MAX_CERT_WITNESSES:
        raise InvalidCertificate(f"at most {MAX_CERT_WITNESSES} witnesses")
    if type(keys) is not list or not all(type(k) is bytes and len(k) == KEY_LEN for k in keys):
        raise InvalidCertificate("keys must be 32-byte public keys")
    chain = []
    for i, raw in enumerate(chain_raw):
        try:
            chain.append(decode_entry(raw, verify=False))
        except RemoteProtocolError as exc:
            raise InvalidCertificate(f"chain entry {i}: {exc}") from None
    backup = chain[0]
    if backup.kind != "backup":
        raise InvalidCertificate(f"the chain starts with a {backup.kind} entry, not the backup")
    if backup.body["manifest"] != manifest:
        raise InvalidCertificate("the backup entry names manifest "
                                 f"{backup.body['manifest'].hex()[:16]}, not {manifest.hex()[:16]}")
    view = check_chain(chain, author=backup.author, anchored=True)   # signatures + links
    witnesses, witnessed = [], None
    for i, raw in enumerate(wit_raw):
        try:
            w = decode_entry(raw)
        except RemoteProtocolError as exc:
            raise InvalidCertificate(f"witness {i}: {exc}") from None
        if w.kind != "witness" or w.author == backup.author:
            raise InvalidCertificate(f"witness {i} is not a witness entry by another node")
        named = False
        for a, s, hid in witness_heads(w):
            if a != backup.author:
                continue
            have = view.id_at(s)
            if have is None:
                if s < backup.seq:
                    continue          # an older head: says nothing about this chain
                raise InvalidCertificate(f"witness {i} names seq {s}, past the chain's head "
                                         f"{view.head.seq}")
            if have != hid:
                raise InvalidCertificate(
                    f"witness {i} by {w.author.hex()[:16]} saw entry {hid.hex()[:16]} at seq "
                    f"{s}, the chain has {have.hex()[:16]}: the log was rewritten")
            named = True
            witnessed = s if witnessed is None else max(witnessed, s)
        if not named:
            raise InvalidCertificate(f"witness {i} does not name a head of this chain")
        witnesses.append(w)
    want = sorted({backup.author} | {w.author for w in witnesses})
    if keys != want:
        raise InvalidCertificate("the key list does not match the chain's and witnesses' authors")
    network, members, revoked = _members(doc, network_key, backup, witnesses)
    if network is not None:             # only member witnesses attest anything
        witnessed = max((s for w in witnesses if w.author in members
                         for a, s, _ in witness_heads(w) if a == backup.author
                         and view.id_at(s) is not None), default=None)
    return CertificateReport(manifest, backup.author, backup, view.head, witnesses, witnessed,
                             network, frozenset(members), revoked)


def _members(doc: dict, network_key: bytes | None, backup: Entry, witnesses) -> tuple:
    """(the pinned network public key or None, the keys of the author and witnesses
    whose member certificate in the file is signed by that network and valid when
    they signed their entry). network_key: the one the checker expects."""
    pinned = doc.get("network")
    if network_key is not None and pinned != network_key:
        raise InvalidCertificate(
            "the certificate is pinned to no network" if pinned is None else
            f"the certificate is pinned to network {ms.network_id(pinned).hex()[:16]}, not "
            f"the one given ({ms.network_id(network_key).hex()[:16]})")
    if pinned is None:
        return None, set(), {}
    raws = doc["members"]
    if type(pinned) is not bytes or len(pinned) != KEY_LEN:
        raise InvalidCertificate("the network key must be 32 bytes")
    if type(raws) is not list or len(raws) > MAX_CERT_MEMBERS:
        raise InvalidCertificate(f"at most {MAX_CERT_MEMBERS} member certificates")
    when = {backup.author: backup.time}
    for w in witnesses:
        when[w.author] = min(when.get(w.author, w.time), w.time)
    members = set()
    for i, raw in enumerate(raws):
        try:
            cert = ms.decode_certificate(raw)
            if cert.node in when:
                ms.check_certificate(pinned, raw, now=when[cert.node])
                members.add(cert.node)
        except ms.NotAMember:         # of another network, or not when it signed: no vote
            continue
        except RemoteProtocolError as exc:  # malformed, or a forged network signature
            raise InvalidCertificate(f"member certificate {i}: {exc}") from None
    revoked = {}
    revs = doc.get("revocations", [])
    if type(revs) is not list or len(revs) > MAX_CERT_MEMBERS:
        raise InvalidCertificate(f"at most {MAX_CERT_MEMBERS} revocations")
    for i, raw in enumerate(revs):
        try:
            r = ms.check_revocation(pinned, raw)
        except RemoteProtocolError as exc:   # malformed, forged, or another network's
            raise InvalidCertificate(f"revocation {i}: {exc}") from None
        if r.node in when:
            revoked[r.node] = r
            members.discard(r.node)           # a revoked key can sign at any date it likes
    return pinned, members, revoked
