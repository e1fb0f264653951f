"""Shared test helpers: real `hypersdk` processes, image builders, a store fixture."""
from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
MAKE_IMAGE = SHARED / "bench" / "make_image.py"
HYPERSDK = Path(sys.executable).parent / "hypersdk"
KiB, MiB = 1 << 10, 1 << 20


def cli_env(data_dir: Path, **extra) -> dict:
    env = dict(os.environ, HYPERSDK_DATA_DIR=str(data_dir))
    env.pop("HYPERSDK_DEBUG", None)
    env.update(extra)
    return env


class Cli:
    """Runs the real `hypersdk` executable against one data dir."""

    def __init__(self, data_dir: Path):
        self.data_dir = data_dir

    def __call__(self, *args, ok: bool | None = True, timeout: float = 120, **env):
        p = subprocess.run([str(HYPERSDK), *map(str, args)], capture_output=True, text=True,
                           env=cli_env(self.data_dir, **env), timeout=timeout)
        if ok is True and p.returncode != 0:
            raise AssertionError(f"hypersdk {args} failed ({p.returncode}): {p.stderr}")
        if ok is False and p.returncode == 0:
            raise AssertionError(f"hypersdk {args} unexpectedly succeeded: {p.stdout}")
        return p

    def json(self, *args, **kw):
        import json
        return json.loads(self(*args, "--json", **kw).stdout)


@pytest.fixture
def cli(tmp_path) -> Cli:
    return Cli(tmp_path / "data")


@pytest.fixture
def store(tmp_path):
    from hypersdk.node.store.store import ChunkStore
    with ChunkStore(tmp_path / "store") as s:
        yield s


def mixed_image(path: Path, size: int, seed: int = 1, chunk: int = MiB) -> Path:
    """An image of `size` bytes mixing zero, compressible and random chunks."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        left = size
        i = 0
        while left:
            n = min(chunk, left)
            kind = i % 3
            if kind == 0:
                f.write(bytes(n))
            elif kind == 1:
                f.write(rng.randbytes(n))
            else:
                f.write((b"log line %d " % rng.randrange(1000) * (n // 10 + 1))[:n])
            left -= n
            i += 1
    return path


def random_image(path: Path, size: int, seed: int = 1) -> Path:
    path.write_bytes(random.Random(seed).randbytes(size))
    return path


def realistic_image(path: Path, size: str = "64M", seed: int = 1) -> Path:
    """An ext4 disk image from ../shared/bench/make_image.py (skips if unavailable)."""
    if not MAKE_IMAGE.exists():
        pytest.skip("../shared/bench/make_image.py not available")
    subprocess.run([sys.executable, str(MAKE_IMAGE), "v1", str(path), "--size", size,
                    "--seed", str(seed)], check=True, capture_output=True)
    return path


def _data_ranges(path: Path):
    """(start, end) of the data (non-hole) regions of a file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size, pos, out = os.fstat(fd).st_size, 0, []
        for _ in range(1 << 20):                      # bounded: at most 1M extents
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:                            # ENXIO: holes to the end
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, end))
            if end >= size:
                break
            pos = end
        return out
    finally:
        os.close(fd)


def same_bytes(a: Path, b: Path) -> bool:
    """Byte-for-byte equality that skips regions which are holes in both files."""
    if os.path.getsize(a) != os.path.getsize(b):
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for start, end in sorted(_data_ranges(a) + _data_ranges(b)):
            fa.seek(start)
            fb.seek(start)
            while start < end:
                n = min(end - start, 4 * MiB)
                if fa.read(n) != fb.read(n):
                    return False
                start += n
    return True


async def echo(stream, peer_id):
    """Stream handler that sends back whatever it receives."""
    while data := await stream.receive_some(64 * 1024):
        await stream.send_all(data)


async def read_exactly(stream, n: int) -> bytes:
    got = b""
    while len(got) < n:
        chunk = await stream.receive_some(n - len(got))
        assert chunk, "unexpected EOF"
        got += chunk
    return got
