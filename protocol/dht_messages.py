"""DHT messages: what Kademlia peers say to each other, as frozen dataclasses.

Goals: one small, closed set of requests and responses; every value that can
be constructed is valid and encodes into one frame (framing.MAX_FRAME), so the
codec never has to guess. Constructors raise LocalProtocolError for invalid
values; framing.decode_message turns that into RemoteProtocolError for bytes a
peer sent. Non-goals: routing or storage policy (which records to accept, who
may add a provider) lives in dht/; transport lives in node/.

    request                      tag              response (echoes rid)   tag
    Ping(rid)                    "ping"           Pong(rid)               "pong"
    FindNode(rid, target)        "find_node"      Nodes(rid, peers)       "nodes"
    GetProviders(rid, key)       "get_providers"  Providers(rid, providers, closer)
                                                                          "providers"
    AddProvider(rid, key, provider) "add_provider" Ack(rid, stored)       "ack"
    AddProviders(rid, keys, provider) "add_providers" Ack(rid, stored)    "ack"
    PutRecord(rid, record)       "put_record"     Ack(rid, stored)        "ack"
    GetRecord(rid, key)          "get_record"     RecordFound(rid, record | None, closer)
                                                                          "record"

Every request also has an optional last field `sender: PeerInfo | None`: how
the requester can be dialled, so that the responder can add it to its routing
table. It is a claim: the responder uses it only when sender.id equals the
transport-authenticated peer id. On the wire an absent sender is an absent key
(not nil), so a message without one encodes exactly as before the field existed.

"Not found" is a value: Providers with no providers and RecordFound with
record=None still carry the closer peers the responder knows.

Bounds (each one keeps the largest message under framing.MAX_FRAME = 64 KiB;
tests/test_dht_messages.py checks the worst case of every type):
  rid, seq        unsigned 64-bit integers
  ids, keys       32 bytes (BLAKE3 / Ed25519 public key); signatures 64 bytes
  PeerInfo.addr   1..256 printable ASCII characters (multiaddr text form)
  PeerInfo.site   0..64 characters of text
  peer lists      MAX_PEERS = 32 (>= Kademlia k = 20); providers MAX_PROVIDERS = 64
  record value    MAX_VALUE = 4 KiB
  AddProviders    1..MAX_BATCH_KEYS = 1,024 keys, strictly ascending (one encoding
                  per set of keys, no duplicates): about 36 KiB at most
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Union

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from . import codec
from .errors import LocalProtocolError

ID_LEN = 32
SIG_LEN = 64
MAX_U64 = (1 << 64) - 1
MAX_ADDR = 256
MAX_SITE = 64
MAX_PEERS = 32
MAX_PROVIDERS = 64
MAX_VALUE = 4 << 10
MAX_BATCH_KEYS = 1024         # keys per AddProviders (= dht.reprovide.MAX_BATCH_KEYS)
RECORD_DOMAIN = b"hypersdk/dht-record/v1\x00"   # signatures never mean anything else


# -- field checks: raise LocalProtocolError, never anything else ----------------------

def _u64(name: str, v) -> None:
    if type(v) is not int or not 0 <= v <= MAX_U64:
        raise LocalProtocolError(f"{name} must be an integer in 0..2**64-1, not {v!r:.40}")


def _fixed(name: str, v, n: int) -> None:
    if type(v) is not bytes or len(v) != n:
        raise LocalProtocolError(f"{name} must be {n} bytes")


def _text(name: str, v, max_chars: int) -> None:
    if type(v) is not str or len(v) > max_chars:
        raise LocalProtocolError(f"{name} must be text of at most {max_chars} characters")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise LocalProtocolError(f"{name} is not valid Unicode") from None


def _printable_ascii(v: str) -> bool:
    """Only "!".."~" (what `all("!" <= c <= "~" for c in v)` says, 20x faster)."""
    return v.isascii() and v.isprintable() and " " not in v


def _sender(v) -> None:
    if v is not None and type(v) is not PeerInfo:
        raise LocalProtocolError("sender must be a PeerInfo or None")


def _peers(obj, name: str, max_n: int) -> None:
    """Check a peer list and store it as a tuple (lists are accepted for convenience)."""
    v = getattr(obj, name)
    if type(v) not in (list, tuple) or len(v) > max_n:
        raise LocalProtocolError(f"{name} must be a sequence of at most {max_n} peers")
    if not all(type(p) is PeerInfo for p in v):
        raise LocalProtocolError(f"{name} must hold PeerInfo values")
    object.__setattr__(obj, name, tuple(v))


# -- values carried by messages ------------------------------------------------------

@dataclass(frozen=True, slots=True)
class PeerInfo:
    """Wire form of a dht.contact.Contact (protocol must not import dht)."""
    id: bytes            # 32 bytes, BLAKE3 of the peer's public key
    addr: str            # e.g. "/ip4/10.1.2.3/tcp/4001"
    site: str = ""

    def __post_init__(self):
        _fixed("peer id", self.id, ID_LEN)
        if (type(self.addr) is not str or not 0 < len(self.addr) <= MAX_ADDR
                or not _printable_ascii(self.addr)):
            raise LocalProtocolError(f"peer addr must be 1..{MAX_ADDR} printable ASCII characters")
        _text("peer site", self.site, MAX_SITE)


@dataclass(frozen=True, slots=True)
class SignedRecord:
    """A small value under a 32-byte key, signed by `author` (Ed25519 public key).

    Higher `seq` replaces lower for the same (key, author); which keys an author
    may write is the storing node's policy (dht/), not the wire format's.
    """
    key: bytes
    value: bytes
    author: bytes
    seq: int
    signature: bytes

    def __post_init__(self):
        _fixed("record key", self.key, ID_LEN)
        if type(self.value) is not bytes or len(self.value) > MAX_VALUE:
            raise LocalProtocolError(f"record value must be at most {MAX_VALUE} bytes")
        _fixed("record author", self.author, ID_LEN)
        _u64("record seq", self.seq)
        _fixed("record signature", self.signature, SIG_LEN)

    def signing_bytes(self) -> bytes:
        return signing_bytes(self.key, self.value, self.author, self.seq)

    def verify(self) -> bool:
        """True when `signature` is the author's signature over signing_bytes()."""
        try:
            Ed25519PublicKey.from_public_bytes(self.author).verify(
                self.signature, self.signing_bytes())
        except (InvalidSignature, ValueError):
            return False
        return True

    @classmethod
    def sign(cls, private_key, key: bytes, value: bytes, seq: int) -> "SignedRecord":
        """A record signed with `private_key` (a cryptography Ed25519PrivateKey)."""
        author = private_key.public_key().public_bytes_raw()
        sig = private_key.sign(signing_bytes(key, value, author, seq))
        return cls(key=key, value=value, author=author, seq=seq, signature=sig)


def signing_bytes(key: bytes, value: bytes, author: bytes, seq: int) -> bytes:
    """Domain tag + canonical msgpack of every field except the signature."""
    return RECORD_DOMAIN + codec.encode(
        {"key": key, "value": value, "author": author, "seq": seq})


# -- messages -------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Ping:
    TAG: ClassVar[str] = "ping"
    rid: int
    sender: PeerInfo | None = None

    def __post_init__(self):
        _u64("rid", self.rid)
        _sender(self.sender)


@dataclass(frozen=True, slots=True)
class Pong:
    TAG: ClassVar[str] = "pong"
    rid: int

    def __post_init__(self):
        _u64("rid", self.rid)


@dataclass(frozen=True, slots=True)
class FindNode:
    """Ask for the peers the responder knows closest to `target`."""
    TAG: ClassVar[str] = "find_node"
    rid: int
    target: bytes
    sender: PeerInfo | None = None

    def __post_init__(self):
        _u64("rid", self.rid)
        _fixed("target", self.target, ID_LEN)
        _sender(self.sender)


@dataclass(frozen=True, slots=True)
class Nodes:
    TAG: ClassVar[str] = "nodes"
    rid: int
    peers: tuple[PeerInfo, ...]

    def __post_init__(self):
        _u64("rid", self.rid)
        _peers(self, "peers", MAX_PEERS)


@dataclass(frozen=True, slots=True)
class GetProviders:
    """Ask who holds `key` (a chunk or manifest id)."""
    TAG: ClassVar[str] = "get_providers"
    rid: int
    key: bytes
    sender: PeerInfo | None = None

    def __post_init__(self):
        _u64("rid", self.rid)
        _fixed("key", self.key, ID_LEN)
        _sender(self.sender)


@dataclass(frozen=True, slots=True)
class Providers:
    TAG: ClassVar[str] = "providers"
    rid: int
    providers: tuple[PeerInfo, ...]
    closer: tuple[PeerInfo, ...]

    def __post_init__(self):
        _u64("rid", self.rid)
        _peers(self, "providers", MAX_PROVIDERS)
        _peers(self, "closer", MAX_PEERS)


@dataclass(frozen=True, slots=True)
class AddProvider:
    """Announce that `provider` holds `key`."""
    TAG: ClassVar[str] = "add_provider"
    rid: int
    key: bytes
    provider: PeerInfo
    sender: PeerInfo | None = None

    def __post_init__(self):
        _u64("rid", self.rid)
        _fixed("key", self.key, ID_LEN)
        if type(self.provider) is not PeerInfo:
            raise LocalProtocolError("provider must be a PeerInfo")
        _sender(self.sender)


@dataclass(frozen=True, slots=True)
class AddProviders:
    """Announce that `provider` holds every key of `keys` (the batched reprovide,
    dht/reprovide.py): 1..MAX_BATCH_KEYS keys of 32 bytes, strictly ascending.
    Answered by Ack(stored=True) when the responder stored every key."""
    TAG: ClassVar[str] = "add_providers"
    rid: int
    keys: tuple[bytes, ...]
    provider: PeerInfo
    sender: PeerInfo | None = None

    def __post_init__(self):
        _u64("rid", self.rid)
        v = self.keys
        if type(v) not in (list, tuple) or not 0 < len(v) <= MAX_BATCH_KEYS:
            raise LocalProtocolError(f"keys must be a sequence of 1..{MAX_BATCH_KEYS} keys")
        for key in v:
            _fixed("key", key, ID_LEN)
        if any(a >= b for a, b in zip(v, v[1:])):
            raise LocalProtocolError("keys must be strictly ascending")
        object.__setattr__(self, "keys", tuple(v))
        if type(self.provider) is not PeerInfo:
            raise LocalProtocolError("provider must be a PeerInfo")
        _sender(self.sender)


@dataclass(frozen=True, slots=True)
class PutRecord:
    TAG: ClassVar[str] = "put_record"
    rid: int
    record: SignedRecord
    sender: PeerInfo | None = None

    def __post_init__(self):
        _u64("rid", self.rid)
        if type(self.record) is not SignedRecord:
            raise LocalProtocolError("record must be a SignedRecord")
        _sender(self.sender)


@dataclass(frozen=True, slots=True)
class Ack:
    """Answer to AddProvider, AddProviders and PutRecord; stored=False when the
    responder refused it (AddProviders: refused at least one of its keys)."""
    TAG: ClassVar[str] = "ack"
    rid: int
    stored: bool = True

    def __post_init__(self):
        _u64("rid", self.rid)
        if type(self.stored) is not bool:
            raise LocalProtocolError("stored must be a bool")


@dataclass(frozen=True, slots=True)
class GetRecord:
    TAG: ClassVar[str] = "get_record"
    rid: int
    key: bytes
    sender: PeerInfo | None = None

    def __post_init__(self):
        _u64("rid", self.rid)
        _fixed("key", self.key, ID_LEN)
        _sender(self.sender)


@dataclass(frozen=True, slots=True)
class RecordFound:
    """Answer to GetRecord: the record if the responder holds one, and closer peers."""
    TAG: ClassVar[str] = "record"
    rid: int
    record: SignedRecord | None
    closer: tuple[PeerInfo, ...]

    def __post_init__(self):
        _u64("rid", self.rid)
        if self.record is not None and type(self.record) is not SignedRecord:
            raise LocalProtocolError("record must be a SignedRecord or None")
        _peers(self, "closer", MAX_PEERS)


Request = Union[Ping, FindNode, GetProviders, AddProvider, AddProviders, PutRecord, GetRecord]
Response = Union[Pong, Nodes, Providers, Ack, RecordFound]
Message = Union[Request, Response]

RESPONSE_TYPE: dict[type, type] = {
    Ping: Pong, FindNode: Nodes, GetProviders: Providers,
    AddProvider: Ack, AddProviders: Ack, PutRecord: Ack, GetRecord: RecordFound,
}
MESSAGE_TYPES: dict[str, type] = {
    cls.TAG: cls for cls in (Ping, Pong, FindNode, Nodes, GetProviders, Providers,
                             AddProvider, AddProviders, Ack, PutRecord, GetRecord,
                             RecordFound)
}


def answers(request, response) -> bool:
    """True when `response` is the right type for `request` and echoes its rid."""
    return (type(response) is RESPONSE_TYPE.get(type(request))
            and response.rid == request.rid)
