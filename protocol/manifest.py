"""Backup manifests and hash lists.

A manifest names one image version: its size, chunk size, source metadata,
creation time, and the ids of its *hash-list chunks*. A hash list is the
concatenation of 32-byte chunk ids (ZERO_ID for an all-zero chunk), cut into
pieces of LIST_ENTRIES ids; each piece is stored as an ordinary
content-addressed chunk. So a 10 TB image at 1 MiB chunks has a manifest of
~320 list ids (10 KB) and is processed list piece by list piece, never as one
300 MB list in memory.

manifest id = BLAKE3(canonical msgpack of the manifest document).

Id schemes (encryption at rest, protocol/sealing.py and protocol/ids.py). `key`
names the data key the chunk ids and hash-list ids of this manifest are keyed
with, by its fingerprint (32 bytes, safe to show); None means plain BLAKE3 ids.
Version 1 documents (every manifest written before keyed ids, and every manifest
of a node without a data key) have no "key" field; version 2 documents have it,
never None, so each manifest still has exactly one encoding and an old manifest
decodes, re-encodes and hashes exactly as before.

Version 3 (labels sealed, protocol/labels.py): a node with a data key seals the
manifest's labels -- name, source and created -- into one "labels" record under
its key; the document keeps v, size, chunk_size, lists and key readable, so a
holder without the key still knows the backup's structure (which ids make it up,
how large it is) and nothing of what it is called or where it came from.
decode_manifest leaves such labels sealed (name None, source {}, created 0);
open_labels(m, key) fills them in. Both forms encode to the same bytes and id.

The manifest id itself stays plain BLAKE3 of the encoding, keyed or not. It is
what audit entries, certificates and DHT records name, and any member must be
able to check it against the manifest bytes without the tenant's key (`audit
check-certificate`, `verify --network`). It confirms nothing to an outsider: a
keyed manifest holds keyed list ids and a creation time in nanoseconds, which
nobody without the key can guess, so its hash is no oracle for the image's
content (and at rest the manifest's bytes are sealed under its id).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from . import codec, labels
from .chunks import ID_LEN, ZERO_ID, chunk_id, valid_chunk_size
from .errors import LocalProtocolError, RemoteProtocolError
from .sealing import DataKey, SealError

VERSION = 1                               # plain BLAKE3 chunk ids (no "key" field)
VERSION_KEYED = 2                         # keyed chunk ids: "key" names the data key
VERSION_LABELS = 3                        # keyed, and name/source/created sealed in "labels"
FINGERPRINT_LEN = 32
LIST_ENTRIES = 32768                      # ids per hash-list chunk (1 MiB)
MAX_IMAGE = 1 << 56                       # 64 PiB: a sanity bound, not a limit in practice
MAX_NAME = 255
_KEYS = {"v", "name", "size", "chunk_size", "lists", "source", "created"}
_KEYS_V2 = _KEYS | {"key"}
_KEYS_V3 = {"v", "size", "chunk_size", "lists", "key", "labels"}
_LABEL_FIELDS = frozenset({"name", "source", "created"})


def chunk_count(size: int, chunk_size: int) -> int:
    return -(-size // chunk_size)


def list_count(n_chunks: int) -> int:
    return -(-n_chunks // LIST_ENTRIES)


@dataclass(frozen=True)
class Manifest:
    name: str | None                      # None: sealed in `labels`, not opened here
    size: int
    chunk_size: int
    lists: tuple[bytes, ...]
    source: dict = field(default_factory=dict)
    created: int = 0                      # unix time in nanoseconds
    key: bytes | None = None              # fingerprint of the id key; None: plain BLAKE3
    labels: bytes | None = None           # version 3: name, source, created sealed (module doc)

    def __post_init__(self):
        problem = _problem(self)
        if problem:
            raise LocalProtocolError(problem)

    @property
    def n_chunks(self) -> int:
        return chunk_count(self.size, self.chunk_size)

    def chunk_len(self, index: int) -> int:
        """Plaintext length of chunk `index` (the last one may be short)."""
        return min(self.chunk_size, self.size - index * self.chunk_size)

    def list_len(self, list_index: int) -> int:
        """Number of ids held by hash-list piece `list_index`."""
        return min(LIST_ENTRIES, self.n_chunks - list_index * LIST_ENTRIES)

    @property
    def opened(self) -> bool:
        """Are name, source and created known (never sealed, or opened here)?"""
        return self.name is not None

    def to_doc(self) -> dict:
        if self.labels is not None:
            return {"v": VERSION_LABELS, "size": self.size, "chunk_size": self.chunk_size,
                    "lists": list(self.lists), "key": self.key, "labels": self.labels}
        doc = {"v": VERSION, "name": self.name, "size": self.size,
               "chunk_size": self.chunk_size, "lists": list(self.lists),
               "source": dict(self.source), "created": self.created}
        if self.key is not None:
            doc.update(v=VERSION_KEYED, key=self.key)
        return doc

    def encode(self) -> bytes:
        return codec.encode(self.to_doc())

    @property
    def id(self) -> bytes:
        return chunk_id(self.encode())


def _labels_oid(m: Manifest) -> bytes:
    return labels.labels_oid([m.size, m.chunk_size, list(m.lists), m.key])


def seal_labels(m: Manifest, key: DataKey) -> Manifest:
    """m as a version 3 manifest: its name, source and created sealed under key (the
    data key its ids are keyed with). The result still carries them, opened."""
    if m.key is None or key.fingerprint != m.key:
        raise LocalProtocolError("labels are sealed with the data key the manifest's ids use")
    doc = {"name": m.name, "source": dict(m.source), "created": m.created}
    return replace(m, labels=labels.seal_labels(key, _labels_oid(m), doc))


def open_labels(m: Manifest, key: DataKey) -> Manifest:
    """m with its sealed labels opened (m itself when there is nothing to open).
    RemoteProtocolError when key is another key than m's, or the labels do not open
    or are invalid: a manifest whose labels do not open is damaged."""
    if m.labels is None or m.opened:
        return m
    if key.fingerprint != m.key:
        raise RemoteProtocolError(f"the labels are sealed with data key {m.key.hex()[:16]}")
    try:
        doc = labels.open_labels(key, _labels_oid(m), m.labels, _LABEL_FIELDS)
        return replace(m, name=doc["name"], source=doc["source"], created=doc["created"])
    except (SealError, LocalProtocolError) as exc:
        raise RemoteProtocolError(f"manifest labels: {exc}") from None


def _problem(m: Manifest) -> str | None:
    if m.labels is not None:
        if m.key is None:
            return "a manifest with sealed labels must name its key"
        if type(m.labels) is not bytes or len(m.labels) > labels.MAX_RECORD:
            return "manifest labels must be a sealed record of at most 12 KiB"
        if m.name is None and (m.source or m.created):
            return "a manifest with unopened labels has no source or creation time"
    if m.name is None and m.labels is None:
        return "a manifest without sealed labels must have a name"
    if m.name is not None and (not isinstance(m.name, str) or not 0 < len(m.name) <= MAX_NAME):
        return "manifest name must be 1..255 characters"
    if not isinstance(m.size, int) or isinstance(m.size, bool) or not 0 <= m.size <= MAX_IMAGE:
        return f"manifest size {m.size!r} out of range"
    if not isinstance(m.chunk_size, int) or not valid_chunk_size(m.chunk_size):
        return f"chunk size {m.chunk_size!r} is not a power of two in 64 KiB..8 MiB"
    if not isinstance(m.created, int) or isinstance(m.created, bool) or m.created < 0:
        return "manifest creation time must be a non-negative integer"
    if not isinstance(m.source, dict) or not all(
            isinstance(k, str) and isinstance(v, (str, int)) and not isinstance(v, bool)
            for k, v in m.source.items()):
        return "manifest source must map text to text or integers"
    want = list_count(chunk_count(m.size, m.chunk_size))
    if len(m.lists) != want:
        return f"manifest has {len(m.lists)} hash lists, its size needs {want}"
    if not all(isinstance(x, bytes) and len(x) == ID_LEN for x in m.lists):
        return "hash list ids must be 32 bytes"
    if m.key is not None and not (type(m.key) is bytes and len(m.key) == FINGERPRINT_LEN):
        return f"manifest key must be a {FINGERPRINT_LEN}-byte key fingerprint"
    return None


def decode_manifest(data: bytes) -> Manifest:
    """Parse a manifest; RemoteProtocolError for anything malformed."""
    doc = codec.decode(data)
    if not isinstance(doc, dict):
        raise RemoteProtocolError("manifest is not a map")
    v = doc.get("v")
    want = ({VERSION: _KEYS, VERSION_KEYED: _KEYS_V2, VERSION_LABELS: _KEYS_V3}.get(v)
            if type(v) is int else None)
    if want is None:
        raise RemoteProtocolError(f"unsupported manifest version {v!r:.40}")
    if set(doc) != want:
        raise RemoteProtocolError(f"manifest keys {sorted(doc)} are not {sorted(want)}")
    if v != VERSION and doc["key"] is None:
        raise RemoteProtocolError(f"a version {v} manifest must name its key")
    if v == VERSION_LABELS and type(doc["labels"]) is not bytes:
        raise RemoteProtocolError("manifest labels must be bytes")
    try:
        return Manifest(name=doc.get("name"), size=doc["size"], chunk_size=doc["chunk_size"],
                        lists=tuple(doc["lists"]) if isinstance(doc["lists"], list) else None,
                        source=doc.get("source", {}), created=doc.get("created", 0),
                        key=doc.get("key"), labels=doc.get("labels"))
    except (LocalProtocolError, TypeError) as exc:
        raise RemoteProtocolError(f"invalid manifest: {exc}") from None


def check_list_lengths(m: Manifest, entries: list[int]) -> None:
    """LocalProtocolError unless hash-list pieces holding `entries` ids each are
    exactly the pieces m's size needs (a writer checks this before it commits a
    manifest, so a manifest that does not match its lists is never recorded)."""
    want = [m.list_len(i) for i in range(len(m.lists))]
    if list(entries) != want:
        raise LocalProtocolError(
            f"hash lists hold {sum(entries)} ids in {len(entries)} piece(s); a "
            f"{m.size}-byte image at {m.chunk_size}-byte chunks needs {m.n_chunks} "
            f"in {len(want)}")


def split_list(piece: bytes, expected: int) -> list[bytes]:
    """The ids of one hash-list piece; RemoteProtocolError if its length is wrong."""
    if len(piece) != expected * ID_LEN:
        raise RemoteProtocolError(
            f"hash list piece holds {len(piece)} bytes, expected {expected * ID_LEN}")
    return [piece[i:i + ID_LEN] for i in range(0, len(piece), ID_LEN)]


def zero_list(entries: int) -> bytes:
    """The plaintext of an all-zero hash-list piece (every chunk in it is zero)."""
    return ZERO_ID * entries
