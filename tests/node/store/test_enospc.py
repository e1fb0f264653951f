"""A full disk: the data dir or the restore target on a small tmpfs.

Claims under test: running out of space is reported as one clear line on
stderr with a non-zero exit; it never leaves a half-made backup, a damaged
store or a partial output file; the space a failed backup took is given back,
and the store stays usable once there is room again.

Needs root to mount tmpfs file systems; skips with the reason otherwise.
"""
from __future__ import annotations

import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import Cli, KiB, MiB

pytestmark = pytest.mark.root
CHUNK = "64K"


@pytest.fixture
def tmpfs(tmp_path):
    """mount(name, size) -> a fresh tmpfs of that size; all are unmounted afterwards."""
    mounted: list[Path] = []

    def mount(name: str, size: str) -> Path:
        if os.geteuid() != 0:
            pytest.skip("needs root to mount a small tmpfs (run the tests as root)")
        if shutil.which("mount") is None:
            pytest.skip("no mount(8) on this system")
        d = tmp_path / name
        d.mkdir()
        p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)],
                           capture_output=True, text=True)
        if p.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip() or p.returncode}")
        mounted.append(d)
        return d

    yield mount
    for d in reversed(mounted):
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def _random_file(path: Path, size: int, seed: int) -> bytes:
    data = random.Random(seed).randbytes(size)
    path.write_bytes(data)
    return data


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _fill(mount: Path, leave: int) -> Path:
    """Write a filler file so that about `leave` bytes stay free on `mount`."""
    filler = mount / "filler"
    n = _free(mount) - leave
    assert n > 0, f"cannot leave {leave} bytes free: only {_free(mount)} are"
    with open(filler, "wb") as f:
        for _ in range(n // MiB + 1):                  # bounded
            k = min(MiB, n)
            if k == 0:
                break
            f.write(bytes(k))
            n -= k
    return filler


def assert_no_space_error(p, what: str):
    assert p.returncode != 0, f"{what}: succeeded on a full disk:\n{p.stdout}"
    lines = p.stderr.splitlines()
    assert len(lines) == 1, f"{what}: want exactly one line on stderr, got:\n{p.stderr}"
    assert "no space" in lines[0].lower(), f"{what}: the error does not say no space: {lines[0]}"


def assert_consistent_with(cli: Cli, refs: set[str], what: str):
    v = cli("verify", ok=None)
    assert v.returncode == 0 and "OK: store is consistent" in v.stdout, \
        f"{what}: verify ({v.returncode}):\n{v.stdout}{v.stderr}"
    listed = {b["ref"] for b in cli.json("backups")}
    assert listed == refs, f"{what}: backups lists {sorted(listed)}, want {sorted(refs)}"


def _restores_identical(cli: Cli, ref: str, want: bytes, out: Path):
    cli("restore", ref, out, "--force")
    assert out.read_bytes() == want, f"restore of {ref} differs from its source"
    out.unlink()


def test_backup_larger_than_the_data_dir_fails_cleanly_and_store_stays_usable(tmp_path, tmpfs):
    data = tmpfs("data", "24m")
    cli = Cli(data)
    big = tmp_path / "big.img"
    _random_file(big, 48 * MiB, seed=1)           # incompressible, twice the tmpfs
    small = tmp_path / "small.img"
    small_bytes = _random_file(small, 2 * MiB, seed=2)
    out = tmp_path / "out.img"

    free0 = _free(data)
    p = cli("backup", big, "--chunk-size", CHUNK, ok=None)
    assert_no_space_error(p, "backup of 48 MiB into a 24 MiB data dir")
    assert_consistent_with(cli, set(), "after the failed backup")
    assert _free(data) >= free0 - 1 * MiB, \
        f"the failed backup kept {free0 - _free(data)} bytes of the data dir"

    cli("backup", small, "--chunk-size", CHUNK)      # room again: the store works
    assert_consistent_with(cli, {"small.img@1"}, "after the small backup")
    _restores_identical(cli, "small.img", small_bytes, out)

    # a failed backup that appends to a pack a complete backup lives in
    free1 = _free(data)
    p = cli("backup", big, "--chunk-size", CHUNK, ok=None)
    assert_no_space_error(p, "second backup of 48 MiB")
    assert_consistent_with(cli, {"small.img@1"}, "after the second failed backup")
    assert _free(data) >= free1 - 1 * MiB
    _restores_identical(cli, "small.img", small_bytes, out)
    cli("backup", small, "--chunk-size", CHUNK, "--name", "again")
    assert_consistent_with(cli, {"small.img@1", "again@1"}, "after a later backup")


# how much more (or less) room than the backup's pack bytes is left free: the
# negative ones run out while writing the pack, the small positive ones while
# committing the index, the large ones succeed
SLACKS = (-256 * KiB, -4 * KiB, 0, 8 * KiB, 16 * KiB, 32 * KiB, 48 * KiB, 64 * KiB,
          96 * KiB, 160 * KiB, 1 * MiB)


@pytest.mark.slow                             # ~16 s: a backup cut by ENOSPC at every point (CI runs it)
def test_running_out_of_space_at_any_point_of_a_backup_is_clean(tmp_path, tmpfs):
    img = tmp_path / "img.bin"
    img_bytes = _random_file(img, 8 * MiB, seed=3)
    out = tmp_path / "out.img"
    # the pack bytes this backup needs, measured on an unconstrained store
    ref_cli = Cli(tmp_path / "unconstrained")
    ref_cli("backup", img, "--chunk-size", CHUNK)
    need = ref_cli.json("store", "stats")["stored_bytes"]

    outcomes = {}
    for i, slack in enumerate(SLACKS):
        data = tmpfs(f"data{i}", "24m")
        cli = Cli(data)
        cli("backups")                                # create the index first
        filler = _fill(data, need + slack)
        p = cli("backup", img, "--chunk-size", CHUNK, ok=None)
        what = f"backup of {need} pack bytes with {need + slack} bytes free"
        if p.returncode == 0:
            outcomes[slack] = "ok"
            assert_consistent_with(cli, {"img.bin@1"}, what)
            _restores_identical(cli, "img.bin", img_bytes, out)
            continue
        outcomes[slack] = "no space"
        assert_no_space_error(p, what)
        assert_consistent_with(cli, set(), what)
        filler.unlink()                               # room again: the same store works
        cli("backup", img, "--chunk-size", CHUNK)
        assert_consistent_with(cli, {"img.bin@1"}, f"{what}, then with room")
        _restores_identical(cli, "img.bin", img_bytes, out)
    print(f"\nslack -> outcome: {outcomes}")
    assert "ok" in outcomes.values() and "no space" in outcomes.values(), \
        f"the slacks did not straddle the limit: {outcomes}"


def _full_data_dir(tmp_path, tmpfs):
    """A store holding one 2 MiB backup whose file system some other file then
    filled to 100% before any command starts. (cli, backup bytes, filler)"""
    data = tmpfs("data", "24m")
    cli = Cli(data)
    small = tmp_path / "small.img"
    small_bytes = _random_file(small, 2 * MiB, seed=4)
    cli("backup", small, "--chunk-size", CHUNK)
    filler = _fill(data, 0)
    assert _free(data) == 0
    return cli, small_bytes, filler


def test_backup_into_an_already_full_data_dir_says_no_space(tmp_path, tmpfs):
    cli, small_bytes, filler = _full_data_dir(tmp_path, tmpfs)
    other = tmp_path / "other.img"
    _random_file(other, 1 * MiB, seed=8)
    p = cli("backup", other, "--chunk-size", CHUNK, ok=None)
    assert_no_space_error(p, "backup into a data dir whose disk is already full")
    filler.unlink()
    assert_consistent_with(cli, {"small.img@1"}, "after freeing space")
    _restores_identical(cli, "small.img", small_bytes, tmp_path / "out.img")


def test_backups_stay_listable_verifiable_restorable_while_data_dir_is_full(tmp_path, tmpfs):
    """Reading needs no room: a full data dir disk (the moment one wants a
    restore the most) must not lock the user out of existing backups."""
    cli, small_bytes, filler = _full_data_dir(tmp_path, tmpfs)
    for args in (("backups",), ("verify",), ("store", "stats")):
        p = cli(*args, ok=None)
        assert p.returncode == 0, f"`hypersdk {' '.join(args)}` on a full data dir: {p.stderr}"
    assert_consistent_with(cli, {"small.img@1"}, "full data dir")
    _restores_identical(cli, "small.img", small_bytes, tmp_path / "out.img")
    filler.unlink()
    assert_consistent_with(cli, {"small.img@1"}, "after freeing space")


def test_restore_to_a_full_dir_leaves_no_out_and_no_partial_file(tmp_path, tmpfs):
    cli = Cli(tmp_path / "data")
    img = tmp_path / "img.bin"
    _random_file(img, 12 * MiB, seed=5)
    cli("backup", img, "--chunk-size", CHUNK)
    outdir = tmpfs("out", "8m")
    target = outdir / "restored.img"

    p = cli("restore", "img.bin", target, ok=None)
    assert_no_space_error(p, "restore of 12 MiB into an 8 MiB dir")
    assert os.listdir(outdir) == [], f"left behind: {os.listdir(outdir)}"
    assert _free(outdir) >= 8 * MiB - 64 * KiB, "the failed restore kept space"

    # with --force over an existing OUT: OUT stays exactly as it was
    keep = _random_file(target, 1 * MiB, seed=6)
    p = cli("restore", "img.bin", target, "--force", ok=None)
    assert_no_space_error(p, "restore --force of 12 MiB over a 1 MiB file in an 8 MiB dir")
    assert os.listdir(outdir) == [target.name], f"left behind: {os.listdir(outdir)}"
    assert target.read_bytes() == keep, "a failed restore changed the existing OUT"


def test_sparse_restore_fits_where_its_apparent_size_does_not(tmp_path, tmpfs):
    """Zero chunks stay holes: a 32 MiB image with 2 MiB of data restores into 8 MiB."""
    cli = Cli(tmp_path / "data")
    rng = random.Random(7)
    img = tmp_path / "sparse.img"
    content = bytearray(32 * MiB)
    for off in (0, 9 * MiB + 64 * KiB, 31 * MiB):
        content[off:off + 640 * KiB] = rng.randbytes(640 * KiB)
    img.write_bytes(content)
    cli("backup", img, "--chunk-size", CHUNK)
    outdir = tmpfs("out", "8m")
    cli("restore", "sparse.img", outdir / "r.img")
    assert (outdir / "r.img").read_bytes() == bytes(content)
    assert os.listdir(outdir) == ["r.img"]
