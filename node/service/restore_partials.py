"""Partial files of killed restores: finding them and removing the stale ones.

A restore writes OUT's image to .NAME.hypersdk-partial-PID next to OUT (a
staged network restore to ...-PID-stage). The writer holds an exclusive flock
on its partial file for as long as it writes it, and the partial's name carries
its pid. A partial is stale when its lock can be taken AND no process has that
pid (the pid test covers the instant between creating the file and locking it;
a reused pid only keeps a stale file a while longer, never deletes a live one).
Each restore removes the stale partials of its OUT before it writes; gc removes
the stale partials of every OUT, found through the data dir's registry
(DATA/partials/: one small JSON record {path, pid} per partial, written by
atomic rename before the partial is created and removed after it is renamed or
removed; best effort: a restore works without it, and the next restore to that
OUT still cleans up).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import stat
import threading
from pathlib import Path

_PARTIAL_NAME = re.compile(r"\.(?P<out>.+)\.hypersdk-partial-(?P<pid>\d+)(?:-stage)?")


def partial_path(out: str) -> str:
    out = os.path.abspath(out)
    return os.path.join(os.path.dirname(out),
                        f".{os.path.basename(out)}.hypersdk-partial-{os.getpid()}")


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True                   # someone else's process
    except (OverflowError, OSError):
        return False
    return True


def _remove_if_stale(path: str, pid: int) -> bool:
    """Unlink the partial file path if it is stale: nobody holds its lock and its
    writer pid is dead. True if removed."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False              # a writer holds it: live
        if _alive(pid):
            return False              # created but not locked yet, or renamed and not closed
        cur = os.lstat(path)
        if (cur.st_dev, cur.st_ino) != (st.st_dev, st.st_ino):
            return False
        os.unlink(path)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)                  # (releases the lock)


def remove_stale_partials(out: str, registry: "PartialRegistry | None" = None) -> int:
    """Remove the stale partial files of OUT (killed restores); how many."""
    parent, base = os.path.split(os.path.abspath(out))
    prefix = f".{base}.hypersdk-partial-"
    try:
        names = os.listdir(parent)
    except OSError:
        return 0
    removed = 0
    for name in names:
        if not name.startswith(prefix):
            continue
        mm = _PARTIAL_NAME.fullmatch(name)
        if mm is None or mm["out"] != base:
            continue
        path = os.path.join(parent, name)
        if _remove_if_stale(path, int(mm["pid"])):
            removed += 1
            if registry is not None:
                registry.remove(path)
    return removed


class PartialRegistry:
    """DATA/partials/: one record per partial file a restore is writing, so that gc
    (which knows no output dirs) can find the partials of killed restores.

    A record is KEY.json = {"path": partial path, "pid": writer pid}, KEY a hash of
    the path, written whole by rename; add() comes before the partial exists and
    remove() after it is renamed or removed, so a crash leaves at worst a record
    without a file (gc drops it once its pid is dead). Best effort: a data dir that
    cannot be written does not stop a restore."""

    def __init__(self, data_dir):
        self.dir = Path(data_dir) / "partials"

    def _record(self, partial: str) -> Path:
        return self.dir / (hashlib.sha256(os.fsencode(partial)).hexdigest()[:32] + ".json")

    def add(self, partial: str) -> None:
        partial = os.path.abspath(partial)
        rec = self._record(partial)
        tmp = self.dir / f".tmp-{os.getpid()}-{threading.get_ident()}-{rec.name}"
        try:
            self.dir.mkdir(mode=0o700, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            try:
                os.write(fd, json.dumps({"path": partial, "pid": os.getpid()}).encode())
            finally:
                os.close(fd)
            os.replace(tmp, rec)
        except OSError:
            _unlink_quiet(tmp)

    def remove(self, partial: str) -> None:
        _unlink_quiet(self._record(os.path.abspath(partial)))

    def clean(self) -> int:
        """Remove every registered partial whose writer is dead (and its record);
        drop records of partials that are gone. Returns partial files removed."""
        try:
            names = os.listdir(self.dir)
        except OSError:
            return 0
        removed = 0
        for name in names:
            rec = self.dir / name
            if name.startswith(".tmp-"):          # a torn add() of a dead writer
                pid = name.split("-")[1]
                if pid.isdigit() and not _alive(int(pid)):
                    _unlink_quiet(rec)
                continue
            if not name.endswith(".json"):
                continue
            try:
                doc = json.loads(rec.read_bytes())
                path, pid = doc["path"], doc["pid"]
                ok = isinstance(path, str) and isinstance(pid, int) and os.path.isabs(path)
            except (OSError, ValueError, KeyError, TypeError):
                ok = False
            mm = _PARTIAL_NAME.fullmatch(os.path.basename(path)) if ok else None
            if mm is None or int(mm["pid"]) != pid:
                _unlink_quiet(rec)                # not a record of ours: touch no other file
                continue
            if _remove_if_stale(path, pid):
                removed += 1
                _unlink_quiet(rec)
            elif not _alive(pid) and not os.path.lexists(path):
                _unlink_quiet(rec)
        return removed


def _unlink_quiet(path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
