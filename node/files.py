"""Files of a data dir: private modes and cross-process locks (used by every layer).

The data dir is private: the directory 0700, every file in it 0600.

Backup names, source paths and the audit log are nobody else's business on a
shared machine. The directory is made 0700 before anything is created in it,
so no one else can open what it holds even for the instant before a file is
tightened. Our own files are created 0600 (os.open with that mode). SQLite
creates its database file itself (0644 less the umask) and gives the -wal and
-shm files the database file's mode, so private_db() chmods the database file
(by path) right after SQLite created it, before the first write makes a WAL.
It must never open and close a descriptor of a database file: closing any
descriptor of a file drops every POSIX lock the process holds on it, SQLite's
included, and another connection of this process would then lose its locks.
Data dirs made by an older hypersdk (0755 / 0644) are tightened when opened.

Advisory file locks between hypersdk processes sharing one data dir.

write.lock  : one writer at a time (backup, delete, gc).
compact.lock: readers (restore, verify) hold it shared; gc holds it exclusive
              while it deletes or moves chunks, so no reader sees a pack vanish.
A killed process releases its locks with its file descriptors.
"""
from __future__ import annotations

import fcntl
import os
import stat
import threading
from contextlib import contextmanager
from pathlib import Path

DIR_MODE, FILE_MODE = 0o700, 0o600


def private_dir(path: Path) -> Path:
    """Create path (and parents) if needed; make path itself 0700."""
    path = Path(path)
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    _tighten(path, DIR_MODE)
    return path


def private_db(path: Path) -> Path:
    """Make the SQLite database at path (and its -wal/-shm files, if any) 0600, by
    path: call it once sqlite3 has opened the database (see the module doc)."""
    path = Path(path)
    for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        _tighten(p, FILE_MODE)
    return path


def _tighten(path: Path, mode: int) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode) or st.st_uid != os.geteuid():
        return                           # not ours to change
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(path, stat.S_IMODE(st.st_mode) & mode)


@contextmanager
def flock(path: Path, *, exclusive: bool, on_wait=None):
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait:
                on_wait(f"waiting for another hypersdk process to release {path.name}")
            fcntl.flock(fd, mode)
        yield
    finally:
        os.close(fd)           # releases the lock


def write_atomic(path, data: bytes) -> None:
    """Replace the file at path with data, mode 0600, durably: a temporary file in
    the same directory, fsync, rename, fsync of the directory. A crash leaves the
    old file or the new one, never a torn one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}-{threading.get_ident()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, FILE_MODE)
    try:
        try:
            os.fchmod(fd, FILE_MODE)            # the umask can only remove bits: be explicit
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class NotPrivate(Exception):
    """read_private refused a file; str() says why, starting with the path."""


def read_private(path, limit: int, what: str, *, follow: bool = True) -> tuple[bytes, int]:
    """(the first limit+1 bytes at most, the size) of the secret file at path, which must be a
    regular file readable by its owner only (mode 0600 or stricter); NotPrivate
    naming `what` (e.g. "credentials file") otherwise. follow=False: refuse a
    symbolic link."""
    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
    if not follow:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise NotPrivate(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise NotPrivate(f"cannot open {what} {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotPrivate(f"{what} {path} is not a regular file")
        if st.st_mode & 0o077:
            raise NotPrivate(f"{what} {path} is accessible by others (mode "
                             f"{stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}")
        return os.read(fd, limit + 1), st.st_size
    finally:
        os.close(fd)
