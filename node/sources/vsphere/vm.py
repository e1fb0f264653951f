"""The VM: its disks and configuration, tasks, Changed Block Tracking, snapshots.

Snapshots hypersdk takes are named SNAPSHOT_PREFIX + UTC time + random suffix,
so a later run recognises the ones a killed run left behind and removes them
(`stale_snapshots`) before taking its own; nobody else's snapshot is touched.

QueryChangedDiskAreas answers one window at a time (vCenter caps it): callers
loop with startOffset = answer.startOffset + answer.length until the capacity,
as `changed_areas` does, with a bound on the number of calls.
"""
from __future__ import annotations

import datetime
import os
import time
from dataclasses import dataclass

from hypersdk.node.errors import UserError

SNAPSHOT_PREFIX = "hypersdk-backup-"
TASK_TIMEOUT = 600.0            # seconds a vSphere task may take (a snapshot of a big VM)
BLOCK = 64 << 10                # CBT's granularity


class ChangeIdRejected(Exception):
    """vSphere does not know the changeId (CBT was reset, another disk): back up in full."""


@dataclass(frozen=True)
class Disk:
    key: int                    # device key
    label: str
    capacity: int               # bytes
    file: str                   # "[datastore] path.vmdk" (of the snapshot, for a snapshot's disk)
    change_id: str | None       # the CBT changeId (of the snapshot, for a snapshot's disk)
    controller: dict
    unit: int | None
    thin: bool | None

    def to_json(self) -> dict:
        return {"key": self.key, "label": self.label, "capacity": self.capacity,
                "file": self.file, "change_id": self.change_id, "controller": self.controller,
                "unit": self.unit, "thin": self.thin}


def find_vm(session, url):
    vm = session.content.searchIndex.FindByInventoryPath(url.inventory_path)
    if vm is None:
        raise UserError(f"VM {url.inventory_path} not found on {url.host} (the path is the "
                        "datacenter, 'vm', then the VM's folders and name)")
    from pyVmomi import vim
    if not isinstance(vm, vim.VirtualMachine):
        raise UserError(f"{url.inventory_path} on {url.host} is a {type(vm).__name__}, not a VM")
    return vm


def disks(config) -> list[Disk]:
    """The virtual disks of a VM's or a snapshot's config, in device order."""
    from pyVmomi import vim
    devs = list(config.hardware.device)
    by_key = {d.key: d for d in devs}
    out = []
    for d in devs:
        if not isinstance(d, vim.vm.device.VirtualDisk):
            continue
        cap = d.capacityInBytes or (d.capacityInKB or 0) * 1024
        c = by_key.get(d.controllerKey)
        ctrl = {"key": d.controllerKey,
                "type": type(c).__name__.rsplit(".", 1)[-1] if c is not None else None,
                "bus": getattr(c, "busNumber", None)}
        b = d.backing
        out.append(Disk(d.key, d.deviceInfo.label if d.deviceInfo else str(d.key), cap,
                        getattr(b, "fileName", "") or "", getattr(b, "changeId", None) or None,
                        ctrl, d.unitNumber, getattr(b, "thinProvisioned", None)))
    return out


def config_doc(vm) -> dict:
    """What a restore needs to know about the VM's shape (JSON-able)."""
    from pyVmomi import vim
    c = vm.config
    hw = c.hardware
    nets = []
    for d in hw.device:
        if isinstance(d, vim.vm.device.VirtualEthernetCard):
            b = d.backing
            nets.append({"label": d.deviceInfo.label if d.deviceInfo else str(d.key),
                         "type": type(d).__name__.rsplit(".", 1)[-1],
                         "network": getattr(b, "deviceName", None)
                         or getattr(getattr(b, "port", None), "portgroupKey", None),
                         "mac": getattr(d, "macAddress", None)})
    return {"name": vm.name, "uuid": c.uuid, "instance_uuid": c.instanceUuid,
            "guest_id": c.guestId, "guest_name": c.guestFullName,
            "annotation": c.annotation or "", "num_cpu": hw.numCPU,
            "cores_per_socket": hw.numCoresPerSocket, "memory_mb": hw.memoryMB,
            "firmware": c.firmware, "version": c.version,
            "disks": [d.to_json() for d in disks(c)], "networks": nets}


def wait(task, what: str, timeout: float = TASK_TIMEOUT):
    """The task's result; UserError naming `what` when it fails or takes too long."""
    deadline = time.monotonic() + timeout
    delay = 0.02
    while task.info.state not in ("success", "error"):
        if time.monotonic() > deadline:
            raise UserError(f"{what}: vSphere task still running after {timeout:.0f} s")
        time.sleep(delay)                    # polling a remote task: backoff to 1 s
        delay = min(1.0, delay * 2)
    if task.info.state == "error":
        err = task.info.error
        raise UserError(f"{what} refused by vSphere: {getattr(err, 'msg', None) or err}")
    return task.info.result


def enable_cbt(vm) -> bool:
    """Turn Changed Block Tracking on; True when it was off."""
    if vm.config.changeTrackingEnabled:
        return False
    from pyVmomi import vim
    wait(vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(changeTrackingEnabled=True)),
         f"enabling Changed Block Tracking on {vm.name}")
    return True


def _walk(tree):
    for node in tree or []:
        yield node
        yield from _walk(node.childSnapshotList)


def stale_snapshots(vm) -> list[tuple[str, object]]:
    """(name, snapshot) of hypersdk's own snapshots of vm (a killed run's), oldest first."""
    if vm.snapshot is None:
        return []
    return [(n.name, n.snapshot) for n in _walk(vm.snapshot.rootSnapshotList)
            if n.name.startswith(SNAPSHOT_PREFIX)]


def create_snapshot(vm, *, quiesce: bool):
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    name = f"{SNAPSHOT_PREFIX}{stamp}-{os.urandom(3).hex()}"
    return wait(vm.CreateSnapshot_Task(
        name=name, description="taken by hypersdk backup; removed when the backup ends "
        "(a later run removes it if a killed run left it)", memory=False, quiesce=quiesce),
        f"snapshot of {vm.name}")


def remove_snapshot(snap, what: str) -> None:
    wait(snap.RemoveSnapshot_Task(removeChildren=False), what)


def changed_areas(vm, snap, disk: Disk, change_id: str) -> list[tuple[int, int]]:
    """[(start, length)] of disk (in snapshot snap) that changed since change_id
    ("*": every allocated area), merged and in order. ChangeIdRejected when vSphere
    does not know change_id; UserError for other refusals."""
    from pyVmomi import vim, vmodl
    areas: list[tuple[int, int]] = []
    start, calls = 0, 0
    limit = disk.capacity // BLOCK + 16       # one window at least covers one block
    while start < disk.capacity:
        calls += 1
        if calls > limit:
            raise UserError(f"QueryChangedDiskAreas of {disk.label} made no progress")
        try:
            info = vm.QueryChangedDiskAreas(snapshot=snap, deviceKey=disk.key,
                                            startOffset=start, changeId=change_id)
        except vim.fault.FileFault as exc:
            raise ChangeIdRejected(exc.msg or "FileFault") from None
        except (vmodl.fault.InvalidArgument, vim.fault.VimFault) as exc:
            if change_id != "*":
                raise ChangeIdRejected(getattr(exc, "msg", None) or type(exc).__name__) \
                    from None
            raise UserError(f"QueryChangedDiskAreas of {disk.label} refused: "
                            f"{getattr(exc, 'msg', None) or type(exc).__name__}") from None
        if info.startOffset != start or info.length <= 0:
            raise UserError(f"QueryChangedDiskAreas of {disk.label}: answer window "
                            f"{info.startOffset}+{info.length} for start {start}")
        end = start + info.length
        for a in info.changedArea or []:
            s, e = max(a.start, start), min(a.start + a.length, end, disk.capacity)
            if e <= s:
                continue
            if areas and areas[-1][0] + areas[-1][1] >= s:
                areas[-1] = (areas[-1][0], max(areas[-1][0] + areas[-1][1], e) - areas[-1][0])
            else:
                areas.append((s, e - s))
        start = end
    return areas


# -- creating a VM from a saved configuration (restore) ---------------------------------

_CONTROLLERS = ("ParaVirtualSCSIController", "VirtualLsiLogicController",
                "VirtualLsiLogicSASController", "VirtualBusLogicController",
                "VirtualAHCIController", "VirtualNVMEController")
_NICS = ("VirtualE1000", "VirtualE1000e", "VirtualVmxnet3", "VirtualVmxnet2", "VirtualPCNet32")


def datastore_of(file: str) -> str | None:
    """"[DS] path/x.vmdk" -> "DS"."""
    return file[1:file.index("]")] if file.startswith("[") and "]" in file else None


def create_vm(session, url, config: dict, datastore: str | None):
    """Create a powered-off VM at url (its last path part the name) shaped like the
    saved `config` (vm.config_doc): CPUs, memory, guest, firmware, annotation,
    disk controllers and thin disks of the saved capacities, NICs on networks of
    the same names (skipped, and said, when no such network exists here). Returns
    (vm, notes)."""
    from pyVmomi import vim
    dc_path, _, rest = url.inventory_path.partition("/vm/")
    folder_path, _, name = rest.rpartition("/")
    dc = session.content.searchIndex.FindByInventoryPath(dc_path)
    if dc is None or not isinstance(dc, vim.Datacenter):
        raise UserError(f"datacenter {dc_path} not found on {url.host}")
    folder = dc.vmFolder if not folder_path else \
        session.content.searchIndex.FindByInventoryPath(f"{dc_path}/vm/{folder_path}")
    if folder is None:
        raise UserError(f"folder {dc_path}/vm/{folder_path} not found on {url.host}")
    if session.content.searchIndex.FindByInventoryPath(url.inventory_path) is not None:
        raise UserError(f"a VM {url.inventory_path} exists already: restore under another "
                        "name, or into it with --into")
    stores = {d.name: d for d in dc.datastore}
    want = datastore or next((datastore_of(d["file"]) for d in config["disks"]
                              if datastore_of(d["file"]) in stores), None)
    if want not in stores:
        raise UserError(f"datastore {want!r} not found in {dc_path} (there: "
                        f"{', '.join(sorted(stores)) or 'none'}): pass --datastore NAME")
    pools = [c.resourcePool for c in dc.hostFolder.childEntity
             if isinstance(c, vim.ComputeResource)]
    if not pools:
        raise UserError(f"no host or cluster in {dc_path} to run a VM on")
    changes, keys, notes = [], {}, []
    for d in config["disks"]:
        c = d["controller"]
        if c["key"] in keys:
            continue
        kind = c["type"] if c["type"] in _CONTROLLERS + ("VirtualIDEController",) else \
            "ParaVirtualSCSIController"
        keys[c["key"]] = -(100 + len(keys))
        if kind == "VirtualIDEController":
            continue                              # a new VM has its IDE controllers already
        dev = getattr(vim.vm.device, kind)(key=keys[c["key"]], busNumber=c.get("bus") or 0)
        if hasattr(dev, "sharedBus"):
            dev.sharedBus = "noSharing"
        changes.append(vim.vm.device.VirtualDeviceSpec(operation="add", device=dev))
    for i, d in enumerate(config["disks"]):
        ctrl = keys[d["controller"]["key"]]
        if d["controller"]["type"] == "VirtualIDEController":
            ctrl = 200                            # a new VM's first IDE controller
        disk = vim.vm.device.VirtualDisk(
            key=-(200 + i), controllerKey=ctrl, unitNumber=d["unit"] or 0,
            capacityInKB=-(-d["capacity"] // 1024),
            backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
                diskMode="persistent", thinProvisioned=True, fileName=f"[{want}]"))
        changes.append(vim.vm.device.VirtualDeviceSpec(operation="add", fileOperation="create",
                                                       device=disk))
    nets = {n.name for n in dc.network}
    for i, n in enumerate(config.get("networks", [])):
        if n.get("network") not in nets:
            notes.append(f"network {n.get('network')!r} of {n['label']} does not exist here: "
                         "NIC not added")
            continue
        kind = n["type"] if n["type"] in _NICS else "VirtualVmxnet3"
        changes.append(vim.vm.device.VirtualDeviceSpec(operation="add", device=getattr(
            vim.vm.device, kind)(key=-(300 + i), backing=vim.vm.device.VirtualEthernetCard
            .NetworkBackingInfo(deviceName=n["network"]))))
    spec = vim.vm.ConfigSpec(name=name, guestId=config.get("guest_id") or "otherGuest",
                             numCPUs=config.get("num_cpu") or 1,
                             memoryMB=config.get("memory_mb") or 256,
                             annotation=config.get("annotation") or None,
                             files=vim.vm.FileInfo(vmPathName=f"[{want}]"),
                             deviceChange=changes)
    if config.get("firmware"):
        spec.firmware = config["firmware"]
    vm = wait(folder.CreateVM_Task(config=spec, pool=pools[0]), f"creating VM {name}")
    return vm, notes
