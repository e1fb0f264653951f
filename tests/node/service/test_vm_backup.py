"""`hypersdk backup vsphere://...` and `restore NAME@N DIR` as real processes against a
real vSphere API (vcsim from ../shared/vcsim, 127.0.0.1), issue 19.

The live disk of a vcsim VM is a file the test writes; a snapshot freezes a copy;
Changed Block Tracking reports exactly the 64 KiB blocks that changed. Bytes read
are the bytes that came over HTTP (the backup's --json `bytes_read`)."""
from __future__ import annotations

import json
import os
import random
import subprocess
import time
from pathlib import Path

import pytest
from conftest import HYPERSDK, Cli, cli_env
from vcsim_helpers import PASSWORD, Vcsim, tls_files, vcsim_binary

MiB, BS = 1 << 20, 64 << 10
VM = "DC0/vm/DC0_H0_VM0"
PW = {"HYPERSDK_VSPHERE_PASSWORD": PASSWORD}


@pytest.fixture(scope="module")
def binary():
    return vcsim_binary()


def image(size: int, seed: int, regions) -> bytearray:
    rng = random.Random(seed)
    img = bytearray(size)
    for off, ln in regions:
        img[off:off + ln] = rng.randbytes(ln)
    return img


def mutate(path: Path, img: bytearray, regions, seed: int) -> None:
    """Overwrite regions of the live disk with bytes that differ from the old ones."""
    rng = random.Random(seed)
    with open(path, "r+b") as f:
        for off, ln in regions:
            new = bytes(o ^ (rng.randrange(255) + 1) for o in img[off:off + ln])
            img[off:off + ln] = new
            f.seek(off)
            f.write(new)


def two_disks(sim, seed: int, second: int):
    """Give the VM a second disk of `second` bytes; data in both: (a, b, b's live file)."""
    sim.add_disk(VM, second)
    a = image(2 * MiB, seed, [(0, MiB // 2), (MiB + 3, 70000)])
    b = image(second, seed + 1, [(2 * MiB, MiB)])
    sim.set_disk(VM, bytes(a), "disk-202-0")
    return a, b, sim.set_disk(VM, bytes(b), "disk-202-1")


def blocks(regions) -> set[int]:
    return {b for off, ln in regions for b in range(off // BS, (off + ln - 1) // BS + 1)}


def restored(cli: Cli, ref: str, out: Path) -> dict:
    doc = cli.json("restore", ref, out)
    return {Path(d["out"]).name: Path(d["out"]).read_bytes() for d in doc["disks"]}


def test_full_then_incremental_reads_only_changed_blocks(tmp_path, binary):
    """Full backup from the snapshot (CBT turned on: it says why it is full), five
    regions changed (unaligned, one across two blocks, one at the end), then an
    incremental that downloads only those blocks and restores byte-identical; the
    startOffset loop runs (answers of 16 MiB at most)."""
    size = 64 * MiB
    img = image(size, 1, [(0, 128 << 10), (5 * MiB + 7, 50000), (30 * MiB, MiB),
                          (47 * MiB + 333, 200), (size - BS, BS)])
    cli = Cli(tmp_path / "data")
    with Vcsim(binary, tmp_path / "sim", span=16 * MiB) as sim:
        live = sim.set_disk(VM, bytes(img))
        full = cli.json("backup", sim.url(VM), "--insecure", "--name", "web", **PW)
        (d,) = full["disks"]
        assert full["ref"] == "web@1" and full["cbt_enabled_now"] is True
        assert d["mode"] == "full" and "Changed Block Tracking was off" in d["reason"]
        allocated = len(blocks([(0, 128 << 10), (5 * MiB + 7, 50000), (30 * MiB, MiB),
                                (47 * MiB + 333, 200), (size - BS, BS)])) * BS
        assert allocated <= d["bytes_read"] <= allocated + 512         # + the format probe
        assert sim.snapshot_names() == []                               # removed after
        v1 = bytes(img)

        regions = [(100, 10), (3 * BS - 50, 100), (10 * MiB, BS), (20 * MiB + 12345, 300000),
                   (size - 1000, 1000)]
        mutate(live, img, regions, 2)
        inc = cli.json("backup", sim.url(VM), "--insecure", "--name", "web", **PW)
        (d2,) = inc["disks"]
        assert inc["ref"] == "web@2" and d2["mode"] == "incremental" and d2["reason"] == ""
        assert d2["change_id"] != d["change_id"]
        changed = len(blocks(regions)) * BS
        assert changed <= d2["bytes_read"] <= changed + 512
        assert d2["unchanged_bytes_reused"] > 0 and d2["export_format"] == "raw"
        assert sim.snapshot_names() == []
    out1, out2 = restored(cli, "web@1", tmp_path / "r1"), restored(cli, "web@2", tmp_path / "r2")
    assert list(out1.values()) == [v1] and list(out2.values()) == [bytes(img)]
    cfg = json.loads((tmp_path / "r2" / "vm.json").read_text())
    assert cfg["vm"]["name"] == "DC0_H0_VM0" and cfg["disks"][0]["change_id"] == d2["change_id"]
    lst = cli.json("backups")
    assert [x["ref"] for x in lst if x.get("kind") == "vm"] == ["web@1", "web@2"]
    assert {x["ref"] for x in lst if x.get("kind") != "vm"} == {"web/disk-202-0@1",
                                                                 "web/disk-202-0@2"}
    text = cli("backups").stdout
    assert "web@2" in text and "(VM DC0_H0_VM0)" in text
    # each disk's signed backup entry names the VM, the disk, its changeId and the set
    entries = [e for e in cli.json("audit", "log") if e["kind"] == "backup"]
    src = {e["body"]["source"]["set"]: e["body"]["source"] for e in entries}
    assert src["web@2"]["change_id"] == d2["change_id"] and src["web@2"]["vm"] == VM
    assert src["web@1"]["mode"] == "full" and src["web@2"]["mode"] == "incremental"
    assert src["web@2"]["disk"] == "disk-202-0" and src["web@2"]["kind"] == "vsphere"


def test_live_changes_after_the_snapshot_do_not_leak_in_and_a_killed_run_is_cleaned_up(
        tmp_path, binary):
    size = 8 * MiB
    img = image(size, 3, [(0, size)])
    cli = Cli(tmp_path / "data")
    hook = tmp_path / "hook"
    with Vcsim(binary, tmp_path / "sim") as sim:
        live = sim.set_disk(VM, bytes(img))
        frozen = bytes(img)
        p = subprocess.Popen([str(HYPERSDK), "backup", sim.url(VM), "--insecure", "--json"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=cli_env(cli.data_dir, HYPERSDK_TEST_VSPHERE_HOOK=str(hook),
                                         **PW))
        _wait_for(Path(str(hook) + ".snap"), p)
        mutate(live, img, [(MiB + 5, 3 * BS)], 4)                     # after the snapshot
        hook.touch()
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert json.loads(out)["disks"][0]["mode"] == "full"
        assert list(restored(cli, "DC0_H0_VM0@1", tmp_path / "r1").values()) == [frozen]

        # kill -9 while the snapshot exists: it stays; the next run removes it and works
        hook2 = tmp_path / "hook2"
        p = subprocess.Popen([str(HYPERSDK), "backup", sim.url(VM), "--insecure"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env=cli_env(cli.data_dir, HYPERSDK_TEST_VSPHERE_HOOK=str(hook2),
                                         **PW))
        _wait_for(Path(str(hook2) + ".snap"), p)
        p.kill()
        p.wait(30)
        left = sim.snapshot_names()
        assert len(left) == 1 and left[0].startswith("hypersdk-backup-")
        doc = cli.json("backup", sim.url(VM), "--insecure", **PW)
        assert doc["stale_snapshots_removed"] == left and sim.snapshot_names() == []
        assert doc["ref"] == "DC0_H0_VM0@2" and doc["disks"][0]["mode"] == "incremental"
        assert list(restored(cli, "DC0_H0_VM0@2", tmp_path / "r2").values()) == [bytes(img)]


def test_ctrl_c_removes_the_snapshot_and_records_nothing(tmp_path, binary):
    import signal
    cli = Cli(tmp_path / "data")
    hook = tmp_path / "hook"
    with Vcsim(binary, tmp_path / "sim") as sim:
        sim.set_disk(VM, bytes(image(4 * MiB, 9, [(0, 4 * MiB)])))
        p = subprocess.Popen([str(HYPERSDK), "backup", sim.url(VM), "--insecure"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=cli_env(cli.data_dir, HYPERSDK_TEST_VSPHERE_HOOK=str(hook),
                                         **PW))
        _wait_for(Path(str(hook) + ".snap"), p)
        assert len(sim.snapshot_names()) == 1
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=120)
        assert p.returncode == 130 and err.strip() == "hypersdk: interrupted"
        assert sim.snapshot_names() == []                  # removed on the way out
        assert not cli.data_dir.exists()                   # nothing recorded, nothing left


def _wait_for(path: Path, proc, limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)


def test_rejected_change_id_falls_back_to_full_and_multi_disk_sets_restore(tmp_path, binary):
    cli = Cli(tmp_path / "data")
    with Vcsim(binary, tmp_path / "sim") as sim:
        a, b, live_b = two_disks(sim, 5, 4 * MiB)
        first = cli.json("backup", sim.url(VM), "--insecure", "--parallel", "1", **PW)
        assert [d["mode"] for d in first["disks"]] == ["full", "full"]
        # CBT off and on again: vSphere forgets every changeId of the VM
        from pyVmomi import vim
        for on in (False, True):
            sim.wait(sim.vm(VM).ReconfigVM_Task(spec=vim.vm.ConfigSpec(
                changeTrackingEnabled=on)))
        mutate(live_b, b, [(3 * MiB, 10)], 7)
        again = cli.json("backup", sim.url(VM), "--insecure", **PW)
        assert [d["mode"] for d in again["disks"]] == ["full", "full"]
        assert all("vSphere rejected the previous changeId" in d["reason"]
                   for d in again["disks"])
    got = restored(cli, "DC0_H0_VM0@2", tmp_path / "r")
    assert sorted(got) == ["disk-202-0.img", "disk-202-1.img"]
    assert got["disk-202-0.img"] == bytes(a) and got["disk-202-1.img"] == bytes(b)
    cfg = json.loads((tmp_path / "r" / "vm.json").read_text())
    assert {d["label"]: d["capacity"] for d in cfg["disks"]} == {"disk-202-0": 2 * MiB,
                                                                   "disk-202-1": 4 * MiB}
    assert {d["file"] for d in cfg["disks"]} == set(got)
    p = cli("restore", "DC0_H0_VM0@2", tmp_path / "r", ok=False)          # not empty
    assert "is not empty" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def _one_line_error(p, *fragments) -> None:
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def test_bad_input_one_clear_line_no_snapshot_nothing_recorded(tmp_path, binary):
    ca, cert, key = tls_files(tmp_path / "tls")
    cli = Cli(tmp_path / "data")
    with Vcsim(binary, tmp_path / "sim", tls=(cert, key)) as sim:
        sim.set_disk(VM, bytes(image(2 * MiB, 8, [(0, MiB)])))
        url = sim.url(VM)
        # TLS is verified by default: our CA is not the system's
        _one_line_error(cli("backup", url, ok=False, **PW), "TLS certificate not trusted",
                        "--ca-file")
        _one_line_error(cli("backup", url, "--insecure", ok=False,
                            HYPERSDK_VSPHERE_PASSWORD="wrong"), "login failed for user")
        _one_line_error(cli("backup", url.replace(str(sim.port), "1"), "--ca-file", ca,
                            ok=False, **PW), "unreachable")
        _one_line_error(cli("backup", sim.url("DC0/vm/nope"), "--ca-file", ca, ok=False, **PW),
                        "VM DC0/vm/nope not found")
        _one_line_error(cli("backup", url, "--ca-file", ca, ok=False), "no vSphere password",
                        "HYPERSDK_VSPHERE_PASSWORD")
        _one_line_error(cli("backup", url.replace("user@", "user:pass@"), ok=False, **PW),
                        "process list")
        creds = tmp_path / "creds"
        creds.write_text(PASSWORD + "\n")
        creds.chmod(0o644)
        _one_line_error(cli("backup", url, "--ca-file", ca, "--credentials", creds, ok=False),
                        "accessible by others", "chmod 600")
        assert not cli.data_dir.exists()              # nothing created by a refusal
        creds.chmod(0o600)
        doc = cli.json("backup", url, "--ca-file", ca, "--credentials", creds)
        assert doc["ref"] == "DC0_H0_VM0@1" and sim.snapshot_names() == []

        # the server dies mid-backup: one line, no set recorded, nothing half-written
        hook = tmp_path / "hook"
        p = subprocess.Popen([str(HYPERSDK), "backup", url, "--ca-file", str(ca)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=cli_env(cli.data_dir, HYPERSDK_TEST_VSPHERE_HOOK=str(hook),
                                         **PW))
        _wait_for(Path(str(hook) + ".snap"), p)
        sim.proc.kill()
        sim.proc.wait(10)
        hook.touch()
        out, err = p.communicate(timeout=120)
        assert p.returncode != 0 and len(err.strip().splitlines()) == 1, err
        assert [x["ref"] for x in cli.json("backups") if x.get("kind") == "vm"] == \
            ["DC0_H0_VM0@1"]

    with Vcsim(binary, tmp_path / "sim2") as sim:        # a VM with no disk
        from pyVmomi import vim
        d = sim.disks(VM)[0]
        sim.wait(sim.vm(VM).ReconfigVM_Task(spec=vim.vm.ConfigSpec(deviceChange=[
            vim.vm.device.VirtualDeviceSpec(operation="remove", device=d)])))
        _one_line_error(cli("backup", sim.url(VM), "--insecure", ok=False, **PW),
                        "has no virtual disks")
        assert sim.snapshot_names() == []


def test_restore_into_vsphere_creates_the_vm_uploads_and_verifies(tmp_path, binary):
    """A two-disk VM backed up, restored into vSphere as a new VM (its shape from the
    saved configuration: CPUs, memory, guest, disks of the saved capacities) and read
    back identical; --into writes into an existing powered-off VM; a VM of that name
    already there, or a running one for --into, is refused in one line."""
    cli = Cli(tmp_path / "data")
    with Vcsim(binary, tmp_path / "sim") as sim:
        a, b, _ = two_disks(sim, 11, 3 * MiB)
        from pyVmomi import vim
        sim.wait(sim.vm(VM).ReconfigVM_Task(spec=vim.vm.ConfigSpec(numCPUs=2, memoryMB=96,
                                                                   annotation="web tier")))
        cli.json("backup", sim.url(VM), "--insecure", "--name", "web", **PW)
        new = "DC0/vm/web-restored"
        doc = cli.json("restore", "web@1", sim.url(new), "--insecure", **PW)
        assert doc["created"] is True and len(doc["disks"]) == 2
        assert all(d["chunks_verified"] > 0 for d in doc["disks"])
        vm = sim.vm(new)
        assert vm is not None and vm.runtime.powerState == "poweredOff"
        assert (vm.config.hardware.numCPU, vm.config.hardware.memoryMB,
                vm.config.annotation) == (2, 96, "web tier")
        caps = sorted(d.capacityInKB * 1024 for d in sim.disks(new))
        assert caps == [2 * MiB, 3 * MiB]
        # what vSphere holds now is the backup (read back by the test, too)
        got = sorted(sim.live_path(d).read_bytes() for d in sim.disks(new))
        assert got == sorted([bytes(a), bytes(b)])
        _one_line_error(cli("restore", "web@1", sim.url(new), "--insecure", ok=False, **PW),
                        "exists already")
        # --into the original VM, powered off, after its disks changed
        sim.set_disk(VM, bytes(2 * MiB), "disk-202-0")
        _one_line_error(cli("restore", "web@1", sim.url(VM), "--into", "--insecure", ok=False,
                            **PW), "power it off")
        sim.wait(sim.vm(VM).PowerOffVM_Task())
        doc = cli.json("restore", "web@1", sim.url(VM), "--into", "--insecure", **PW)
        assert doc["created"] is False
        assert sim.live_path(sim.disk(VM, "disk-202-0")).read_bytes() == bytes(a)
        _one_line_error(cli("restore", "web/disk-202-0@1", sim.url("DC0/vm/x"), "--insecure",
                            ok=False, **PW), "not a VM backup")


def test_several_vms_in_one_command_with_a_bound(tmp_path, binary):
    """Two VMs backed up by one command (--parallel-vms 2: their snapshots and reads
    overlap, their ingests take turns), each restoring identical; a VM that is not
    there fails alone (exit 3, one FAILED line), the others are recorded."""
    cli = Cli(tmp_path / "data")
    vms = ["DC0/vm/DC0_H0_VM0", "DC0/vm/DC0_H0_VM1"]
    with Vcsim(binary, tmp_path / "sim") as sim:
        imgs = {}
        for i, v in enumerate(vms):
            label = sim.disks(v)[0].deviceInfo.label
            imgs[v] = image(3 * MiB, 20 + i, [(i * MiB, MiB + 77)])
            sim.set_disk(v, bytes(imgs[v]), label)
        doc = cli.json("backup", *(sim.url(v) for v in vms), "--insecure", "--parallel-vms",
                       "2", **PW)
        assert doc["failed"] == 0 and [x["ref"] for x in doc["vms"]] == ["DC0_H0_VM0@1",
                                                                         "DC0_H0_VM1@1"]
        p = cli("backup", sim.url(vms[1]), sim.url("DC0/vm/gone"), "--insecure", ok=False,
                **PW)
        assert p.returncode == 3 and "FAILED" in p.stdout and "DC0/vm/gone not found" in p.stdout
        assert "1 of 2 VMs backed up" in p.stdout
        assert sim.snapshot_names(vms[0]) == sim.snapshot_names(vms[1]) == []
    for i, v in enumerate(vms):
        name = v.rsplit("/", 1)[1]
        got = restored(cli, f"{name}@1", tmp_path / f"r{i}")
        assert list(got.values()) == [bytes(imgs[v])]
    assert [x["ref"] for x in cli.json("backups") if x.get("kind") == "vm"] == [
        "DC0_H0_VM0@1", "DC0_H0_VM1@1", "DC0_H0_VM1@2"]
    p = cli("backup", "/etc/hostname", "vsphere://u@h/D/vm/x", ok=False)
    assert p.returncode == 2 and "vsphere:// URLs only" in p.stderr
