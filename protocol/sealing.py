"""Encryption at rest: keyed chunk ids and sealed records (keyed convergent encryption).

Pure: no I/O, no clock, no randomness (a new key's 32 random bytes are an argument).

Why. A site that stores another site's replicas, a stolen disk or a peer in the
exchange must learn nothing of a tenant's images but sizes. Plain content
addressing leaks more than that: anyone can hash a guessed block (a known OS
file, a known database page) and ask whether a store holds it. Encryption must
still keep what content addressing buys: the same plaintext stored twice, at
any of the tenant's sites, is one record, so dedup and replication work as before.

Keys. A tenant data key K is 32 random bytes (DataKey.generate). Every use of K
goes through its own subkey, derived with BLAKE3's derive_key mode under a
context string "hypersdk 2026-12 <purpose> v1", so no two purposes can ever be
confused and a subkey reveals nothing of K or of its siblings:

    chunk id     keys the chunk ids (keyed_id)
    record key   the AES-256-GCM key of every sealed record
    record iv    keys the synthetic IV of every sealed record
    fingerprint  BLAKE3 of it is DataKey.fingerprint: names K in logs, configs and
                 comparisons between sites without revealing K or any subkey

Keyed ids. keyed_id(K, data) = BLAKE3 keyed hash of the plaintext under the id
subkey. Without K nobody can compute, or confirm, the id of a guessed chunk; with
K ids deduplicate exactly as plain BLAKE3 ids do. The all-zero chunk stays
special: it keeps protocol.chunks.ZERO_ID, is never hashed, stored or sealed
(its length is implied by its position, so sealing it would protect nothing).

Records. What is stored at rest and sent on the wire for one object (a chunk, a
manifest or a hash-list piece) under its id:

    header = MAGIC (1) | kind (1) | codec (1) | raw_len (4, big-endian)
    iv     = BLAKE3 keyed(iv subkey, header | object id (32) | payload)[:12]
    record = header | iv | AES-256-GCM(record subkey, iv, payload, aad = header | object id)

`kind` is KIND_CHUNK, KIND_MANIFEST, KIND_HASHLIST or KIND_LABELS; `codec` is the store's
codec byte (raw, zstd, zstd delta...), opaque here; `raw_len` is the plaintext
length after decoding; `payload` is the codec's output. The record is a
hand-built SIV: the IV is a keyed hash of everything sealed, so sealing is
deterministic. The same object at two sites is the same record (dedup and
replication compare bytes, never decrypt), and a GCM nonce can only repeat for
identical (header, id, payload), i.e. for an identical record, which leaks
nothing new. Different payloads repeat a 96-bit IV only by chance: about
n^2 / 2^97 for n records under one K, 2^-33 at 2^32 records (4 PiB of 1 MiB
chunks); such a collision would leak the XOR of two payloads and let their
holder forge tags, so one K should seal well under 2^40 records.

The header and the object id are authenticated (AAD): a record served under
another id, as another kind, with another codec or length, or under another K,
does not open. open_record does not recompute the IV: the tag already proves
that a holder of K sealed exactly this (header, id, payload), and checking that
the plaintext hashes to its keyed id (what the caller does after decoding, as
with plain ids today) catches a sealer that put the wrong data under an id.
Skipping it saves a second pass over the payload on every read.

Keyless holders. A replica site without K sees only the header: peek_header
gives kind, codec, raw_len and the sealed payload length, enough to account
for space and to check sizes, nothing else. Equality of two records is visible
(that is convergent encryption's price, and it stays within one tenant: two
tenants' records of the same data differ).

Bounds. payload <= MAX_PAYLOAD: ZSTD_COMPRESSBOUND(MAX_CHUNK), the largest zstd
frame of the largest chunk (= protocol.exchange.MAX_PAYLOAD), plus 32 bytes for
the base id a zstd-delta record carries (node/store/delta.py); a raw record of
MAX_CHUNK fits too. raw_len <= MAX_RAW[kind]: MAX_CHUNK (8 MiB) for chunks and
hash-list pieces (a piece is an ordinary chunk, 1 MiB today), MAX_MANIFEST_RAW
(1 MiB) for manifests, 16x protocol.exchange.MAX_MANIFEST; a 1 MiB manifest
names ~32k hash lists, i.e. ~1 PiB of image at 1 MiB chunks; MAX_LABELS_RAW
(12 KiB) for a backup's labels (protocol/labels.py), which ride in audit entries. Every size is
checked before any crypto runs.

Errors. A record that is malformed, oversized or does not open raises SealError
(an IntegrityError carrying the object id, the kind and the reason) and nothing
else: never a cryptography exception, struct.error or IndexError. Arguments
we pass wrongly (a payload too large to seal, an unknown kind, an id that is
not 32 bytes, the zero id) raise LocalProtocolError; a stored key of the wrong
size, RemoteProtocolError.
"""
from __future__ import annotations

import hmac
import struct
from dataclasses import dataclass
from typing import NamedTuple

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .chunks import ID_LEN, MAX_CHUNK, ZERO_ID
from .errors import IntegrityError, LocalProtocolError, RemoteProtocolError

KEY_LEN = 32
MAGIC = 0xE1                              # "encrypted, format 1"; not a zstd or pack magic byte
KIND_CHUNK = 1
KIND_MANIFEST = 2
KIND_HASHLIST = 3
KIND_LABELS = 4                           # a backup's name, source, time (protocol/labels.py)
KIND_NAMES = {KIND_CHUNK: "chunk", KIND_MANIFEST: "manifest", KIND_HASHLIST: "hash list",
              KIND_LABELS: "labels"}
MAX_MANIFEST_RAW = 1 << 20                # 16x exchange.MAX_MANIFEST (60 KiB); ~1 PiB of image
MAX_LABELS_RAW = 12 << 10                 # fits in an audit entry (16 KiB) with room to spare
MAX_RAW = {KIND_CHUNK: MAX_CHUNK, KIND_MANIFEST: MAX_MANIFEST_RAW, KIND_HASHLIST: MAX_CHUNK,
           KIND_LABELS: MAX_LABELS_RAW}
MAX_PAYLOAD = MAX_CHUNK + (MAX_CHUNK >> 8) + ID_LEN   # zstd_bound(MAX_CHUNK) + a delta's base id
MAX_CODEC = 255

_HEADER = struct.Struct(">BBBI")
HEADER_LEN = _HEADER.size                 # 7
IV_LEN = 12
TAG_LEN = 16
RECORD_OVERHEAD = HEADER_LEN + IV_LEN + TAG_LEN        # 35 bytes on top of the payload
MAX_RECORD = MAX_PAYLOAD + RECORD_OVERHEAD

_CONTEXT = "hypersdk 2026-12 {} v1"
_INTO = hasattr(AESGCM, "encrypt_into") and hasattr(AESGCM, "decrypt_into")


class SealError(IntegrityError):
    """A sealed record is malformed, oversized, or does not open under this key,
    id and kind. `oid` is the object id it was opened under (None for peek_header)."""

    def __init__(self, oid: bytes | None, kind: int, reason: str):
        self.oid = oid
        self.kind = kind
        self.reason = reason
        what = KIND_NAMES.get(kind, "record")
        name = f"sealed {what} {oid.hex()}" if oid is not None else f"sealed {what}"
        super().__init__(f"{name}: {reason}")


def _subkey(k: bytes, purpose: str) -> bytes:
    return blake3.blake3(k, derive_key_context=_CONTEXT.format(purpose)).digest()


@dataclass(frozen=True, eq=False)
class DataKey:
    """A tenant data key K and its subkeys; make one with generate or from_bytes.
    repr never shows K; == compares K in constant time; print the fingerprint."""

    secret: bytes                         # K itself: keep it secret
    id_key: bytes
    record_key: bytes
    iv_key: bytes
    fingerprint: bytes                    # safe to print and compare
    _aead: AESGCM                         # AES-256-GCM under record_key, set up once

    @classmethod
    def generate(cls, random32: bytes) -> DataKey:
        """A new key from 32 bytes of the caller's CSPRNG (os.urandom / secrets)."""
        if type(random32) is not bytes or len(random32) != KEY_LEN:
            raise LocalProtocolError(f"a data key needs exactly {KEY_LEN} random bytes")
        if random32 == bytes(KEY_LEN):
            raise LocalProtocolError("32 zero bytes are not randomness: refusing the data key")
        return cls._derive(random32)

    @classmethod
    def from_bytes(cls, b) -> DataKey:
        """The key stored as `b` (its `secret`); RemoteProtocolError if it cannot be one."""
        if not isinstance(b, (bytes, bytearray, memoryview)):
            raise RemoteProtocolError(f"a data key is {KEY_LEN} bytes, not {type(b).__name__}")
        b = bytes(b)
        if len(b) != KEY_LEN:
            raise RemoteProtocolError(f"a data key is {KEY_LEN} bytes, not {len(b)}")
        if b == bytes(KEY_LEN):
            raise RemoteProtocolError("an all-zero data key is not a key")
        return cls._derive(b)

    @classmethod
    def _derive(cls, k: bytes) -> DataKey:
        record_key = _subkey(k, "record key")
        return cls(secret=k, id_key=_subkey(k, "chunk id"), record_key=record_key,
                   iv_key=_subkey(k, "record iv"),
                   fingerprint=blake3.blake3(_subkey(k, "fingerprint")).digest(),
                   _aead=AESGCM(record_key))

    def __repr__(self) -> str:
        return f"DataKey(fingerprint={self.fingerprint.hex()[:16]})"

    def __eq__(self, other) -> bool:
        if not isinstance(other, DataKey):
            return NotImplemented
        return hmac.compare_digest(self.secret, other.secret)

    def __hash__(self) -> int:
        return hash(self.fingerprint)


def keyed_id(key: DataKey, data) -> bytes:
    """The id of a chunk's plaintext under `key`: BLAKE3 keyed with the id subkey.
    Callers test protocol.chunks.is_zero first: a zero chunk's id is ZERO_ID."""
    return blake3.blake3(data, key=key.id_key).digest()


class Opened(NamedTuple):
    codec: int
    raw_len: int
    payload: bytearray                    # decrypted in place (see open_record)


class Header(NamedTuple):
    kind: int
    codec: int
    raw_len: int
    sealed_len: int                       # payload bytes sealed inside (record length - overhead)


def _bytes_view(v, what: str) -> memoryview:
    try:
        return memoryview(v).cast("B")
    except TypeError:
        raise LocalProtocolError(f"{what} must be contiguous bytes, not {type(v).__name__}") from None


def _check_args(key, kind, oid) -> None:
    if not isinstance(key, DataKey):
        raise LocalProtocolError(f"key must be a DataKey, not {type(key).__name__}")
    if type(kind) is not int or kind not in MAX_RAW:
        raise LocalProtocolError(f"kind must be one of {sorted(MAX_RAW)}, not {kind!r:.40}")
    if type(oid) is not bytes or len(oid) != ID_LEN:
        raise LocalProtocolError(f"object id must be {ID_LEN} bytes")
    if oid == ZERO_ID:
        raise LocalProtocolError("the zero chunk is never sealed")


def seal(key: DataKey, kind: int, oid: bytes, codec: int, raw_len: int, payload) -> bytearray:
    """The sealed record of `payload` (codec output of `raw_len` plaintext bytes) for
    object `oid`. Deterministic: the same arguments always give the same record.
    `payload` may be bytes, bytearray or memoryview; it is not copied before encryption.
    The record is a new bytearray (seal_into writes into a buffer of the caller's)."""
    view = _bytes_view(payload, "payload")
    out = bytearray(view.nbytes + RECORD_OVERHEAD)
    seal_into(key, kind, oid, codec, raw_len, view, out)
    return out


def seal_into(key: DataKey, kind: int, oid: bytes, codec: int, raw_len: int, payload,
              out) -> memoryview:
    """seal() into the start of `out` (a writable buffer of at least len(payload) +
    RECORD_OVERHEAD bytes that does not overlap payload); returns the record, a view
    of out. For callers that reuse buffers: a fresh 1 MiB buffer per record (its
    allocation and page faults) cost more than the encryption, measured."""
    _check_args(key, kind, oid)
    if type(codec) is not int or not 0 <= codec <= MAX_CODEC:
        raise LocalProtocolError(f"codec must be in 0..{MAX_CODEC}, not {codec!r:.40}")
    if type(raw_len) is not int or not 0 <= raw_len <= MAX_RAW[kind]:
        raise LocalProtocolError(f"raw_len of a {KIND_NAMES[kind]} must be in 0..{MAX_RAW[kind]}, "
                                 f"not {raw_len!r:.40}")
    view = _bytes_view(payload, "payload")
    if view.nbytes > MAX_PAYLOAD:
        raise LocalProtocolError(f"payload of {view.nbytes} bytes exceeds {MAX_PAYLOAD}")
    n = view.nbytes + RECORD_OVERHEAD
    dst = _bytes_view(out, "out")
    if dst.readonly or dst.nbytes < n:
        raise LocalProtocolError(f"out must be a writable buffer of at least {n} bytes")
    header = _HEADER.pack(MAGIC, kind, codec, raw_len)
    aad = header + oid
    h = blake3.blake3(aad, key=key.iv_key)
    h.update(view)
    iv = h.digest(length=IV_LEN)
    dst[:HEADER_LEN] = header
    dst[HEADER_LEN:HEADER_LEN + IV_LEN] = iv
    if _INTO:
        key._aead.encrypt_into(iv, view, aad, dst[HEADER_LEN + IV_LEN:n])
    else:                                 # cryptography < 45
        dst[HEADER_LEN + IV_LEN:n] = key._aead.encrypt(iv, view, aad)
    return dst[:n]


def _parse(record, oid: bytes | None, want_kind: int | None) -> tuple[memoryview, int, int, int]:
    """Checks shared by peek_header and open_record: SealError for any bad header or size."""
    try:
        view = memoryview(record).cast("B")
    except TypeError:
        raise LocalProtocolError(f"a record must be contiguous bytes, not "
                                 f"{type(record).__name__}") from None
    n = view.nbytes
    ekind = want_kind or 0
    if n < RECORD_OVERHEAD:
        raise SealError(oid, ekind, f"{n} bytes, shorter than the {RECORD_OVERHEAD}-byte overhead")
    if n > MAX_RECORD:
        raise SealError(oid, ekind, f"{n} bytes, longer than the largest record ({MAX_RECORD})")
    magic, kind, codec, raw_len = _HEADER.unpack_from(view, 0)
    if magic != MAGIC:
        raise SealError(oid, ekind, f"magic byte 0x{magic:02x} is not 0x{MAGIC:02x}: not a sealed record")
    if kind not in MAX_RAW:
        raise SealError(oid, ekind, f"unknown kind {kind}")
    if want_kind is not None and kind != want_kind:
        raise SealError(oid, want_kind, f"record is a {KIND_NAMES[kind]}, "
                                        f"expected a {KIND_NAMES[want_kind]}")
    if raw_len > MAX_RAW[kind]:
        raise SealError(oid, kind, f"raw_len {raw_len} exceeds {MAX_RAW[kind]}")
    return view, kind, codec, raw_len


def peek_header(record) -> Header:
    """What a holder without the key can check: the kind and sizes a record claims.
    SealError if the header or the record's size is impossible. Proves nothing else."""
    view, kind, codec, raw_len = _parse(record, None, None)
    return Header(kind, codec, raw_len, view.nbytes - RECORD_OVERHEAD)


def peek_kind(record) -> int | None:
    """The kind byte a record's header claims, None when it has no sealed header at
    all; never raises (a server's cheap test of what it is about to send)."""
    if len(record) < RECORD_OVERHEAD or record[0] != MAGIC:
        return None
    return record[1]


def open_record(key: DataKey, kind: int, oid: bytes, record) -> Opened:
    """The payload sealed in `record` for object `oid` of `kind` under `key`, as a
    new bytearray (decrypt_into: ~5x faster than a fresh bytes per 1 MiB payload).
    SealError if the record is malformed or was not sealed for exactly this
    (key, kind, id, header, payload); nothing else escapes."""
    _check_args(key, kind, oid)
    view, _, codec, raw_len = _parse(record, oid, kind)
    payload = bytearray(view.nbytes - RECORD_OVERHEAD)
    _decrypt(key, kind, oid, view, payload)
    return Opened(codec, raw_len, payload)


def open_record_into(key: DataKey, kind: int, oid: bytes, record, out) -> Opened:
    """open_record into the start of `out` (a writable buffer of at least the record's
    length - RECORD_OVERHEAD bytes, not overlapping it): the payload is a view of out,
    valid until the caller writes to out again. For a reader that decodes the payload
    at once with a reused buffer (a fresh zeroed 1 MiB buffer per record cost about
    twice the decryption, measured). Same checks and errors as open_record."""
    _check_args(key, kind, oid)
    view, _, codec, raw_len = _parse(record, oid, kind)
    n = view.nbytes - RECORD_OVERHEAD
    dst = _bytes_view(out, "out")
    if dst.readonly or dst.nbytes < n:
        raise LocalProtocolError(f"out must be a writable buffer of at least {n} bytes")
    _decrypt(key, kind, oid, view, dst[:n])
    return Opened(codec, raw_len, dst[:n])


def _decrypt(key: DataKey, kind: int, oid: bytes, view: memoryview, dst) -> None:
    header = view[:HEADER_LEN].tobytes()
    iv = view[HEADER_LEN:HEADER_LEN + IV_LEN].tobytes()
    try:
        if _INTO:
            key._aead.decrypt_into(iv, view[HEADER_LEN + IV_LEN:], header + oid, dst)
        else:                             # cryptography < 45
            dst[:] = key._aead.decrypt(iv, view[HEADER_LEN + IV_LEN:], header + oid)
    except InvalidTag:
        raise SealError(oid, kind, "does not authenticate (damaged, another id, kind or key)") from None
