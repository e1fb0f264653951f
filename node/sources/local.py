"""A local disk image (regular file or block device) read as one consistent snapshot.

ImageSource.open(path) records what the image looks like when the backup
starts (size, and for a file its mtime and identity); every read is
positional (pread at an explicit offset: nothing shares a file position, so a
SEEK_DATA probe can never shift what is read), and nothing is read past the
recorded size. `check_unchanged()` compares the image with what was recorded:
a backup calls it after the last read and before it commits, so an image that
grew, shrank or was written while it was read is refused, never recorded.

Why size and mtime: they are what the kernel tells us cheaply about a change.
A write changes mtime (to the kernel's coarse clock, a few ms), a truncate or
append changes the size; a short read before the recorded end means the file
shrank under us. A block device has no meaningful mtime (writes through it do
not touch the device node), so only its size is checked: a device that is
written while read needs a snapshot (LVM, a filesystem or a VM snapshot),
which is what the error message says.

Holes: `data_from(pos)` is SEEK_DATA (the next offset holding data, or the
size when only a hole remains), so a chunk that lies wholly in a hole is
recorded as zero without reading it.
"""
from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass

from hypersdk.node.errors import UserError

SNAPSHOT_HINT = ("back up a snapshot instead (LVM, a filesystem snapshot, or a VM snapshot) "
                 "for a consistent image")


class SourceReadError(Exception):
    """Reading the image failed (distinguishes source errors from store errors)."""

    def __init__(self, exc: OSError):
        self.exc = exc
        super().__init__(exc.strerror or str(exc))


class SourceChanged(UserError):
    """The image changed while it was read: the backup must not be recorded."""

    def __init__(self, path: str, what: str):
        self.path, self.what = path, what
        super().__init__(f"{path} changed while it was read ({what}): backup aborted, "
                         f"nothing recorded; {SNAPSHOT_HINT}")


@dataclass(frozen=True)
class SourceState:
    size: int
    mtime_ns: int | None          # None for a block device
    dev: int
    ino: int


class ImageSource:
    """An open image: positional reads bounded by the size recorded at open."""

    def __init__(self, path: str, fd: int, state: SourceState, is_block: bool, mode: int):
        self.path, self.fd, self.state = path, fd, state
        self.is_block, self.mode = is_block, mode
        self.size = state.size
        self._seek_data = hasattr(os, "SEEK_DATA") and self.size > 0
        self._next_data = 0           # no data before this offset (a SEEK_DATA answer)

    @classmethod
    def open(cls, path: str) -> "ImageSource":
        """The image at path; UserError with one clear line otherwise."""
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
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except PermissionError:
            raise UserError(f"{path}: permission denied") from None
        except OSError as exc:
            raise UserError(f"{path}: {exc.strerror}") from None
        try:
            is_block = stat.S_ISBLK(os.fstat(fd).st_mode)
            state = _state(fd, is_block)
        except OSError as exc:
            os.close(fd)
            raise UserError(f"{path}: {exc.strerror}") from None
        return cls(path, fd, state, is_block, stat.S_IMODE(st.st_mode))

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def metadata(self) -> dict:
        """What a manifest records about this source (text or integers only)."""
        doc = {"kind": "block" if self.is_block else "file",
               "path": os.path.abspath(self.path), "mode": self.mode}
        if self.state.mtime_ns is not None:
            doc["mtime_ns"] = self.state.mtime_ns
        return doc

    # -- reading --------------------------------------------------------------------
    def read_into(self, buf, offset: int, length: int) -> int:
        """Fill buf[:length] with the image's bytes at offset; never reads past the
        recorded size (length is cut to it). SourceChanged if the image ends early
        (it shrank while read); SourceReadError for an I/O error."""
        length = max(0, min(length, self.size - offset))
        view = memoryview(buf)
        got = 0
        try:
            while got < length:
                try:
                    n = os.preadv(self.fd, [view[got:length]], offset + got)
                except InterruptedError:
                    continue
                except OSError as exc:
                    raise SourceReadError(exc) from exc
                if n == 0:
                    raise self._changed(f"it ended at byte {offset + got}, "
                                        f"{self.size} bytes were recorded at the start")
                got += n
        finally:
            view.release()
        return got

    def data_from(self, pos: int) -> int:
        """The first offset >= pos that may hold data (the recorded size when the
        rest is a hole). Without SEEK_DATA support: pos (everything is data)."""
        if not self._seek_data or pos >= self.size:
            return pos
        if pos < self._next_data:
            return self._next_data
        try:
            self._next_data = min(os.lseek(self.fd, pos, os.SEEK_DATA), self.size)
        except OSError as exc:
            if exc.errno == errno.ENXIO:          # only a hole from pos to the end
                self._next_data = self.size
            else:                                 # not supported here: read everything
                self._seek_data = False
                return pos
        return self._next_data

    def is_hole(self, pos: int, length: int) -> bool:
        """True if [pos, pos+length) (cut to the size) holds no data."""
        end = min(pos + length, self.size)
        return pos < end and self.data_from(pos) >= end

    # -- consistency ----------------------------------------------------------------
    def check_unchanged(self) -> None:
        """SourceChanged if the image's size (or a file's mtime) is not what it was
        at open."""
        try:
            now = _state(self.fd, self.is_block)
        except OSError as exc:
            raise SourceReadError(exc) from exc
        was = self.state
        if now.size != was.size:
            raise self._changed(f"size {was.size} -> {now.size} bytes")
        if now.mtime_ns != was.mtime_ns:
            raise self._changed("it was written (its modification time changed)")

    def _changed(self, what: str) -> SourceChanged:
        return SourceChanged(self.path, what)


def _state(fd: int, is_block: bool) -> SourceState:
    st = os.fstat(fd)
    if is_block:
        size = os.lseek(fd, 0, os.SEEK_END)   # st_size is 0 for a block device
        return SourceState(size, None, st.st_rdev, 0)
    return SourceState(st.st_size, st.st_mtime_ns, st.st_dev, st.st_ino)
