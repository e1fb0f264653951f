"""Chunk exchange messages ("/hypersdk/exchange/1"), as frozen dataclasses.

Goals: let a restoring node learn a manifest, learn which of its chunks a peer
holds, and fetch chunks, with every byte it receives checked against a content
address before it is used. Every value that can be constructed is valid and
encodes into one frame (protocol.exchange_framing); constructors raise
LocalProtocolError, the frame decoder turns that into RemoteProtocolError for
bytes a peer sent. Non-goals: which peer to ask for what (node/exchange/swarm_plan.py),
storage (node/store/store.py), transport (node/).

One request/response stream protocol:

    request                              tag            response(s), echo rid     tag
    GetManifest(rid, manifest_id)        "get_manifest" ManifestData(rid, manifest_id,
                                                          data | None)            "manifest"
    Have(rid, manifest_id, start, count) "have"         HaveBits(rid, manifest_id, start,
                                                          count, bits)            "have_bits"
    Get(rid, ids)                        "get"          one per id, in request order:
                                                          Data(rid, id, codec, raw_len,
                                                               payload)           "data"
                                                          or Missing(rid, id)     "missing"
    Cancel(ids)                          "cancel"       none: each id an earlier Get on
                                                          this stream asked for and the
                                                          responder has not sent yet is
                                                          answered with Missing instead
                                                          of Data (still one answer per
                                                          id, in order); other ids are
                                                          ignored

Cancel is how a downloader that got a chunk from one peer stops the copies it asked
others for in its endgame: a copy not yet sent costs a Missing frame instead of the
chunk. It races with the answers (a Data may already be on its way), so a downloader
takes either answer for a cancelled id.

Versioning: a responder that gets a tag it does not know fails the stream
(RemoteProtocolError), so a new request type needs a new protocol id
("/hypersdk/exchange/2", offered before /1 in the libp2p protocol negotiation,
and a new version byte in the fast channel's offer), not a new tag under /1. Cancel
is part of /1 as first deployed (no node without it ever ran outside this
repository's history). So is CODEC_SEALED, on the condition that no node with keyed
ids (7fd0074, encryption at rest step 1) ran without it outside this repository: such
a node would fail the stream on codec 3 (check_data_header).

ManifestData.data is the manifest's canonical encoding (protocol.manifest);
None means "not held" (a value, not an error). The receiver checks
BLAKE3(data) == manifest_id with open_manifest() before trusting it.

HaveBits: bit i (0 <= i < count) says whether the responder holds the chunk at
position start + i of the manifest's chunk list. Bits are packed LSB-first:
position start + i is `bits[i // 8] >> (i % 8) & 1`. len(bits) ==
ceil(count / 8) and the padding bits of the last byte are zero, so a bitfield
has exactly one encoding. Positions past the end of the manifest, zero chunks,
and every position of a manifest the responder does not know, are 0.

The wire codec rule (Data.codec): CODEC_RAW (0), CODEC_ZSTD (1) and CODEC_SEALED
(3) are sent; 2 never is. A record stored as a zstd delta (node/store/packfile.py
codec 2) depends on a base chunk the peer may not have, so a server MUST NOT send
it as stored: it decodes the delta and re-encodes the plaintext (data_from_plain()
does the choice: zstd when it shrinks the chunk, raw otherwise), sealed or not. A
Data frame with codec 2 does not decode (RemoteProtocolError). open_data() is the
only way a receiver should turn a Data message into chunk bytes: it bounds
decompression to raw_len and checks BLAKE3(plaintext) == id, raising
ChunkHashMismatch (with expected and actual ids as evidence) when the content is
wrong and RemoteProtocolError when the payload does not decompress. Chunks of a
manifest with keyed ids (protocol/ids.py) are checked with key=: the keyed id of
the plaintext must be the id.

CODEC_SEALED: the payload is a whole sealed record (protocol/sealing.py) of the
chunk under its id, exactly as the server stores it (node/store/packfile.py SEALED),
whose inner codec is raw or zstd (a delta is re-encoded, above, and sealed again)
and whose raw_len is the message's. The rule: a chunk whose id is keyed only ever
travels sealed, whoever asks; a hash-list piece and a manifest travel opened (they
hold ids and sizes, which every holder of the records sees anyway; keyed ids name
nothing without the key). So a storage-only member, which lacks the tenant's key,
learns from a manifest and its pieces which records to keep, and keeps the sealed
chunks it cannot open (check_opaque: the header and sizes are all it can check;
open_piece_unchecked: a piece decoded, its keyed id unchecked), and serves them
as stored to the key's holders.
A receiver with the key opens a sealed chunk under msg.id, kind from the record's header
(authenticated: only chunk and hash-list records are accepted), decodes the inner
payload as above and checks the keyed id; it can then keep the record as received
(sealing is deterministic: it is the record sealing here would produce), so neither
side decrypts-and-reseals on the way. A sealed payload that does not open, claims
another kind, codec or length, or is not sealed for this id under this key is a
SealedDataError (a RemoteProtocolError, with the id and the reason as evidence);
one checked without a key (plain ids: no honest server sends it)
SealedDataKeyMissing, also a RemoteProtocolError. Other schemes are unchanged: a
server opens a sealed record with plain ids, or a sealed delta, and sends codec and
payload as above, over the already encrypted connection.

Bounds (tests/test_exchange.py checks the worst case of every type):
  rid, start      unsigned 64-bit integers
  ids             32 bytes; never ZERO_ID (zero chunks are never sent)
  Have.count      1..MAX_HAVE = 262,144 positions -> at most 32 KiB of bits
  Get.ids         1..MAX_GET_IDS = 64 distinct ids
  Cancel.ids      1..MAX_GET_IDS = 64 distinct ids
  Data.raw_len    1..MAX_CHUNK (protocol.chunks, 8 MiB)
  Data.payload    RAW: exactly raw_len bytes; ZSTD: 1..zstd_bound(raw_len) bytes;
                  SEALED: RECORD_OVERHEAD + 1..zstd_bound(raw_len) bytes (at most
                  MAX_SEALED_PAYLOAD)
  ManifestData    data of at most MAX_MANIFEST = 60 KiB: ~1,800 hash lists, i.e.
                  images up to ~56 TiB at 1 MiB chunks (8x that at 8 MiB chunks)
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import ClassVar, Iterable, Iterator, Union

import zstandard

from .chunks import ID_LEN, MAX_CHUNK, ZERO_ID, VerifiedChunk, chunk_id
from .errors import ChunkHashMismatch, LocalProtocolError, RemoteProtocolError
from .ids import id_of
from .sealing import (
    KIND_CHUNK,
    KIND_HASHLIST,
    KIND_NAMES,
    RECORD_OVERHEAD,
    SealError,
    open_record,
    open_record_into,
    peek_header,
)

PROTOCOL_ID = "/hypersdk/exchange/1"
MAX_U64 = (1 << 64) - 1
MAX_HAVE = 8 * 32768          # positions per Have: 32 KiB of bits, fits a 64 KiB frame
MAX_GET_IDS = 64              # ids per Get: 64 MiB of 1 MiB chunks in flight per request
MAX_MANIFEST = 60 << 10       # encoded manifest bytes in one ManifestData
CODEC_RAW = 0                 # = node.store.packfile.CODEC_RAW
CODEC_ZSTD = 1                # = node.store.packfile.CODEC_ZSTD
CODEC_SEALED = 3              # a whole sealed record (protocol/sealing.py) of raw or zstd
WIRE_CODECS = (CODEC_RAW, CODEC_ZSTD, CODEC_SEALED)   # never packfile.CODEC_ZSTD_DELTA (2)


def zstd_bound(n: int) -> int:
    """ZSTD_COMPRESSBOUND(n): the largest zstd frame of n input bytes."""
    return n + (n >> 8) + ((128 << 10) - n >> 11 if n < 128 << 10 else 0)


MAX_PAYLOAD = zstd_bound(MAX_CHUNK)
MAX_SEALED_PAYLOAD = MAX_PAYLOAD + RECORD_OVERHEAD    # the largest Data body of all


# -- field checks: raise LocalProtocolError, never anything else ----------------------

def _u64(name: str, v) -> None:
    if type(v) is not int or not 0 <= v <= MAX_U64:
        raise LocalProtocolError(f"{name} must be an integer in 0..2**64-1, not {v!r:.40}")


def _id(name: str, v) -> None:
    if type(v) is not bytes or len(v) != ID_LEN:
        raise LocalProtocolError(f"{name} must be {ID_LEN} bytes")


def _chunk(name: str, v) -> None:
    _id(name, v)
    if v == ZERO_ID:
        raise LocalProtocolError(f"{name} is the zero chunk, which is never sent")


def _chunk_ids(v) -> tuple:
    """1..MAX_GET_IDS distinct non-zero chunk ids (Get, Cancel), as a tuple."""
    if type(v) not in (list, tuple) or not 0 < len(v) <= MAX_GET_IDS:
        raise LocalProtocolError(f"ids must be a sequence of 1..{MAX_GET_IDS} chunk ids")
    for cid in v:
        _chunk("chunk id", cid)
    if len(set(v)) != len(v):
        raise LocalProtocolError("ids must not repeat")
    return tuple(v)


def bits_len(count: int) -> int:
    return (count + 7) // 8


def pack_bits(flags: Iterable[bool]) -> bytes:
    """LSB-first bitfield of `flags` (flag i -> bit i % 8 of byte i // 8)."""
    out = bytearray()
    for i, f in enumerate(flags):
        if i % 8 == 0:
            out.append(0)
        if f:
            out[-1] |= 1 << (i % 8)
    return bytes(out)


# -- messages -------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class GetManifest:
    TAG: ClassVar[str] = "get_manifest"
    rid: int
    manifest_id: bytes

    def __post_init__(self):
        _u64("rid", self.rid)
        _id("manifest_id", self.manifest_id)


@dataclass(frozen=True, slots=True)
class ManifestData:
    """The manifest's canonical encoding, or None when the responder lacks it."""
    TAG: ClassVar[str] = "manifest"
    rid: int
    manifest_id: bytes
    data: bytes | None

    def __post_init__(self):
        _u64("rid", self.rid)
        _id("manifest_id", self.manifest_id)
        if self.data is not None and (type(self.data) is not bytes
                                      or not 0 < len(self.data) <= MAX_MANIFEST):
            raise LocalProtocolError(f"manifest data must be None or 1..{MAX_MANIFEST} bytes")


@dataclass(frozen=True, slots=True)
class Have:
    """Which of chunk positions [start, start + count) of a manifest do you hold?"""
    TAG: ClassVar[str] = "have"
    rid: int
    manifest_id: bytes
    start: int
    count: int

    def __post_init__(self):
        _u64("rid", self.rid)
        _id("manifest_id", self.manifest_id)
        _u64("start", self.start)
        if type(self.count) is not int or not 0 < self.count <= MAX_HAVE:
            raise LocalProtocolError(f"count must be in 1..{MAX_HAVE}")


@dataclass(frozen=True, slots=True)
class HaveBits:
    """Answer to Have: an LSB-first bitfield over the requested range."""
    TAG: ClassVar[str] = "have_bits"
    rid: int
    manifest_id: bytes
    start: int
    count: int
    bits: bytes

    def __post_init__(self):
        _u64("rid", self.rid)
        _id("manifest_id", self.manifest_id)
        _u64("start", self.start)
        if type(self.count) is not int or not 0 < self.count <= MAX_HAVE:
            raise LocalProtocolError(f"count must be in 1..{MAX_HAVE}")
        if type(self.bits) is not bytes or len(self.bits) != bits_len(self.count):
            raise LocalProtocolError(f"bits must be {bits_len(self.count)} bytes for "
                                     f"{self.count} positions")
        pad = -self.count % 8
        if pad and self.bits[-1] >> (8 - pad):
            raise LocalProtocolError("padding bits past count must be zero")

    @classmethod
    def from_flags(cls, rid: int, manifest_id: bytes, start: int,
                   flags: Iterable[bool]) -> "HaveBits":
        flags = list(flags)
        return cls(rid, manifest_id, start, len(flags), pack_bits(flags))

    def has(self, position: int) -> bool:
        """Whether the absolute chunk `position` is held (False outside the range)."""
        i = position - self.start
        return 0 <= i < self.count and bool(self.bits[i >> 3] >> (i & 7) & 1)

    def positions(self) -> Iterator[int]:
        """The absolute positions held, ascending."""
        for k, byte in enumerate(self.bits):
            while byte:
                low = byte & -byte
                yield self.start + 8 * k + low.bit_length() - 1
                byte ^= low


@dataclass(frozen=True, slots=True)
class Get:
    """Send me these chunks; answered by one Data or Missing per id, in order."""
    TAG: ClassVar[str] = "get"
    rid: int
    ids: tuple[bytes, ...]

    def __post_init__(self):
        _u64("rid", self.rid)
        object.__setattr__(self, "ids", _chunk_ids(self.ids))


@dataclass(frozen=True, slots=True)
class Cancel:
    """Do not send these chunks of earlier Gets on this stream (Missing instead); no
    answer of its own."""
    TAG: ClassVar[str] = "cancel"
    ids: tuple[bytes, ...]

    def __post_init__(self):
        object.__setattr__(self, "ids", _chunk_ids(self.ids))


@dataclass(frozen=True, slots=True)
class Data:
    """One chunk: `payload` is the plaintext (RAW) or one zstd frame of it (ZSTD).
    Unverified: use open_data() to get the plaintext."""
    TAG: ClassVar[str] = "data"
    rid: int
    id: bytes
    codec: int
    raw_len: int
    payload: bytes

    def __post_init__(self):
        _u64("rid", self.rid)
        _chunk("chunk id", self.id)
        check_data_header(self.codec, self.raw_len, len(self.payload)
                          if type(self.payload) is bytes else None)

    def __repr__(self):
        return (f"Data(rid={self.rid}, id={self.id.hex()[:16]}.., codec={self.codec}, "
                f"raw_len={self.raw_len}, payload=<{len(self.payload)} bytes>)")


def check_data_header(codec: int, raw_len: int, size: int | None) -> None:
    """The rules on (codec, raw_len, payload size) of a Data message."""
    if type(codec) is not int or codec not in WIRE_CODECS:
        raise LocalProtocolError(f"codec {codec!r:.20} is not sent on the wire "
                                 f"(only raw=0, zstd=1 and sealed=3; deltas are re-encoded)")
    if type(raw_len) is not int or not 0 < raw_len <= MAX_CHUNK:
        raise LocalProtocolError(f"raw_len must be in 1..{MAX_CHUNK}")
    if type(size) is not int:
        raise LocalProtocolError("payload must be bytes")
    if codec == CODEC_RAW and size != raw_len:
        raise LocalProtocolError(f"a raw payload of {size} bytes for raw_len {raw_len}")
    if codec == CODEC_ZSTD and not 0 < size <= zstd_bound(raw_len):
        raise LocalProtocolError(f"a zstd payload of {size} bytes for raw_len {raw_len} "
                                 f"(at most {zstd_bound(raw_len)})")
    if codec == CODEC_SEALED and not (RECORD_OVERHEAD < size
                                      <= zstd_bound(raw_len) + RECORD_OVERHEAD):
        raise LocalProtocolError(f"a sealed payload of {size} bytes for raw_len {raw_len} "
                                 f"(at least {RECORD_OVERHEAD + 1}, at most "
                                 f"{zstd_bound(raw_len) + RECORD_OVERHEAD})")


@dataclass(frozen=True, slots=True)
class Missing:
    """The responder does not hold chunk `id`."""
    TAG: ClassVar[str] = "missing"
    rid: int
    id: bytes

    def __post_init__(self):
        _u64("rid", self.rid)
        _chunk("chunk id", self.id)


Request = Union[GetManifest, Have, Get, Cancel]
Response = Union[ManifestData, HaveBits, Data, Missing]
Message = Union[Request, Response]

REQUEST_TYPES = (GetManifest, Have, Get, Cancel)      # what a responder accepts
MESSAGE_TYPES: dict[str, type] = {
    cls.TAG: cls
    for cls in (GetManifest, ManifestData, Have, HaveBits, Get, Cancel, Data, Missing)
}


def answers(request, response) -> bool:
    """True when `response` is a valid answer to `request` (type, rid and the
    echoed fields; for Get, any one of its ids: check the order with the ids).
    Nothing answers a Cancel."""
    if response.rid != getattr(request, "rid", None):
        return False
    if type(request) is GetManifest:
        return type(response) is ManifestData and response.manifest_id == request.manifest_id
    if type(request) is Have:
        return (type(response) is HaveBits and response.manifest_id == request.manifest_id
                and response.start == request.start and response.count == request.count)
    if type(request) is Get:
        return type(response) in (Data, Missing) and response.id in request.ids
    return False


# -- receiving: the only ways to turn a response into trusted bytes --------------------

_tls = threading.local()


def _zd() -> zstandard.ZstdDecompressor:
    d = getattr(_tls, "zd", None)
    if d is None:
        d = _tls.zd = zstandard.ZstdDecompressor()
    return d


def _zc(level: int) -> zstandard.ZstdCompressor:
    cache = getattr(_tls, "zc", None)
    if cache is None:
        cache = _tls.zc = {}
    c = cache.get(level)
    if c is None:
        c = cache[level] = zstandard.ZstdCompressor(level=level)
    return c


class SealedDataError(RemoteProtocolError):
    """A CODEC_SEALED payload that is not a sealed raw or zstd chunk (or hash-list)
    record of this id and raw_len under this key. Evidence: cid and reason."""

    def __init__(self, cid: bytes, reason: str):
        self.cid = cid
        self.reason = reason
        super().__init__(f"sealed chunk {cid.hex()} received from a peer: {reason}")


class SealedDataKeyMissing(SealedDataError):
    """A CODEC_SEALED payload checked without a data key (the manifest's ids are plain
    BLAKE3): nothing here can open it, and no honest server sends one (module doc)."""

    def __init__(self, cid: bytes):
        super().__init__(cid, "it is sealed with a data key and its id is checked without "
                              "one (plain ids: a server sends sealed records only for keyed ids)")


def _sealed_header(msg: Data, key) -> tuple[int, int]:
    """(kind, inner codec) of msg's sealed record after every check that needs no key."""
    if key is None:
        raise SealedDataKeyMissing(msg.id)
    return _sealed_shape(msg)


def _sealed_shape(msg: Data) -> tuple[int, int]:
    """(kind, inner codec) of msg's sealed record: its header and sizes checked."""
    try:
        kind, codec, raw_len, size = peek_header(msg.payload)
    except SealError as exc:
        raise SealedDataError(msg.id, exc.reason) from None
    if kind not in (KIND_CHUNK, KIND_HASHLIST):
        raise SealedDataError(msg.id, f"the record is a {KIND_NAMES[kind]}, not a chunk")
    if raw_len != msg.raw_len:
        raise SealedDataError(msg.id, f"the record's raw_len is {raw_len}, "
                                      f"the message's {msg.raw_len}")
    if codec == CODEC_RAW:
        if size != raw_len:
            raise SealedDataError(msg.id, f"a sealed raw payload of {size} bytes "
                                          f"for raw_len {raw_len}")
    elif codec == CODEC_ZSTD:
        if not 0 < size <= zstd_bound(raw_len):
            raise SealedDataError(msg.id, f"a sealed zstd payload of {size} bytes "
                                          f"for raw_len {raw_len}")
    else:
        raise SealedDataError(msg.id, f"the record's codec {codec} is neither raw nor zstd")
    return kind, codec


def check_opaque(msg: Data) -> None:
    """What a holder without the data key of a keyed backup (a storage-only member)
    can check of one of its chunks before storing it for the key's holders: a
    CODEC_SEALED record of a chunk (not a hash list, not a manifest), raw or zstd
    inside, whose header agrees with the message (SealedDataError otherwise). The
    content and its id are not checked: nobody without the key can; the backup's
    owner proves them by possession challenges over the sealed record, and every
    key holder that fetches the record opens and checks it. A keyed chunk that is
    not sealed is refused too: honest servers send keyed chunks sealed only, so
    this holder never receives their plaintext."""
    if type(msg) is not Data:
        raise LocalProtocolError("check_opaque takes a Data message")
    if msg.codec != CODEC_SEALED:
        raise SealedDataError(msg.id, "a chunk with a keyed id sent unsealed (a server "
                                      "sends keyed chunks sealed only)")
    kind, _ = _sealed_shape(msg)
    if kind != KIND_CHUNK:
        raise SealedDataError(msg.id, f"the record is a {KIND_NAMES[kind]}, not a chunk")


def open_piece_unchecked(msg: Data) -> bytes:
    """The plaintext of a hash-list piece of a keyed backup, for a holder without its
    key: decoded with the bounds of open_data (raw, or one zstd frame of exactly
    raw_len bytes) but not checked against its keyed id, which only a key holder
    can compute. Servers send pieces opened (their keyed ids are no secret: module
    doc); a sealed one is a SealedDataKeyMissing. A holder that stores what a
    dishonest member sent holds useless records: its owner's challenges show it."""
    if type(msg) is not Data:
        raise LocalProtocolError("open_piece_unchecked takes a Data message")
    if msg.codec == CODEC_SEALED:
        raise SealedDataKeyMissing(msg.id)
    return msg.payload if msg.codec == CODEC_RAW else _unzstd(msg.payload, msg.raw_len)


def _open_sealed(msg: Data, key, out=None, kind: int | None = None) -> tuple[int, object]:
    """(inner codec, payload) of a CODEC_SEALED message: opened under msg.id with key
    (into `out`, a writable buffer, when given: the payload is then a view of it);
    kind: _sealed_header's, when the caller has it already."""
    if kind is None:
        kind = _sealed_header(msg, key)[0]
    try:
        if out is None:
            opened = open_record(key, kind, msg.id, msg.payload)
        else:
            opened = open_record_into(key, kind, msg.id, msg.payload, out)
    except SealError as exc:
        raise SealedDataError(msg.id, exc.reason) from None
    return opened.codec, opened.payload


def _sealed_scratch(n: int) -> bytearray:
    """This thread's reused buffer for a sealed zstd payload, of at least n bytes."""
    b = getattr(_tls, "sealed", None)
    if b is None or len(b) < n:
        b = _tls.sealed = bytearray(max(n, 1 << 20))
    return b


def _unzstd(payload, raw_len: int) -> bytes:
    try:
        declared = zstandard.frame_content_size(payload)
        if declared not in (-1, raw_len):
            raise RemoteProtocolError(
                f"zstd frame declares {declared} bytes, raw_len is {raw_len}")
        plain = _zd().decompress(payload, max_output_size=raw_len, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise RemoteProtocolError(f"zstd payload does not decode: {exc}") from None
    if len(plain) != raw_len:
        raise RemoteProtocolError(
            f"zstd payload decodes to {len(plain)} bytes, raw_len is {raw_len}")
    return plain


def open_data(msg: Data, key=None) -> VerifiedChunk:
    """The verified plaintext of `msg` (key: the DataKey of a keyed manifest's ids,
    None for plain BLAKE3 ids).

    RemoteProtocolError: the zstd payload is not exactly one frame decoding to
    raw_len bytes (a declared content size other than raw_len is refused before
    any allocation, so a decompression bomb costs nothing); SealedDataError (one)
    for a CODEC_SEALED payload that does not open (module doc), SealedDataKeyMissing
    for one without a key.
    ChunkHashMismatch: the plaintext does not hash to msg.id (evidence: both ids).
    """
    if type(msg) is not Data:
        raise LocalProtocolError("open_data takes a Data message")
    codec, payload = msg.codec, msg.payload
    if codec == CODEC_SEALED:
        codec, payload = _open_sealed(msg, key)
    plain = payload if codec == CODEC_RAW else _unzstd(payload, msg.raw_len)
    actual = id_of(key, plain)
    if actual != msg.id:
        raise ChunkHashMismatch(msg.id, actual, "received from a peer")
    return VerifiedChunk.of(msg.id, plain)


_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_DID_LEN = (0, 1, 2, 4)
_FCS_LEN = (0, 2, 4, 8)


def zstd_frame_size(payload) -> int:
    """The compressed size of the zstd frame that starts `payload` (RFC 8878: header,
    blocks, optional checksum), found by walking the block headers without decoding.
    RemoteProtocolError when the bytes are not a zstd frame or it is cut short."""
    n = len(payload)
    if n < 6 or bytes(payload[:4]) != _ZSTD_MAGIC:
        raise RemoteProtocolError("zstd payload does not decode: not a zstd frame")
    fhd = payload[4]
    if fhd & 0x08:
        raise RemoteProtocolError("zstd payload does not decode: reserved header bit set")
    single = fhd >> 5 & 1
    fcs = _FCS_LEN[fhd >> 6] or single          # flag 0: 1 byte when single-segment
    off = 5 + (1 - single) + _DID_LEN[fhd & 3] + fcs
    while True:
        if off + 3 > n:
            raise RemoteProtocolError("zstd payload does not decode: truncated frame")
        bh = payload[off] | payload[off + 1] << 8 | payload[off + 2] << 16
        kind = bh >> 1 & 3
        if kind == 3:
            raise RemoteProtocolError("zstd payload does not decode: reserved block type")
        off += 3 + (1 if kind == 1 else bh >> 3)
        if bh & 1:
            break
    if fhd & 0x04:
        off += 4                                    # content checksum
    if off > n:
        raise RemoteProtocolError("zstd payload does not decode: truncated frame")
    return off


def open_data_into(msg: Data, buf, key=None) -> memoryview:
    """open_data(msg) without allocating: the verified plaintext as a memoryview,
    of msg.payload (RAW) or of the start of `buf` (ZSTD: decompressed straight into
    it; SEALED: a raw payload decrypted straight into it, a zstd one decrypted into
    this thread's reused buffer and decompressed into it; `buf` is a writable buffer
    of at least raw_len + 1 bytes, reused by the caller, so the view is valid until
    the caller writes to `buf` again).
    Same checks and errors as open_data: exactly one frame (its size from the block
    headers must be the whole payload), declared size, decoded size == raw_len,
    BLAKE3(plaintext) == id (the keyed id under `key` when given)."""
    if type(msg) is not Data:
        raise LocalProtocolError("open_data_into takes a Data message")
    raw_len = msg.raw_len
    codec, payload = msg.codec, msg.payload
    if codec != CODEC_RAW:
        out = memoryview(buf)
        if len(out) <= raw_len:
            raise LocalProtocolError(f"buffer of {len(out)} bytes for a {raw_len}-byte chunk")
    if codec == CODEC_SEALED:
        kind, inner = _sealed_header(msg, key)
        if inner == CODEC_RAW:                # the plaintext, decrypted straight into buf
            codec, payload = _open_sealed(msg, key, out, kind)
        else:
            codec, payload = _open_sealed(msg, key,
                                          _sealed_scratch(len(payload) - RECORD_OVERHEAD), kind)
    if codec == CODEC_RAW:
        plain = memoryview(payload)
    else:
        size = zstd_frame_size(payload)
        if size != len(payload):
            raise RemoteProtocolError(f"zstd payload does not decode: {len(payload) - size}"
                                      f" bytes after the frame")
        try:
            declared = zstandard.frame_content_size(payload)
            if declared not in (-1, raw_len):
                raise RemoteProtocolError(
                    f"zstd frame declares {declared} bytes, raw_len is {raw_len}")
            reader = _zd().stream_reader(payload, read_across_frames=False)
            got = reader.readinto(out[:raw_len + 1])     # + 1: a longer frame shows
        except zstandard.ZstdError as exc:
            raise RemoteProtocolError(f"zstd payload does not decode: {exc}") from None
        if got != raw_len:
            raise RemoteProtocolError(
                f"zstd payload decodes to {got}{'+' if got > raw_len else ''} bytes, "
                f"raw_len is {raw_len}")
        plain = out[:raw_len]
    actual = id_of(key, plain)
    if actual != msg.id:
        raise ChunkHashMismatch(msg.id, actual, "received from a peer")
    return plain


def open_manifest(msg: ManifestData):
    """The verified, decoded Manifest of `msg`, or None when the peer lacks it.

    ChunkHashMismatch when BLAKE3(data) != manifest_id; RemoteProtocolError when
    the bytes hash right but are not a manifest.
    """
    from .manifest import decode_manifest
    if type(msg) is not ManifestData:
        raise LocalProtocolError("open_manifest takes a ManifestData message")
    if msg.data is None:
        return None
    actual = chunk_id(msg.data)
    if actual != msg.manifest_id:
        raise ChunkHashMismatch(msg.manifest_id, actual, "manifest received from a peer")
    return decode_manifest(msg.data)


# -- sending -------------------------------------------------------------------------

def data_from_plain(rid: int, cid: bytes, plain, level: int = 2) -> Data:
    """A Data message for a chunk's plaintext: zstd when it shrinks it, raw otherwise.

    The server's path for records it cannot send as stored (zstd deltas);
    records stored raw or zstd are sent as stored (codec, raw_len, stored bytes),
    preferably without building a Data (exchange_framing.encode_data_header).
    """
    plain = bytes(plain)
    z = _zc(level).compress(plain)
    if len(z) < len(plain):
        return Data(rid, cid, CODEC_ZSTD, len(plain), z)
    return Data(rid, cid, CODEC_RAW, len(plain), plain)
