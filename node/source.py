"""Opening a local disk image (regular file or block device) with clear errors."""
from __future__ import annotations

import os
import stat

from .errors import UserError


def open_image(path: str):
    """(binary file object, size in bytes); UserError with one clear line otherwise."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except OSError as exc:
        raise UserError(f"{path}: {exc.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise UserError(f"{path}: is a directory, not a disk image")
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise UserError(f"{path}: not a regular file or block device")
    try:
        f = open(path, "rb", buffering=0)
    except PermissionError:
        raise UserError(f"{path}: permission denied") from None
    except OSError as exc:
        raise UserError(f"{path}: {exc.strerror}") from None
    size = f.seek(0, os.SEEK_END)
    f.seek(0)
    return f, size
