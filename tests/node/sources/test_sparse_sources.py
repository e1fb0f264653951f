"""Sparse sources restore byte-identical, and holes are still skipped without reading.

The bug these tests pin down: the chunker probed holes with lseek(SEEK_DATA)
on the file descriptor its reads shared, so a chunk that began in a hole and
held data later was read from the wrong offset (and every chunk after it was
shifted). `verify` could not see it: the wrong bytes hash to their recorded id.
Benchmark images are written dense, which is why nothing caught it.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from conftest import MAKE_IMAGE, Cli, KiB, MiB, _data_ranges, same_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hypersdk.node.service.backup import backup
from hypersdk.node.service.restore import restore
from hypersdk.node.store.store import ChunkStore

CHUNK_SIZES = (64 * KiB, 128 * KiB, 1 * MiB)


def write_layout(path, segments, seed: int) -> bytes:
    """A sparse file from (kind, length) segments: "hole" leaves a hole (the file
    is truncated to size first), "data" writes non-zero random bytes. Returns the
    file's full content."""
    import random
    rng = random.Random(seed)
    size = sum(n for _, n in segments)
    content = bytearray(size)
    with open(path, "wb") as f:
        f.truncate(size)
        pos = 0
        for kind, n in segments:
            if kind == "data" and n:
                data = bytes(rng.randrange(1, 256) for _ in range(min(n, 64))) * (n // 64 + 1)
                data = data[:n]
                os.pwrite(f.fileno(), data, pos)
                content[pos:pos + n] = data
            pos += n
    return bytes(content)


def expected_read(path, size: int, chunk: int) -> int:
    """Bytes a hole-skipping reader reads: every chunk that is not wholly a hole
    in the file system's view (SEEK_DATA)."""
    ranges = _data_ranges(path)
    total = 0
    for start in range(0, size, chunk):
        end = min(start + chunk, size)
        if any(s < end and e > start for s, e in ranges):
            total += end - start
    return total


def _length(chunk: int):
    """Segment lengths around the interesting boundaries of a chunk and a page."""
    return st.one_of(
        st.sampled_from([1, 4095, 4096, 4097, chunk - 1, chunk, chunk + 1, 2 * chunk,
                         chunk // 2, 3 * chunk + 7]),
        st.integers(1, 3 * chunk))


@st.composite
def layouts(draw):
    chunk = draw(st.sampled_from(CHUNK_SIZES))
    n = draw(st.integers(1, 8))
    first = draw(st.sampled_from(["hole", "data"]))
    kinds = [first if i % 2 == 0 else ("data" if first == "hole" else "hole")
             for i in range(n)]
    if draw(st.booleans()):                              # all-hole / all-data files too
        kinds = [kinds[0]] * n
    return chunk, [(k, draw(_length(chunk))) for k in kinds]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(layout=layouts(), seed=st.integers(0, 1 << 30))
def test_every_hole_layout_restores_identical_and_holes_are_not_read(tmp_path_factory,
                                                                     layout, seed):
    chunk, segments = layout
    d = tmp_path_factory.mktemp("sparse")
    src, out = d / "src.img", d / "out.img"
    content = write_layout(src, segments, seed)
    with ChunkStore(d / "store") as store:
        r = backup(store, str(src), chunk_size=chunk)
        assert r.bytes_read == expected_read(src, len(content), chunk), \
            "a chunk wholly in a hole was read, or a chunk with data was skipped"
        restore(store, "src.img", str(out))
    assert out.read_bytes() == content
    shutil.rmtree(d)


def test_issue_repro_two_4k_writes_in_a_4m_hole(tmp_path):
    """The reported repro: 4 KiB at 0 and at 1.5 MiB of a 4 MiB sparse file."""
    src, out = tmp_path / "sp.img", tmp_path / "out.img"
    write_layout(src, [("data", 4096), ("hole", 1536 * KiB - 4096), ("data", 4096),
                       ("hole", 4 * MiB - 1536 * KiB - 4096)], seed=3)
    cli = Cli(tmp_path / "data")
    r = cli.json("backup", src)
    assert r["bytes_read"] == 2 * MiB and r["hole_bytes_skipped"] == 2 * MiB
    cli("restore", "sp.img", out)
    assert out.read_bytes() == src.read_bytes()
    assert cli.json("verify", "sp.img", "--against", src)["ok"]


def _e2fsck(img) -> subprocess.CompletedProcess:
    return subprocess.run(["e2fsck", "-fn", str(img)], capture_output=True, text=True)


@pytest.mark.skipif(not MAKE_IMAGE.exists() or not shutil.which("mkfs.ext4"),
                    reason="needs ../shared/bench/make_image.py and e2fsprogs")
def test_real_sparse_ext4_image_restores_identical_and_fsck_clean(tmp_path):
    """A real ext4 image as `mkfs.ext4 -d` leaves it (sparse, like thin VM disks),
    and a `cp --sparse=always` copy of it: both restore byte-identical and fsck-clean."""
    img = tmp_path / "disk.img"
    subprocess.run([sys.executable, str(MAKE_IMAGE), "v1", str(img), "--size", "64M",
                    "--seed", "5", "--sparse"], check=True, capture_output=True)
    copy = tmp_path / "copy.img"
    subprocess.run(["cp", "--sparse=always", str(img), str(copy)], check=True)
    cli = Cli(tmp_path / "data")
    for path in (img, copy):
        holes = os.path.getsize(path) - sum(e - s for s, e in _data_ranges(path))
        assert holes > 8 * MiB, f"{path.name} is not sparse; the test would prove nothing"
        r = cli.json("backup", path, "--chunk-size", "64K")
        assert r["bytes_read"] < r["size"]               # holes were skipped
        out = tmp_path / f"out-{path.name}"
        cli("restore", r["manifest"], out)
        assert out.read_bytes() == path.read_bytes()
        fsck = _e2fsck(out)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        assert cli.json("verify", r["manifest"], "--against", path)["ok"]


def test_verify_against_names_each_differing_chunk_and_exits_3(tmp_path):
    src = tmp_path / "d.img"
    write_layout(src, [("data", 3 * 64 * KiB), ("hole", 2 * 64 * KiB), ("data", 100)], seed=1)
    cli = Cli(tmp_path / "data")
    cli("backup", src, "--chunk-size", "64K")
    assert cli.json("verify", "d.img", "--against", src)["differing_chunks"] == 0
    with open(src, "r+b") as f:                            # change chunk 1 and chunk 3
        os.pwrite(f.fileno(), b"\x01", 64 * KiB + 5)
        os.pwrite(f.fileno(), b"\x02", 3 * 64 * KiB + 9)   # was a hole: now data
    p = cli("verify", "d.img", "--against", src, "--json", ok=False)
    assert p.returncode == 3
    import json
    doc = json.loads(p.stdout)
    assert [d["index"] for d in doc["differences"]] == [1, 3]
    assert doc["differences"][1]["backup_chunk"] == "00" * 32      # recorded as zero
    text = cli("verify", "d.img", "--against", src, ok=False)
    assert text.returncode == 3 and "DIFFERS chunk 1 " in text.stdout
    assert "DIFFERS chunk 3 " in text.stdout
    # a source of another size differs too
    with open(src, "ab") as f:
        f.write(b"x")
    assert cli("verify", "d.img", "--against", src, ok=False).returncode == 3
    # usage errors
    assert cli("verify", "--against", src, ok=False).returncode == 2
    assert cli("verify", "d.img", "--against", src, "--network", ok=False).returncode == 2


def test_same_bytes_helper_compares_holes_against_data(tmp_path):
    """same_bytes (used across the suite) must see data in one file against a hole
    in the other: a helper that skipped such regions would hide this very bug."""
    a, b = tmp_path / "a", tmp_path / "b"
    write_layout(a, [("hole", 64 * KiB)], seed=1)
    write_layout(b, [("hole", 4096), ("data", 10), ("hole", 64 * KiB - 4106)], seed=1)
    assert not same_bytes(a, b) and not same_bytes(b, a)
