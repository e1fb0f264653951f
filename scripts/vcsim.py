"""A real vSphere API on 127.0.0.1 for the tests, the demo and the benchmarks:
../shared/vcsim (govmomi's simulator, patched for frozen snapshots and Changed Block
Tracking), built once per machine.

    binary = build()                          # ~35 s + apt the first time, then cached
    with Vcsim(binary, workdir) as sim:       # a fresh inventory
        sim.set_disk("DC0/vm/DC0_H0_VM0", image_bytes)
        sim.url("DC0/vm/DC0_H0_VM0")          # vsphere://user@127.0.0.1:PORT/DC0/vm/...

The binary is cached in $TMPDIR/hypersdk-vcsim-<hash of the build inputs>/ (a
lock keeps concurrent builds apart).
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import re
import signal
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VCSIM_DIR = REPO.parent / "shared" / "vcsim"
BUILD_TIMEOUT = 900
USER, PASSWORD = "user", "pass"


class BuildFailed(Exception):
    pass


def build() -> Path:
    """The vcsim binary, built from ../shared/vcsim when not cached (BuildFailed)."""
    if not (VCSIM_DIR / "build-vcsim.sh").exists():
        raise BuildFailed("../shared/vcsim is not available")
    h = hashlib.sha256()
    for name in ("build-vcsim.sh", "main.go", "vcsim-0.24.2-backup.patch"):
        h.update((VCSIM_DIR / name).read_bytes())
    out = Path(tempfile.gettempdir()) / f"hypersdk-vcsim-{h.hexdigest()[:16]}"
    binary = out / "vcsim"
    out.mkdir(exist_ok=True)
    with open(out / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)             # one build at a time
        if not binary.exists():
            p = subprocess.run(["sh", str(VCSIM_DIR / "build-vcsim.sh"), str(out)],
                               capture_output=True, text=True, timeout=BUILD_TIMEOUT)
            if p.returncode != 0 or not binary.exists():
                raise BuildFailed(f"building vcsim failed: {p.stderr[-2000:]}")
    return binary


class Vcsim:
    def __init__(self, binary: Path, tmp: Path, *, span: int | None = None,
                 username: str = USER, password: str = PASSWORD, tls: tuple | None = None):
        self.binary, self.tmp = binary, Path(tmp)
        self.span, self.username, self.password, self.tls = span, username, password, tls
        self.proc = None
        self.port = None
        self._si = None

    def __enter__(self):
        self.tmp.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, TMPDIR=str(self.tmp))
        env.pop("VCSIM_CBT_SPAN", None)
        if self.span:
            env["VCSIM_CBT_SPAN"] = str(self.span)
        args = [str(self.binary), "-l", "127.0.0.1:0", "-username", self.username,
                "-password", self.password]
        if self.tls:
            args += ["-tlscert", str(self.tls[0]), "-tlskey", str(self.tls[1])]
        self.log = open(self.tmp / "vcsim.log", "wb")
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self.log, env=env)
        line = self.proc.stdout.readline().decode()
        m = re.search(r"@127\.0\.0\.1:(\d+)/sdk", line)
        if not m:
            self.__exit__()
            raise AssertionError(f"vcsim did not start: {line!r}")
        self.port = int(m.group(1))
        return self

    def __exit__(self, *exc):
        if self._si is not None:
            from pyVim.connect import Disconnect
            try:
                Disconnect(self._si)
            except Exception:
                pass
            self._si = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()

    def url(self, vm_path: str = "DC0/vm/DC0_H0_VM0", user: str | None = None) -> str:
        return f"vsphere://{user or self.username}@127.0.0.1:{self.port}/{vm_path}"

    # -- test-side access (pyvmomi, unverified TLS: the test's own view) --------------
    @property
    def si(self):
        if self._si is None:
            from pyVim.connect import SmartConnect
            self._si = SmartConnect(host="127.0.0.1", port=self.port, user=self.username,
                                    pwd=self.password, disableSslCertValidation=True)
        return self._si

    def vm(self, vm_path: str = "DC0/vm/DC0_H0_VM0"):
        return self.si.content.searchIndex.FindByInventoryPath(vm_path)

    def disks(self, vm_path: str = "DC0/vm/DC0_H0_VM0") -> list:
        from pyVmomi import vim
        return [d for d in self.vm(vm_path).config.hardware.device
                if isinstance(d, vim.vm.device.VirtualDisk)]

    def wait(self, task) -> object:
        for _ in range(2000):                    # bounded: 100 s
            if task.info.state in ("success", "error"):
                break
            time.sleep(0.05)
        assert task.info.state == "success", task.info.error
        return task.info.result

    def live_path(self, disk) -> Path:
        vm_ds = self.si.content.searchIndex.FindByInventoryPath("DC0/vm/DC0_H0_VM0").datastore[0]
        rel = re.match(r"\[.+?\] (.+)", disk.backing.fileName).group(1)
        return Path(vm_ds.info.url) / rel

    def disk(self, vm_path: str, label: str):
        return next(d for d in self.disks(vm_path) if d.deviceInfo.label == label)

    def set_disk(self, vm_path: str, data: bytes, label: str = "disk-202-0") -> Path:
        """Give the VM's disk `label` the capacity len(data) (a multiple of 1 KiB) and
        the content data; returns its live backing file."""
        from pyVmomi import vim
        d = self.disk(vm_path, label)
        d.capacityInKB = len(data) // 1024
        self.wait(self.vm(vm_path).ReconfigVM_Task(spec=vim.vm.ConfigSpec(deviceChange=[
            vim.vm.device.VirtualDeviceSpec(operation="edit", device=d)])))
        path = self.live_path(self.disk(vm_path, label))
        path.write_bytes(data)
        return path

    def add_disk(self, vm_path: str, capacity: int) -> None:
        """A second (thin) disk on the first disk's controller."""
        from pyVmomi import vim
        first = self.disks(vm_path)[0]
        disk = vim.vm.device.VirtualDisk(
            controllerKey=first.controllerKey, unitNumber=(first.unitNumber or 0) + 1,
            capacityInKB=capacity // 1024,
            backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(diskMode="persistent",
                                                                  thinProvisioned=True))
        self.wait(self.vm(vm_path).ReconfigVM_Task(spec=vim.vm.ConfigSpec(deviceChange=[
            vim.vm.device.VirtualDeviceSpec(operation="add", fileOperation="create",
                                            device=disk)])))

    def snapshot_names(self, vm_path: str = "DC0/vm/DC0_H0_VM0") -> list[str]:
        vm = self.vm(vm_path)
        out, todo = [], list(vm.snapshot.rootSnapshotList) if vm.snapshot else []
        while todo:
            n = todo.pop()
            out.append(n.name)
            todo.extend(n.childSnapshotList or [])
        return out
