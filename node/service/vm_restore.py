"""Restoring a VM backup set (node/store/vm_sets.py) into a directory.

    DIR/<disk label>.img   one raw image per disk (node/service/restore.py: each
                           written to a temporary file, verified, renamed)
    DIR/vm.json            the VM's configuration and the set's disks (the shape a
                           restore into vSphere recreates)

DIR is created when absent; an existing DIR must be empty unless --force (then
files of those names are replaced). vm.json is written last, atomically, so a
DIR with vm.json holds every disk.
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field

from hypersdk.node.errors import UserError
from hypersdk.node.service.restore import restore


def disk_file(label: str) -> str:
    """A file name for a disk label ("Hard disk 1" -> "Hard_disk_1.img")."""
    return (re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("._") or "disk") + ".img"


@dataclass
class SetRestoreResult:
    ref: str
    out: str
    disks: list = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {"ref": self.ref, "kind": "vm", "out": self.out,
                "config": os.path.join(self.out, "vm.json"),
                "disks": [r.to_json() for r in self.disks], "seconds": round(self.seconds, 3)}


def restore_set(store, vmset, out: str, *, force: bool = False, progress=None, on_wait=None,
                before_commit=None) -> SetRestoreResult:
    t0 = time.perf_counter()
    out = os.path.abspath(out)
    if os.path.lexists(out) and not os.path.isdir(out):
        raise UserError(f"{out}: a VM backup restores into a directory (one image per disk "
                        "and vm.json); this is not one")
    if os.path.isdir(out) and os.listdir(out) and not force:
        raise UserError(f"{out} is not empty: give an empty or new directory, or --force to "
                        "replace the disk images and vm.json in it")
    names = [disk_file(d["label"]) for d in vmset.doc["disks"]]
    if len(set(names)) != len(names):
        names = [f"{i}-{n}" for i, n in enumerate(names)]
    try:
        os.makedirs(out, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{out}: {exc.strerror}") from None
    res = SetRestoreResult(vmset.ref, out)
    for d, name in zip(vmset.doc["disks"], names):
        advance = progress(d["label"], d["capacity"]) if progress else None
        res.disks.append(restore(store, d["ref"], os.path.join(out, name), force=force,
                                 progress=advance, on_wait=on_wait, before_commit=before_commit))
    doc = {"ref": vmset.ref, "source": vmset.doc["source"], "created_ns": vmset.created,
           "vm": vmset.doc["vm"],
           "disks": [dict(d, file=name) for d, name in zip(vmset.doc["disks"], names)]}
    tmp = os.path.join(out, f".vm.json.{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(out, "vm.json"))
    res.seconds = time.perf_counter() - t0
    return res
