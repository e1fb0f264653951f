"""Demo part: back up a VM from a vSphere API (vcsim on 127.0.0.1), change its disk,
back it up again reading only the changed blocks (CBT), restore it, compare.

    .venv/bin/python scripts/demo_vsphere.py WORKDIR
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

from vcsim import PASSWORD, Vcsim, build

H = str(Path(sys.executable).parent / "hypersdk")
VM = "DC0/vm/DC0_H0_VM0"
MiB = 1 << 20


def step(*args, **env) -> str:
    print(f"\n\033[1m$ hypersdk {' '.join(args)}\033[0m", flush=True)
    p = subprocess.run([H, *args], capture_output=True, text=True, env=dict(os.environ, **env))
    print(p.stdout + p.stderr, end="", flush=True)
    if p.returncode != 0:
        raise SystemExit(f"hypersdk {args[0]} failed")
    return p.stdout


def main() -> None:
    work = Path(sys.argv[1])
    data = work / "vsphere-store"
    os.environ["HYPERSDK_DATA_DIR"] = str(data)
    print("== vSphere: a VM backed up from a snapshot with Changed Block Tracking (vcsim)")
    print("(building the simulator the first time takes about a minute)", flush=True)
    binary = build()
    rng = random.Random(7)
    img = bytearray(64 * MiB)
    for off in range(0, len(img), 4 * MiB):                 # a disk with data here and there
        img[off:off + MiB] = rng.randbytes(MiB)
    with Vcsim(binary, work / "vcsim") as sim:
        live = sim.set_disk(VM, bytes(img))
        url = sim.url(VM)
        pw = {"HYPERSDK_VSPHERE_PASSWORD": PASSWORD}
        step("backup", url, "--insecure", "--name", "web01", **pw)
        with open(live, "r+b") as f:                        # the VM writes a few blocks
            for off in (5 * MiB + 123, 17 * MiB, 60 * MiB + 9999):
                new = rng.randbytes(20000)
                f.seek(off)
                f.write(new)
                img[off:off + len(new)] = new
        print("\n(the VM changed 60 KB in three places; the next backup reads only those "
              "64 KiB blocks)")
        out = step("backup", url, "--insecure", "--name", "web01", "--json", **pw)
        d = json.loads(out)["disks"][0]
        print(f"incremental: read {d['bytes_read']} bytes of a {d['capacity']}-byte disk "
              f"since changeId {d['change_id']}")
    step("backups")
    step("restore", "web01@2", str(work / "web01-restored"))
    got = (work / "web01-restored" / "disk-202-0.img").read_bytes()
    print("restored disk is byte-identical to the VM's disk at the snapshot:", got == bytes(img))
    cfg = json.loads((work / "web01-restored" / "vm.json").read_text())
    print(f"vm.json: {cfg['vm']['name']}, guest {cfg['vm']['guest_id']}, {cfg['vm']['num_cpu']} "
          f"CPU, {cfg['vm']['memory_mb']} MB, disks "
          + ", ".join(f"{x['label']} ({x['capacity']} bytes)" for x in cfg["disks"]))
    if got != bytes(img):
        raise SystemExit("restore differs")


if __name__ == "__main__":
    main()
