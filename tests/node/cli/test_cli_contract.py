"""The CLI's contract with users and scripts (README "Usage"): exit codes, one-line
errors, --json everywhere (errors too), --version, Ctrl-C, a private data dir,
and commands that fail or only read leave nothing behind."""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import time

import click
import pytest
from conftest import HYPERSDK, Cli, MiB, cli_env, random_image


def _leaf_commands(group: click.Group, path=()):
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            yield from _leaf_commands(cmd, path + (name,))
        else:
            yield path + (name,), cmd


def test_every_command_takes_json():
    from hypersdk.node.cli.app import cli
    missing = [" ".join(p) for p, cmd in _leaf_commands(cli)
               if "--json" not in {o for prm in cmd.params for o in prm.opts}]
    assert missing == [], f"commands without --json: {missing}"


def test_version(tmp_path):
    from importlib.metadata import version
    p = Cli(tmp_path / "d")("--version")
    assert p.stdout.strip() == f"hypersdk {version('hypersdk')}"


@pytest.mark.parametrize("args, code", [
    (["backup"], 2),                                   # missing argument
    (["backup", "x.img", "--chunk-size", "3K"], 2),    # bad option value
    (["restore", "vm1@0", "out"], 2),                  # bad REF syntax
    (["verify", "--network"], 2),                      # --network needs REF
    (["backup", "IMG", "--name", ""], 2),              # empty name
    (["nosuchcommand"], 2),
    (["backup", "/nonexistent/x.img"], 1),             # a user's error, not usage
    (["restore", "nosuch", "out"], 1),
])
def test_exit_codes_and_one_line_errors(tmp_path, args, code):
    img = random_image(tmp_path / "img", 1000)
    cli = Cli(tmp_path / "data")
    if args[0] == "restore":
        cli("backup", img)
    args = [str(img) if a == "IMG" else a for a in args]
    p = cli(*args, ok=None)
    assert p.returncode == code, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hypersdk: error: "), p.stderr
    # the same error under --json: a JSON document on stdout, the line on stderr
    if args[0] != "nosuchcommand":
        pj = cli(*args, "--json", ok=None)
        assert pj.returncode == code
        doc = json.loads(pj.stdout)
        assert doc["exit"] == code and doc["error"] == lines[0][len("hypersdk: error: "):]


def test_ctrl_c_during_backup_says_interrupted_exits_130_and_records_nothing(tmp_path):
    img = tmp_path / "big.img"
    with open(img, "wb") as f:                 # random: slow to compress at level 19
        for _ in range(128):
            f.write(os.urandom(MiB))
    data = tmp_path / "data"
    p = subprocess.Popen([str(HYPERSDK), "backup", str(img), "--zstd-level", "19"],
                         env=cli_env(data), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    deadline = time.monotonic() + 120
    packs = data / "packs"
    while time.monotonic() < deadline and p.poll() is None:       # bounded poll
        if any(f.stat().st_size > 0 for f in packs.glob("pack-*.dat")):
            break
        time.sleep(0.01)
    assert p.poll() is None, "the backup ended before it could be interrupted"
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert err.strip().splitlines() == ["hypersdk: interrupted"]
    assert "Aborted" not in out + err
    assert Cli(data).json("backups") == []


def _modes(root):
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            out[os.path.relpath(p, root)] = stat.S_IMODE(os.lstat(p).st_mode)
    out["."] = stat.S_IMODE(os.stat(root).st_mode)
    return out


def test_data_dir_is_private_and_old_ones_are_tightened(tmp_path):
    img = random_image(tmp_path / "img", 3 * MiB)
    old = os.umask(0o022)
    try:
        cli = Cli(tmp_path / "data")
        cli("backup", img)
        cli("verify", "img")
        cli("delete", "img")
        cli("gc")
    finally:
        os.umask(old)
    modes = _modes(tmp_path / "data")
    loose = {k: oct(v) for k, v in modes.items()
             if v & 0o077 or (v != 0o700 and stat.S_ISDIR(os.lstat(tmp_path / "data" / k)
                                                          .st_mode))}
    assert loose == {}, f"readable by others: {loose}"
    assert {"index.sqlite", "audit.sqlite", "node.key"} <= set(modes)
    # a data dir an older hypersdk left world-readable
    os.chmod(tmp_path / "data", 0o755)
    os.chmod(tmp_path / "data" / "index.sqlite", 0o644)
    os.chmod(tmp_path / "data" / "audit.sqlite", 0o644)
    cli("backup", img, "--name", "again")
    modes = _modes(tmp_path / "data")
    assert modes["."] == 0o700
    assert modes["index.sqlite"] == 0o600 and modes["audit.sqlite"] == 0o600


def test_reading_commands_and_failed_first_backups_leave_no_data_dir(tmp_path):
    data = tmp_path / "data"
    cli = Cli(data)
    assert cli("verify", ok=False).returncode == 1
    assert cli("store", "stats", ok=False).returncode == 1
    assert cli.json("backups") == []
    assert cli("audit", "log", ok=False).returncode == 1
    os.mkfifo(tmp_path / "fifo")
    assert cli("backup", tmp_path / "fifo", ok=False).returncode == 1
    assert cli("backup", tmp_path, ok=False).returncode == 1               # a directory
    assert cli("backup", tmp_path / "missing", ok=False).returncode == 1
    assert not data.exists(), "a command that failed or only read created the data dir"
