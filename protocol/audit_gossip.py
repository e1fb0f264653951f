"""Audit-log gossip messages (/hypersdk/audit/1) and the head digests (pure).

One request per stream, one reply (as the DHT): frames are a 4-byte length
and one canonical msgpack map {"v": 1, "t": tag, fields...}, at most
MAX_FRAME bytes (protocol/framing.py's FrameDecoder with this decoder).

    Push(rid, entries, certs)     -> Ack(rid, wants)
        entries: signed audit entries (raw bytes, protocol/audit.py), at most
        MAX_ENTRIES and MAX_PUSH_BYTES in all. certs: the member certificates
        (protocol/membership.py, signed by the network key) of the entries'
        authors, so that a receiver that never met an author can check it is a
        member before it stores or forwards the author's entries (at most
        MAX_CERTS, MAX_CERT_BYTES in all; empty between nodes in no network). wants: (author, seq) pairs
        naming where the receiver's copy of an author's log ends when the push
        could not be attached (a gap): the pusher sends that range next.
    Sync(rid, root, buckets)      -> Heads(rid, buckets, heads, more)
        anti-entropy: the digests of the requester's heads (see `digests`);
        the reply carries the responder's bucket digests and its heads
        (author, seq, id) in every bucket whose digest differs, sorted by
        author (at most MAX_HEADS; more=True if cut).
    GetRange(rid, author, start, count) -> Entries(rid, entries, certs)
        the responder's entries of author from seq `start`, at most `count`
        (<= MAX_ENTRIES) and MAX_PUSH_BYTES, with the author's certificate.
    ForkProof(rid, first, second) -> Ack(rid, ())
        two signed entries of one author and seq with different ids.
    Hello(rid, addr)              -> Ack(rid, ())
        "I push to you; push to me too, at addr": makes the push overlay
        symmetric, so a node that nobody picked as a neighbour still gets
        every push (a k-out random graph leaves ~e^-k of the nodes with no
        in-edge; made undirected it is connected).

Entries travel as their signed bytes and are checked by the node
(protocol.audit.decode_entry and LogView) before anything is stored or
forwarded: this layer bounds sizes and shapes only. Every decoding failure
is a RemoteProtocolError.

Digests: a head is (author, seq, id); heads fall in BUCKETS buckets by the
author key's first 4 bits; a bucket's digest is BLAKE3 over its heads sorted
by author, each as author || seq (8 bytes, big-endian) || id; the root is
BLAKE3 over the BUCKETS digests. Two nodes with the same root hold the same
heads (so, logs being hash chains, the same entries).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import blake3

from .audit import ID_LEN, KEY_LEN, MAX_ENTRY, MAX_SEQ
from .errors import LocalProtocolError, RemoteProtocolError
from .framing import HEADER, FrameDecoder, encode_document, open_document

PROTOCOL_ID = "/hypersdk/audit/1"
VERSION = 1
MAX_ENTRIES = 64
MAX_PUSH_BYTES = 192 << 10
MAX_HEADS = 1024
MAX_WANTS = MAX_ENTRIES
BUCKETS = 16
MAX_FRAME = 256 << 10
MAX_ADDR = 256
MAX_CERTS = MAX_ENTRIES
MAX_CERT = 2048                   # protocol/membership.py MAX_RECORD
MAX_CERT_BYTES = 48 << 10         # entries (192 KiB) + certs fit MAX_FRAME
EMPTY = blake3.blake3(b"").digest()


def _uint(v) -> bool:
    return type(v) is int and 0 <= v <= MAX_SEQ


def _entries(v, what: str) -> tuple:
    if type(v) not in (list, tuple) or len(v) > MAX_ENTRIES:
        raise LocalProtocolError(f"{what} must be a list of at most {MAX_ENTRIES} entries")
    total = 0
    for e in v:
        if type(e) is not bytes or not 0 < len(e) <= MAX_ENTRY:
            raise LocalProtocolError(f"{what}: an entry must be 1..{MAX_ENTRY} bytes")
        total += len(e)
    if total > MAX_PUSH_BYTES:
        raise LocalProtocolError(f"{what}: {total} bytes of entries exceed {MAX_PUSH_BYTES}")
    return tuple(v)


def _certs(v, what: str) -> tuple:
    if type(v) not in (list, tuple) or len(v) > MAX_CERTS:
        raise LocalProtocolError(f"{what} certs must be a list of at most {MAX_CERTS}")
    total = 0
    for c in v:
        if type(c) is not bytes or not 0 < len(c) <= MAX_CERT:
            raise LocalProtocolError(f"{what}: a certificate must be 1..{MAX_CERT} bytes")
        total += len(c)
    if total > MAX_CERT_BYTES:
        raise LocalProtocolError(f"{what}: {total} bytes of certificates exceed {MAX_CERT_BYTES}")
    return tuple(v)


def _key(v, what: str) -> None:
    if type(v) is not bytes or len(v) != KEY_LEN:
        raise LocalProtocolError(f"{what} must be a {KEY_LEN}-byte key")


def _id(v, what: str) -> None:
    if type(v) is not bytes or len(v) != ID_LEN:
        raise LocalProtocolError(f"{what} must be a {ID_LEN}-byte id")


def _digest_list(v) -> tuple:
    if type(v) not in (list, tuple) or len(v) != BUCKETS:
        raise LocalProtocolError(f"buckets must be {BUCKETS} digests")
    for b in v:
        _id(b, "bucket digest")
    return tuple(v)


def _rid(v) -> None:
    if not _uint(v):
        raise LocalProtocolError("rid must be an unsigned 63-bit int")


@dataclass(frozen=True)
class Push:
    TAG = "push"
    rid: int
    entries: tuple
    certs: tuple = ()

    def __post_init__(self):
        _rid(self.rid)
        object.__setattr__(self, "entries", _entries(self.entries, "push"))
        object.__setattr__(self, "certs", _certs(self.certs, "push"))


@dataclass(frozen=True)
class Ack:
    TAG = "ack"
    rid: int
    wants: tuple            # ((author, seq), ...)

    def __post_init__(self):
        _rid(self.rid)
        if type(self.wants) not in (list, tuple) or len(self.wants) > MAX_WANTS:
            raise LocalProtocolError(f"wants must be a list of at most {MAX_WANTS}")
        out = []
        for w in self.wants:
            if type(w) not in (list, tuple) or len(w) != 2 or not _uint(w[1]):
                raise LocalProtocolError("a want is (author, seq)")
            _key(w[0], "want author")
            out.append((w[0], w[1]))
        object.__setattr__(self, "wants", tuple(out))


@dataclass(frozen=True)
class Sync:
    TAG = "sync"
    rid: int
    root: bytes
    buckets: tuple

    def __post_init__(self):
        _rid(self.rid)
        _id(self.root, "root")
        object.__setattr__(self, "buckets", _digest_list(self.buckets))


@dataclass(frozen=True)
class Heads:
    TAG = "heads"
    rid: int
    buckets: tuple
    heads: tuple            # ((author, seq, id), ...)
    more: bool

    def __post_init__(self):
        _rid(self.rid)
        object.__setattr__(self, "buckets", _digest_list(self.buckets))
        if type(self.heads) not in (list, tuple) or len(self.heads) > MAX_HEADS:
            raise LocalProtocolError(f"heads must be a list of at most {MAX_HEADS}")
        out = []
        for h in self.heads:
            if type(h) not in (list, tuple) or len(h) != 3 or not _uint(h[1]):
                raise LocalProtocolError("a head is (author, seq, id)")
            _key(h[0], "head author")
            _id(h[2], "head id")
            out.append((h[0], h[1], h[2]))
        if type(self.more) is not bool:
            raise LocalProtocolError("more must be a bool")
        object.__setattr__(self, "heads", tuple(out))


@dataclass(frozen=True)
class GetRange:
    TAG = "get_range"
    rid: int
    author: bytes
    start: int
    count: int

    def __post_init__(self):
        _rid(self.rid)
        _key(self.author, "author")
        if not _uint(self.start):
            raise LocalProtocolError("start must be a seq")
        if type(self.count) is not int or not 1 <= self.count <= MAX_ENTRIES:
            raise LocalProtocolError(f"count must be 1..{MAX_ENTRIES}")


@dataclass(frozen=True)
class Entries:
    TAG = "entries"
    rid: int
    entries: tuple
    certs: tuple = ()

    def __post_init__(self):
        _rid(self.rid)
        object.__setattr__(self, "entries", _entries(self.entries, "entries"))
        object.__setattr__(self, "certs", _certs(self.certs, "entries"))


@dataclass(frozen=True)
class ForkProof:
    TAG = "fork"
    rid: int
    first: bytes
    second: bytes

    def __post_init__(self):
        _rid(self.rid)
        for e in (self.first, self.second):
            if type(e) is not bytes or not 0 < len(e) <= MAX_ENTRY:
                raise LocalProtocolError(f"a fork proof entry must be 1..{MAX_ENTRY} bytes")


@dataclass(frozen=True)
class Hello:
    TAG = "hello"
    rid: int
    addr: str

    def __post_init__(self):
        _rid(self.rid)
        if type(self.addr) is not str or not 0 < len(self.addr) <= MAX_ADDR:
            raise LocalProtocolError(f"addr must be a string of 1..{MAX_ADDR} characters")


MESSAGE_TYPES = {c.TAG: c for c in (Push, Ack, Sync, Heads, GetRange, Entries, ForkProof, Hello)}
RESPONSE_TYPE = {Push: Ack, Sync: Heads, GetRange: Entries, ForkProof: Ack, Hello: Ack}
_FIELDS = {tag: tuple(f.name for f in fields(cls)) for tag, cls in MESSAGE_TYPES.items()}


def encode_message(msg) -> bytes:
    """One frame: 4-byte big-endian length + the canonical document."""
    payload = encode_document(msg, MESSAGE_TYPES, VERSION, MAX_FRAME)
    return len(payload).to_bytes(HEADER, "big") + payload


def decode_message(payload):
    """One frame payload -> message; RemoteProtocolError for anything malformed."""
    tag, doc = open_document(payload, MESSAGE_TYPES, VERSION, max_size=MAX_FRAME)
    if doc.keys() != set(_FIELDS[tag]):
        raise RemoteProtocolError(f"{tag} fields {sorted(doc)} are not {sorted(_FIELDS[tag])}")
    try:
        return MESSAGE_TYPES[tag](**doc)
    except (LocalProtocolError, TypeError) as exc:
        raise RemoteProtocolError(f"invalid {tag} message: {exc}") from None


def frame_decoder() -> FrameDecoder:
    return FrameDecoder(decode_message, MAX_FRAME)


def answers(request, reply) -> bool:
    return type(reply) is RESPONSE_TYPE.get(type(request)) and reply.rid == request.rid


# -- head digests -------------------------------------------------------------------

def bucket_of(author: bytes) -> int:
    return author[0] >> 4


def digests(heads) -> tuple[bytes, tuple]:
    """(root, bucket digests) of heads: {author: (seq, id)} (module docstring)."""
    parts: list[list] = [[] for _ in range(BUCKETS)]
    for author in sorted(heads):
        seq, hid = heads[author]
        parts[bucket_of(author)].append(author + seq.to_bytes(8, "big") + hid)
    buckets = tuple(blake3.blake3(b"".join(p)).digest() if p else EMPTY for p in parts)
    return blake3.blake3(b"".join(buckets)).digest(), buckets


def differing(mine: tuple, theirs: tuple) -> list[int]:
    """Bucket numbers whose digests differ."""
    return [i for i in range(BUCKETS) if mine[i] != theirs[i]]


__all__ = ["PROTOCOL_ID", "Push", "Ack", "Sync", "Heads", "GetRange", "Entries", "ForkProof",
           "Hello",
           "MESSAGE_TYPES", "RESPONSE_TYPE", "encode_message", "decode_message",
           "frame_decoder", "answers", "digests", "differing", "bucket_of", "MAX_ENTRIES",
           "MAX_HEADS", "MAX_FRAME", "MAX_PUSH_BYTES", "BUCKETS"]
