"""Where a restore may write: checking OUT, the restored file's mode, block devices.

OUT is checked before anything is written (check_target):
  absent               a new image file;
  a regular file       replaced only with force (--force);
  a block device       written in place only with to_device (--to-device, a
                       confirmation --force does not give): OUT must be at least
                       the image size; O_EXCL, so a mounted device is refused;
  a symbolic link      refused, or with follow_symlink (--follow-symlink) the
                       path it resolves to is checked by these same rules;
  a directory, FIFO, socket or character device: refused, saying which it is.

A device gets every chunk written at its offset with positional writes, zero
chunks as zeros (a device is not empty; it cannot have holes), and one
fdatasync at the end; bytes past the image size are untouched.
"""
from __future__ import annotations

import errno
import os
import stat

from hypersdk.node.errors import UserError
from hypersdk.node.service.image_write import ALIGN, block_size, set_direct, write_image


def check_target(out: str, force: bool, to_device: bool, follow_symlink: bool):
    """(path to write, is a block device), or UserError saying what OUT is and why not."""
    path = out
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None and stat.S_ISLNK(st.st_mode):
        if not follow_symlink:
            try:
                dest = os.readlink(path)
            except OSError:
                dest = "?"
            raise UserError(f"{out} is a symbolic link (to {dest}); restore neither replaces "
                            "nor follows it: give the target's path, or add --follow-symlink "
                            "to write where it points")
        path = os.path.realpath(path)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        if st is not None and stat.S_ISLNK(st.st_mode):
            raise UserError(f"{out}: symbolic link loop; nothing written")
    if st is None:
        if to_device:
            raise UserError(f"{path}: no such block device (--to-device writes only into an "
                            "existing block device)")
        return path, False
    mode = st.st_mode
    if stat.S_ISDIR(mode):
        raise UserError(f"{path} is a directory; restore writes an image file (give its "
                        f"path, e.g. {os.path.join(path, 'NAME.img')}) or a block device")
    if stat.S_ISBLK(mode):
        if not to_device:
            raise UserError(f"{path} is a block device: restoring overwrites the device; "
                            "add --to-device to confirm (--force does not)")
        return path, True
    if stat.S_ISREG(mode):
        if to_device:
            raise UserError(f"--to-device: {path} is a regular file, not a block device "
                            "(use --force to replace a file)")
        if not force:
            raise UserError(f"{path} exists; use --force to overwrite it")
        return path, False
    kind = ("a character device" if stat.S_ISCHR(mode) else
            "a FIFO (named pipe)" if stat.S_ISFIFO(mode) else
            "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
    raise UserError(f"{path} is {kind}; restore writes only to a regular file or a "
                    "block device")


def restored_mode(source, umask: int | None = None) -> int:
    """The permission bits of a restored image file: the source's (manifest
    source "mode"; permission bits only, never setuid/setgid/sticky: a manifest
    may come from another node), else 0666 & ~umask."""
    mode = source.get("mode") if isinstance(source, dict) else None
    if isinstance(mode, int) and not isinstance(mode, bool) and mode >= 0:
        return mode & 0o777
    return 0o666 & ~(current_umask() if umask is None else umask)


def current_umask() -> int:
    """This process's umask, read without changing it (os.umask would, for every
    thread) where /proc says it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o077)
    os.umask(old)
    return old


def restore_device(store, m, out: str, direct, progress, workers: int):
    """Write the image into the block device out; (zero chunks, chunks).

    O_EXCL: the kernel refuses (EBUSY) a device that is mounted or claimed.
    Every chunk is written, zero chunks as zeros; bytes past the image size are
    not touched (O_DIRECT only when the image size is a multiple of its 4 KiB
    alignment, so no padded write reaches past it)."""
    try:
        fd = os.open(out, os.O_WRONLY | os.O_EXCL)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise UserError(f"{out} is in use (mounted, or held by another program); "
                            "nothing written") from None
        raise UserError(f"cannot open {out}: {exc.strerror}") from None
    try:
        if not stat.S_ISBLK(os.fstat(fd).st_mode):
            raise UserError(f"{out} is no longer a block device; nothing written")
        dev_size = os.lseek(fd, 0, os.SEEK_END)
        if dev_size < m.size:
            raise UserError(f"{out} holds {dev_size} bytes, less than the image's {m.size} "
                            "bytes; nothing written")
        use_direct = (direct is not False and m.size % ALIGN == 0
                      and block_size(fd) in (512, 1024, 2048, 4096) and set_direct(fd))
        try:
            zeros, n = write_image(store, m, fd, use_direct, progress, workers,
                                    zero_fill=True)
            os.fdatasync(fd)
        except OSError as exc:
            raise UserError(f"writing {out} failed: {exc.strerror or exc}; the device is "
                            "partly written") from None
        return zeros, n
    finally:
        os.close(fd)
