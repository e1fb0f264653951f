"""The real `hypersdk` executable: outputs, --json, and one-line errors for bad input."""
import json
import os
import shutil
import subprocess

import pytest
from conftest import HYPERSDK, cli_env, mixed_image, random_image, same_bytes

CS = 64 << 10


def one_error_line(p, *fragments):
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("hypersdk: error: ")
    for frag in fragments:
        assert frag in lines[0], lines[0]
    assert "Traceback" not in p.stderr


def test_backup_restore_verify_cycle_with_json(cli, tmp_path):
    src = mixed_image(tmp_path / "disk.img", 5 * CS + 123, chunk=CS)
    r = cli.json("backup", src, "--chunk-size", "64K")
    assert r["bytes_read"] == 5 * CS + 123 and r["ref"] == "disk.img@1"
    assert r["zero_chunks"] == 2 and r["new_chunks"] == 4
    assert len(r["manifest"]) == 64 and r["seconds"] >= 0
    out = tmp_path / "out.img"
    rr = cli.json("restore", r["manifest"][:10], out)
    assert rr["bytes"] == 5 * CS + 123 and same_bytes(out, src)
    listing = cli.json("backups")
    assert [b["ref"] for b in listing] == ["disk.img@1"]
    v = cli.json("verify")
    assert v["ok"] and v["chunks_checked"] == 5       # 4 data + 1 hash list
    stats = cli.json("store", "stats")
    assert stats["unique_chunks"] == 5 and stats["backups"] == 1
    assert stats["logical_bytes"] == 5 * CS + 123
    d = cli.json("delete", "disk.img")
    assert d["deleted"]["ref"] == "disk.img@1"
    g = cli.json("gc")
    assert g["chunks_deleted"] == 5
    assert cli.json("backups") == []


def test_human_output_names_what_was_stored(cli, tmp_path):
    src = mixed_image(tmp_path / "disk.img", 6 * CS, chunk=CS)
    out = cli("backup", src, "--name", "web", "--chunk-size", "64K").stdout
    assert "backup web@1" in out and "manifest" in out and "2 zero" in out
    assert "web@1" in cli("backups").stdout
    assert "OK: store is consistent" in cli("verify").stdout
    assert "dedup ratio" in cli("store", "stats").stdout


def test_data_dir_option_and_env(tmp_path):
    src = random_image(tmp_path / "a.img", 1000)
    env = cli_env(tmp_path / "env-dir")
    run = lambda *a: subprocess.run([str(HYPERSDK), *map(str, a)], env=env,
                                    capture_output=True, text=True, check=True)
    run("--data-dir", tmp_path / "opt-dir", "backup", src)
    assert (tmp_path / "opt-dir" / "index.sqlite").exists()
    assert not (tmp_path / "env-dir").exists()
    run("backup", src)
    assert (tmp_path / "env-dir" / "index.sqlite").exists()


def test_default_data_dir_is_xdg(tmp_path):
    env = dict(os.environ, XDG_DATA_HOME=str(tmp_path / "xdg"))
    env.pop("HYPERSDK_DATA_DIR", None)
    src = tmp_path / "d.img"
    src.write_bytes(b"x" * 100)
    p = subprocess.run([str(HYPERSDK), "backups"], env=env, check=True, capture_output=True,
                       text=True)
    assert p.stdout.strip() == "no backups yet"
    assert not (tmp_path / "xdg").exists(), "listing backups created a data dir"
    subprocess.run([str(HYPERSDK), "backup", src], env=env, check=True, capture_output=True)
    assert (tmp_path / "xdg" / "hypersdk" / "index.sqlite").exists()


def test_empty_file_is_a_valid_image(cli, tmp_path):
    src = tmp_path / "empty.img"
    src.write_bytes(b"")
    r = cli.json("backup", src)
    assert r["bytes_read"] == 0 and r["chunks"] == 0
    out = tmp_path / "out.img"
    cli("restore", "empty.img", out)
    assert out.read_bytes() == b""


def test_size_not_multiple_of_chunk_size(cli, tmp_path):
    src = random_image(tmp_path / "odd.img", 3 * CS + 17)
    cli("backup", src, "--chunk-size", "64K")
    out = tmp_path / "out.img"
    cli("restore", "odd.img", out)
    assert out.read_bytes() == src.read_bytes()


@pytest.mark.parametrize("args, fragments", [
    (["backup", "/nonexistent/disk.img"], ["no such file"]),
    (["backup", "{tmp}"], ["is a directory"]),
    (["backup", "{img}", "--chunk-size", "3M"], ["power of two"]),
    (["backup", "{img}", "--chunk-size", "32K"], ["power of two"]),
    (["backup", "{img}", "--chunk-size", "lots"], ["cannot read size"]),
    (["backup", "{img}", "--name", "a@b"], ["bad backup name"]),
    (["restore", "nosuch", "{tmp}/o"], ["no backup matches"]),
    (["restore", "disk.img@7", "{tmp}/o"], ["no backup 'disk.img@7'", "versions: 1"]),
    (["restore", "disk.img@x", "{tmp}/o"], ["version after @"]),
    (["restore", "disk.img", "{img}"], ["exists", "--force"]),
    (["restore", "disk.img", "{tmp}/missing-dir/o"], ["no such directory"]),
    (["verify", "nosuch"], ["no backup matches"]),
    (["delete", "nosuch"], ["no backup matches"]),
])
def test_bad_input_gives_one_clear_line(cli, tmp_path, args, fragments):
    img = random_image(tmp_path / "disk.img", 2 * CS)
    cli("backup", img, "--chunk-size", "64K")
    before = cli.json("backups")
    p = cli(*[a.format(tmp=tmp_path, img=img) for a in args], ok=False)
    one_error_line(p, *fragments)
    assert cli.json("backups") == before                # nothing recorded or lost
    assert img.read_bytes() == random_image(tmp_path / "again", 2 * CS).read_bytes()


def test_restore_force_overwrites(cli, tmp_path):
    src = random_image(tmp_path / "disk.img", CS + 5)
    cli("backup", src)
    out = tmp_path / "out.img"
    out.write_bytes(b"old")
    cli("restore", "disk.img", out, "--force")
    assert out.read_bytes() == src.read_bytes()


def test_ambiguous_prefix_is_refused(cli, tmp_path):
    from hypersdk.node.service.backup import backup
    from hypersdk.node.store.store import ChunkStore
    src = tmp_path / "e.img"
    src.write_bytes(b"")
    seen = {}
    with ChunkStore(cli.data_dir) as store:
        for i in range(3000):                          # birthday bound on 4 hex digits
            r = backup(store, str(src), name=f"n{i}", chunk_size=CS)
            prefix = r.manifest_id.hex()[:4]
            if prefix in seen:
                break
            seen[prefix] = r
        else:
            pytest.fail("no 4-digit prefix collision in 3000 manifests")
    p = cli("restore", prefix, tmp_path / "o", ok=False)
    one_error_line(p, "ambiguous", "prefixes 2 manifests")


def test_unreadable_file(cli, tmp_path):
    src = random_image(tmp_path / "secret.img", 100)
    os.chmod(src, 0)
    cmd = [str(HYPERSDK), "backup", str(src)]
    if os.geteuid() == 0:                   # root reads anything: drop that power
        if not shutil.which("setpriv"):
            pytest.skip("root without setpriv cannot make a file unreadable")
        cmd = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *cmd]
    p = subprocess.run(cmd, capture_output=True, text=True, env=cli_env(cli.data_dir))
    one_error_line(p, "permission denied")
    assert cli.json("backups") == []


def test_corruption_gives_exit_3_and_names_the_chunk(cli, tmp_path):
    src = random_image(tmp_path / "disk.img", 3 * CS)
    cli("backup", src, "--chunk-size", "64K")
    pack = next((cli.data_dir / "packs").glob("pack-*.dat"))
    with open(pack, "r+b") as f:
        f.seek(CS + 45 + 45 + 100)                     # inside the second chunk's data
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 1]))
    p = cli("verify", ok=False)
    assert p.returncode == 3
    assert "DAMAGED chunk" in p.stdout and "AFFECTED backup disk.img@1" in p.stdout
    report = json.loads(cli("verify", "--json", ok=False).stdout)
    assert len(report["damaged"]) == 1 and report["affected_backups"][0]["ref"] == "disk.img@1"
    out = tmp_path / "out.img"
    p = cli("restore", "disk.img", out, ok=False)
    one_error_line(p, report["damaged"][0]["chunk"])
    assert not out.exists()


def test_help_lists_every_command(cli):
    out = cli("--help").stdout
    for cmd in ("backup", "restore", "verify", "backups", "delete", "gc", "store"):
        assert cmd in out
    assert "stats" in cli("store", "--help").stdout


def test_every_command_has_its_help_text():
    """`hypersdk X --help` and the command lists show each command's docstring; a
    statement placed before it (a lazy import, say) silently drops it."""
    import importlib

    import click

    from hypersdk.node.cli.app import cli
    for mod in ("hypersdk.node.cli.audit_cmds", "hypersdk.node.cli.node_cmds"):  # add commands
        importlib.import_module(mod)

    def walk(cmd, path):
        yield path, cmd
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                yield from walk(sub, f"{path} {name}")

    missing = [p for p, c in walk(cli, "hypersdk") if not (c.help or "").strip()]
    assert len(list(walk(cli, "hypersdk"))) > 10
    assert missing == []
