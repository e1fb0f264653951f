"""Pack files: append-only sequences of chunk records.

Record = 45-byte header + stored bytes:
    magic  b"HSC1"   4
    codec  u8        1   low 4 bits: 0 = raw, 1 = zstd, 2 = zstd delta (see delta.py)
                         | SEALED (0x40): the stored bytes are a sealed record
                           (protocol/sealing.py) whose payload is that codec's output
                         | KEYED (0x20, only with SEALED): the id is keyed under the
                           store's data key (protocol/ids.py), else plain BLAKE3
                         | FOREIGN (0x10): the id is keyed under another tenant's data
                           key, which this node does not hold (a storage-only
                           holder's replica): nobody here can check it. With
                           SEALED | KEYED the record is that tenant's sealed
                           record, stored and served as received (opaque here;
                           raw or zstd inside); without KEYED it is a hash-list
                           piece a key holder sent opened (keyed ids are no
                           secret), sealed under this store's own key (SEALED)
    id     32 bytes      the chunk id (of the plaintext, in the scheme the codec says)
    raw    u32 LE        plaintext length
    stored u32 LE        length of the bytes that follow

Records of stores before encryption at rest (index schema <= 2) have codecs 0-2
only; they stay readable as they are. The index repeats the codec byte (with its
flags), so a reader knows how to open and check a record before reading it.

The header repeats the chunk id so that a record read at the wrong offset is
detected at once, and so that the index could be rebuilt from packs alone.
A pack only ever grows by appending; bytes past the end the index committed
are the torn tail of an interrupted write and are cut off before the next
append.
"""
from __future__ import annotations

import errno
import os
import struct

from hypersdk.protocol.errors import ChunkCorrupt

MAGIC = b"HSC1"
HEADER = struct.Struct("<4sB32sII")
HDR_LEN = HEADER.size
CODEC_RAW = 0
CODEC_ZSTD = 1
CODEC_ZSTD_DELTA = 2
INNER_CODECS = (CODEC_RAW, CODEC_ZSTD, CODEC_ZSTD_DELTA)
SEALED = 0x40
KEYED = 0x20
INNER = 0x0F
FOREIGN = 0x10
_WHOLE = (CODEC_RAW, CODEC_ZSTD)
CODECS = frozenset(INNER_CODECS) | {SEALED | c for c in INNER_CODECS} | {
    SEALED | KEYED | c for c in INNER_CODECS} | {
    f | c for f in (FOREIGN | SEALED, FOREIGN | SEALED | KEYED) for c in _WHOLE}


def inner(codec: int) -> int:
    """The codec of the payload (raw, zstd, zstd delta), sealed or not."""
    return codec & INNER


def is_sealed(codec: int) -> bool:
    return bool(codec & SEALED)


def is_keyed(codec: int) -> bool:
    return bool(codec & KEYED)


def is_foreign(codec: int) -> bool:
    return bool(codec & FOREIGN)


def is_opaque(codec: int) -> bool:
    """Another tenant's sealed record: it cannot be opened here."""
    return codec & (FOREIGN | SEALED | KEYED) == FOREIGN | SEALED | KEYED
PACK_MAX = 512 << 20          # a pack is closed once it passes this size


def pack_name(pack_id: int) -> str:
    return f"pack-{pack_id:08d}.dat"


def parse_pack_name(name: str) -> int | None:
    if name.startswith("pack-") and name.endswith(".dat") and name[5:-4].isdigit():
        return int(name[5:-4])
    return None


def header(cid: bytes, codec: int, raw_len: int, stored_len: int) -> bytes:
    return HEADER.pack(MAGIC, codec, cid, raw_len, stored_len)


def read_record(fd: int, offset: int, cid: bytes, stored_len: int, where: str):
    """Return (codec, raw_len, stored bytes) of the record at offset, checking its header."""
    buf = os.pread(fd, HDR_LEN + stored_len, offset)
    if len(buf) != HDR_LEN + stored_len:
        raise ChunkCorrupt(cid, f"pack is truncated ({len(buf)} of "
                                f"{HDR_LEN + stored_len} bytes readable)", where)
    magic, codec, rid, raw_len, slen = HEADER.unpack_from(buf)
    if magic != MAGIC or rid != cid or slen != stored_len or codec not in CODECS:
        raise ChunkCorrupt(cid, "record header does not match the index", where)
    return codec, raw_len, memoryview(buf)[HDR_LEN:]


_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", None)


def read_record_cached(fd: int, offset: int, cid: bytes, stored_len: int):
    """read_record without ever waiting for the disk: (codec, raw_len, stored view)
    when every byte of the record is in the page cache (preadv with RWF_NOWAIT)
    and its header matches, else None (not cached, short, not supported, or a
    header that does not match: the caller takes its usual path, which reports)."""
    if _RWF_NOWAIT is None:
        return None
    buf = bytearray(HDR_LEN + stored_len)
    try:
        got = os.preadv(fd, [buf], offset, _RWF_NOWAIT)
    except OSError:                       # EAGAIN: not cached; EOPNOTSUPP, ...
        return None
    if got != len(buf):
        return None
    magic, codec, rid, raw_len, slen = HEADER.unpack_from(buf)
    if magic != MAGIC or rid != cid or slen != stored_len or codec not in CODECS:
        return None
    return codec, raw_len, memoryview(buf)[HDR_LEN:]


_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_fallocate = None


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Free the blocks of [offset, offset+length) in place (Linux fallocate
    PUNCH_HOLE); the range then reads as zeros. False if the filesystem
    cannot do it."""
    global _fallocate
    if _fallocate is None:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        _fallocate = getattr(libc, "fallocate", False)
        if _fallocate:
            _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if not _fallocate or length <= 0:
        return bool(_fallocate)
    if _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return True
    import ctypes
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS):
        return False
    raise OSError(err, os.strerror(err))


def allocated_bytes(path) -> int:
    """Bytes a file really occupies on disk (holes excluded)."""
    return os.stat(path).st_blocks * 512
