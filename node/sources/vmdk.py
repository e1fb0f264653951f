"""A one-pass reader of streamOptimized VMDK, the format vCenter's NFC export serves.

What the format is (VMware "Virtual Disk Format 1.1", sparse extents with
markers): sector 0 holds a 512-byte sparse header (magic b"KDMV", version 3,
flags with compressed grains (bit 16) and markers (bit 17), compressAlgorithm
1 = deflate, the capacity and the grain size in 512-byte sectors), an embedded
text descriptor follows it, and the header area ends at `overHead` sectors.
Then comes a stream of markers, each padded to whole sectors:

    grain     {lba u64, size u32 > 0, zlib data[size]}       one grain of the disk
    metadata  {numSectors u64, size u32 == 0, type u32}      then numSectors sectors:
              EOS 0, grain table 1, grain directory 2, footer 3 (the header
              again, with the real gdOffset), progress 4 (VMware's keep-alive)

Two layouts exist. VMware (and so an NFC export) writes gdOffset = GD_AT_END in
the first header, grain tables behind GT markers after their grains, then the
GD marker, the footer and EOS. qemu-img writes the grain directory and tables
into the header area (they are complete when the file is read) and no
metadata markers; it ends the file with a zero sector (which reads as EOS), or
with nothing when the last grain ends the file.

Why one pass: the bytes come from an HTTP response that cannot seek. Each grain
marker carries its LBA, which is all a sequential reader needs, so the tables
behind GT/GD markers are skipped (their sizes bounded by the header) and grains
are yielded as they arrive; VMware and qemu-img write them in increasing LBA
order, and any other order is refused rather than buffered. Nothing after EOS
is read.

Completeness: a stream whose header promises a footer (GD_AT_END) must carry
the footer and EOS. When the tables are in the header area (qemu-img), they
are read in passing and only the number of grains they list is kept: the
stream may end without EOS but only after exactly that many grains.

What it rejects (VmdkError, one line, with the byte offset), because the bytes
come from a network peer: a bad magic, version or flags, a corrupted newline
detector (a text-mode transfer), a grain size outside 8..2048 sectors or not a
power of two, a descriptor over 64 KiB, a header area larger than its tables
need, a compressed grain over twice the grain size, a grain that inflates past
the grain size or not to a whole grain (the last grain may stop at capacity),
bad or incomplete deflate data, an LBA not grain-aligned, at or past capacity,
or not above the previous one, unknown marker types, metadata larger than the
header says the tables are, a footer that disagrees with the header, and
truncation anywhere. Reads are of at most 64 KiB and memory is bounded by a
grain plus one read (and, for header-area tables, the directory: at most 4 MiB).
"""
from __future__ import annotations

import struct
import sys
import zlib
from array import array
from collections.abc import Iterator
from dataclasses import dataclass

SECTOR = 512
MAGIC = b"KDMV"
GD_AT_END = 0xFFFF_FFFF_FFFF_FFFF
FLAG_NL_DETECT, FLAG_ZERO_GRAIN = 1 << 0, 1 << 2
FLAG_COMPRESSED, FLAG_MARKERS = 1 << 16, 1 << 17
_KNOWN_INCOMPAT = FLAG_COMPRESSED | FLAG_MARKERS      # bits 16..31 change the format
COMPRESS_DEFLATE = 1
NL_DETECTOR = b"\n \r\n"
EOS, GT, GD, FOOTER, PROGRESS = 0, 1, 2, 3, 4

MAX_CAPACITY = 64 << 40                 # bytes: above vSphere's 62 TB disks
MIN_GRAIN, MAX_GRAIN = 8, 2048          # sectors: 4 KiB .. 1 MiB (VMware writes 128)
MAX_GTES = 512                          # entries per grain table (the spec's value)
MAX_DESCRIPTOR = 64 << 10
MAX_FRONT_GD = 1 << 20                  # header-area directory entries held (4 MiB)
PIECE = 64 << 10                        # the largest single read

# magic, version, flags, capacity, grainSize, descriptorOffset, descriptorSize,
# numGTEsPerGT, rgdOffset, gdOffset, overHead, uncleanShutdown, newline chars,
# compressAlgorithm (then 433 bytes of padding)
_HEADER = struct.Struct("<4sIIQQQQIQQQB4sH")
_MARKER = struct.Struct("<QII")         # lba|numSectors, size, type (metadata only)
_GRAIN_HEAD = 12                        # a grain's data starts after lba and size


class VmdkError(ValueError):
    """The stream is not a well-formed streamOptimized VMDK (or it was cut short)."""


def is_stream_optimized(first_bytes: bytes) -> bool:
    """Whether an export starting with these bytes (its first sector) is a
    streamOptimized VMDK: the sparse magic with compressed grains, markers and
    deflate. Anything else is raw. (A KDMV file without markers, such as a
    monolithicSparse extent, needs random access: False here, and a caller
    should not store it as a raw disk either.)"""
    if len(first_bytes) < SECTOR or first_bytes[:4] != MAGIC:
        return False
    _, _, flags, *_, compress = _HEADER.unpack_from(first_bytes)
    return flags & (FLAG_COMPRESSED | FLAG_MARKERS) == FLAG_COMPRESSED | FLAG_MARKERS \
        and compress == COMPRESS_DEFLATE


@dataclass(frozen=True)
class _Header:
    version: int
    flags: int
    capacity: int               # sectors
    grain: int                  # sectors
    desc_offset: int
    desc_sectors: int
    gtes: int
    gd_offset: int
    overhead: int
    compress: int

    @property
    def n_gts(self) -> int:
        return -(-self.capacity // (self.grain * self.gtes))

    @property
    def gd_sectors(self) -> int:
        return -(-self.n_gts * 4 // SECTOR)

    @property
    def gt_sectors(self) -> int:
        return -(-self.gtes * 4 // SECTOR)


def _parse_header(sector: bytes, where: str) -> _Header:
    (magic, version, flags, capacity, grain, desc_offset, desc_sectors, gtes, _rgd, gd_offset,
     overhead, _unclean, newlines, compress) = _HEADER.unpack_from(sector)
    if magic != MAGIC:
        raise VmdkError(f"{where}: bad magic {magic!r} (not a sparse VMDK)")
    if flags & (FLAG_COMPRESSED | FLAG_MARKERS) != FLAG_COMPRESSED | FLAG_MARKERS:
        raise VmdkError(f"{where}: flags {flags:#x} lack compressed grains and markers "
                        "(not streamOptimized)")
    if version != 3:
        raise VmdkError(f"{where}: version {version}, a streamOptimized VMDK is version 3")
    if flags & 0xFFFF0000 & ~_KNOWN_INCOMPAT:
        raise VmdkError(f"{where}: unknown incompatible flags {flags:#x}")
    if flags & FLAG_NL_DETECT and newlines != NL_DETECTOR:
        raise VmdkError(f"{where}: newline detector {newlines!r} is corrupted "
                        "(the file went through a text-mode transfer)")
    if compress != COMPRESS_DEFLATE:
        raise VmdkError(f"{where}: compressAlgorithm {compress}, only deflate (1) is defined")
    if not MIN_GRAIN <= grain <= MAX_GRAIN or grain & (grain - 1):
        raise VmdkError(f"{where}: grain size {grain} sectors is not a power of two in "
                        f"{MIN_GRAIN}..{MAX_GRAIN}")
    if capacity * SECTOR > MAX_CAPACITY:
        raise VmdkError(f"{where}: capacity {capacity * SECTOR:,} bytes is over {MAX_CAPACITY:,}")
    if not 1 <= gtes <= MAX_GTES:
        raise VmdkError(f"{where}: {gtes} entries per grain table, not 1..{MAX_GTES}")
    h = _Header(version, flags, capacity, grain, desc_offset, desc_sectors, gtes, gd_offset,
                overhead, compress)
    if desc_sectors * SECTOR > MAX_DESCRIPTOR:
        raise VmdkError(f"{where}: descriptor of {desc_sectors} sectors is over "
                        f"{MAX_DESCRIPTOR // 1024} KiB")
    if desc_sectors and not 1 <= desc_offset <= overhead - desc_sectors:
        raise VmdkError(f"{where}: descriptor at sector {desc_offset} is outside the header area")
    # the header, the descriptor and two copies of the tables, rounded up to a grain
    limit = 1 + MAX_DESCRIPTOR // SECTOR + 2 * (h.gd_sectors + h.n_gts * h.gt_sectors)
    if not 1 <= overhead <= -(-limit // grain) * grain:
        raise VmdkError(f"{where}: header area of {overhead} sectors is out of bounds")
    return h


class StreamOptimizedReader:
    """Reads a streamOptimized VMDK from `stream` (anything with read(n); it is
    never seeked) in one pass. The constructor reads the header area: capacity,
    grain_size (bytes) and descriptor are then known. grains() yields the
    grains; absent grains are zeros, which the caller fills in."""

    def __init__(self, stream):
        self._stream = stream
        self.position = 0                   # bytes consumed from the stream
        self.grains_read = 0
        self.complete = False               # grains() reached the end of the disk's stream
        self._started = False
        h = _parse_header(self._read(SECTOR, "the header"), "header")
        self._h = h
        self.capacity = h.capacity * SECTOR
        self.grain_size = h.grain * SECTOR
        self.descriptor = ""
        self._front = 0 < h.gd_offset < h.overhead  # tables in the header area (qemu-img)
        self._expected: int | None = None           # grains those tables list
        if h.desc_sectors:
            self._skip_to(h.desc_offset, "the header area")
            raw = self._read(h.desc_sectors * SECTOR, "the descriptor")
            self.descriptor = raw.split(b"\0", 1)[0].decode("utf-8", "replace")
        if self._front:
            self._read_front_tables()
        self._skip_to(h.overhead, "the header area")

    # -- the header area ---------------------------------------------------------------------

    def _read_front_tables(self) -> None:
        """The grain directory and tables qemu-img writes into the header area:
        only the number of grains they list is kept."""
        h = self._h
        if h.n_gts > MAX_FRONT_GD:
            raise VmdkError(f"grain directory of {h.n_gts:,} entries is over {MAX_FRONT_GD:,}")
        first_free = h.desc_offset + h.desc_sectors if h.desc_sectors else 1
        if h.gd_offset < first_free or h.gd_offset + h.gd_sectors > h.overhead:
            raise VmdkError(f"grain directory at sector {h.gd_offset} overlaps the header "
                            "or the descriptor, or leaves the header area")
        self._skip_to(h.gd_offset, "the header area")
        gd = self._u32s(h.n_gts, h.gd_sectors, "the grain directory")
        expected, next_free = 0, h.gd_offset + h.gd_sectors
        for gt in gd:
            if gt == 0:
                continue                    # a table never allocated: its grains are absent
            if gt < next_free or gt + h.gt_sectors > h.overhead:
                raise VmdkError(f"grain table at sector {gt} is out of order, overlaps, or is "
                                "not in the header area")
            self._skip_to(gt, "the grain tables")
            entries = self._u32s(h.gtes, h.gt_sectors, "a grain table")
            absent = entries.count(0) + (entries.count(1) if h.flags & FLAG_ZERO_GRAIN else 0)
            expected += h.gtes - absent
            next_free = gt + h.gt_sectors
        self._expected = expected

    def _u32s(self, n: int, sectors: int, what: str) -> array:
        out = array("I")
        for piece in self._pieces(sectors * SECTOR, what):
            out.frombytes(piece)
        if sys.byteorder == "big":
            out.byteswap()
        del out[n:]
        return out

    # -- the marker stream -------------------------------------------------------------------

    def grains(self) -> Iterator[tuple[int, bytes]]:
        """(offset in bytes, data) for each grain present, in stream order (which
        is increasing offset). data is a whole grain, except that the last grain
        may stop at capacity. Ends at EOS (nothing after it is read)."""
        if self._started:
            raise RuntimeError("grains() reads the stream once")
        self._started = True
        h = self._h
        next_lba, footer_seen = 0, False
        while True:
            at = self.position
            sector = self._read_marker()
            if sector is None:                      # clean end of the stream, no EOS
                if self._expected is not None and self.grains_read == self._expected:
                    break
                raise VmdkError(f"VMDK stream ends at byte {at:,} before its end-of-stream "
                                f"marker (after {self.grains_read} grains)")
            lba, size, mtype = _MARKER.unpack_from(sector)
            if footer_seen and (size or mtype != EOS):
                raise VmdkError(f"marker at byte {at:,} after the footer (only EOS may follow)")
            if size:
                if lba < next_lba:
                    raise VmdkError(f"grain at byte {at:,} has LBA {lba}, not above the "
                                    f"previous grain's (out of order or repeated)")
                yield self._grain(at, lba, size, sector)
                next_lba = lba + 1
                continue
            if mtype == EOS:
                if lba:
                    raise VmdkError(f"end-of-stream marker at byte {at:,} has size {lba}")
                if h.gd_offset == GD_AT_END and not footer_seen:
                    raise VmdkError(f"end-of-stream at byte {at:,} without the footer the "
                                    "header promised (gdOffset = GD_AT_END)")
                if self._expected is not None and self.grains_read != self._expected:
                    raise VmdkError(f"stream has {self.grains_read} grains, its grain "
                                    f"tables list {self._expected}")
                break
            if mtype == FOOTER:
                if lba != 1:
                    raise VmdkError(f"footer marker at byte {at:,} has size {lba}, not 1")
                self._check_footer(self._read(SECTOR, "the footer"), at)
                footer_seen = True
            elif mtype in (GT, GD):
                most = h.gt_sectors if mtype == GT else h.gd_sectors
                if lba > most:
                    raise VmdkError(f"{'grain table' if mtype == GT else 'grain directory'} "
                                    f"at byte {at:,} claims {lba} sectors, over {most}")
                self._skip(lba * SECTOR, "metadata")
            elif mtype == PROGRESS:
                if lba:
                    raise VmdkError(f"progress marker at byte {at:,} has size {lba}")
            else:
                raise VmdkError(f"unknown marker type {mtype} at byte {at:,}")
        self.complete = True

    def _grain(self, at: int, lba: int, size: int, sector: bytes) -> tuple[int, bytes]:
        h = self._h
        if lba % h.grain:
            raise VmdkError(f"grain at byte {at:,} has LBA {lba}, not a multiple of the "
                            f"grain size ({h.grain} sectors)")
        if lba >= h.capacity:
            raise VmdkError(f"grain at byte {at:,} has LBA {lba}, past the capacity "
                            f"({h.capacity} sectors)")
        if size > 2 * self.grain_size:
            raise VmdkError(f"grain at byte {at:,} claims {size:,} compressed bytes, over "
                            f"twice the grain size")
        if self._expected is not None and self.grains_read >= self._expected:
            raise VmdkError(f"grain at byte {at:,} is more than the {self._expected} "
                            "its grain tables list")
        inflate, out = zlib.decompressobj(), bytearray()
        where = f"grain at byte {at:,} (LBA {lba})"

        def feed(data: bytes) -> None:
            while data and not inflate.eof:
                try:
                    out.extend(inflate.decompress(data, self.grain_size - len(out) + 1))
                except zlib.error as e:
                    raise VmdkError(f"{where}: bad deflate data ({e})") from None
                if len(out) > self.grain_size:
                    raise VmdkError(f"{where} inflates past the grain size "
                                    f"({self.grain_size:,} bytes)")
                data = inflate.unconsumed_tail
            # bytes after the end of the deflate data (inside `size`) are ignored

        head = sector[_GRAIN_HEAD:_GRAIN_HEAD + size]
        feed(head)
        left = size - len(head)
        rest = -(-(_GRAIN_HEAD + size) // SECTOR) * SECTOR - SECTOR
        for piece in self._pieces(rest, where):
            if left:
                feed(piece[:left])
                left -= min(left, len(piece))
        if not inflate.eof:
            raise VmdkError(f"{where}: deflate data is incomplete")
        offset = lba * SECTOR
        end = min(offset + self.grain_size, self.capacity)
        if len(out) not in (self.grain_size, end - offset):
            raise VmdkError(f"{where} inflates to {len(out):,} bytes, not a grain "
                            f"({self.grain_size:,})")
        self.grains_read += 1
        del out[end - offset:]
        return offset, bytes(out)

    def _check_footer(self, sector: bytes, at: int) -> None:
        f = _parse_header(sector, f"footer at byte {at + SECTOR:,}")
        h = self._h
        if (f.version, f.flags, f.capacity, f.grain, f.gtes, f.compress) != \
                (h.version, h.flags, h.capacity, h.grain, h.gtes, h.compress):
            raise VmdkError(f"footer at byte {at + SECTOR:,} disagrees with the header")
        if f.gd_offset == GD_AT_END:
            raise VmdkError(f"footer at byte {at + SECTOR:,} does not say where the "
                            "grain directory is")

    def read_all_into(self, out) -> int:
        """Write the whole disk (capacity bytes, zeros where no grain is) to
        `out` (anything with write(b); written in order, never seeked).
        Returns the number of bytes written."""
        zeros, pos = bytes(self.grain_size), 0

        def fill(to: int) -> None:
            nonlocal pos
            while pos < to:
                n = min(len(zeros), to - pos)
                out.write(zeros[:n] if n < len(zeros) else zeros)
                pos += n

        for offset, data in self.grains():
            fill(offset)
            out.write(data)
            pos += len(data)
        fill(self.capacity)
        return pos

    # -- reading -----------------------------------------------------------------------------

    def _read(self, n: int, what: str) -> bytes:
        """Exactly n bytes (n <= PIECE), or VmdkError saying where the stream ended."""
        buf = bytearray()
        while len(buf) < n:
            piece = self._stream.read(n - len(buf))
            if not piece:
                raise VmdkError(f"VMDK stream truncated at byte {self.position + len(buf):,} "
                                f"(in {what})")
            if len(piece) > n - len(buf):
                raise VmdkError(f"the stream returned {len(piece)} bytes for a read of "
                                f"{n - len(buf)}")
            buf += piece
        self.position += n
        return bytes(buf)

    def _read_marker(self) -> bytes | None:
        """The next marker's first sector, or None at a clean end of the stream."""
        first = self._stream.read(SECTOR)
        if not first:
            return None
        if len(first) > SECTOR:
            raise VmdkError(f"the stream returned {len(first)} bytes for a read of {SECTOR}")
        self.position += len(first)
        if len(first) == SECTOR:
            return first
        return first + self._read(SECTOR - len(first), "a marker")

    def _pieces(self, n: int, what: str) -> Iterator[bytes]:
        while n > 0:
            piece = self._read(min(n, PIECE), what)
            n -= len(piece)
            yield piece

    def _skip(self, n: int, what: str) -> None:
        for _ in self._pieces(n, what):
            pass

    def _skip_to(self, sector: int, what: str) -> None:
        gap = sector * SECTOR - self.position
        if gap < 0:
            raise VmdkError(f"{what}: sector {sector} overlaps what was already read "
                            f"(at byte {self.position:,})")
        self._skip(gap, what)
