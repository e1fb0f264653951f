"""Real `hypersdk` processes for the benchmarks: run a command, start a node.

Imported by the bench scripts (run as `python bench/NAME.py`, so this folder is on
their path); uses the `hypersdk` next to the running Python."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

HYPERSDK = Path(sys.executable).parent / "hypersdk"


def cli(data_dir: Path, *args, timeout: float = 600) -> str:
    """stdout of `hypersdk ARGS` on data_dir (an error raises CalledProcessError)."""
    env = dict(os.environ, HYPERSDK_DATA_DIR=str(data_dir))
    return subprocess.run([str(HYPERSDK), *map(str, args)], env=env, check=True,
                          capture_output=True, text=True, timeout=timeout).stdout


def random_image(path: Path, size: int) -> Path:
    """A random (incompressible) image of `size` bytes at path."""
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 8 << 20)
            f.write(os.urandom(n))
            left -= n
    return path


def start(data_dir: Path, *extra, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """`node init` then `node run` on 127.0.0.1 (EXTRA: more run options; env: more
    environment of the node process); (process, its first address) once it wrote
    node.addrs, within 60 s."""
    env = dict(os.environ, **(env or {}), HYPERSDK_DATA_DIR=str(data_dir))
    cli(data_dir, "node", "init")
    proc = subprocess.Popen([str(HYPERSDK), "node", "run", "--listen",
                             "/ip4/127.0.0.1/tcp/0", *extra], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    addrs = data_dir / "node.addrs"
    for _ in range(600):                       # <= 60 s
        if addrs.exists() and addrs.read_text().strip():
            return proc, addrs.read_text().split()[0]
        if proc.poll() is not None:
            raise SystemExit(f"node in {data_dir} exited ({proc.returncode})")
        time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"node in {data_dir} did not start in 60 s")
