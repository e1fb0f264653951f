"""The store operations: what `backup`, `restore`, `verify`, `backups`, `delete`,
`forget`, `gc` and `store stats` do, for the CLI and for the daemon alike.

Each op is `fn(store, args, ui) -> (JSON document, text, exit code)`: it does the
work on an open ChunkStore and returns its result; it prints nothing. `ui` gives
`progress(total, label)` (a context manager yielding an advance(n) callable, or
None) and `on_wait(msg)` (a lock wait or a warning). The CLI (node/cli/app.py)
runs an op in its own process when no node runs on the data dir and prints the
result; the daemon (node/daemon/daemon.py) runs the same op in a worker thread
and streams progress to the client. Nothing here imports the CLI or the daemon.
"""
from __future__ import annotations

import datetime
import os

from hypersdk.node.config import human
from hypersdk.node.errors import UsageError, UserError


class StoreOp:
    def __init__(self, fn, readonly: bool):
        self.fn, self.readonly = fn, readonly


STORE_OPS: dict[str, StoreOp] = {}


def store_op(name: str, *, readonly: bool = False):
    def register(fn):
        STORE_OPS[name] = StoreOp(fn, readonly)
        return fn
    return register


@store_op("backup")
def _op_backup(store, a, ui):
    from hypersdk.node.audit import intents as audit_intents
    from hypersdk.node.service.backup import backup as run_backup
    from hypersdk.node.sources.local import ImageSource
    from hypersdk.node.store import intents as store_intents
    path = a["path"]
    with ImageSource.open(path) as src:
        total = src.size

    def owe_entry(db, m, version):                   # in the backup's commit
        store_intents.add(db, "backup", {"manifest": m.id, "name": m.name, "size": m.size,
                                         "chunks": m.n_chunks, "source": m.source})
    with ui.progress(total, "backup") as advance:
        r = run_backup(store, path, name=a["name"], chunk_size=a["chunk_size"],
                       level=a["zstd_level"], progress=advance, on_wait=ui.on_wait,
                       extra=owe_entry)
    audit_intents.crash_point("backup-committed")
    audit_intents.flush(store, ui.on_wait)
    rate = r.size / r.seconds if r.seconds else 0
    holes = f", {human(r.size - r.bytes_read)} of holes skipped" if r.size > r.bytes_read else ""
    return (r.to_json(),
            f"backup {r.name}@{r.version}\n"
            f"manifest      {r.manifest_id.hex()}\n"
            f"image         {human(r.size)} ({r.size} bytes) in {r.seconds:.2f} s, "
            f"{human(rate)}/s\n"
            f"bytes read    {human(r.bytes_read)}{holes}\n"
            f"chunks        {r.chunks} ({r.zero_chunks} zero, {r.new_chunks} new)\n"
            f"new stored    {human(r.new_bytes_stored)} ({human(r.new_bytes_raw)} before compression)",
            0)


@store_op("backup vm")
def _op_backup_vm(store, a, ui):
    import contextlib

    from hypersdk.node.service.vm_backup import backup_vm, backup_vms
    from hypersdk.node.store import intents as store_intents

    def owe_entry(db, m, version, disk):             # in the set's commit, per disk
        store_intents.add(db, "backup", {"manifest": m.id, "name": m.name, "size": m.size,
                                         "chunks": m.n_chunks, "source": m.source})
    kw = dict(password=a["password"], quiesce=a["quiesce"], insecure=a["insecure"],
              ca_file=a["ca_file"], chunk_size=a["chunk_size"], level=a["zstd_level"],
              on_wait=ui.on_wait, record_extra=owe_entry, parallel=a["parallel"])
    urls = a["url"].split()                          # several VMs: URLs hold no spaces
    if len(urls) > 1:
        if a["name"]:
            raise UserError("--name names one VM's backups: give one URL with it")
        got = backup_vms(store, urls, parallel_vms=a["parallel_vms"], **kw)
    else:
        with contextlib.ExitStack() as bars:
            def progress(label, total):
                return bars.enter_context(ui.progress(total, f"backup {label}"))
            got = [(urls[0], backup_vm(store, urls[0], name=a["name"], progress=progress,
                                       **kw))]
    from hypersdk.node.audit import intents as audit_intents
    audit_intents.crash_point("backup-committed")
    audit_intents.flush(store, ui.on_wait)
    lines, docs, failed = [], [], 0
    for url, r in got:
        if isinstance(r, UserError):
            failed += 1
            docs.append({"source": url, "error": str(r)})
            lines.append(f"FAILED {url}: {r}")
            continue
        docs.append(r.to_json())
        lines += _vm_lines(r)
    if len(urls) == 1:                               # (its failure raised above)
        return docs[0], "\n".join(lines), 0
    lines.append(f"{len(got) - failed} of {len(got)} VMs backed up")
    return {"vms": docs, "failed": failed}, "\n".join(lines), 3 if failed else 0


def _vm_lines(r) -> list[str]:
    lines = [f"backup {r.ref} of VM {r.vm} ({len(r.disks)} disk(s)) in {r.seconds:.2f} s"]
    if r.stale_removed:
        lines.append(f"removed {len(r.stale_removed)} snapshot(s) an earlier run left: "
                     + ", ".join(r.stale_removed))
    for d in r.disks:
        rate = d.downloaded / d.seconds if d.seconds else 0
        why = f" ({d.reason})" if d.reason else f" since changeId {d.change_id}"
        lines.append(f"disk {d.label:<16} {d.ref}: {d.mode}{why}; {human(d.capacity)}, read "
                     f"{human(d.downloaded)} at {human(rate)}/s, {human(d.reused_bytes)} "
                     f"unchanged kept, {d.new_chunks} new chunks")
    if r.snapshot_left:
        lines.append(f"WARNING: the backup snapshot could not be removed ({r.snapshot_left}); "
                     "the next backup of this VM removes it")
    return lines


@store_op("restore", readonly=True)
def _op_restore(store, a, ui):
    from hypersdk.node.audit import intents as audit_intents
    from hypersdk.node.service.restore import restore as run_restore
    from hypersdk.node.store import catalog, vm_sets
    vmset = vm_sets.resolve(store.db, a["ref"])
    if vmset is not None:
        return _restore_set(store, vmset, a, ui)
    size = catalog.resolve(store, a["ref"]).size
    umask = a.get("umask")
    with ui.progress(size, "restore") as advance:
        r = run_restore(store, a["ref"], a["out"], force=a["force"],
                        to_device=bool(a.get("to_device")),
                        follow_symlink=bool(a.get("follow_symlink")),
                        umask=umask if isinstance(umask, int) else None,
                        progress=advance, on_wait=ui.on_wait,
                        before_commit=audit_intents.restore_recorder(store.root, ui.on_wait))
    rate = r.size / r.seconds if r.seconds else 0
    zeros = (f"{r.zero_chunks} zero chunks written as zeros" if r.device else
             f"{r.zero_chunks} zero chunks left as holes")
    return (r.to_json(),
            f"restored {r.manifest_id.hex()[:16]} to {r.out}: {human(r.size)} in {r.seconds:.2f} s "
            f"({human(rate)}/s), {r.chunks} chunks verified, {zeros}",
            0)


def _restore_set(store, vmset, a, ui):
    import contextlib

    from hypersdk.node.audit import intents as audit_intents
    from hypersdk.node.service.vm_restore import restore_set
    if a.get("to_device") or a.get("follow_symlink"):
        raise UserError("a VM backup restores into a directory: --to-device and "
                        "--follow-symlink do not apply")
    with contextlib.ExitStack() as bars:
        def progress(label, total):
            return bars.enter_context(ui.progress(total, f"restore {label}"))
        r = restore_set(store, vmset, a["out"], force=a["force"], progress=progress,
                        on_wait=ui.on_wait,
                        before_commit=audit_intents.restore_recorder(store.root, ui.on_wait))
    lines = [f"restored VM backup {r.ref} ({vmset.doc['vm']['name']}) to {r.out} in "
             f"{r.seconds:.2f} s"]
    for x in r.disks:
        lines.append(f"  {os.path.basename(x.out)}: {human(x.size)}, {x.chunks} chunks verified")
    lines.append(f"  vm.json: the VM's configuration ({len(r.disks)} disk(s))")
    return r.to_json(), "\n".join(lines), 0


@store_op("restore vm", readonly=True)
def _op_restore_vm(store, a, ui):
    import contextlib

    from hypersdk.node.service.vm_restore import restore_set_to_vsphere
    from hypersdk.node.store import vm_sets
    vmset = vm_sets.resolve(store.db, a["ref"])
    if vmset is None:
        raise UserError(f"{a['ref']!r} is not a VM backup: only VM backups (made from "
                        "vsphere://) restore into vSphere")
    with contextlib.ExitStack() as bars:
        def progress(label, total):
            return bars.enter_context(ui.progress(total, f"upload {label}"))
        r = restore_set_to_vsphere(store, vmset, a["url"], password=a["password"],
                                   into=a["into"], datastore=a["datastore"],
                                   insecure=a["insecure"], ca_file=a["ca_file"],
                                   progress=progress)
    lines = [f"restored VM backup {r.ref} into {'a new VM' if r.created else 'the VM'} "
             f"{r.target} in {r.seconds:.2f} s"]
    for d in r.disks:
        lines.append(f"  {d['label']} -> {d['file']}: {human(d['bytes'])}, "
                     f"{d['chunks_verified']} chunks read back and verified")
    lines += [f"  NOTE: {n}" for n in r.notes]
    return r.to_json(), "\n".join(lines), 0


NEEDS_NODE = ("verify --network needs the running node on this data dir (start it with "
              "`hypersdk node run`)")


@store_op("verify", readonly=True)
def _op_verify(store, a, ui):
    from hypersdk.node.store.verify import verify_backup, verify_store
    if a.get("network"):
        raise UserError(NEEDS_NODE)
    if a.get("against"):
        from hypersdk.node.service.verify_source import verify_against
        from hypersdk.node.store import catalog
        with ui.progress(catalog.resolve(store, a["ref"]).size, "compare") as advance:
            rep = verify_against(store, a["ref"], a["against"], progress=advance)
        return rep.to_json(), rep.text(), 0 if rep.ok else 3
    ref = a["ref"]
    if ref:
        from hypersdk.node.store import catalog
        b = catalog.resolve(store, ref)
        from hypersdk.protocol.manifest import list_count
        chunks = b.stats.get("chunks", 0)
        n = chunks - b.stats.get("zero_chunks", 0) + list_count(chunks)
        with ui.progress(n, "verify") as advance:
            report = verify_backup(store, ref, progress=advance)
        from hypersdk.node.audit import log as audit_log
        audit_log.record_after_op(store.root, "verify", {
            "manifest": b.manifest_id, "holder": None,  # = this node
            "result": "ok" if report.ok else "damaged",
            "summary": {"chunks_checked": report.chunks_checked,
                        "bytes_checked": report.bytes_checked,
                        "damaged": len(report.damaged)}}, ui.on_wait)
    else:
        n = store.db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]
        with ui.progress(n, "verify") as advance:
            report = verify_store(store, progress=advance)
    lines = [f"checked {report.chunks_checked} chunks ({human(report.bytes_checked)}), "
             f"{report.backups_checked} backups"]
    for d in report.damaged.values():
        lines.append(f"DAMAGED chunk {d.cid.hex()}: {d.reason}")
    for b, cids in report.affected.values():
        lines.append(f"AFFECTED backup {b.ref} (manifest {b.manifest_id.hex()[:16]}): "
                     f"{len(cids)} bad chunk(s)")
    lines.append("OK: store is consistent" if report.ok and not ref else
                 f"OK: backup {ref} is intact" if report.ok else
                 f"FAILED: {len(report.damaged)} damaged chunk(s), "
                 f"{len(report.affected)} backup(s) affected")
    return report.to_json(), "\n".join(lines), 0 if report.ok else 3


@store_op("backups", readonly=True)
def _op_backups(store, a, ui):
    from hypersdk.node.store import catalog, vm_sets
    rows = catalog.list_backups(store)
    sets = vm_sets.list_sets(store.db)
    lines = [f"{'REF':<28} {'MANIFEST':<16} {'SIZE':>10} {'NEW STORED':>10}  CREATED (UTC)"]
    for v in sets:
        when = datetime.datetime.fromtimestamp(v.created / 1e9, datetime.timezone.utc)
        doc = v.to_json()
        lines.append(f"{v.ref:<28} {'(VM ' + doc['vm'] + ')':<16} {human(doc['size']):>10} "
                     f"{'':>10}  {when:%Y-%m-%d %H:%M:%S}  disks: "
                     + ", ".join(d["ref"] for d in doc["disks"]))
    for b in rows:
        t = datetime.datetime.fromtimestamp(b.created / 1e9, datetime.timezone.utc)
        when = f"{t:%Y-%m-%d %H:%M:%S}" if b.created else "-"    # 0: its labels are sealed
        lines.append(f"{b.ref:<28} {b.manifest_id.hex()[:16]:<16} {human(b.size):>10} "
                     f"{human(b.stats.get('new_bytes_stored', 0)):>10}  {when:<19}"
                     + ("  (held sealed for others)" if b.stats.get("opaque") else ""))
    docs = [v.to_json() for v in sets] + [b.to_json() for b in rows]
    return docs, "\n".join(lines) if docs else "no backups yet", 0


@store_op("delete")
def _op_delete(store, a, ui):
    from hypersdk.node.audit import intents as audit_intents
    from hypersdk.node.store import catalog, vm_sets
    with store.write_lock(ui.on_wait):
        vmset = vm_sets.resolve(store.db, a["ref"])
        if vmset is None:
            b = catalog.resolve(store, a["ref"])
            held = vm_sets.owner(store.db, b.name, b.version, b.manifest_id)
            if held is not None:
                raise UserError(f"{b.ref} is a disk of VM backup {held.ref}: delete the whole VM "
                                f"backup (`hypersdk delete {held.ref}`); one missing a disk "
                                "does not restore")
            _remove_backup(store, b)
        else:
            gone = _remove_set(store, vmset)
    audit_intents.crash_point("delete-committed")
    audit_intents.flush(store, ui.on_wait)
    if vmset is not None:
        refs = [f"{n}@{v}" for n, v, _ in gone]
        return ({"deleted": vmset.to_json(), "backups_deleted": [
                    {"ref": f"{n}@{v}", "name": n, "version": v, "manifest": m.hex()}
                    for n, v, m in gone]},
                f"deleted VM backup {vmset.ref} and its {len(gone)} disk backup(s) "
                f"({', '.join(refs)}); run `hypersdk gc` to reclaim space", 0)
    return ({"deleted": b.to_json()},
            f"deleted {b.ref} (manifest {b.manifest_id.hex()[:16]}); run `hypersdk gc` to reclaim space",
            0)


def _remove_backup(store, b) -> None:
    """Delete image backup b: its catalog row and its audit intent in one transaction."""
    from hypersdk.node.store import catalog
    from hypersdk.node.store import intents as store_intents
    catalog.delete_backup(store, b, extra=lambda db: store_intents.add(db, "delete", {
        "manifest": b.manifest_id, "name": b.name, "version": b.version}))


def _remove_set(store, vmset) -> list:
    """Delete a VM backup set and its disk backups in one transaction, with one delete
    intent per disk backup; the (name, version, manifest) of the backups removed."""
    from hypersdk.node.store import intents as store_intents
    from hypersdk.node.store import vm_sets
    return vm_sets.delete_set(store.db, vmset, extra=lambda db, n, v, m: store_intents.add(
        db, "delete", {"manifest": m, "name": n, "version": v}))


@store_op("forget")
def _op_forget(store, a, ui):
    """Apply a retention policy (node/service/retention.py) to NAME's versions, or to
    every name's (`all`): remove the versions it does not keep, as `delete` does
    (one transaction and one delete entry per image backup; a VM set with all its
    disk backups in one transaction). dry_run: only say what it would do."""
    import contextlib

    from hypersdk.node.audit import intents as audit_intents
    from hypersdk.node.service import retention
    policy = retention.Policy.from_args(a)
    name, dry = a.get("name"), bool(a.get("dry_run"))
    if bool(name) == bool(a.get("all")):
        raise UsageError("forget needs one backup NAME, or --all for every name")
    if name and "@" in name:
        raise UsageError(f"forget takes a backup NAME, not a version ({name!r}): it applies "
                         "the policy to every version of NAME")
    docs, lines, n_versions = {"keep": [], "remove": []}, [], 0
    try:
        with contextlib.nullcontext() if dry else store.write_lock(ui.on_wait):
            for group, kind, versions in _forget_groups(store, name):
                sel = retention.apply(versions, policy)
                why = {id(v): r for v, r in zip(sel.keep, sel.reasons)}
                n_versions += len(versions)
                lines.append(f"{group} ({'VM backup' if kind == 'vm' else 'image backup'}): "
                             f"keep {len(sel.keep)}, remove {len(sel.remove)}")
                for v in sorted(versions, key=lambda v: (v.created, v.version), reverse=True):
                    doc = _version_doc(v, kind, why.get(id(v)))
                    if id(v) not in why and not dry:
                        if kind == "vm":
                            _remove_set(store, v)
                        else:
                            _remove_backup(store, v)
                    docs["keep" if id(v) in why else "remove"].append(doc)
                    when = retention.local_time(v.created).astimezone()
                    lines.append((f"  {'keep' if id(v) in why else 'remove':<6} {v.ref:<28} "
                                  f"{when:%Y-%m-%d %H:%M:%S %z}  "
                                  + (", ".join(why[id(v)]) if id(v) in why else
                                     f"(VM: {len(v.doc['disks'])} disk backups)" if kind == "vm"
                                     else "")).rstrip())
        audit_intents.crash_point("delete-committed")
    finally:
        audit_intents.flush(store, ui.on_wait)      # the entries of what was removed
    k, r = len(docs["keep"]), len(docs["remove"])
    lines.append(f"dry run, policy {policy.describe()}: would remove {r} of {n_versions} "
                 f"version(s), keep {k}; nothing changed" if dry else
                 f"policy {policy.describe()}: removed {r} of {n_versions} version(s), kept {k}"
                 + ("; run `hypersdk gc` to reclaim space" if r else ""))
    return dict(docs, dry_run=dry, policy=policy.to_json()), "\n".join(lines), 0


def _forget_groups(store, name: str | None) -> list:
    """[(name, "vm" | "image", versions)] for `forget NAME` (None: every name). A VM's
    disk backups go with their set, never on their own. Copies held for other members
    (replicas) are theirs to forget: they go when their author deletes them."""
    from hypersdk.node.store import catalog, vm_sets
    held = vm_sets.owners(store.db)
    images: dict = {}
    for b in catalog.list_backups(store):
        if (b.name, b.version, b.manifest_id) not in held and not b.stats.get("replica"):
            images.setdefault(b.name, []).append(b)
    sets: dict = {}
    for s in vm_sets.list_sets(store.db):
        sets.setdefault(s.name, []).append(s)
    if name is None:
        return ([(n, "vm", v) for n, v in sorted(sets.items())]
                + [(n, "image", v) for n, v in sorted(images.items())])
    out = ([(name, "vm", sets[name])] if name in sets else []) + \
        ([(name, "image", images[name])] if name in images else [])
    if out:
        return out
    owner = next((ref for (n, _, _), ref in held.items() if n == name), None)
    if owner is not None:
        vm = owner.rpartition("@")[0]
        raise UserError(f"{name!r} holds disk backups of the VM backup {vm!r}: forget {vm!r} "
                        "instead (a VM backup is kept or removed whole)")
    raise UserError(f"no backup named {name!r} (try `hypersdk backups`)")


def _version_doc(v, kind: str, reasons) -> dict:
    doc = {"ref": v.ref, "name": v.name, "version": v.version, "kind": kind,
           "created_ns": v.created}
    if kind == "vm":
        doc["disks"] = [d["ref"] for d in v.doc["disks"]]
    else:
        doc["manifest"] = v.manifest_id.hex()
    if reasons is not None:
        doc["reasons"] = reasons
    return doc


@store_op("gc")
def _op_gc(store, a, ui):
    from hypersdk.node.service.restore_partials import PartialRegistry
    from hypersdk.node.store.gc import gc as run_gc
    r = run_gc(store, on_wait=ui.on_wait)
    # and the partial image files of killed restores, wherever they were written
    r["stale_partials_removed"] = PartialRegistry(store.root).clean()
    return (r, f"deleted {r['chunks_deleted']} unreferenced chunks "
               f"({human(r['bytes_released'])}); packs removed {r['packs_removed']}, "
               f"rewritten {r['packs_rewritten']}; disk {human(r['disk_bytes_before'])} -> "
               f"{human(r['disk_bytes_after'])}", 0)


@store_op("store stats", readonly=True)
def _op_stats(st, a, ui):
    s = st.stats()
    s["data_dir"] = str(st.root)
    ratio = lambda v: f"{v:.2f}x" if v else "-"
    return (s,
            f"data dir           {s['data_dir']}\n"
            f"backups            {s['backups']}\n"
            f"logical bytes      {human(s['logical_bytes'])} (sum of image sizes)\n"
            f"unique chunks      {s['unique_chunks']} ({s['delta_chunks']} stored as deltas "
            f"against an earlier version)\n"
            f"unique raw bytes   {human(s['unique_raw_bytes'])}\n"
            f"stored bytes       {human(s['stored_bytes'])} "
            f"(packs on disk {human(s['pack_bytes_on_disk'])})\n"
            f"dedup ratio        {ratio(s['dedup_ratio'])} "
            "(logical / unique raw; zero chunks count as dedup)\n"
            f"compression ratio  {ratio(s['compression_ratio'])} (unique raw / stored)\n"
            f"total reduction    {ratio(s['reduction_ratio'])} (logical / stored)",
            0)
