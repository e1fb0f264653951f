"""Restoring a backup from the local store into an image file or onto a block device.

OUT is checked first (node/service/restore_target.py says what OUT may be). An image
file is written to a temporary file next to OUT (.NAME.hypersdk-partial-PID,
mode 0600 while written; node/service/restore_partials.py cleans up those of killed
restores) and renamed over OUT only when every chunk has been read, verified
and written and the data is synced, so OUT is either absent (or untouched) or
complete. All-zero chunks are never written: they stay holes in the sparse
output. Before the rename the file gets the source's permission bits (manifest
source "mode", & 0o777: a manifest may come from another node, so never
setuid/setgid/sticky), or 0666 & ~umask when the manifest does not say. A
network restore hands over a staged image (node/service/restore_staged.py) that the
fetch has partly written already.
"""
from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass

from hypersdk.node.errors import UserError
from hypersdk.node.service.image_write import fsync_dir, open_out, write_image
from hypersdk.node.service.restore_partials import (
    PartialRegistry,
    partial_path,
    remove_stale_partials,
)
from hypersdk.node.service.restore_staged import _STAGED
from hypersdk.node.service.restore_target import check_target, restore_device, restored_mode
from hypersdk.node.store import catalog
from hypersdk.node.store.chunker import default_workers


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
    did not happen (the audit log's restore intent: node/audit/intents.py)."""
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
        out, is_device = check_target(out, force, to_device, follow_symlink)
        parent = os.path.dirname(os.path.abspath(out))
        if not os.path.isdir(parent):
            raise UserError(f"{parent}: no such directory")
        registry = PartialRegistry(store.root)
        remove_stale_partials(out, registry)
        workers = workers or default_workers()
        if is_device:
            zeros, n = restore_device(store, m, out, direct, progress, workers)
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
                fd, direct = open_out(tmp, direct is not False)
            except OSError as exc:
                registry.remove(tmp)
                raise UserError(f"cannot write {out}: {exc.strerror}") from None
        renamed, after = False, None
        try:
            zeros, n = write_image(store, m, fd, direct, progress, workers, skip)
            os.ftruncate(fd, m.size)
            os.fchmod(fd, mode)               # 0600 until now; the rename publishes it
            os.fdatasync(fd)
            if before_commit is not None:
                after = before_commit(m, out, tmp, os.fstat(fd))
            os.replace(tmp, out)              # still locked: never "stale" in between
            renamed = True
            fsync_dir(parent)
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
