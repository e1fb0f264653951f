"""A source that changes while it is backed up is refused, never recorded.

Before: a file that grew during a backup exited 0 and then failed to restore
("hash list piece holds 39168 bytes, expected 32768") and blocked `gc` for the
whole store; a file that shrank was recorded silently with zeros. Now the
backup reads exactly the size it saw at the start and fails with one clear
line when the size (or a file's mtime) changed; nothing is recorded under the
name, and the chunks already stored are reused by the next run.

The change is made from the backup's own progress callback (called after each
chunk is taken from the reader), so it lands mid-backup deterministically.
"""
from __future__ import annotations

import os

import pytest
from conftest import Cli, KiB, MiB, random_image

from hypersdk.node.errors import UserError
from hypersdk.node.service.backup import backup
from hypersdk.node.service.restore import restore
from hypersdk.node.store import catalog
from hypersdk.node.store.gc import gc
from hypersdk.protocol.errors import LocalProtocolError
from hypersdk.protocol.manifest import Manifest, check_list_lengths

CS = 64 * KiB


def _aged(path):
    """Date the file an hour back, as a real disk image is: a write during the
    backup then changes its mtime whatever the kernel's timestamp granularity."""
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns - 3600 * 10**9, st.st_mtime_ns - 3600 * 10**9))


def _after_chunks(n: int, action):
    seen = [0]

    def progress(nbytes):
        seen[0] += 1
        if seen[0] == n:
            action()
    return progress


def _append(path, data: bytes):
    def act():
        with open(path, "ab") as f:
            f.write(data)
    return act


def _truncate(path, size: int):
    return lambda: os.truncate(path, size)


def _overwrite(path, offset: int):
    def act():
        with open(path, "r+b") as f:
            os.pwrite(f.fileno(), b"\xff" * 10, offset)
    return act


CHANGES = {
    # 100 bytes past a chunk boundary was enough to make an unrestorable backup
    "grows by 100 bytes": lambda p: _append(p, b"g" * 100),
    "shrinks to half": lambda p: _truncate(p, 8 * CS),
    "shrinks by one byte": lambda p: _truncate(p, 16 * CS - 1),
    "rewritten in place": lambda p: _overwrite(p, 15 * CS),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
@pytest.mark.parametrize("when", [1, 16])        # after the first chunk / after the last
def test_source_changed_mid_backup_is_refused_and_nothing_recorded(store, tmp_path,
                                                                    change, when):
    src = random_image(tmp_path / "vm.img", 16 * CS, seed=7)
    _aged(src)
    with pytest.raises(UserError) as err:
        backup(store, str(src), chunk_size=CS,
               progress=_after_chunks(when, CHANGES[change](src)))
    msg = str(err.value)
    assert "changed while it was read" in msg and "snapshot" in msg
    assert "\n" not in msg
    assert catalog.list_backups(store) == []
    assert store.db.execute("SELECT COUNT(*) FROM manifests").fetchone()[0] == 0
    # the store is healthy: gc runs, and the next run (source at rest) reuses chunks
    gc(store)
    r = backup(store, str(src), chunk_size=CS)
    assert r.size == src.stat().st_size
    out = tmp_path / "out.img"
    restore(store, "vm.img", str(out))
    assert out.read_bytes() == src.read_bytes()


def test_rerun_after_a_refused_backup_reuses_the_stored_chunks(tmp_path):
    """Chunks committed before the change was found are kept for the next run."""
    src = random_image(tmp_path / "vm.img", 64 * CS, seed=9)
    _aged(src)
    from hypersdk.node.store.store import ChunkStore
    os.environ["HYPERSDK_COMMIT_BYTES"] = str(4 * CS)     # batches commit as it goes
    try:
        with ChunkStore(tmp_path / "store") as store:
            with pytest.raises(UserError):
                backup(store, str(src), chunk_size=CS,
                       progress=_after_chunks(64, _append(src, b"x" * 100)))
            kept = store.db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]
            assert kept >= 32, "the chunks stored before the refusal were thrown away"
            r = backup(store, str(src), chunk_size=CS)
            assert r.new_chunks <= r.chunks - kept + 1
    finally:
        del os.environ["HYPERSDK_COMMIT_BYTES"]


def test_cli_growing_source_exits_nonzero_with_one_line(tmp_path):
    """Through the real CLI: the source grows while `hypersdk backup` reads it (a
    writer process appends until the backup process ends)."""
    import subprocess
    import sys
    src = random_image(tmp_path / "vm.img", 64 * MiB, seed=2)
    _aged(src)
    cli = Cli(tmp_path / "data")
    writer = subprocess.Popen([sys.executable, "-c", f"""
import os, time
deadline = time.monotonic() + 120
with open({str(src)!r}, 'ab') as f:
    while time.monotonic() < deadline and not os.path.exists({str(tmp_path / 'stop')!r}):
        f.write(b'x' * 100)
        f.flush()
"""])
    try:
        p = cli("backup", src, "--chunk-size", "64K", ok=False)
    finally:
        (tmp_path / "stop").touch()
        writer.wait(timeout=60)
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "changed while it was read" in lines[0], p.stderr
    assert cli.json("backups") == []


def test_a_manifest_that_does_not_match_its_lists_cannot_be_built_for_commit():
    m = Manifest(name="x", size=3 * CS, chunk_size=CS, lists=(b"\1" * 32,))
    check_list_lengths(m, [3])
    for bad in ([2], [4], [3, 1], []):
        with pytest.raises(LocalProtocolError):
            check_list_lengths(m, bad)


def test_gc_refusing_for_one_unreadable_backup_names_it_and_how_to_remove_it(tmp_path):
    """One backup whose hash list cannot be read stops gc (it cannot know what that
    list references); the refusal names the backup and the command that removes it,
    and after that command gc runs and every other backup still restores."""
    import sqlite3
    good = random_image(tmp_path / "good.img", 3 * CS, seed=1)
    bad = random_image(tmp_path / "bad.img", 3 * CS, seed=2)
    cli = Cli(tmp_path / "data")
    cli("backup", good, "--chunk-size", "64K")
    mid = cli.json("backup", bad, "--chunk-size", "64K")["manifest"]
    from hypersdk.protocol.manifest import decode_manifest
    db = sqlite3.connect(tmp_path / "data" / "index.sqlite")
    (body,) = db.execute("SELECT body FROM manifests WHERE id=?", (bytes.fromhex(mid),)).fetchone()
    with db:
        db.execute("DELETE FROM chunks WHERE id=?", (decode_manifest(body).lists[0],))
    db.close()
    p = cli("gc", ok=False)
    assert p.returncode == 1
    line = p.stderr.strip()
    assert "\n" not in line and "bad.img@1" in line and "hypersdk delete bad.img@1" in line
    cli("delete", "bad.img@1")
    cli("gc")
    out = tmp_path / "out.img"
    cli("restore", "good.img", out)
    assert out.read_bytes() == good.read_bytes()
