"""Restoring a backup from the local store into an image file or onto a block device.

OUT is checked before anything is written (_check_target):
  absent               a new image file;
  a regular file       replaced only with force (--force);
  a block device       written in place only with to_device (--to-device, a
                       confirmation --force does not give): OUT must be at least
                       the image size; O_EXCL, so a mounted device is refused;
  a symbolic link      refused, or with follow_symlink (--follow-symlink) the
                       path it resolves to is checked by these same rules;
  a directory, FIFO, socket or character device: refused, saying which it is.

An image file is written to a temporary file next to OUT
(.NAME.hypersdk-partial-PID, mode 0600 while written) and renamed over OUT only
when every chunk has been read, verified and written and the data is synced, so
OUT is either absent (or untouched) or complete. All-zero chunks are never
written: they stay holes in the sparse output. Before the rename the file gets
the source's permission bits (manifest source "mode", & 0o777: a manifest may
come from another node, so never setuid/setgid/sticky), or 0666 & ~umask when
the manifest does not say. A device gets every chunk written at its offset with
positional writes, zero chunks as zeros (a device is not empty; it cannot have
holes), and one fdatasync at the end; bytes past the image size are untouched.

Partial files of killed restores. The writer holds an exclusive flock on its
partial file for as long as it writes it, and the partial's name carries its
pid. A partial is stale when its lock can be taken AND no process has that pid
(the pid test covers the instant between creating the file and locking it; a
reused pid only keeps a stale file a while longer, never deletes a live one).
Each restore removes the stale partials of its OUT before it writes; gc removes
the stale partials of every OUT, found through the data dir's registry
(DATA/partials/: one small JSON record {path, pid} per partial, written by
atomic rename before the partial is created and removed after it is renamed or
removed; best effort: a restore works without it, and the next restore to that
OUT still cleans up).
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import json
import mmap
import os
import queue
import re
import stat
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from protocol.chunks import ZERO_ID

from . import catalog
from .chunker import default_workers
from .errors import UserError


@dataclass
class RestoreResult:
    manifest_id: bytes
    out: str
    size: int
    chunks: int
    zero_chunks: int
    seconds: float
    device: bool = False              # written into a block device (zero chunks as zeros)
    mode: int | None = None           # the permission bits an image file got

    def to_json(self) -> dict:
        doc = {"manifest": self.manifest_id.hex(), "out": self.out, "bytes": self.size,
               "chunks": self.chunks, "zero_chunks": self.zero_chunks,
               "target": "device" if self.device else "file",
               "seconds": round(self.seconds, 3)}
        if self.mode is not None:
            doc["mode"] = f"{self.mode:04o}"
        return doc


class StagedImage:
    """An image written while its chunks arrive from the network (a network restore:
    node/replication.py), which restore() then completes instead of starting over.

    stage(out, manifest_id) creates the temporary file restore() would create and
    registers it under OUT; the fetch hands it every verified new chunk, which is
    written at each position the chunk has in the image; restore(store, ref, OUT)
    takes the stage if it is for the same manifest, writes only the positions not
    written yet (read and verified from the store as usual), syncs and renames. OUT
    stays untouched until then; discard() (or a restore of anything else) removes
    the temporary file.

    Two ways in, both from worker threads:
      write_many([(cid, plain), ...])     writes at once (synchronous);
      buf = buffer(n); ...; submit(cid, buf, n)
                                          the fetch's verifiers decode a chunk straight
                                          into a page-aligned buffer of the stage's
                                          pool and, once it is verified, submit it;
                                          one of WRITERS writer threads writes it
                                          (O_DIRECT with no copy) and returns the
                                          buffer to the pool.
                                          buffer() blocks while all POOL_BYTES are
                                          queued (backpressure), so verifying never
                                          waits for the disk unless the disk is behind.
                                          release(buf) returns an unused buffer.
    finish() waits for the queued writes and stops the writers, raising the first
    error (restore() calls it before it takes the file; the fetch before it ends).

    Why several writers: an O_DIRECT write returns when the device has the data, so
    one writer keeps one write in flight. In a 2 GiB 4-seed restore on this VM that
    one writer spent 1.1-1.4 s waiting on 1.3 GB of writes while the verifiers,
    starved of pool buffers, waited 0.4-1.0 s for it (the same writes take 0.54 s
    on an idle machine: the VM's disk slows while its vCPUs are busy). With 2-4
    writes in flight the restore took 1.45 s on average instead of 1.59 s
    (BENCHMARKS.md, swarm section). Chunks never overlap in the image, so the
    writers need no ordering among themselves."""

    POOL_BYTES = 24 << 20
    WRITERS = 3

    def __init__(self, out: str, manifest_id: bytes, data_dir=None):
        self.out = os.path.abspath(out)
        self.manifest_id = manifest_id
        parent = os.path.dirname(self.out)
        self.tmp = os.path.join(parent, f".{os.path.basename(self.out)}"
                                f".hypersdk-partial-{os.getpid()}-stage")
        self.registry = PartialRegistry(data_dir) if data_dir is not None else None
        if self.registry is not None:
            self.registry.add(self.tmp)   # before the file exists: a crash leaves a record
        try:
            self.fd, self.direct = _open_out(self.tmp)
        except BaseException:
            if self.registry is not None:
                self.registry.remove(self.tmp)
            raise
        self.written: set[int] = set()
        self.positions: dict[bytes, list[int]] = {}
        self.chunk_size = 0
        self.size = 0
        self.capacity = 0                 # bytes a pool buffer holds (chunk_size + 1)
        self._lock = threading.Lock()
        self._free: queue.SimpleQueue | None = None
        self._queue: queue.SimpleQueue | None = None
        self._writers: list[threading.Thread] = []
        self._closed = False
        self._error: BaseException | None = None

    def begin(self, m, ids) -> None:
        """The manifest and every position's chunk id (ZERO_ID for zero chunks)."""
        self.chunk_size, self.size = m.chunk_size, m.size
        pos: dict[bytes, list[int]] = {}
        for i, cid in enumerate(ids):
            if cid != ZERO_ID:
                pos.setdefault(cid, []).append(i)
        self.positions = pos

    def write_many(self, items) -> None:
        """Write verified plaintexts at their positions (a worker thread)."""
        for cid, plain in items:
            if plain is None:
                continue
            for i in self.positions.get(cid, ()):
                _write_plain(self.fd, self.direct, plain, i * self.chunk_size)
                with self._lock:
                    self.written.add(i)

    # -- the pool and the writer thread

    def _start(self) -> None:
        with self._lock:
            if self._writers or self._closed or self.fd is None:
                return
            self.capacity = self.chunk_size + 1
            size = -(-(self.capacity) // _ALIGN) * _ALIGN
            self._free = queue.SimpleQueue()
            for _ in range(max(4, self.POOL_BYTES // size)):
                self._free.put(mmap.mmap(-1, size))
            self._queue = queue.SimpleQueue()
            self._writers = [threading.Thread(target=self._write_loop, daemon=True,
                                              name=f"stage-writer-{i}")
                             for i in range(self.WRITERS)]
            for w in self._writers:
                w.start()

    def buffer(self, n: int):
        """A page-aligned buffer for a chunk of n <= capacity bytes (blocks while
        every buffer is queued for writing); RuntimeError once the stage is closed."""
        if not self._writers:
            self._start()
        if self._error is not None:
            raise self._error
        if self._closed or self._free is None:
            raise RuntimeError("the staged image is closed")
        if n > self.capacity - 1:
            raise ValueError(f"a {n}-byte chunk does not fit the stage's buffers")
        buf = self._free.get()
        if buf is None:                   # closed: pass the sentinel on to other waiters
            self._free.put(None)
            raise RuntimeError("the staged image is closed")
        return buf

    def release(self, buf) -> None:
        self._free.put(buf)

    def fill(self, buf, data) -> None:
        """Copy data (a verified raw chunk, bytes) into the start of a pool buffer,
        with the GIL released (a foreign-function memmove), unlike a slice copy."""
        n = len(data)
        if n > len(buf):
            raise ValueError("the data does not fit the buffer")
        _memmove(ctypes.addressof(ctypes.c_char.from_buffer(buf)), data, n)

    def submit(self, cid: bytes, buf, n: int) -> None:
        """Queue buf[:n], a verified plaintext from buffer(), for writing at cid's
        positions; the buffer goes back to the pool once written (a stage closed
        meanwhile leaves those positions to restore())."""
        if self._closed:
            self._free.put(buf)
            return
        self._queue.put((cid, buf, n))

    def _write_loop(self) -> None:
        q = self._queue
        while True:
            item = q.get()
            if item is None:
                return
            cid, buf, n = item
            try:
                if self._error is None:
                    self.write_aligned(cid, buf, n)
            except BaseException as exc:      # reported by buffer() and finish()
                with self._lock:
                    if self._error is None:
                        self._error = exc
            finally:
                self._free.put(buf)

    def finish(self) -> None:
        """Wait for every submitted write, stop the writers; raise the first error."""
        with self._lock:
            self._closed = True
            writers, self._writers = self._writers, []
        if writers:
            for _ in writers:             # one stop mark each, after every queued write
                self._queue.put(None)
            for w in writers:
                w.join()
            self._free.put(None)          # a buffer() still waiting fails instead
        if self._error is not None:
            raise self._error

    def write_aligned(self, cid: bytes, buf, n: int) -> None:
        """Write a verified plaintext held at buf[:n] at its positions. buf is
        page-aligned (an mmap) with room for n rounded up to a page: O_DIRECT writes
        go straight from it (its bytes past n are zeroed), no copy."""
        if self.direct:
            padded = -(-n // _ALIGN) * _ALIGN
            if padded > n:
                buf[n:padded] = bytes(padded - n)
            view = memoryview(buf)[:padded]
        else:
            view = memoryview(buf)[:n]
        try:
            for i in self.positions.get(cid, ()):
                _pwrite_all(self.fd, view, i * self.chunk_size)
                with self._lock:
                    self.written.add(i)
        finally:
            view.release()

    def discard(self) -> None:
        _STAGED.pop(self.out, None)
        try:
            self.finish()
        except BaseException:
            pass                          # discarded anyway
        if self.fd is not None:
            if os.path.exists(self.tmp):  # still ours (locked): nobody else removes it
                os.unlink(self.tmp)
            os.close(self.fd)
            self.fd = None
        if self.registry is not None:
            self.registry.remove(self.tmp)


_STAGED: dict[str, StagedImage] = {}


def stage(out: str, manifest_id: bytes, data_dir=None) -> StagedImage:
    """A StagedImage for OUT, registered for the restore(…, OUT) that follows.
    data_dir: record the temporary file in that data dir's partials registry (so
    gc can remove it if this process dies); restore() records it otherwise.
    OSError if OUT exists and is not a regular file (a device is written in
    place, a symlink or anything else is refused: restore() says why)."""
    try:
        st = os.lstat(out)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file: no staged image", out)
    old = _STAGED.pop(os.path.abspath(out), None)
    if old is not None:
        old.discard()
    st = StagedImage(out, manifest_id, data_dir)
    _STAGED[st.out] = st
    return st


def discard_staged(out: str) -> None:
    """Remove OUT's stage if nobody took it."""
    st = _STAGED.pop(os.path.abspath(out), None)
    if st is not None:
        st.discard()


def restore(store, ref: str, out: str, *, force: bool = False, to_device: bool = False,
            follow_symlink: bool = False, umask: int | None = None, progress=None,
            on_wait=None, workers: int | None = None,
            direct: bool | None = None, before_commit=None) -> RestoreResult:
    """Restore backup REF to OUT (what OUT may be: the module doc).

    force: replace an existing regular file; to_device: write into the block
    device OUT; follow_symlink: write where the symbolic link OUT points;
    umask: the mask for an image whose manifest records no mode (default: this
    process's; the CLI passes its own, since a node runs the op in its process);
    direct: None = O_DIRECT where the filesystem takes it, False = buffered;
    before_commit(manifest, out, tmp, stat of tmp) -> after(committed: bool) is
    called just before the temporary file becomes OUT (for a device, whose commit
    is its final sync: tmp "" and the device's stat), and after once that did or
    did not happen (the audit log's restore intent: node/audit_intents.py)."""
    staged = _STAGED.pop(os.path.abspath(out), None)
    try:
        return _restore(store, ref, out, force, to_device, follow_symlink, umask, progress,
                        on_wait, workers, direct, staged, before_commit)
    finally:
        if staged is not None:
            staged.discard()           # used (fd taken, file renamed) or not: cleaned up


def _restore(store, ref, out, force, to_device, follow_symlink, umask, progress, on_wait,
             workers, direct, staged, before_commit):
    t0 = time.perf_counter()
    with store.read_lock(on_wait):
        b = catalog.resolve(store, ref)
        m = catalog.load_manifest(store, b.manifest_id)
        out, is_device = _check_target(out, force, to_device, follow_symlink)
        parent = os.path.dirname(os.path.abspath(out))
        if not os.path.isdir(parent):
            raise UserError(f"{parent}: no such directory")
        registry = PartialRegistry(store.root)
        remove_stale_partials(out, registry)
        workers = workers or default_workers()
        if is_device:
            zeros, n = _restore_device(store, m, out, direct, progress, workers)
            if before_commit is not None:     # the device is synced: that was its commit
                before_commit(m, out, "", os.stat(out))(True)
            return RestoreResult(m.id, out, m.size, n, zeros, time.perf_counter() - t0,
                                 device=True)
        mode = restored_mode(m.source, umask)
        skip: set[int] = set()
        if staged is not None and staged.manifest_id == m.id and staged.fd is not None \
                and staged.out == os.path.abspath(out):
            try:
                staged.finish()               # its queued writes are in the file
            except OSError as exc:
                raise UserError(f"cannot write {out}: {exc.strerror}") from None
            tmp, fd, direct = staged.tmp, staged.fd, staged.direct
            staged.fd = None                  # ours now (with its lock)
            skip = staged.written
            registry.add(tmp)
        else:
            tmp = partial_path(out)
            registry.add(tmp)                 # before the file exists: see the module doc
            try:
                fd, direct = _open_out(tmp, direct is not False)
            except OSError as exc:
                registry.remove(tmp)
                raise UserError(f"cannot write {out}: {exc.strerror}") from None
        renamed, after = False, None
        try:
            zeros, n = _write_image(store, m, fd, direct, progress, workers, skip)
            os.ftruncate(fd, m.size)
            os.fchmod(fd, mode)               # 0600 until now; the rename publishes it
            os.fdatasync(fd)
            if before_commit is not None:
                after = before_commit(m, out, tmp, os.fstat(fd))
            os.replace(tmp, out)              # still locked: never "stale" in between
            renamed = True
            _fsync_dir(parent)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise UserError(f"no space left to write {out}; nothing written") from None
            raise
        finally:
            if not renamed and os.path.exists(tmp):
                os.unlink(tmp)                # ours: we hold its lock
            os.close(fd)
            registry.remove(tmp)
            if after is not None:
                after(renamed)
    return RestoreResult(m.id, out, m.size, n, zeros, time.perf_counter() - t0, mode=mode)


# -- the target --------------------------------------------------------------------------

def _check_target(out: str, force: bool, to_device: bool, follow_symlink: bool):
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


def _restore_device(store, m, out: str, direct, progress, workers: int):
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
        use_direct = (direct is not False and m.size % _ALIGN == 0
                      and _block_size(fd) in (512, 1024, 2048, 4096) and _set_direct(fd))
        try:
            zeros, n = _write_image(store, m, fd, use_direct, progress, workers,
                                    zero_fill=True)
            os.fdatasync(fd)
        except OSError as exc:
            raise UserError(f"writing {out} failed: {exc.strerror or exc}; the device is "
                            "partly written") from None
        return zeros, n
    finally:
        os.close(fd)


def _block_size(fd: int) -> int:
    """The device's logical block size (BLKSSZGET), 0 if unknown."""
    import struct
    try:
        return struct.unpack("i", fcntl.ioctl(fd, 0x1268, b"\0\0\0\0"))[0]
    except OSError:
        return 0


def _set_direct(fd: int) -> bool:
    """Turn O_DIRECT on for fd; False where the file system refuses it."""
    if not hasattr(os, "O_DIRECT"):
        return False
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_DIRECT)
        return True
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        return False


def _fsync_dir(path: str) -> None:
    """Make a rename in directory path durable (where the file system can)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- partial files -----------------------------------------------------------------------

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


def _open_out(path: str, try_direct: bool = True):
    """(fd, direct) of a fresh partial file at path, mode 0600, locked (flock, held
    until the fd closes: a locked partial is live); O_DIRECT when the filesystem
    takes it (tmpfs does not).

    Writing a fresh multi-GB file through the page cache costs more kernel
    time than everything else in a restore on this kind of machine (page
    allocation + copy); direct I/O from aligned buffers skips it.
    """
    for _ in range(64):      # bounded: each retry means another writer renamed that name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o600)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EINVAL, "not a regular file", path)
            fcntl.flock(fd, fcntl.LOCK_EX)       # waits only for a writer of this name
            try:
                cur = os.lstat(path)
            except FileNotFoundError:
                cur = None
            if cur is None or (cur.st_dev, cur.st_ino) != (st.st_dev, st.st_ino):
                os.close(fd)                     # renamed (or removed) meanwhile: again
                continue
            os.ftruncate(fd, 0)
            os.fchmod(fd, 0o600)
            if try_direct and _set_direct(fd):
                try:            # some filesystems accept the flag but refuse the writes
                    os.pwrite(fd, memoryview(_aligned(_ALIGN))[:_ALIGN], 0)
                    os.ftruncate(fd, 0)
                    return fd, True
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    fcntl.fcntl(fd, fcntl.F_SETFL,
                                fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
            return fd, False
        except BaseException:
            os.close(fd)
            raise
    raise OSError(errno.EBUSY, "other restores keep replacing it", path)


_tls = threading.local()
_memmove = ctypes.memmove


def _aligned(size: int) -> mmap.mmap:
    """A per-thread page-aligned buffer of at least size bytes (for O_DIRECT)."""
    buf = getattr(_tls, "buf", None)
    if buf is None or len(buf) < size:
        buf = _tls.buf = mmap.mmap(-1, size)
    return buf


def _pwrite_all(fd: int, data, offset: int):
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _write_chunk(store, fd: int, direct: bool, cid: bytes, offset: int) -> int:
    """Read, verify and write one chunk at its offset (runs in a worker thread)."""
    return _write_plain(fd, direct, store.read(cid), offset)


def _write_plain(fd: int, direct: bool, data, offset: int) -> int:
    if direct:
        padded = -(-len(data) // _ALIGN) * _ALIGN       # the last chunk may be short
        buf = _aligned(padded)
        buf[:len(data)] = data
        if padded > len(data):
            buf[len(data):padded] = bytes(padded - len(data))
        _pwrite_all(fd, memoryview(buf)[:padded], offset)
    else:
        _pwrite_all(fd, data, offset)
    return len(data)


_ALIGN = 4096


def _write_zeros(fd: int, direct: bool, length: int, offset: int) -> int:
    """Write length zero bytes at offset (a zero chunk on a device), from a
    per-thread page-aligned buffer that is never written to (so stays zero)."""
    padded = -(-length // _ALIGN) * _ALIGN if direct else length
    buf = getattr(_tls, "zeros", None)
    if buf is None or len(buf) < padded:
        buf = _tls.zeros = mmap.mmap(-1, max(padded, _ALIGN))
    view = memoryview(buf)[:padded]
    try:
        _pwrite_all(fd, view, offset)
    finally:
        view.release()
    return length


def _write_image(store, m, fd: int, direct: bool, progress, workers: int, skip=frozenset(),
                 zero_fill: bool = False):
    """Workers read, verify and write chunks (any order, each at its offset);
    returns (zero chunks, chunks). zero_fill: write zero chunks as zeros (a
    device), instead of leaving them holes (a fresh file)."""
    depth = workers * 4
    zeros = n = 0
    inflight: deque = deque()

    def drain_one():
        size = inflight.popleft().result()
        if progress:
            progress(size)

    with ThreadPoolExecutor(workers, thread_name_prefix="restore") as pool:
        try:
            for index, cid in catalog.iter_chunk_ids(store, m):
                n += 1
                if cid == ZERO_ID:
                    zeros += 1
                    if zero_fill:
                        inflight.append(pool.submit(_write_zeros, fd, direct,
                                                    m.chunk_len(index), index * m.chunk_size))
                        if len(inflight) >= depth:
                            drain_one()
                    elif progress:
                        progress(m.chunk_len(index))
                    continue
                if index in skip:             # written by the network fetch (StagedImage)
                    if progress:
                        progress(m.chunk_len(index))
                    continue
                inflight.append(pool.submit(_write_chunk, store, fd, direct, cid,
                                            index * m.chunk_size))
                if len(inflight) >= depth:
                    drain_one()
            while inflight:
                drain_one()
        finally:
            for fut in inflight:
                fut.cancel()
    return zeros, n
