"""The scan of issue 16: back up a realistic disk image with the real `hypersdk`
command into a data dir that holds a data key, read every file of the data dir
(packs, index.sqlite and its -wal/-shm, audit.sqlite, keys, everything; and every
zstd frame found in any of them, decompressed) and look for 256 random 64-byte
samples of the image: none may be there. The control: the same scan of a data dir
without a key finds them (so the scan can fail)."""
from __future__ import annotations

import random

import zstandard
from conftest import Cli, realistic_image

from hypersdk.node.net import datakey

MiB = 1 << 20
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
MAX_FRAME = 9 * MiB                    # a zstd frame of the largest chunk fits in this


def samples_of(img, n=256, seed=16) -> list[bytes]:
    """n random 64-byte samples of the image's content. A sample with fewer than 16
    distinct byte values (runs of zeros, padding, repeated fill) is drawn again:
    such bytes occur in any file (SQLite pages, pack headers) and prove nothing."""
    data = img.read_bytes()
    rng = random.Random(seed)
    out: set[bytes] = set()
    for _ in range(200 * n):                       # bounded
        if len(out) == n:
            break
        at = rng.randrange(len(data) - 64)
        s = data[at:at + 64]
        if len(set(s)) >= 16:
            out.add(s)
    assert len(out) == n, "the image has too little content to sample"
    return sorted(out)


def zstd_frames(blob: bytes):
    """The decompressed content of every zstd frame that starts anywhere in blob."""
    view = memoryview(blob)
    at = blob.find(ZSTD_MAGIC)
    while at >= 0:
        try:
            yield zstandard.ZstdDecompressor().decompressobj().decompress(
                view[at:at + MAX_FRAME])
        except zstandard.ZstdError:
            pass
        at = blob.find(ZSTD_MAGIC, at + 1)


def found_in(data_dir, samples) -> tuple[set[bytes], list[str]]:
    """(samples found, files read)."""
    blobs, files = [], []
    for p in sorted(data_dir.rglob("*")):
        if p.is_file():
            files.append(str(p.relative_to(data_dir)))
            blob = p.read_bytes()
            blobs.append(blob)
            blobs.extend(zstd_frames(blob))
    return {s for s in samples if any(s in b for b in blobs)}, files


def test_no_sample_of_the_image_is_anywhere_in_a_keyed_data_dir(tmp_path):
    img = realistic_image(tmp_path / "disk.img", "64M", seed=3)
    samples = samples_of(img)
    keyed, plain = Cli(tmp_path / "keyed"), Cli(tmp_path / "plain")
    datakey.create(keyed.data_dir)
    for cli in (keyed, plain):
        r = cli.json("backup", img, "--name", "disk")
        assert r["new_chunks"] > 20
        cli.json("verify", "disk")

    found, files = found_in(keyed.data_dir, samples)
    assert {"index.sqlite", "audit.sqlite"} <= set(files) and any(
        f.startswith("packs/pack-") for f in files)
    assert found == set(), f"{len(found)} of {len(samples)} samples found at rest"

    # the control: the same scan of a data dir without a key finds the image
    found, _ = found_in(plain.data_dir, samples)
    assert len(found) == len(samples)

    # the keyed data dir restores the image byte for byte
    keyed("restore", "disk", tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == img.read_bytes()
