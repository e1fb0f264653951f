"""Checking a backup against its source image, chunk by chunk (`verify REF --against PATH`).

`verify` re-hashes stored chunks against their ids, so it cannot see a chunk
that was recorded with the wrong bytes: those bytes hash to their id. (That
is what the sparse-source bug fixed in this release did: a backup of a file
with holes could record shifted data.) Comparing with the source is the only
check that can: the source is read as a backup reads it (node/sources/local.py:
positional reads, holes skipped) and every chunk's id compared with the one
the backup recorded, in the backup's id scheme (keyed under the data key the
manifest names, or plain BLAKE3). Nothing is stored and nothing in the store
changes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from hypersdk.node.errors import UserError
from hypersdk.node.sources.local import ImageSource, SourceChanged, SourceReadError
from hypersdk.node.store import catalog
from hypersdk.node.store.chunker import ScanStats, scan
from hypersdk.protocol.chunks import ZERO_ID, short
from hypersdk.protocol.errors import IntegrityError, ProtocolError

MAX_LISTED = 1000                 # differing chunks named in the report (all are counted)


@dataclass
class Difference:
    index: int
    offset: int
    length: int
    backup: bytes                 # chunk id recorded in the backup (ZERO_ID: zero)
    source: bytes                 # chunk id of the source's bytes (ZERO_ID: zero)

    def to_json(self) -> dict:
        return {"index": self.index, "offset": self.offset, "length": self.length,
                "backup_chunk": self.backup.hex(), "source_chunk": self.source.hex()}


@dataclass
class AgainstReport:
    ref: str
    manifest_id: bytes
    path: str
    backup_size: int
    source_size: int
    chunk_size: int
    chunks_compared: int = 0
    differing: int = 0
    listed: list = field(default_factory=list)
    bytes_read: int = 0

    @property
    def ok(self) -> bool:
        return self.differing == 0 and self.backup_size == self.source_size

    def to_json(self) -> dict:
        return {"ok": self.ok, "ref": self.ref, "manifest": self.manifest_id.hex(),
                "against": self.path, "backup_size": self.backup_size,
                "source_size": self.source_size, "chunk_size": self.chunk_size,
                "chunks_compared": self.chunks_compared, "differing_chunks": self.differing,
                "bytes_read": self.bytes_read,
                "differences": [d.to_json() for d in self.listed]}

    def text(self) -> str:
        lines = [f"compared {self.chunks_compared} chunks of {self.ref} (manifest "
                 f"{self.manifest_id.hex()[:16]}) with {self.path}"]
        if self.backup_size != self.source_size:
            lines.append(f"SIZE differs: backup {self.backup_size} bytes, source "
                         f"{self.source_size} bytes")
        for d in self.listed[:20]:
            lines.append(f"DIFFERS chunk {d.index} (bytes {d.offset}-{d.offset + d.length - 1}): "
                         f"backup {_name(d.backup)}, source {_name(d.source)}")
        if self.differing > 20:
            lines.append(f"... and {self.differing - 20} more (--json lists up to {MAX_LISTED})")
        lines.append(f"OK: backup {self.ref} matches {self.path}" if self.ok else
                     f"FAILED: backup {self.ref} differs from {self.path} in "
                     f"{self.differing} chunk(s)" +
                     (" and in size" if self.backup_size != self.source_size else ""))
        return "\n".join(lines)


def _name(cid: bytes) -> str:
    return "zero" if cid == ZERO_ID else short(cid)


def verify_against(store, ref: str, path: str, *, progress=None) -> AgainstReport:
    """Compare backup REF with the image at path (see the module doc)."""
    with store.read_lock():
        b = catalog.resolve(store, ref)
        m = catalog.load_manifest(store, b.manifest_id)
        with ImageSource.open(path) as src:
            rep = AgainstReport(b.ref, m.id, path, m.size, src.size, m.chunk_size)
            stats = ScanStats()
            recorded = catalog.iter_chunk_ids(store, m)
            try:
                for c in scan(src, m.chunk_size, has=lambda cid: True, level=1, stats=stats,
                              key=store.key_for(m.key)):      # the backup's id scheme
                    try:
                        _, want = next(recorded, (None, None))
                    except (IntegrityError, ProtocolError) as exc:
                        raise UserError(f"backup {b.ref}: hash list unreadable ({exc}); run "
                                        "`hypersdk verify`") from None
                    if want is None:              # the source is longer than the backup
                        break
                    rep.chunks_compared += 1
                    if c.cid != want or c.length != m.chunk_len(c.index):
                        rep.differing += 1
                        if len(rep.listed) < MAX_LISTED:
                            rep.listed.append(Difference(c.index, c.index * m.chunk_size,
                                                         c.length, want, c.cid))
                    if progress:
                        progress(c.length)
                src.check_unchanged()
            except SourceReadError as exc:
                raise UserError(f"{path}: read error: {exc}") from None
            except SourceChanged as exc:
                raise UserError(f"{path} changed while it was compared ({exc.what}): "
                                "the comparison means nothing; compare a snapshot") from None
            rep.bytes_read = stats.bytes_read
    return rep
