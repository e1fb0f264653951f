"""Length-prefixed frames of DHT messages, and a sans-I/O frame decoder.

A frame is a 4-byte big-endian payload length followed by the payload, one
canonical msgpack map: {"v": VERSION, "t": <message tag>, <field>: <value>...}
(field names as in protocol.dht_messages; a PeerInfo is the map
{"id", "addr", "site"}, a SignedRecord the map {"key", "value", "author",
"seq", "signature"}, None is nil). Optional fields (a request's `sender`) are
left out when None and never sent as nil, so each message keeps exactly one
encoding.

Bounds: MAX_FRAME = 64 KiB of payload. The largest valid DHT message is about
55 KiB (Providers with 64 providers and 32 closer peers, every string at its
limit; the largest AddProviders, 1,024 keys, is about 36 KiB), so every
constructible message fits and anything bigger is hostile.
A length prefix over MAX_FRAME is rejected as soon as its 4 bytes arrive,
before any of the body is buffered; FrameDecoder never holds more than
MAX_FRAME + 4 bytes (see FrameDecoder.room).

Every decoding failure (malformed or non-canonical msgpack, wrong version,
unknown tag, unknown or missing fields, wrong types or lengths, too-long lists
or strings) is a RemoteProtocolError and nothing else; an oversized length
prefix is its subclass OversizedFrame (so a node can say why it dropped a peer).
"""
from __future__ import annotations

from dataclasses import fields

import msgpack

from . import codec
from .dht_messages import MAX_BATCH_KEYS, MAX_PROVIDERS, MESSAGE_TYPES, PeerInfo, SignedRecord
from .errors import LocalProtocolError, RemoteProtocolError

VERSION = 1
HEADER = 4
MAX_FRAME = 64 << 10

_PEER_KEYS = frozenset({"id", "addr", "site"})
_OPTIONAL = frozenset({"sender"})          # absent on the wire when None
_RECORD_KEYS = frozenset({"key", "value", "author", "seq", "signature"})
_FIELDS = {tag: tuple(f.name for f in fields(cls)) for tag, cls in MESSAGE_TYPES.items()}
_REQUIRED = {tag: frozenset(names) - _OPTIONAL for tag, names in _FIELDS.items()}


class OversizedFrame(RemoteProtocolError):
    """A length prefix announced more than MAX_FRAME bytes."""


# -- encoding ---------------------------------------------------------------------------

def _to_wire(value):
    """The wire tree of a field value, its maps built with their keys already in
    canonical (sorted) order, so that msgpack.packb gives the canonical bytes
    without codec.encode's generic sorting pass."""
    t = type(value)
    if t is tuple:
        return [_peer_wire(v) if type(v) is PeerInfo else v for v in value]
    if t is PeerInfo:
        return _peer_wire(value)
    if t is SignedRecord:
        return {"author": value.author, "key": value.key, "seq": value.seq,
                "signature": value.signature, "value": value.value}
    return value


def _peer_wire(p: PeerInfo) -> dict:
    return {"addr": p.addr, "id": p.id, "site": p.site}


# each message's map keys (its fields plus "t" and "v") in canonical order
_ORDER = {tag: tuple(sorted((*names, "t", "v"))) for tag, names in _FIELDS.items()}


def encode_payload(msg) -> bytes:
    """The canonical msgpack document of `msg` (a frame without its length prefix).
    A constructed message is valid (dht_messages checks every field), so its
    tree holds only what the canonical encoding allows; the maps are built in
    sorted key order and packed directly (tests check the bytes equal
    codec.encode of the same document)."""
    cls = type(msg)
    tag = getattr(cls, "TAG", None)
    if MESSAGE_TYPES.get(tag) is not cls:
        raise LocalProtocolError(f"{cls.__name__} is not a DHT message")
    doc = {}
    for name in _ORDER[tag]:
        if name == "t":
            doc["t"] = tag
        elif name == "v":
            doc["v"] = VERSION
        else:
            value = getattr(msg, name)
            if value is None and name in _OPTIONAL:
                continue
            doc[name] = _to_wire(value)
    payload = msgpack.packb(doc, use_bin_type=True)
    if len(payload) > MAX_FRAME:              # unreachable for valid messages; a guard
        raise LocalProtocolError(f"{tag} message of {len(payload)} bytes exceeds {MAX_FRAME}")
    return payload


_DOC_FIELDS: dict[type, tuple] = {}


def encode_document(msg, types: dict, version: int, max_size: int) -> bytes:
    """The canonical document {"v", "t", fields...} of a dataclass message whose
    TAG names it in `types` (the generic form of encode_payload, used by the
    chunk exchange, possession challenges and audit gossip). A constructed
    message is valid, so exceeding max_size is a local bug: LocalProtocolError."""
    cls = type(msg)
    tag = getattr(cls, "TAG", None)
    if types.get(tag) is not cls:
        raise LocalProtocolError(f"{cls.__name__} is not a message of this protocol")
    names = _DOC_FIELDS.get(cls)
    if names is None:
        names = _DOC_FIELDS[cls] = tuple(f.name for f in fields(cls))
    doc = {name: getattr(msg, name) for name in names}
    doc.update(v=version, t=tag)
    payload = codec.encode(doc)
    if len(payload) > max_size:               # unreachable for valid messages; a guard
        raise LocalProtocolError(f"{tag} message of {len(payload)} bytes exceeds {max_size}")
    return payload


def encode_message(msg) -> bytes:
    """One frame: 4-byte big-endian length + canonical payload."""
    payload = encode_payload(msg)
    return len(payload).to_bytes(HEADER, "big") + payload


# -- decoding ---------------------------------------------------------------------------

def _map(value, keys: frozenset, what: str) -> dict:
    if type(value) is not dict or value.keys() != keys:
        raise RemoteProtocolError(f"{what} must be a map with keys {sorted(keys)}")
    return value


# Validated PeerInfo values by (id, addr, site): the same peers arrive in reply
# after reply, and PeerInfo is immutable, so one validation per distinct peer
# is enough. Bounded: emptied when full (a flood of fresh peers costs only the
# validations it would cost without the cache).
_PEER_CACHE: dict[tuple, PeerInfo] = {}
PEER_CACHE_SIZE = 1 << 16


def _peer(value) -> PeerInfo:
    if type(value) is not dict or value.keys() != _PEER_KEYS:
        raise RemoteProtocolError(f"peer must be a map with keys {sorted(_PEER_KEYS)}")
    key = (value["id"], value["addr"], value["site"])
    if type(key[0]) is not bytes or type(key[1]) is not str or type(key[2]) is not str:
        return PeerInfo(*key)               # raises LocalProtocolError
    p = _PEER_CACHE.get(key)
    if p is None:
        p = PeerInfo(*key)
        if len(_PEER_CACHE) >= PEER_CACHE_SIZE:
            _PEER_CACHE.clear()
        _PEER_CACHE[key] = p
    return p


def _peer_list(value) -> tuple:
    if type(value) is not list or len(value) > MAX_PROVIDERS:
        raise RemoteProtocolError(f"peer list must be a list of at most {MAX_PROVIDERS}")
    return tuple(_peer(p) for p in value)


def _key_list(value) -> tuple:
    if type(value) is not list or len(value) > MAX_BATCH_KEYS:
        raise RemoteProtocolError(f"keys must be a list of at most {MAX_BATCH_KEYS}")
    return tuple(value)                  # element checks: AddProviders.__post_init__


def _record(value):
    return None if value is None else SignedRecord(**_map(value, _RECORD_KEYS, "record"))


_FROM_WIRE = {"peers": _peer_list, "closer": _peer_list, "providers": _peer_list,
              "provider": _peer, "sender": _peer, "record": _record, "keys": _key_list}


def open_document(payload, types, version: int = VERSION,
                  max_size: int = MAX_FRAME) -> tuple[str, dict]:
    """(tag, fields) of one message document {"v", "t", fields...} whose tag is a
    key of `types`; RemoteProtocolError for anything else. Shared by the DHT
    messages, the chunk exchange (protocol/exchange_framing.py) and audit gossip."""
    doc = codec.decode(payload, max_size=max_size)
    if type(doc) is not dict:
        raise RemoteProtocolError("message is not a map")
    v, tag = doc.pop("v", None), doc.pop("t", None)
    if type(v) is not int or v != version:
        raise RemoteProtocolError(f"unsupported message version {v!r:.20}")
    if type(tag) is not str or tag not in types:
        raise RemoteProtocolError(f"unknown message type {tag!r:.40}")
    return tag, doc


def decode_message(payload):
    """Parse one frame payload (no length prefix) into a message."""
    tag, doc = open_document(payload, MESSAGE_TYPES)
    names = _FIELDS[tag]
    if not _REQUIRED[tag] <= doc.keys() <= set(names):
        raise RemoteProtocolError(f"{tag} fields {sorted(doc)} are not {sorted(names)}")
    try:
        args = {n: _FROM_WIRE[n](doc[n]) if n in _FROM_WIRE else doc[n] for n in doc}
        return MESSAGE_TYPES[tag](**args)
    except LocalProtocolError as exc:
        raise RemoteProtocolError(f"invalid {tag} message: {exc}") from None


class FrameDecoder:
    """Turns a byte stream into messages (the h11 pattern, no I/O).

        while True:
            msg = dec.next_message()      # None: need more bytes
            if msg is None:
                data = await stream.receive_some(dec.room)
                dec.receive_data(data)    # b"" marks end of stream
                ...

    After a RemoteProtocolError the decoder stays failed: drop the peer.
    `decode` parses one payload (DHT messages by default) and `max_frame`
    bounds a payload, so other protocols reuse the framing.
    """

    def __init__(self, decode=None, max_frame: int = MAX_FRAME):
        self._buf = bytearray()
        self._eof = False
        self._error: str | None = None
        self._decode = decode_message if decode is None else decode
        self.max_frame = max_frame

    @property
    def room(self) -> int:
        """How many bytes receive_data accepts now (>= 1 once next_message returned None)."""
        return self.max_frame + HEADER - len(self._buf)

    def receive_data(self, data: bytes) -> None:
        self._raise_if_failed()
        if self._eof and data:
            raise LocalProtocolError("data received after end of stream")
        if len(data) > self.room:
            raise LocalProtocolError(f"{len(data)} bytes exceed the decoder's room {self.room}")
        if not data:
            self._eof = True
        self._buf += data
        self._body_len()                        # reject an oversized prefix right away

    def next_message(self):
        """The next complete message, or None if more bytes are needed."""
        self._raise_if_failed()
        n = self._body_len()
        if n is None or len(self._buf) < HEADER + n:
            if self._eof and self._buf:
                self._fail("stream ended inside a frame")
            return None
        payload = bytes(self._buf[HEADER:HEADER + n])
        del self._buf[:HEADER + n]
        try:
            return self._decode(payload)
        except RemoteProtocolError as exc:
            self._fail(str(exc))

    def _body_len(self) -> int | None:
        if len(self._buf) < HEADER:
            return None
        n = int.from_bytes(self._buf[:HEADER], "big")
        if n > self.max_frame:
            self._fail(f"frame length {n} exceeds {self.max_frame}", OversizedFrame)
        return n

    def _fail(self, reason: str, error: type = RemoteProtocolError):
        self._error = reason
        self._buf.clear()
        raise error(reason)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RemoteProtocolError(f"decoder failed earlier: {self._error}")
