"""Backing up a vSphere VM: snapshot, Changed Block Tracking, every disk, one set.

    backup_vm(store, "vsphere://user@vc/DC/vm/web01", password=..., chunk_size=...)

The flow (node/sources/vsphere/ has the pieces):
1. log in (TLS verified unless --insecure), find the VM; a VM with no disk is
   refused;
2. remove hypersdk's own snapshots a killed run left behind (said in the result);
3. turn CBT on when it is off (this first backup is then full, and says so);
4. take a snapshot (hypersdk's name, --quiesce asks the guest tools to flush);
5. per disk of the snapshot: the areas to read come from QueryChangedDiskAreas
   since the changeId recorded with this disk's previous backup (incremental), or
   since "*" (every allocated area: a full backup, with the reason: no previous
   backup, CBT just enabled, capacity or chunk size changed, changeId rejected);
   chunks outside the areas are the previous backup's chunks (incremental) or
   zeros (full), never read; the rest is read from the snapshot's export lease;
6. one transaction records every disk's backup (NAME/LABEL@N, ordinary backups)
   and the set NAME@N (node/store/vm_sets.py) with the VM's configuration and
   each disk's changeId; nothing is recorded when any disk fails;
7. the snapshot is removed whatever happened (success, error, Ctrl-C); a removal
   that fails after a recorded backup is reported, and the next run removes it.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from hypersdk.node.config import DEFAULT_ZSTD_LEVEL, commit_bytes
from hypersdk.node.errors import UserError
from hypersdk.node.service.backup import check_name, ingest, space_errors
from hypersdk.node.sources.vsphere import export, session
from hypersdk.node.sources.vsphere import url as vurl
from hypersdk.node.sources.vsphere import vm as vvm
from hypersdk.node.sources.vsphere.source import VsphereDiskSource
from hypersdk.node.store import catalog, vm_sets
from hypersdk.protocol.chunks import ZERO_ID
from hypersdk.protocol.errors import IntegrityError, ProtocolError
from hypersdk.protocol.manifest import LIST_ENTRIES, split_list


@dataclass
class DiskResult:
    label: str
    key: int
    capacity: int
    change_id: str | None
    mode: str                    # "full" | "incremental"
    reason: str                  # why full
    ref: str = ""
    manifest: bytes = b""
    downloaded: int = 0          # bytes that came over HTTP
    read_bytes: int = 0          # bytes of chunks read (the rest: holes, unchanged)
    reused_bytes: int = 0
    requests: int = 0
    format: str | None = None
    new_chunks: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {"label": self.label, "key": self.key, "capacity": self.capacity,
                "change_id": self.change_id, "mode": self.mode, "reason": self.reason,
                "ref": self.ref, "manifest": self.manifest.hex(), "bytes_read": self.downloaded,
                "chunk_bytes_read": self.read_bytes, "unchanged_bytes_reused": self.reused_bytes,
                "http_requests": self.requests, "export_format": self.format,
                "new_chunks": self.new_chunks, "seconds": round(self.seconds, 3)}


@dataclass
class VmBackupResult:
    name: str
    version: int
    vm: str
    source: str
    disks: list = field(default_factory=list)
    stale_removed: list = field(default_factory=list)
    cbt_enabled: bool = False
    snapshot_left: str | None = None
    seconds: float = 0.0
    phases: dict = field(default_factory=dict)   # seconds: login, snapshot, disks, cleanup

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def to_json(self) -> dict:
        return {"ref": self.ref, "name": self.name, "version": self.version, "kind": "vm",
                "vm": self.vm, "source": self.source, "cbt_enabled_now": self.cbt_enabled,
                "stale_snapshots_removed": self.stale_removed,
                "snapshot_left_behind": self.snapshot_left,
                "bytes_read": sum(d.downloaded for d in self.disks),
                "disks": [d.to_json() for d in self.disks], "seconds": round(self.seconds, 3),
                "phases_s": {k: round(v, 3) for k, v in self.phases.items()}}


class PreviousIds:
    """The chunk ids of a disk's previous backup, read from its hash lists one piece
    (32,768 ids, 1 MiB) at a time as the chunker walks the disk: memory stays at one
    piece for any disk size (a list of every id took ~100 bytes per chunk: 400 MB
    for a 4 TiB disk). A piece the store can no longer read (the previous backup
    deleted and collected meanwhile) gives UNREADABLE for its chunks, which the
    store does not hold: such chunks are read whole from vSphere, as any chunk
    whose previous version is missing (node/sources/vsphere/source.py)."""

    UNREADABLE = b"\xff" * 32

    def __init__(self, store, m):
        self.store, self.m = store, m
        self._at, self._ids = -1, []

    def __len__(self) -> int:
        return self.m.n_chunks

    def __getitem__(self, index: int) -> bytes:
        if not 0 <= index < self.m.n_chunks:
            raise IndexError(index)
        li, off = divmod(index, LIST_ENTRIES)
        if li != self._at:
            self._at, self._ids = li, self._piece(li)
        return self._ids[off] if self._ids else self.UNREADABLE

    def _piece(self, li: int) -> list[bytes]:
        n, lid = self.m.list_len(li), self.m.lists[li]
        if lid == ZERO_ID:
            return [ZERO_ID] * n
        try:
            return split_list(self.store.read(lid), n)
        except (ProtocolError, IntegrityError, OSError, UserError):
            return []


def _previous_ids(store, mid: bytes) -> PreviousIds | None:
    try:
        m = catalog.load_manifest(store, mid)
    except UserError:
        return None
    if m.key != (store.key.fingerprint if store.key is not None else None):
        return None                              # ids under another key: not reusable
    return PreviousIds(store, m)


def _local(store, cid: bytes) -> bytes | None:
    """A chunk of the previous backup from the store, or None (missing, damaged:
    then the whole chunk is read from vSphere)."""
    try:
        return store.read(cid)
    except (ProtocolError, IntegrityError, OSError, UserError):
        return None


def _plan(store, vm, snap, d, prev_set, chunk_size: int, cbt_new: bool):
    """(mode, reason, areas, previous ids) for disk d of the snapshot."""
    prev = prev_set.disk(d.key) if prev_set is not None else None
    reason = None
    if cbt_new:
        reason = "Changed Block Tracking was off: turned on now, so this first backup is full"
    elif prev is None:
        reason = "no previous backup of this disk"
    elif not d.change_id or not prev.get("change_id"):
        reason = "no changeId to compare with"
    elif prev["capacity"] != d.capacity:
        reason = f"capacity changed ({prev['capacity']} -> {d.capacity} bytes)"
    elif prev["chunk_size"] != chunk_size:
        reason = f"chunk size changed ({prev['chunk_size']} -> {chunk_size})"
    if reason is None:
        previous = _previous_ids(store, bytes.fromhex(prev["manifest"]))
        if previous is None:
            reason = "the previous backup's manifest is not readable here"
        else:
            try:
                areas = vvm.changed_areas(vm, snap, d, prev["change_id"])
                return "incremental", "", areas, previous
            except vvm.ChangeIdRejected as exc:
                reason = f"vSphere rejected the previous changeId ({exc})"
    try:
        areas = vvm.changed_areas(vm, snap, d, "*")
    except vvm.ChangeIdRejected as exc:
        areas = [(0, d.capacity)]                # no allocation map: read it all
        reason += f"; allocated areas unknown ({exc}): reading the whole disk"
    return "full", reason, areas, None


def backup_vm(store, url_text: str, *, password: str, name: str | None = None,
              quiesce: bool = False, insecure: bool = False, ca_file: str | None = None,
              chunk_size: int, level: int = DEFAULT_ZSTD_LEVEL, progress=None,
              on_wait=None, now_ns=time.time_ns, record_extra=None,
              parallel: int = 2) -> VmBackupResult:
    """Back up the VM at url_text as the next version of NAME (default: the VM's
    name); see the module doc. progress(label, total) -> advance(n) or None, per
    disk. record_extra(db, manifest, version, disk_result) runs in the commit for
    each disk (the audit intent). parallel: disks read (ahead of the ingest) at once."""
    t0 = time.perf_counter()
    u = vurl.parse(url_text)
    name = name or u.vm_path.rsplit("/", 1)[-1]
    check_name(name)
    if vm_sets.is_image_name(store.db, name):
        raise UserError(f"{name!r} names image backups already: choose another --name")
    clock = [time.perf_counter()]

    def phase(name: str) -> None:
        now = time.perf_counter()
        res.phases[name] = res.phases.get(name, 0.0) + now - clock[0]
        clock[0] = now
    res = VmBackupResult(name, 0, u.inventory_path, str(u))
    with session.connect(u, password, insecure=insecure, ca_file=ca_file) as s:
        vm = vvm.find_vm(s, u)
        if not vvm.disks(vm.config):
            raise UserError(f"VM {u.inventory_path} has no virtual disks: nothing to back up")
        phase("login")
        for label, old in vvm.stale_snapshots(vm):
            vvm.remove_snapshot(old, f"removing snapshot {label} an earlier run left on "
                                     f"{vm.name}")
            res.stale_removed.append(label)
        res.cbt_enabled = vvm.enable_cbt(vm)
        snap = vvm.create_snapshot(vm, quiesce=quiesce)
        phase("snapshot")
        lease, ok = None, False
        try:
            _test_hook()
            config = vvm.config_doc(vm)
            sdisks = vvm.disks(snap.config)
            lease = export.Lease(s, snap.ExportSnapshot(), f"export of {vm.name}")
            disks = _prepare(store, s, vm, snap, lease, sdisks, res, u, chunk_size, parallel)
            _read_disks(store, disks, res, config, u, chunk_size, level, progress, on_wait,
                        now_ns, record_extra)
            phase("disks")
            ok = True
        finally:
            if lease is not None:
                lease.complete() if ok else lease.abort()
            try:
                vvm.remove_snapshot(snap, f"removing the backup snapshot of {vm.name}")
            except Exception as exc:
                if not ok:
                    raise                        # the first error is the one to tell
                res.snapshot_left = str(exc)
            phase("cleanup")
    res.seconds = time.perf_counter() - t0
    return res


def _test_hook() -> None:
    """Tests only (HYPERSDK_TEST_VSPHERE_HOOK=PATH): with the snapshot taken, create
    PATH.snap and wait (at most 60 s) for PATH, so a test can change the live disk,
    kill this process or the server at that moment."""
    hook = os.environ.get("HYPERSDK_TEST_VSPHERE_HOOK")
    if not hook:
        return
    open(hook + ".snap", "w").close()
    deadline = time.monotonic() + 60
    while not os.path.exists(hook) and time.monotonic() < deadline:
        time.sleep(0.02)


PREFETCH_BYTES = 64 << 20       # per disk being read ahead


@dataclass
class _Disk:
    d: object                   # vm.Disk of the snapshot
    r: DiskResult
    reader: object              # export.DiskReader for reads off the plan
    ahead: object               # export.DiskReader of the prefetch
    src: VsphereDiskSource
    meta: dict                  # the source's metadata (the manifest's source map)


def _prepare(store, s, vm, snap, lease, sdisks, res, u, chunk_size, parallel) -> list:
    """Plan every disk (CBT against the latest set of NAME) and start reading ahead:
    up to `parallel` disks at once (export.Prefetch, PREFETCH_BYTES each), disk i
    when disk i - parallel has been read. Needs no store lock: another VM's ingest
    may run meanwhile."""
    import threading
    prev_set = vm_sets.latest(store.db, res.name)
    out, done = [], []
    try:
        for pos, d in enumerate(sdisks):
            mode, reason, areas, previous = _plan(store, vm, snap, d, prev_set, chunk_size,
                                                  res.cbt_enabled)
            r = DiskResult(d.label, d.key, d.capacity, d.change_id, mode, reason)
            url = lease.url_for(d, pos)
            reader = export.DiskReader(s.http, lease, url, d.capacity, d.label)
            meta = {"kind": "vsphere", "host": u.host, "vm": u.inventory_path,
                    "disk": d.label, "disk_key": d.key, "change_id": d.change_id or "",
                    "mode": mode}                # + "set" once the version is known
            src = VsphereDiskSource(reader, d.capacity, chunk_size, areas, previous=previous,
                                    has=store.has, read_previous=lambda cid: _local(store, cid),
                                    path=f"{u}/{d.label}", metadata=meta)
            done.append(threading.Event())
            ahead = export.DiskReader(s.http, None, url, d.capacity, d.label)
            src.prefetch = export.Prefetch(
                ahead, src.planned_spans(), limit=PREFETCH_BYTES, done=done[-1],
                after=done[pos - parallel] if pos >= parallel else None)
            out.append(_Disk(d, r, reader, ahead, src, meta))
    except BaseException:
        for x in out:
            x.src.close()
        raise
    return out


def _read_disks(store, disks, res, config, u, chunk_size, level, progress, on_wait, now_ns,
                record_extra) -> None:
    """Ingest the prepared disks in order into one writer, under the store's write
    lock, and record them and the set in one transaction."""
    try:
        with space_errors(store, str(u)), store.write_lock(on_wait), \
                store.writer(batch_bytes=commit_bytes(), direct=True) as w:
            res.version = vm_sets.next_version(store.db, res.name)
            got = []
            for x in disks:
                t1 = time.perf_counter()
                x.meta["set"] = f"{res.name}@{res.version}"
                advance = progress(x.d.label, x.d.capacity) if progress else None
                one = ingest(store, w, x.src, name=f"{res.name}/{x.d.label}",
                             chunk_size=chunk_size, level=level, progress=advance,
                             now_ns=now_ns, deltas=False)
                x.src.close()
                r = x.r
                r.downloaded = x.reader.downloaded + x.ahead.downloaded
                r.requests = x.reader.requests + x.ahead.requests
                r.format = x.ahead.format or x.reader.format
                r.read_bytes, r.reused_bytes = one.scanned.bytes_read, one.scanned.reused_bytes
                r.new_chunks, r.manifest = one.tally.new, one.manifest.id
                r.seconds = time.perf_counter() - t1
                res.disks.append(r)
                got.append((r, one))
            created = now_ns()

            def record(db):
                docs = []
                for r, one in got:
                    v = catalog.add_backup(db, one.manifest, dict(one.stats, vm_set=True),
                                           store.key)
                    r.ref = f"{one.manifest.name}@{v}"
                    if record_extra is not None:
                        record_extra(db, one.manifest, v, r)
                    docs.append(dict(r.to_json(), chunk_size=chunk_size))
                vm_sets.add(db, res.name, res.version, created,
                            {"vm": config, "source": str(u), "disks": docs})
            w.commit(record)
    finally:
        for x in disks:
            x.src.close()


def backup_vms(store, urls: list[str], *, parallel_vms: int = 2, **kw) -> list:
    """Back up several VMs (each under its VM name), `parallel_vms` at once: their
    logins, snapshots, CBT queries and read-ahead overlap, their ingests take turns
    at the store's write lock. [(url, VmBackupResult or the UserError)], in order;
    one VM failing does not stop the others."""
    from concurrent.futures import ThreadPoolExecutor
    names = [vurl.parse(x).vm_path.rsplit("/", 1)[-1] for x in urls]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"several VMs are named {dup[0]!r}: back them up one at a time, each "
                        "with --name")

    def one(url):
        try:
            return backup_vm(store, url, **kw)
        except UserError as exc:
            return exc
    with ThreadPoolExecutor(max(1, parallel_vms), thread_name_prefix="vm") as pool:
        return list(zip(urls, pool.map(one, urls)))
