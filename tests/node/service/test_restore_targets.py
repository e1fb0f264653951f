"""What `hypersdk restore REF OUT` does with each kind of OUT, the permission bits
of a restored file, and the partial files of killed restores (node/service/restore.py).

OUT kinds: an existing regular file needs --force; a directory, a FIFO, a socket
and a character device are refused with one line saying which; a symbolic link is
refused (neither replaced nor followed) unless --follow-symlink; a block device is
written in place only with --to-device (--force is not enough), only if it holds
the whole image, zero chunks as zeros (tested on a loop device over a file of 0xFF).

Partials: a restore killed with SIGKILL leaves `.OUT.hypersdk-partial-PID`; the
next restore to OUT and `hypersdk gc` remove it; a partial whose writer is alive
(it holds the file's lock) is never removed.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import HYPERSDK, REPO, Cli, cli_env, mixed_image

CS = 64 << 10


def one_error_line(p, *fragments) -> str:
    assert p.returncode != 0, p.stdout
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("hypersdk: error: "), lines[0]
    for frag in fragments:
        assert frag in lines[0], lines[0]
    return lines[0]


def partials(d: Path) -> list[str]:
    return sorted(n for n in os.listdir(d) if "hypersdk-partial" in n)


@pytest.fixture
def backed(cli, tmp_path):
    """A 64K-chunk backup `disk.img` of a mixed image (a third of its chunks zero)."""
    src = mixed_image(tmp_path / "disk.img", 24 * CS, seed=3, chunk=CS)
    cli("backup", src, "--chunk-size", "64K")
    return src


# -- regular files and permission bits --------------------------------------------------

def test_existing_file_needs_force_and_gets_the_source_mode(cli, tmp_path):
    src = mixed_image(tmp_path / "disk.img", 5 * CS + 7, seed=2, chunk=CS)
    os.chmod(src, 0o640)
    cli("backup", src, "--chunk-size", "64K")
    out = tmp_path / "out.img"
    out.write_bytes(b"old")
    one_error_line(cli("restore", "disk.img", out, ok=False), "exists", "--force")
    assert out.read_bytes() == b"old"
    cli("restore", "disk.img", out, "--force")
    assert out.read_bytes() == src.read_bytes()
    assert stat.S_IMODE(out.stat().st_mode) == 0o640
    fresh = tmp_path / "fresh.img"
    doc = cli.json("restore", "disk.img", fresh)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o640 and doc["mode"] == "0640"
    assert partials(tmp_path) == []


def _with_source(store, src: Path, name: str, source: dict):
    """Back src up, then record its manifest again as `name` with another source dict
    (a manifest with or without "mode")."""
    from hypersdk.node.service.backup import backup
    from hypersdk.node.store import catalog
    r = backup(store, str(src), chunk_size=CS)
    m = dataclasses.replace(catalog.load_manifest(store, r.manifest_id), name=name,
                            source=source)
    with store.db:
        catalog.add_backup(store.db, m, {"chunks": m.n_chunks})
    return m


def test_mode_comes_from_the_manifest_else_from_the_umask(store, tmp_path):
    from hypersdk.node.service.restore import restore
    src = mixed_image(tmp_path / "src.img", 4 * CS, seed=5, chunk=CS)
    _with_source(store, src, "m640", {"kind": "file", "path": str(src), "mode": 0o640})
    _with_source(store, src, "suid", {"kind": "file", "path": str(src), "mode": 0o4755})
    _with_source(store, src, "old", {"kind": "file", "path": str(src)})    # no "mode"
    cases = [("m640", {}, 0o640), ("suid", {}, 0o755),          # never setuid/sticky bits
             ("old", {"umask": 0o022}, 0o644), ("old", {"umask": 0o077}, 0o600),
             ("old", {"umask": 0o002}, 0o664)]
    for i, (ref, kw, want) in enumerate(cases):
        out = tmp_path / f"out{i}.img"
        r = restore(store, ref, str(out), **kw)
        assert stat.S_IMODE(out.stat().st_mode) == want, (ref, kw)
        assert r.mode == want and out.read_bytes() == src.read_bytes()


def test_cli_uses_its_own_umask_when_the_manifest_has_no_mode(cli, tmp_path):
    from hypersdk.node.store.store import ChunkStore
    src = mixed_image(tmp_path / "src.img", 3 * CS, seed=6, chunk=CS)
    with ChunkStore(cli.data_dir) as store:
        _with_source(store, src, "old", {"kind": "file", "path": str(src)})
    for umask, want in ((0o027, 0o640), (0o002, 0o664)):
        out = tmp_path / f"out-{umask:o}.img"
        p = subprocess.run([str(HYPERSDK), "restore", "old", str(out)], capture_output=True,
                           text=True, env=cli_env(cli.data_dir), umask=umask, timeout=120)
        assert p.returncode == 0, p.stderr
        assert stat.S_IMODE(out.stat().st_mode) == want
        assert out.read_bytes() == src.read_bytes()


# -- targets that are refused -----------------------------------------------------------

def test_directory_is_refused_saying_so_with_and_without_force(cli, tmp_path, backed):
    d = tmp_path / "outdir"
    d.mkdir()
    (d / "keep").write_bytes(b"x")
    for extra in ((), ("--force",)):
        line = one_error_line(cli("restore", "disk.img", d, *extra, ok=False),
                              str(d), "is a directory")
        assert "--force" not in line
    assert os.listdir(d) == ["keep"] and partials(tmp_path) == []


def test_symlink_is_refused_unless_followed(cli, tmp_path, backed):
    target = tmp_path / "target.img"
    target.write_bytes(b"precious")
    link = tmp_path / "link.img"
    link.symlink_to(target.name)
    for extra in ((), ("--force",)):
        one_error_line(cli("restore", "disk.img", link, *extra, ok=False),
                       "symbolic link", "--follow-symlink")
        assert link.is_symlink() and target.read_bytes() == b"precious"
    # followed: the target is a file like any other (it exists: --force)
    one_error_line(cli("restore", "disk.img", link, "--follow-symlink", ok=False),
                   str(target), "exists", "--force")
    cli("restore", "disk.img", link, "--follow-symlink", "--force")
    assert link.is_symlink() and os.readlink(link) == target.name
    assert target.read_bytes() == backed.read_bytes()
    assert partials(tmp_path) == []


def test_fifo_socket_and_char_device_are_refused(cli, tmp_path, backed):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    sock_path = tmp_path / "s.sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    targets = [(fifo, "FIFO"), (sock_path, "socket")]
    if os.geteuid() == 0:                    # a private copy of /dev/null (1, 3)
        chardev = tmp_path / "null"
        os.mknod(chardev, stat.S_IFCHR | 0o600, os.makedev(1, 3))
        targets.append((chardev, "character device"))
    try:
        for path, kind in targets:
            before = os.lstat(path)
            for extra in ((), ("--force",)):
                one_error_line(cli("restore", "disk.img", path, *extra, ok=False),
                               str(path), kind, "regular file or a block device")
            after = os.lstat(path)
            assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
    finally:
        sock.close()
    assert partials(tmp_path) == []


# -- block devices (loop devices over files of 0xFF) ------------------------------------

@pytest.fixture
def loopdev(tmp_path):
    """attach(size) -> (device path, backing file): a loop device over a file of
    0xFF bytes; every device is detached afterwards."""
    attached: list[str] = []

    def attach(size: int, name: str = "backing.img") -> tuple[Path, Path]:
        if os.geteuid() != 0:
            pytest.skip("needs root to attach a loop device (run the tests as root)")
        if shutil.which("losetup") is None:
            pytest.skip("no losetup(8) on this system")
        backing = tmp_path / name
        backing.write_bytes(b"\xff" * size)
        p = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True,
                           text=True)
        if p.returncode != 0:
            pytest.skip(f"cannot attach a loop device here: {p.stderr.strip() or p.returncode}")
        dev = p.stdout.strip()
        attached.append(dev)
        return Path(dev), backing

    try:
        yield attach
    finally:
        for dev in attached:
            subprocess.run(["losetup", "-d", dev], capture_output=True)


def _read_dev(dev: Path) -> bytes:
    with open(dev, "rb") as f:
        return f.read()


@pytest.mark.parametrize("size", [24 * CS, 24 * CS - 1000], ids=["aligned", "unaligned"])
def test_block_device_needs_to_device_and_gets_every_byte(cli, tmp_path, loopdev, size):
    src = mixed_image(tmp_path / "disk.img", size, seed=3, chunk=CS)
    cli("backup", src, "--chunk-size", "64K")
    dev, _ = loopdev(32 * CS)
    ones = b"\xff" * (32 * CS)
    for extra in ((), ("--force",)):
        one_error_line(cli("restore", "disk.img", dev, *extra, ok=False),
                       str(dev), "block device", "--to-device")
        assert _read_dev(dev) == ones, "a refused restore wrote to the device"
    assert stat.S_ISBLK(os.lstat(dev).st_mode)
    doc = cli.json("restore", "disk.img", dev, "--to-device")
    assert doc["target"] == "device" and doc["zero_chunks"] == 8
    got = _read_dev(dev)
    data = src.read_bytes()
    assert data[:CS] == bytes(CS)                      # the image has zero chunks...
    assert got[:size] == data                          # ...written over the 0xFF
    assert got[size:] == ones[size:], "bytes past the image were changed"
    assert stat.S_ISBLK(os.lstat(dev).st_mode), "the device node was replaced"
    assert not [n for n in os.listdir(dev.parent) if n.startswith(f".{dev.name}.hypersdk")]


def test_symlink_to_a_block_device_needs_both_flags(cli, tmp_path, loopdev):
    src = mixed_image(tmp_path / "disk.img", 6 * CS, seed=8, chunk=CS)
    cli("backup", src, "--chunk-size", "64K")
    dev, _ = loopdev(8 * CS)
    link = tmp_path / "by-id-disk"
    link.symlink_to(dev)
    one_error_line(cli("restore", "disk.img", link, "--to-device", ok=False),
                   "symbolic link", "--follow-symlink")
    one_error_line(cli("restore", "disk.img", link, "--follow-symlink", ok=False),
                   "block device", "--to-device")
    assert _read_dev(dev) == b"\xff" * (8 * CS)
    cli("restore", "disk.img", link, "--follow-symlink", "--to-device")
    assert _read_dev(dev)[:6 * CS] == src.read_bytes() and link.is_symlink()


def test_device_smaller_than_the_image_is_refused_untouched(cli, tmp_path, loopdev):
    src = mixed_image(tmp_path / "disk.img", 24 * CS, seed=3, chunk=CS)
    cli("backup", src, "--chunk-size", "64K")
    dev, _ = loopdev(8 * CS)
    one_error_line(cli("restore", "disk.img", dev, "--to-device", ok=False),
                   str(dev), str(8 * CS), str(24 * CS), "nothing written")
    assert _read_dev(dev) == b"\xff" * (8 * CS)


def test_to_device_refuses_what_is_not_a_block_device(cli, tmp_path, backed):
    out = tmp_path / "out.img"
    one_error_line(cli("restore", "disk.img", out, "--to-device", ok=False),
                   "no such block device")
    assert not out.exists()
    out.write_bytes(b"old")
    one_error_line(cli("restore", "disk.img", out, "--to-device", "--force", ok=False),
                   "not a block device")
    assert out.read_bytes() == b"old" and partials(tmp_path) == []


# -- partial files of killed restores ---------------------------------------------------

BIG = 512 << 20


@pytest.fixture(scope="module")
def big_store(tmp_path_factory):
    """A data dir holding `big.img`: 512 MiB of one repeated 64 KiB chunk (tiny in the
    store, about a second to restore: long enough to be caught mid-write) and
    `small.img`."""
    root = tmp_path_factory.mktemp("bigstore")
    cli = Cli(root / "data")
    block = random.Random(11).randbytes(CS)
    src = root / "big.img"
    with open(src, "wb") as f:
        for _ in range(BIG // CS):
            f.write(block)
    cli("backup", src, "--chunk-size", "64K")
    src.unlink()
    small = mixed_image(root / "small.img", 5 * CS, seed=12, chunk=CS)
    cli("backup", small, "--chunk-size", "64K")
    return cli, small


def _killed_restore(cli: Cli, out: Path) -> Path:
    """Start `hypersdk restore big.img OUT`, SIGKILL it once its partial file is
    there, reap it; returns the partial file it left."""
    proc = subprocess.Popen([str(HYPERSDK), "restore", "big.img", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=cli_env(cli.data_dir))
    partial = out.parent / f".{out.name}.hypersdk-partial-{proc.pid}"
    try:
        deadline = time.monotonic() + 120              # a bound, not a synchronisation
        while not partial.exists():
            if proc.poll() is not None:
                pytest.fail(f"the restore ended (exit {proc.returncode}) before its partial "
                            f"file was seen: {proc.stderr.read().decode()!r}")
            if time.monotonic() > deadline:
                pytest.fail("no partial file appeared within 120 s")
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()                                    # reaped: its pid is gone
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, "the restore finished before the kill"
    assert partial.exists() and not out.exists()
    return partial


LIVE_WRITER = r"""
import fcntl, os, sys
from hypersdk.node.service.restore_partials import PartialRegistry
out, data = sys.argv[1], sys.argv[2]
d, b = os.path.split(out)
p = os.path.join(d, f".{b}.hypersdk-partial-{os.getpid()}")
PartialRegistry(data).add(p)
fd = os.open(p, os.O_WRONLY | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, b"still writing")
print(p, flush=True)
sys.stdin.read()
"""


class LiveWriter:
    """A process writing a partial file of OUT (registered, locked) until closed."""

    def __init__(self, out: Path, data_dir: Path):
        self.data_dir = data_dir
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.proc = subprocess.Popen([sys.executable, "-c", LIVE_WRITER, str(out),
                                      str(data_dir)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env, text=True)
        line = self.proc.stdout.readline().strip()
        if not line:
            self.close()
            pytest.fail("the live writer did not start")
        self.path = Path(line)

    def close(self, leave: bool = False):
        """Stop the writer; unless leave, remove its file and record as a restore
        that ends does (the data dir is shared by the tests of this module)."""
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self.proc.stdout.close()
        if not leave:
            from hypersdk.node.service.restore_partials import PartialRegistry
            self.path.unlink(missing_ok=True)
            PartialRegistry(self.data_dir).remove(str(self.path))


def _records(data_dir: Path) -> set[str]:
    d = data_dir / "partials"
    if not d.is_dir():
        return set()
    return {json.loads((d / n).read_text())["path"] for n in os.listdir(d)
            if n.endswith(".json")}


def test_next_restore_to_out_removes_its_stale_partials_only(big_store, tmp_path):
    cli, small = big_store
    out = tmp_path / "out.img"
    stale = _killed_restore(cli, out)
    assert str(stale) in _records(cli.data_dir)
    other = tmp_path / "other.img"                     # another OUT's stale partial
    other_stale = tmp_path / f".{other.name}.hypersdk-partial-{stale.name.rsplit('-', 1)[1]}"
    os.link(stale, other_stale)
    live = LiveWriter(out, cli.data_dir)
    try:
        cli("restore", "small.img", out)
        assert out.read_bytes() == small.read_bytes()
        assert not stale.exists(), "the killed restore's partial is still there"
        assert live.path.exists() and live.path.read_bytes() == b"still writing"
        assert other_stale.exists(), "a partial of another OUT was removed"
        assert partials(tmp_path) == sorted([live.path.name, other_stale.name])
        assert str(stale) not in _records(cli.data_dir)
    finally:
        live.close()


def test_gc_removes_registered_stale_partials_and_keeps_live_ones(big_store, tmp_path):
    cli, _ = big_store
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    stale = _killed_restore(cli, a / "out.img")
    live = LiveWriter(b / "out.img", cli.data_dir)
    try:
        assert {str(stale), str(live.path)} <= _records(cli.data_dir)
        doc = cli.json("gc")
        assert doc["stale_partials_removed"] == 1
        assert not stale.exists() and partials(a) == []
        assert live.path.exists() and live.path.read_bytes() == b"still writing"
        recs = _records(cli.data_dir)
        assert str(stale) not in recs and str(live.path) in recs
    finally:
        live.close(leave=True)
    # its writer gone, the left-over is stale too
    assert cli.json("gc")["stale_partials_removed"] == 1
    assert partials(b) == [] and str(live.path) not in _records(cli.data_dir)
