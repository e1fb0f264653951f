"""Advisory file locks between hypersdk processes sharing one data dir.

write.lock  : one writer at a time (backup, delete, gc).
compact.lock: readers (restore, verify) hold it shared; gc holds it exclusive
              while it deletes or moves chunks, so no reader sees a pack vanish.
A killed process releases its locks with its file descriptors.
"""
from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path


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
