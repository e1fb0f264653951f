"""Restoring a VM backup set (node/store/vm_sets.py) into a directory, or into vSphere.

    DIR/<disk label>.img   one raw image per disk (node/service/restore.py: each
                           written to a temporary file, verified, renamed)
    DIR/vm.json            the VM's configuration and the set's disks (the shape a
                           restore into vSphere recreates)

DIR is created when absent; an existing DIR must be empty unless --force (then
files of those names are replaced). vm.json is written last, atomically, so a
DIR with vm.json holds every disk.

Into vSphere (`restore_set_to_vsphere`, `restore NAME@N vsphere://USER@HOST/DC/vm/PATH`):
a new powered-off VM PATH is created from the saved configuration (node/sources/
vsphere/vm.py create_vm) on --datastore (default: the saved disks' datastore when
it exists), or with --into the disks of the existing, powered-off VM PATH are
overwritten (matched by label, each at least as large as the saved one). Each
disk's content is streamed from the store (every chunk verified as it is read)
into its datastore file, then read back through an ExportVm lease and every chunk
compared with the backup's chunk id: a restore says "verified" only when what
vSphere holds is the backup.
"""
from __future__ import annotations

import json
import os
import re
import time
import urllib.parse
from dataclasses import dataclass, field

from hypersdk.node.errors import UserError
from hypersdk.node.service.restore import restore
from hypersdk.node.store import catalog
from hypersdk.protocol.chunks import ZERO_ID, is_zero
from hypersdk.protocol.ids import id_of


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


@dataclass
class VsphereRestoreResult:
    ref: str
    target: str
    created: bool
    disks: list = field(default_factory=list)     # {label, file, bytes, chunks_verified}
    notes: list = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {"ref": self.ref, "kind": "vm", "target": self.target, "created": self.created,
                "disks": self.disks, "notes": self.notes, "seconds": round(self.seconds, 3)}


def _content(store, mid: bytes):
    """(manifest, an iterator of the image's bytes chunk by chunk: read and verified
    from the store, zeros for zero chunks)."""
    m = catalog.load_manifest(store, mid)

    def gen():
        for i, cid in catalog.iter_chunk_ids(store, m):
            yield bytes(m.chunk_len(i)) if cid == ZERO_ID else store.read(cid)
    return m, gen()


def _verify(store, m, reader) -> int:
    """Read the disk back and compare every chunk with the manifest's id; the number
    of chunks verified, UserError at the first difference."""
    buf = bytearray(m.chunk_size)
    for i, cid in catalog.iter_chunk_ids(store, m):
        n = m.chunk_len(i)
        reader.read_into(buf, i * m.chunk_size, n, m.size)
        view = memoryview(buf)[:n]
        ok = is_zero(view) if cid == ZERO_ID else id_of(store.key, view) == cid
        if not ok:
            raise UserError(f"disk {reader.label}: chunk {i} (bytes {i * m.chunk_size}..) "
                            "read back from vSphere differs from the backup: restore not "
                            "verified")
    return m.n_chunks


def restore_set_to_vsphere(store, vmset, url_text: str, *, password: str, into: bool = False,
                           datastore: str | None = None, insecure: bool = False,
                           ca_file: str | None = None, progress=None) -> VsphereRestoreResult:
    from hypersdk.node.sources.vsphere import export, session
    from hypersdk.node.sources.vsphere import url as vurl
    from hypersdk.node.sources.vsphere import vm as vvm
    t0 = time.perf_counter()
    u = vurl.parse(url_text)
    res = VsphereRestoreResult(vmset.ref, str(u), not into)
    saved = vmset.doc["disks"]
    with session.connect(u, password, insecure=insecure, ca_file=ca_file) as s:
        if into:
            vm = vvm.find_vm(s, u)
            if vm.runtime.powerState != "poweredOff":
                raise UserError(f"VM {u.inventory_path} is {vm.runtime.powerState}: power it "
                                "off to restore into its disks")
        else:
            vm, notes = vvm.create_vm(s, u, vmset.doc["vm"], datastore)
            res.notes += notes
        disks = {d.label: d for d in vvm.disks(vm.config)}
        targets = []
        for i, d in enumerate(saved):
            t = disks.get(d["label"]) if into else vvm.disks(vm.config)[i]
            if t is None:
                raise UserError(f"VM {u.inventory_path} has no disk {d['label']!r} (it has "
                                f"{', '.join(sorted(disks)) or 'none'})")
            if t.capacity < d["capacity"]:
                raise UserError(f"disk {t.label} of {u.inventory_path} holds {t.capacity} "
                                f"bytes, the backup's {d['label']} {d['capacity']}")
            targets.append((d, t))
        dc = u.datacenter
        for d, t in targets:
            m, chunks = _content(store, bytes.fromhex(d["manifest"]))
            ds, path = vvm.datastore_of(t.file), t.file.split("] ", 1)[-1]
            advance = progress(d["label"], m.size) if progress else None

            def body(chunks=chunks, advance=advance):
                for c in chunks:
                    yield c
                    if advance:
                        advance(len(c))
            session.put(s.http, "/folder/" + urllib.parse.quote(path),
                        urllib.parse.urlencode({"dcPath": dc, "dsName": ds}), body(), m.size)
        lease_ = export.Lease(s, vm.ExportVm(), f"reading back {vm.name}")
        ok = False
        try:
            for pos, (d, t) in enumerate(targets):
                m = catalog.load_manifest(store, bytes.fromhex(d["manifest"]))
                reader = export.DiskReader(s.http, lease_, lease_.url_for(t, pos), t.capacity,
                                           t.label)
                try:
                    n = _verify(store, m, reader)
                finally:
                    reader.close()
                res.disks.append({"label": d["label"], "target": t.label, "file": t.file,
                                  "bytes": m.size, "chunks_verified": n})
            ok = True
        finally:
            lease_.complete() if ok else lease_.abort()
    res.seconds = time.perf_counter() - t0
    return res
