"""Long commands draw a progress bar when stderr is a terminal, and only then."""
import os
import pty
import select
import subprocess
import time

from conftest import HYPERSDK, cli_env, mixed_image


def _run_on_pty(args, env) -> tuple[int, str]:
    master, slave = pty.openpty()
    p = subprocess.Popen([str(HYPERSDK), *map(str, args)], stdout=subprocess.DEVNULL,
                         stderr=slave, stdin=subprocess.DEVNULL, env=env)
    os.close(slave)
    out = b""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:            # bounded read of the terminal
        r, _, _ = select.select([master], [], [], 1.0)
        if r:
            try:
                chunk = os.read(master, 4096)
            except OSError:                       # EIO: the child closed the pty
                break
            if not chunk:
                break
            out += chunk
        elif p.poll() is not None:
            break
    os.close(master)
    return p.wait(timeout=30), out.decode(errors="replace")


def test_progress_bar_on_a_terminal(tmp_path):
    src = mixed_image(tmp_path / "disk.img", 24 << 20)
    env = cli_env(tmp_path / "data")
    rc, screen = _run_on_pty(["backup", src], env)
    assert rc == 0
    assert "backup" in screen and "100%" in screen
    rc, screen = _run_on_pty(["restore", "disk.img", tmp_path / "out.img"], env)
    assert rc == 0 and "restore" in screen and "100%" in screen
    for args in (["verify"], ["verify", "disk.img"]):
        rc, screen = _run_on_pty(args, env)
        assert rc == 0 and "verify" in screen and "%" in screen


def test_no_progress_bar_when_not_a_terminal_or_json(tmp_path):
    src = mixed_image(tmp_path / "disk.img", 4 << 20)
    env = cli_env(tmp_path / "data")
    p = subprocess.run([str(HYPERSDK), "backup", str(src)], env=env, capture_output=True,
                       text=True, check=True)
    assert "%" not in p.stderr
    rc, screen = _run_on_pty(["backup", src, "--json"], env)
    assert rc == 0 and "%" not in screen
