"""Error types shared by every layer.

ProtocolError is split as h11 does: LocalProtocolError means we misused an
encoding (a bug on our side), RemoteProtocolError means the bytes we were given
are malformed (a peer, or a damaged file). Integrity failures are their own
types and always carry the evidence.
"""


class ProtocolError(Exception):
    """Base of every encoding error."""


class LocalProtocolError(ProtocolError):
    """We tried to encode something the format does not allow."""


class RemoteProtocolError(ProtocolError):
    """Bytes we received (from a peer or from disk) do not decode."""


class IntegrityError(Exception):
    """Stored or received data does not match its content address."""


class ChunkCorrupt(IntegrityError):
    """A stored or received chunk cannot be read back as its id says."""

    def __init__(self, cid: bytes, reason: str, where: str = ""):
        self.cid = cid
        self.reason = reason
        self.where = where
        loc = f" ({where})" if where else ""
        super().__init__(f"chunk {cid.hex()}{loc}: {reason}")


class ChunkHashMismatch(ChunkCorrupt):
    """A chunk's plaintext does not hash to its id."""

    def __init__(self, expected: bytes, actual: bytes, where: str = ""):
        self.expected = expected
        self.actual = actual
        super().__init__(expected, f"content hashes to {actual.hex()}", where)


class ChunkMissing(IntegrityError):
    """A chunk a manifest needs is not in the store."""

    def __init__(self, cid: bytes):
        self.cid = cid
        super().__init__(f"chunk {cid.hex()} is missing from the store")


class AuditChainBroken(IntegrityError):
    """An author's audit log breaks at `seq`: a bad signature, a gap, a `prev`
    that does not name the previous entry, or an entry by another author.
    `seq` is the first entry that does not fit; `index` (when known) is its
    position in the input that was checked; `entry_id` the offending entry."""

    def __init__(self, author: bytes, seq: int, reason: str, *, entry_id: bytes | None = None,
                 index: int | None = None):
        self.author = author
        self.seq = seq
        self.reason = reason
        self.entry_id = entry_id
        self.index = index
        at = f" (input position {index})" if index is not None else ""
        super().__init__(f"audit log of {author.hex()[:16]} breaks at seq {seq}{at}: {reason}")


class ForkDetected(IntegrityError):
    """Two different, validly signed entries with the same author and seq: proof
    that the author rewrote its log. Carries both entries (protocol.audit.Entry;
    their `.raw` bytes are the portable proof)."""

    def __init__(self, first, second):
        self.first = first
        self.second = second
        self.author = first.author
        self.seq = first.seq
        super().__init__(f"fork in the audit log of {first.author.hex()[:16]} at seq "
                         f"{first.seq}: entries {first.id.hex()[:16]} and {second.id.hex()[:16]}")
