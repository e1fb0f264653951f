"""The streamOptimized VMDK reader (node/sources/vmdk.py) against the real tool
and against the layout VMware writes.

- qemu-img (Debian qemu-utils) converts random sparse raw images (random and
  compressible data, zero regions, sizes that are not a multiple of the grain
  or of a sector, tiny ones) to streamOptimized; the reader, fed through a
  non-seekable stream that returns short reads, rebuilds exactly the raw bytes.
- The same images written in VMware's layout (GD_AT_END, grain tables behind
  markers, GD, footer, EOS, progress markers; several grain sizes and table
  sizes) read back exactly; qemu-img reads that layout too (the test writer is
  the real format).
- is_stream_optimized: true for both, false for raw bytes and monolithicSparse.
- Hostile input raises VmdkError: truncation at every sector and inside
  markers, a huge claimed grain size, a deflate bomb, an LBA past capacity or
  not aligned, out-of-order and repeated grains, bad magic, version, flags,
  newline detector, grain size, descriptor size, header area, unknown markers,
  oversized metadata, a footer that disagrees or is missing, bad deflate data.
  Reads are never over 64 KiB and memory stays bounded (tracemalloc) whatever
  the sizes claim, and nothing after EOS is read.
"""
from __future__ import annotations

import io
import random
import shutil
import struct
import subprocess
import tempfile
import tracemalloc
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hypersdk.node.sources import vmdk
from hypersdk.node.sources.vmdk import StreamOptimizedReader, VmdkError, is_stream_optimized

KiB, MiB = 1 << 10, 1 << 20
QEMU_IMG = shutil.which("qemu-img")
needs_qemu = pytest.mark.skipif(QEMU_IMG is None, reason="qemu-img is not installed "
                                "(Debian package qemu-utils; scripts/setup.sh installs it)")
SETTINGS = settings(max_examples=25, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class OnlyRead:
    """A non-seekable stream: read(n) and nothing else, at most `step` bytes a
    call (a socket's short reads). Records the largest read asked for."""

    def __init__(self, data: bytes, step: int | None = None):
        self._data, self._step, self.pos, self.largest = memoryview(data), step, 0, 0

    def read(self, n: int) -> bytes:
        assert n > 0
        self.largest = max(self.largest, n)
        k = min(n, self._step or n)
        out = bytes(self._data[self.pos:self.pos + k])
        self.pos += len(out)
        return out


def read_disk(data: bytes, step: int | None = None) -> tuple[bytes, StreamOptimizedReader]:
    src = OnlyRead(data, step)
    r = StreamOptimizedReader(src)
    out = io.BytesIO()
    assert r.read_all_into(out) == r.capacity
    assert src.largest <= vmdk.PIECE
    assert r.complete and r.position == src.pos
    return out.getvalue(), r


def padded(raw: bytes) -> bytes:
    """What the disk holds: the raw bytes, zeros up to a whole sector."""
    return raw + bytes(-len(raw) % 512)


def qemu_vmdk(raw: bytes, subformat: str = "streamOptimized") -> bytes:
    with tempfile.TemporaryDirectory() as d:
        src, dst = Path(d, "in.raw"), Path(d, "out.vmdk")
        src.write_bytes(raw)
        subprocess.run([QEMU_IMG, "convert", "-f", "raw", "-O", "vmdk", "-o",
                        f"subformat={subformat}", str(src), str(dst)], check=True,
                       capture_output=True)
        return dst.read_bytes()


def qemu_raw(vmdk_bytes: bytes) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        src, dst = Path(d, "in.vmdk"), Path(d, "out.raw")
        src.write_bytes(vmdk_bytes)
        subprocess.run([QEMU_IMG, "convert", "-f", "vmdk", "-O", "raw", str(src), str(dst)],
                       check=True, capture_output=True)
        return dst.read_bytes()


# -- VMware's layout, written here ---------------------------------------------------------------

DESCRIPTOR = ('# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n'
              'createType="streamOptimized"\n\n# Extent description\n'
              'RDONLY {cap} SPARSE "generated-stream.vmdk"\n\n#DDB\nddb.adapterType = "lsilogic"\n')


def header(cap: int, grain: int = 128, gtes: int = 512, desc_sectors: int = 1,
           gd_offset: int = vmdk.GD_AT_END, overhead: int | None = None, **over) -> bytes:
    f = dict(magic=b"KDMV", version=3, flags=0x30001, cap=cap, grain=grain, desc_offset=1,
             desc_sectors=desc_sectors, gtes=gtes, rgd=0, gd=gd_offset,
             overhead=overhead if overhead is not None else -(-(1 + desc_sectors) // grain) * grain,
             unclean=0, nl=b"\n \r\n", compress=1)
    f.update(over)
    return struct.pack("<4sIIQQQQIQQQB4sH433x", *f.values())


def pad(b: bytes) -> bytes:
    return b + bytes(-len(b) % 512)


def meta(mtype: int, n: int) -> bytes:
    return struct.pack("<QII496x", n, 0, mtype)


def grain_marker(lba: int, comp: bytes) -> bytes:
    return pad(struct.pack("<QI", lba, len(comp)) + comp)


def raw_grains(raw: bytes, grain: int) -> list[tuple[int, bytes]]:
    """(lba, compressed grain) for each grain of raw holding data, a whole grain each."""
    gb = grain * 512
    out = []
    for off in range(0, len(raw), gb):
        g = raw[off:off + gb]
        if any(g):
            out.append((off // 512, zlib.compress(g.ljust(gb, b"\0"))))
    return out


def vmware_stream(cap: int, grains: list[tuple[int, bytes]], grain: int = 128, gtes: int = 512,
                  progress: bool = False) -> bytes:
    """A stream as VMware's StreamVmdkWriter writes it: header (GD_AT_END),
    descriptor, padding to a grain, grain markers with a GT marker and table
    each time the grain table changes, the GD marker and directory, the footer
    marker and footer (with the real gdOffset), EOS."""
    desc = pad(DESCRIPTOR.format(cap=cap).encode())
    ds = len(desc) // 512
    out = bytearray(header(cap, grain, gtes, ds) + desc)
    out += bytes(-len(out) % (grain * 512))
    n_gts = -(-cap // (grain * gtes))
    gd, table, table_no = [0] * n_gts, None, None

    def flush():
        out.extend(meta(vmdk.GT, -(-gtes * 4 // 512)))
        gd[table_no] = len(out) // 512
        out.extend(pad(struct.pack(f"<{gtes}I", *table)))

    for lba, comp in grains:
        no = lba // grain
        if table is not None and no // gtes != table_no:
            flush()
            table = None
        if table is None:
            table, table_no = [0] * gtes, no // gtes
        table[no % gtes] = len(out) // 512
        out += grain_marker(lba, comp)
        if progress:
            out += struct.pack("<QIIQ488x", 0, 0, vmdk.PROGRESS, lba) * 4
    if table is not None:
        flush()
    out += meta(vmdk.GD, -(-n_gts * 4 // 512))
    gd_at = len(out) // 512
    out += pad(struct.pack(f"<{n_gts}I", *gd))
    out += meta(vmdk.FOOTER, 1) + header(cap, grain, gtes, ds, gd_at) + meta(vmdk.EOS, 0)
    return bytes(out)


def vmware_of(raw: bytes, grain: int = 128, gtes: int = 512, progress: bool = False) -> bytes:
    return vmware_stream(-(-len(raw) // 512), raw_grains(raw, grain), grain, gtes, progress)


# -- images --------------------------------------------------------------------------------------

@st.composite
def images(draw, most: int = 3 * MiB) -> bytes:
    """A raw image: zeros with a few regions of random (incompressible) bytes,
    a repeated pattern, or one byte value; sizes include the edge cases."""
    size = draw(st.one_of(st.sampled_from([1, 511, 512, 4096, 64 * KiB - 1, 64 * KiB,
                                           64 * KiB + 1, 128 * KiB + 512, 2 * MiB + 3]),
                          st.integers(1, most)))
    buf = bytearray(size)
    for _ in range(draw(st.integers(0, 6))):
        start = draw(st.integers(0, size - 1))
        n = draw(st.integers(1, min(size - start, 400 * KiB)))
        kind = draw(st.sampled_from(["random", "pattern", "byte"]))
        rng = random.Random(draw(st.integers(0, 2**32)))
        if kind == "random":
            buf[start:start + n] = rng.randbytes(n)
        elif kind == "pattern":
            unit = rng.randbytes(rng.randint(1, 300))
            buf[start:start + n] = (unit * (n // len(unit) + 1))[:n]
        else:
            buf[start:start + n] = bytes([rng.randint(1, 255)]) * n
    if draw(st.booleans()):
        buf[-1] = 0xAB                      # data in the last, possibly partial, grain
    return bytes(buf)


# -- reading what qemu-img writes ------------------------------------------------------------------

@needs_qemu
@SETTINGS
@given(raw=images(), step=st.sampled_from([None, 4096, 777]))
def test_qemu_img_stream_optimized_reads_back_exactly(raw, step):
    v = qemu_vmdk(raw)
    assert is_stream_optimized(v[:512])
    disk, r = read_disk(v, step)
    assert disk == padded(raw) and r.capacity == len(padded(raw))
    assert r.grain_size == 64 * KiB and 'createType="streamOptimized"' in r.descriptor
    # qemu-img leaves all-zero grains out: they are absent, and read as zeros
    src = StreamOptimizedReader(OnlyRead(v))
    got = list(src.grains())
    offsets = [o for o, _ in got]
    assert offsets == [o for o in range(0, len(raw), r.grain_size) if any(raw[o:o + r.grain_size])]
    for o, data in got:
        assert data == padded(raw)[o:o + r.grain_size]
        assert len(data) == min(r.grain_size, r.capacity - o)


@needs_qemu
def test_qemu_img_many_grain_tables():
    """A 40 MiB sparse disk: more than one grain table (each covers 32 MiB)."""
    spots = {0: b"first", 33 * MiB + 5: b"second table", 40 * MiB - 3: b"end"}
    with tempfile.TemporaryDirectory() as d:
        src, dst = Path(d, "in.raw"), Path(d, "out.vmdk")
        with open(src, "wb") as f:
            f.truncate(40 * MiB)
            for off, b in spots.items():
                f.seek(off)
                f.write(b)
        subprocess.run([QEMU_IMG, "convert", "-f", "raw", "-O", "vmdk", "-o",
                        "subformat=streamOptimized", str(src), str(dst)], check=True)
        v = dst.read_bytes()
    r = StreamOptimizedReader(OnlyRead(v))
    got = dict(r.grains())
    assert r.complete and r.capacity == 40 * MiB
    assert sorted(got) == [0, 33 * MiB, 40 * MiB - 64 * KiB]
    for off, b in spots.items():
        g = off - off % r.grain_size
        assert got[g][off - g:off - g + len(b)] == b
        assert got[g].count(0) == r.grain_size - len(b)


@needs_qemu
def test_is_stream_optimized_selects_by_content():
    raw = random.Random(1).randbytes(100 * KiB)
    assert is_stream_optimized(qemu_vmdk(raw)[:512])
    assert is_stream_optimized(vmware_of(raw)[:512])
    mono = qemu_vmdk(raw, "monolithicSparse")
    assert mono[:4] == b"KDMV" and not is_stream_optimized(mono[:512])
    with pytest.raises(VmdkError, match="not streamOptimized"):
        StreamOptimizedReader(OnlyRead(mono))
    for other in (raw[:512], bytes(512), b"", b"KDMV", qemu_vmdk(raw)[:511]):
        assert not is_stream_optimized(other)


# -- reading VMware's layout -----------------------------------------------------------------------

@SETTINGS
@given(raw=images(most=1 * MiB), grain=st.sampled_from([8, 16, 128]),
       gtes=st.sampled_from([512, 16]), progress=st.booleans(), step=st.sampled_from([None, 1000]))
def test_vmware_layout_reads_back_exactly(raw, grain, gtes, progress, step):
    v = vmware_of(raw, grain, gtes, progress)
    assert is_stream_optimized(v[:512])
    disk, r = read_disk(v, step)
    assert disk == padded(raw) and r.grain_size == grain * 512
    assert r.descriptor == DESCRIPTOR.format(cap=r.capacity // 512)


@needs_qemu
def test_qemu_img_reads_the_test_writers_layout():
    rng = random.Random(2)
    raw = bytearray(300 * KiB + 100)
    raw[10:70 * KiB] = rng.randbytes(70 * KiB - 10)
    raw[200 * KiB:200 * KiB + 9] = b"somewhere"
    raw[-1] = 1
    v = vmware_of(bytes(raw))
    assert qemu_raw(v) == padded(bytes(raw)) == read_disk(v)[0]


def test_nothing_after_eos_is_read():
    raw = random.Random(3).randbytes(70 * KiB)
    v = vmware_of(raw)
    src = OnlyRead(v + b"whatever the server sends next" * 100)
    r = StreamOptimizedReader(src)
    out = io.BytesIO()
    r.read_all_into(out)
    assert out.getvalue() == padded(raw) and src.pos == len(v)
    with pytest.raises(RuntimeError):
        next(r.grains())


# -- truncation --------------------------------------------------------------------------------

def cuts(n: int) -> list[int]:
    return sorted({c for s in range(0, n, 512) for c in (s, s + 1, s + 12, s + 300) if c < n})


def test_truncated_vmware_stream_is_refused_everywhere():
    raw = bytearray(200 * KiB)
    raw[:5000] = random.Random(4).randbytes(5000)
    raw[150 * KiB:151 * KiB] = b"z" * KiB
    v = vmware_of(bytes(raw), grain=16, gtes=16, progress=True)
    assert read_disk(v)[0] == bytes(raw)
    for cut in cuts(len(v)):
        with pytest.raises(VmdkError, match="truncated|ends at byte"):
            read_disk(v[:cut])


@needs_qemu
def test_truncated_qemu_img_file_is_refused_unless_every_grain_arrived():
    """qemu-img ends its file with a zero sector (EOS), or with nothing when the
    last grain ends the file: a cut at a sector boundary after the last grain,
    or after that EOS sector (not read past), is the same complete disk; any
    other cut is refused (the header-area tables say how many grains come)."""
    raw = bytearray(400 * KiB + 1)
    raw[:70000] = random.Random(5).randbytes(70000)
    raw[300000:301000] = b"x" * 1000
    raw[-1] = 7
    v = qemu_vmdk(bytes(raw))
    r = StreamOptimizedReader(OnlyRead(v))
    for _ in r.grains():
        last_grain_end = r.position
    for cut in cuts(len(v)):
        if cut >= last_grain_end and cut % 512 == 0 or cut >= last_grain_end + 512:  # (EOS read)
            assert read_disk(v[:cut])[0] == padded(bytes(raw))
        else:
            with pytest.raises(VmdkError, match="truncated|ends at byte"):
                read_disk(v[:cut])


# -- hostile streams ---------------------------------------------------------------------------

CAP = 1024                                  # sectors: 8 grains of 64 KiB
GOOD = zlib.compress(b"g" * 64 * KiB)


def stream(*markers: bytes, cap: int = CAP, **hdr) -> bytes:
    """A VMware-layout stream of the given markers, then footer and EOS."""
    h = header(cap, **hdr)
    body = pad(b"# Disk DescriptorFile\n")
    start = h + body + bytes(128 * 512 - len(h) - len(body))
    return start + b"".join(markers) + meta(vmdk.FOOTER, 1) + header(cap, gd_offset=200) \
        + meta(vmdk.EOS, 0)


def refused(data: bytes, match: str) -> OnlyRead:
    src = OnlyRead(data)
    with pytest.raises(VmdkError, match=match):
        r = StreamOptimizedReader(src)
        for _ in r.grains():
            pass
    assert src.largest <= vmdk.PIECE
    return src


def test_a_well_formed_hostile_test_stream_reads():
    disk, _ = read_disk(stream(grain_marker(0, GOOD), grain_marker(512, GOOD)))
    assert disk == b"g" * 64 * KiB + bytes(4 * 64 * KiB - 64 * KiB) + b"g" * 64 * KiB \
        + bytes(3 * 64 * KiB)


@pytest.mark.parametrize("data, match", [
    (stream(grain_marker(128, GOOD), grain_marker(0, GOOD)), "out of order"),
    (stream(grain_marker(128, GOOD), grain_marker(128, GOOD)), "out of order or repeated"),
    (stream(grain_marker(CAP, GOOD)), "past the capacity"),
    (stream(grain_marker(2**63, GOOD)), "past the capacity"),
    (stream(grain_marker(64, GOOD)), "not a multiple of the grain"),
    (stream(grain_marker(0, zlib.compress(b"g" * (64 * KiB + 1)))), "inflates past"),
    (stream(grain_marker(0, zlib.compress(b"g" * 1000))), "inflates to 1,000 bytes"),
    (stream(grain_marker(0, b"\x78\x9c not deflate at all")), "bad deflate data"),
    (stream(grain_marker(0, GOOD[:-20])), "incomplete"),
    (stream(meta(9, 0)), "unknown marker type 9"),
    (stream(meta(vmdk.GT, 5)), "grain table .* claims 5 sectors, over 4"),
    (stream(meta(vmdk.GD, 2**40)), "grain directory .* claims"),
    (stream(meta(vmdk.EOS, 3)), "end-of-stream marker .* has size 3"),
    (stream(meta(vmdk.PROGRESS, 1)), "progress marker"),
    (stream(meta(vmdk.FOOTER, 2)), "footer marker .* has size 2"),
    (stream(meta(vmdk.FOOTER, 1) + header(CAP + 1, gd_offset=200)), "disagrees"),
    (stream(meta(vmdk.FOOTER, 1) + header(CAP)), "does not say where"),
    (stream(meta(vmdk.FOOTER, 1) + header(CAP, gd_offset=200), grain_marker(0, GOOD)),
     "after the footer"),
    (header(CAP) + bytes(127 * 512) + grain_marker(0, GOOD) + meta(vmdk.EOS, 0),
     "without the footer"),
    (b"KDMW" + stream()[4:], "bad magic"),
    (stream(version=1), "version 1"),
    (stream(flags=0x10001), "not streamOptimized"),
    (stream(flags=0x70001), "unknown incompatible flags"),
    (stream(nl=b"\n \n\n"), "text-mode transfer"),
    (stream(compress=2), "compressAlgorithm 2"),
    (stream(grain=4), "grain size 4"),
    (stream(grain=4096), "grain size 4096"),
    (stream(grain=96), "grain size 96"),
    (stream(cap=2**60), "capacity"),
    (stream(gtes=0), "entries per grain table"),
    (stream(gtes=513), "entries per grain table"),
    (stream(desc_sectors=129, overhead=256), "descriptor of 129 sectors"),
    (stream(desc_sectors=100, overhead=50), "outside the header area"),
    (stream(overhead=2**40), "header area of"),
    (stream(overhead=0, desc_sectors=0), "header area of"),
])
def test_hostile_stream_is_refused(data, match):
    refused(data, match)


def test_header_area_tables_are_checked():
    """qemu-img's layout: the directory and tables in the header area."""
    def qemu_like(gd: list[int], gt: list[int], *markers: bytes, gd_offset: int = 2) -> bytes:
        area = bytearray(256 * 512)
        put = lambda sector, b: area.__setitem__(slice(sector * 512, sector * 512 + len(b)), b)
        put(gd[0], struct.pack("<512I", *(gt + [0] * 512)[:512]))
        put(gd_offset, struct.pack(f"<{len(gd)}I", *gd))
        put(1, b"# Disk DescriptorFile\n")
        put(0, header(CAP, desc_sectors=1, gd_offset=gd_offset, overhead=128, flags=0x30003))
        return bytes(area[:128 * 512]) + b"".join(markers)

    ok = qemu_like([3], [128, 0, 129], grain_marker(0, GOOD), grain_marker(256, GOOD))
    assert read_disk(ok)[0][:64 * KiB] == b"g" * 64 * KiB            # no EOS: complete anyway
    refused(qemu_like([3], [128, 0, 129], grain_marker(0, GOOD)), "ends at byte")
    refused(qemu_like([3], [128, 0, 129], grain_marker(0, GOOD), meta(vmdk.EOS, 0)),
            "its grain tables list 2")
    refused(qemu_like([3], [128], grain_marker(0, GOOD), grain_marker(256, GOOD)),
            "more than the 1")
    refused(qemu_like([200], []), "not in the header area")
    refused(qemu_like([3], [], gd_offset=1), "overlaps the header")


def test_bounded_memory_and_reads_whatever_sizes_claim():
    """Huge claimed sizes are refused before anything is allocated for them; a
    deflate bomb stops at a grain; reads are at most 64 KiB."""
    bomb = zlib.compress(bytes(64 * MiB), 9)          # 64 MiB of zeros in ~64 KiB
    assert len(bomb) < 2 * 64 * KiB
    cases = [
        (stream(grain_marker(0, bomb)), "inflates past"),
        (stream(struct.pack("<QI", 0, 0xFFFF_FFFF) + bytes(500)), "over twice the grain size"),
        (stream(meta(vmdk.GT, 2**60)), "claims"),
        (header(CAP, desc_sectors=2**50), "descriptor of"),
        (header(CAP, overhead=2**62), "header area of"),
    ]
    for data, match in cases:
        tracemalloc.start()
        try:
            refused(data, match)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 1 * MiB, (match, peak)
