"""Crash safety: SIGKILL real `hypersdk backup` and `hypersdk gc` processes at random moments.

The claim under test (store.py, backup.py, gc.py): a kill -9 at any moment of a
backup leaves a store that `verify` finds consistent, `backups` lists only
complete backups, and re-running the backup completes; the same holds for gc
after a delete, and every remaining backup still restores byte-identical.

How a kill moment is picked (sleeping is only ever used to *choose* a random
moment, never to wait for something to happen):
  early   sleep a random time shorter than the measured time to the first pack byte
  delay   sleep a random time within the measured duration of an uninterrupted run
  bytes   poll the pack files until the process has written a random number of bytes
  commit  poll until every pack byte is written, then until the index WAL grows:
          the kill lands in the final SQLite commit (or just after it)
and, for gc, `reclaim` (poll until a random number of pack bytes were freed) and
`swept` (poll until gc's sweep starts writing the index). Durations and byte
counts come from uninterrupted calibration runs of the same work. Every
polling loop is bounded in iterations and in time. All randomness comes from
one seeded random.Random (set HYPERSDK_CRASH_SEED to explore other seeds).

After every kill the stage it hit is classified from what is on disk, and the
test asserts the kills covered several stages, so it cannot silently only kill
processes that are still starting up.
"""
from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import HYPERSDK, Cli, KiB, MiB, cli_env

SEED = int(os.environ.get("HYPERSDK_CRASH_SEED", "20251124"))
BLOCK = 64 * KiB                # image building block == chunk size: each block is one chunk
CHUNK = "64K"                   # smallest chunk size: many write points per MiB
LEVELS = (3, 15)                # zstd levels: the default and a slow one (longer runs)
IMAGE_BLOCKS = 1024             # 64 MiB images
MAX_WAIT = 60.0                 # seconds: upper bound for any one process / polling loop
TEXT = bytes(b"etaoinshrdlu \n,.0123456789"[i % 26] for i in range(256))


# -- images ---------------------------------------------------------------------
def _block(kind: str, seed: int) -> bytes:
    if kind == "zero":
        return bytes(BLOCK)
    raw = random.Random(seed).randbytes(BLOCK)
    return raw if kind == "random" else raw.translate(TEXT)    # text: ~60% compressible


def _blocks(rng: random.Random, base: list | None = None, replace: float = 0.6) -> list:
    """Block specs of an image: 15% zero, 45% random, 40% compressible text. With
    `base`, a later version of that image with `replace` of its blocks rewritten."""
    def fresh():
        k = rng.random()
        return ("zero" if k < 0.15 else "random" if k < 0.6 else "text", rng.getrandbits(64))
    if base is None:
        return [fresh() for _ in range(IMAGE_BLOCKS)]
    return [fresh() if rng.random() < replace else b for b in base]


@dataclass
class Image:
    path: Path
    size: int
    sha: str


def _write_image(path: Path, blocks: list) -> Image:
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for spec in blocks:
            data = _block(*spec)
            h.update(data)
            f.write(data)
    return Image(path, len(blocks) * BLOCK, h.hexdigest())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for _ in range(1 << 20):                     # bounded: files here are < 1 TiB
            b = f.read(4 * MiB)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def _assert_restores(cli: Cli, ref: str, image: Image, out: Path, why: str):
    p = cli("restore", ref, out, "--force", ok=None)
    assert p.returncode == 0, f"{why}: restore {ref} failed ({p.returncode}): {p.stderr}"
    assert out.stat().st_size == image.size, f"{why}: restored {ref} has the wrong size"
    assert _sha256(out) == image.sha, f"{why}: restored {ref} differs from {image.path.name}"
    out.unlink()


# -- observing a store from outside ----------------------------------------------
def _pack_stats(packs: Path) -> dict[str, tuple[int, int]]:
    """pack file name -> (apparent size, allocated bytes)."""
    out = {}
    try:
        entries = list(os.scandir(packs))
    except FileNotFoundError:
        return out
    for e in entries:
        if e.name.startswith("pack-") and e.name.endswith(".dat"):
            try:
                st = e.stat()
            except FileNotFoundError:                # gc unlinked it meanwhile
                continue
            out[e.name] = (st.st_size, st.st_blocks * 512)
    return out


def _wal_size(data: Path) -> int:
    try:
        return (data / "index.sqlite-wal").stat().st_size
    except FileNotFoundError:
        return 0


class PackGrowth:
    """Pack bytes a backup has written past the committed ends, read from file sizes.

    A torn tail left by an earlier killed run looks like new bytes until the
    new run cuts it off (the size drops) or writes past it (the size grows
    beyond it); until one of those is seen, progress counts as 0.
    """

    def __init__(self, data: Path, committed: dict[str, int]):
        self.packs, self.committed = data / "packs", dict(committed)
        self.stale = self._grown()
        self.cut = self.stale == 0

    def _grown(self) -> int:
        return sum(max(0, size - self.committed.get(name, 0))
                   for name, (size, _) in _pack_stats(self.packs).items())

    def now(self) -> int:
        g = self._grown()
        if g != self.stale:
            self.cut = True
        return g if self.cut else 0


class Reclaimed:
    """Allocated pack bytes freed so far (holes punched, files removed)."""

    def __init__(self, data: Path):
        self.packs = data / "packs"
        self.before = self._allocated()

    def _allocated(self) -> int:
        return sum(a for _, a in _pack_stats(self.packs).values())

    def now(self) -> int:
        return max(0, self.before - self._allocated())


@dataclass
class Run:
    rc: int
    stdout: str
    stderr: str
    progress: int          # progress observed after the process ended
    seconds: float         # start to exit
    t_first: float | None  # time of the first observed progress (None: not polled / none)

    @property
    def killed(self) -> bool:
        return self.rc == -signal.SIGKILL


def drive(data: Path, args: list, meter, *, delay: float | None = None,
          target: int | None = None, then_wal: bool = False, spin: bool = False) -> Run:
    """Run `hypersdk ARGS` on `data`; SIGKILL it `delay` seconds after the start,
    or once meter.now() >= target (and, with then_wal, once the index WAL has
    grown after that). With neither, observe it to completion."""
    proc = subprocess.Popen([str(HYPERSDK), *map(str, args)], env=cli_env(data),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    t_first = None
    try:
        if delay is not None:
            time.sleep(delay)           # the random kill moment itself, not a wait
        else:
            deadline = t0 + MAX_WAIT
            wal_mark = None
            step = 0 if spin else 0.0005
            for _ in range(10_000_000):                 # bounded; the deadline ends it first
                if proc.poll() is not None:
                    break
                assert time.monotonic() < deadline, f"hypersdk {args} still running after {MAX_WAIT} s"
                p = meter.now()
                if p and t_first is None:
                    t_first = time.monotonic() - t0
                if target is not None and p >= target:
                    if not then_wal:
                        break
                    if wal_mark is None:
                        wal_mark = _wal_size(data)
                    elif _wal_size(data) > wal_mark:
                        break
                time.sleep(step)
        if (delay is not None or target is not None) and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=MAX_WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    seconds = time.monotonic() - t0
    assert proc.returncode in (0, -signal.SIGKILL), \
        f"hypersdk {args} failed on its own ({proc.returncode}): {err}"
    return Run(proc.returncode, out, err, meter.now(), seconds, t_first)


def check_store(cli: Cli, why: str) -> dict[str, int]:
    """`verify` exits 0 and says consistent; returns `backups` as {ref: size}."""
    v = cli("verify", ok=None)
    assert v.returncode == 0 and "OK: store is consistent" in v.stdout, \
        f"{why}: verify failed ({v.returncode}):\n{v.stdout}{v.stderr}"
    return {b["ref"]: b["size"] for b in cli.json("backups")}


def _summary(rows: list) -> str:
    return "\n".join("  " + " ".join(f"{k}={v}" for k, v in r.items()) for r in rows)


# -- backups ------------------------------------------------------------------------
@dataclass
class Calibration:
    seconds: float        # one uninterrupted run, start to exit
    t_first: float        # start to the first new pack byte
    new_bytes: int        # pack bytes the run adds


def _calibrate(scratch: Cli, image: Image, name: str, level: int) -> Calibration:
    data = scratch.data_dir
    data.mkdir(parents=True, exist_ok=True)
    meter = PackGrowth(data, {n: s for n, (s, _) in _pack_stats(data / "packs").items()})
    run = drive(data, ["backup", image.path, "--name", name, "--chunk-size", CHUNK,
                       "--zstd-level", level], meter)
    assert run.rc == 0, run.stderr
    assert run.progress > 0 and run.t_first is not None, "calibration saw no pack bytes"
    return Calibration(run.seconds, run.t_first, run.progress)


BACKUP_MODES = ("early", "bytes", "bytes", "delay")


@pytest.mark.slow
@pytest.mark.parametrize("commit_bytes,keyed", [(None, False), ("1M", False), ("1M", True)],
                         ids=["one-commit", "commit-every-1M", "sealed-commit-every-1M"])
def test_kill9_during_backup_leaves_consistent_store_and_rerun_completes(
        tmp_path, cli, monkeypatch, commit_bytes, keyed):
    # with 1M, kills also land between batch commits: earlier batches' chunks
    # are committed but no backup references them yet; keyed: the data dir holds a
    # data key, so every record and manifest is sealed (encryption at rest)
    if commit_bytes:
        monkeypatch.setenv("HYPERSDK_COMMIT_BYTES", commit_bytes)
    rng = random.Random(SEED)
    data = cli.data_dir
    data.mkdir()
    scratch = {lv: Cli(tmp_path / f"calibrate-l{lv}") for lv in LEVELS}
    if keyed:
        from hypersdk.node.net import datakey
        key = datakey.create(data)
        for c in scratch.values():
            datakey.install(c.data_dir, key.secret)
    out = tmp_path / "restored.img"
    images: dict[str, Image] = {}
    completed: dict[str, int] = {}          # ref -> size: backups known to be complete
    committed: dict[str, int] = {}          # pack -> committed end (sizes after a completion)
    rows: list[dict] = []
    base = None
    for episode in range(6):                # bounded: 3 planned episodes, spares if needed
        if episode >= 3 and sum(r["killed"] for r in rows) >= 16:
            break
        name = "vm" + "abcdef"[episode]
        base = _blocks(rng, base)
        image = images[name] = _write_image(tmp_path / f"{name}.img", base)
        cal = {lv: _calibrate(scratch[lv], image, name, lv) for lv in LEVELS}
        # random kinds of kill moment; the commit-window kill last, since it may
        # well land after the commit and so end the episode with a complete backup
        modes = list(BACKUP_MODES) + (["early", "bytes", "delay"] if episode == 0 else [])
        rng.shuffle(modes)
        modes.append("commit")
        ref = f"{name}@1"
        for mode in modes:                  # crash, crash, crash ... on one data dir
            level = rng.choice(LEVELS)
            c = cal[level]
            kw = {}
            if mode == "early":
                kw["delay"] = rng.uniform(0, 0.8 * c.t_first)
            elif mode == "delay":
                kw["delay"] = rng.uniform(0, c.seconds)
            elif mode == "bytes":
                kw["target"] = rng.randrange(1, c.new_bytes)
            else:
                kw.update(target=c.new_bytes, then_wal=True)
            meter = PackGrowth(data, committed)
            run = drive(data, ["backup", image.path, "--name", name, "--chunk-size", CHUNK,
                               "--zstd-level", level], meter, **kw)
            why = (f"seed {SEED}, episode {episode} ({ref}), mode {mode}, level {level}, "
                   f"{kw}, rc {run.rc}, {run.progress} new pack bytes at the end")
            listed = check_store(cli, why)
            assert completed.items() <= listed.items(), f"{why}: a complete backup vanished: {listed}"
            new = set(listed) - set(completed)
            if run.rc == 0:
                assert run.stdout.startswith(f"backup {ref}\n"), f"{why}: {run.stdout}"
                assert new == {ref}, f"{why}: backups lists {sorted(listed)}"
            else:
                # only the killed run's own backup may appear, and only if it committed
                assert new <= {ref}, f"{why}: a half-made backup is listed: {sorted(listed)}"
            for r in new:
                assert listed[r] == image.size, f"{why}: {r} lists size {listed[r]}"
            stage = ("committed" if new else "no-pack-bytes" if run.progress == 0 else
                     "mid-pack" if run.progress < c.new_bytes else "pre-commit")
            rows.append({"episode": episode, "mode": mode, "level": level,
                         "killed": run.killed, "stage": stage, "progress": run.progress,
                         "of": c.new_bytes, "prior_backups": len(completed)})
            if new:                         # complete (finished, or killed after commit)
                completed[ref] = image.size
                break
        if ref not in completed:            # the re-run after the crashes completes
            level = rng.choice(LEVELS)
            r = cli("backup", image.path, "--name", name, "--chunk-size", CHUNK,
                    "--zstd-level", level, ok=None)
            assert r.returncode == 0, f"seed {SEED}: re-run of {ref} failed: {r.stderr}"
            assert r.stdout.startswith(f"backup {ref}\n"), r.stdout
            completed[ref] = image.size
            assert check_store(cli, f"after re-run of {ref}") == completed
        committed = {n: s for n, (s, _) in _pack_stats(data / "packs").items()}

    summary = _summary(rows)
    print(f"\nbackup kills (seed {SEED}):\n{summary}")
    kills = [r for r in rows if r["killed"]]
    stages = lambda pred: [r for r in kills if pred(r)]
    assert len(kills) >= 15, f"only {len(kills)} kills landed:\n{summary}"
    assert stages(lambda r: r["stage"] == "no-pack-bytes"), \
        f"no kill before the first pack byte:\n{summary}"
    assert len(stages(lambda r: r["prior_backups"] == 0 and r["stage"] == "mid-pack")) >= 2, \
        f"too few kills mid-way through a first backup:\n{summary}"
    assert len(stages(lambda r: r["prior_backups"] > 0 and r["stage"] == "mid-pack")) >= 2, \
        f"too few kills mid-way with a complete backup in the store:\n{summary}"
    assert len({r["progress"] for r in stages(lambda r: r["stage"] == "mid-pack")}) >= 4, \
        f"mid-pack kills did not hit distinct points:\n{summary}"

    # the re-runs cut every torn tail: the pack holds exactly the committed records
    st = cli.json("store", "stats")
    on_disk = sum(s for s, _ in _pack_stats(data / "packs").values())
    assert on_disk == st["stored_bytes"], (
        f"packs hold {on_disk} bytes but the index accounts for {st['stored_bytes']}: "
        f"a torn tail of a killed run was not cut\n{summary}")
    for ref in completed:
        _assert_restores(cli, ref, images[ref.split("@")[0]], out, f"seed {SEED}, final")
    g = cli.json("gc")
    assert g["disk_bytes_after"] <= g["disk_bytes_before"]
    assert check_store(cli, "after gc") == completed
    for ref in completed:
        _assert_restores(cli, ref, images[ref.split("@")[0]], out, f"seed {SEED}, after gc")
    if keyed:                           # every record and manifest kept is sealed
        import sqlite3
        with sqlite3.connect(data / "index.sqlite") as db:
            codecs = {c for (c,) in db.execute("SELECT codec FROM chunks")}
            keys = {k for (k,) in db.execute("SELECT key FROM manifests")}
        assert codecs and all(c & 0x60 == 0x60 for c in codecs), codecs   # SEALED | KEYED
        assert keys == {key.fingerprint}


def test_kill9_mid_backup_then_rerun_restores_identical(tmp_path):
    """Quick version: one kill part-way through the pack writes of a first backup."""
    rng = random.Random(SEED + 1)
    image = tmp_path / "rand.img"
    image.write_bytes(rng.randbytes(16 * MiB))   # incompressible: >= 16 MiB of pack bytes
    for attempt in range(3):                     # bounded: a loaded machine may let one finish
        cli = Cli(tmp_path / f"data{attempt}")
        cli.data_dir.mkdir()
        target = rng.randrange(256 * KiB, 8 * MiB)
        run = drive(cli.data_dir, ["backup", image, "--chunk-size", CHUNK],
                    PackGrowth(cli.data_dir, {}), target=target)
        if run.killed:
            break
    assert run.killed, f"backup finished before {target} pack bytes were written, 3 times"
    assert run.progress >= target
    assert check_store(cli, "after the kill") == {}
    cli("backup", image, "--chunk-size", CHUNK)
    assert check_store(cli, "after the re-run") == {"rand.img@1": 16 * MiB}
    out = tmp_path / "out.img"
    cli("restore", "rand.img", out)
    assert out.read_bytes() == image.read_bytes()


# -- gc -----------------------------------------------------------------------------
GC_MODES = ("early", "delay", "reclaim", "reclaim", "reclaim")


def _sparse_copy(src: Path, dst: Path):
    """Copy a data dir keeping holes (punched gaps) as holes."""
    subprocess.run(["cp", "-a", "--sparse=always", str(src), str(dst)], check=True)


@pytest.mark.slow
def test_kill9_during_gc_after_delete_keeps_remaining_backups(tmp_path, cli):
    rng = random.Random(SEED + 2)
    data = cli.data_dir
    out = tmp_path / "restored.img"
    images: dict[str, Image] = {}
    order: list[str] = []                     # names of live backups, oldest first
    base = None

    def add_backup():
        nonlocal base
        name = "vm" + "abcdef"[len(images)]
        base = _blocks(rng, base)
        images[name] = _write_image(tmp_path / f"{name}.img", base)
        cli("backup", images[name].path, "--name", name, "--chunk-size", CHUNK)
        order.append(name)

    for _ in range(3):
        add_backup()
    rows: list[dict] = []
    for round_ in range(4):                   # bounded: 2 planned rounds, spares if needed
        if round_ >= 2 and sum(r["killed"] for r in rows) >= 8:
            break
        if len(order) < 3:
            add_backup()
        victim = order.pop(0)
        cli("delete", victim)
        expected = {f"{n}@1": images[n].size for n in order}
        assert check_store(cli, f"after delete {victim}") == expected

        # one uninterrupted gc of the same store: its duration and what it frees
        cal_dir = tmp_path / f"gc-calibrate-{round_}"
        _sparse_copy(data, cal_dir)
        cal = drive(cal_dir, ["gc"], Reclaimed(cal_dir), spin=True)
        assert cal.rc == 0 and cal.progress > 0, f"gc reclaimed nothing: {cal.stdout}"
        shutil.rmtree(cal_dir)

        # the first kill of a round waits for the sweep's commit (gc's first index
        # write); the others are random, each on the store the previous one left
        modes = list(GC_MODES)
        rng.shuffle(modes)
        round_meter = Reclaimed(data)           # freed since the round began
        done = False
        for mode in ["swept", *modes]:
            wal0 = _wal_size(data)
            already = round_meter.now()
            kw = {}
            if mode == "reclaim" and cal.progress - already < 2:
                mode = "delay"                  # nothing left to free part-way
            if mode == "early":
                kw["delay"] = rng.uniform(0, 0.8 * (cal.t_first or cal.seconds))
            elif mode == "delay":
                kw["delay"] = rng.uniform(0, cal.seconds)
            elif mode == "swept":
                kw.update(target=0, then_wal=True)
            else:
                kw["target"] = rng.randrange(already + 1, cal.progress)
            meter = Reclaimed(data)
            meter.before = round_meter.before
            run = drive(data, ["gc"], meter, spin=True, **kw)
            wrote_index = _wal_size(data) > wal0      # read before other commands run
            freed = run.progress - already
            why = (f"seed {SEED + 2}, gc round {round_} (deleted {victim}), mode {mode}, "
                   f"{kw}, rc {run.rc}, freed {freed} (round total {run.progress} "
                   f"of ~{cal.progress})")
            assert check_store(cli, why) == expected, f"{why}: backups changed"
            for n in order:
                _assert_restores(cli, f"{n}@1", images[n], out, why)
            stage = ("start" if freed == 0 and not wrote_index else
                     "swept" if freed == 0 else
                     "mid-reclaim" if run.progress < cal.progress else "reclaimed")
            rows.append({"round": round_, "mode": mode, "killed": run.killed,
                         "stage": stage, "freed": freed, "round_total": run.progress,
                         "of": cal.progress})
            if run.rc == 0:
                done = True
                break
        if not done:                          # a gc after the crashes completes
            cli("gc")
        assert check_store(cli, f"after gc round {round_}") == expected
        for n in order:
            _assert_restores(cli, f"{n}@1", images[n], out, f"after gc round {round_}")
        # nothing leaked: the kills plus one complete gc free what one uninterrupted
        # gc frees (1% slack: the filesystem's own extent blocks vary by a few KiB)
        assert round_meter.now() >= cal.progress * 0.99, (
            f"round {round_}: gc after kills freed {round_meter.now()} bytes, an "
            f"uninterrupted gc frees {cal.progress}")

    summary = _summary(rows)
    print(f"\ngc kills (seed {SEED + 2}):\n{summary}")
    kills = [r for r in rows if r["killed"]]
    assert len(kills) >= 8, f"only {len(kills)} gc kills landed:\n{summary}"
    assert any(r["stage"] == "start" for r in kills), f"no kill before gc wrote anything:\n{summary}"
    assert any(r["stage"] == "swept" for r in kills), \
        f"no kill between the sweep and the freeing of space:\n{summary}"
    assert any(r["stage"] == "mid-reclaim" for r in kills), \
        f"no kill part-way through freeing space:\n{summary}"
