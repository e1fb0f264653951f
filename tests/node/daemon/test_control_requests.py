"""Control requests with bad arguments, sent as raw frames to a real running
node's control socket: for every command, a missing argument, each argument
with a value of the wrong type, out-of-range values and an unknown argument;
and unknown commands. Each gets exactly one error frame, exit 2, a message that
names the command and the argument ("bad request: `restore` needs `ref` ..."),
nothing runs, and the node keeps serving.

The table below is written from the click commands (node/cli/app.py and
node/cli/node_cmds.py: what each sends), independently of the node's own schema
(node/daemon/daemon.py ARGS); a test checks the two cover the same commands."""
from __future__ import annotations

import socket

from conftest import Cli
from test_node_cli import REQUEST_BUDGET, budget, nodes, status  # noqa: F401  (fixture)

KEY = "ab" * 32
DEAD = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWBLwLYANmtx2VovArjC4PzXMLySeZnfwfSb4fqq6N8Ezn"

# command -> (a complete valid argument map, as the CLI sends it; the required names)
VALID = {
    "backup": ({"path": "/nonexistent/disk.img", "name": None, "chunk_size": 65536,
                "zstd_level": 2}, ["path"]),
    "backup vm": ({"url": "vsphere://u@127.0.0.1:1/DC0/vm/x", "password": "pw", "name": None,
                   "quiesce": False, "insecure": False, "ca_file": None, "parallel": 2,
                   "parallel_vms": 2,
                   "chunk_size": 65536,
                   "zstd_level": 2}, ["url", "password"]),
    "restore vm": ({"ref": "nope", "url": "vsphere://u@127.0.0.1:1/DC0/vm/x", "password": "pw",
                    "into": False, "insecure": False, "datastore": None, "ca_file": None},
                   ["ref", "url", "password"]),
    "restore": ({"ref": "nope", "out": "/nonexistent/out.img", "force": False,
                 "to_device": False, "follow_symlink": False, "umask": 0o022}, ["ref", "out"]),
    "verify": ({"ref": None, "network": False, "against": None, "min_holders": 1,
                "loss_ppm": 10000, "confidence_ppm": 990000}, []),
    "backups": ({}, []),
    "delete": ({"ref": "nope"}, ["ref"]),
    "forget": ({"name": "nope", "all": False, "dry_run": False, "keep_last": 1, "keep_hourly": 0,
                "keep_daily": 0, "keep_weekly": 0, "keep_monthly": 0, "keep_yearly": 0}, []),
    "gc": ({}, []),
    "store stats": ({}, []),
    "fetch": ({"ref": "nope"}, ["ref"]),
    "status": ({}, []),
    "peers": ({}, []),
    "join": ({"addr": DEAD}, ["addr"]),
    "join network": ({"token": "hsdk1.AAAA"}, ["token"]),
    "dht provide": ({"key": KEY}, ["key"]),
    "dht find": ({"key": KEY, "count": 1}, ["key"]),
}

# the arguments nil is a value of (no name, no REF, no umask known)
NULLABLE = {("backup", "name"), ("backup vm", "name"), ("backup vm", "ca_file"),
            ("restore vm", "datastore"), ("restore vm", "ca_file"), ("restore", "umask"),
            ("verify", "ref"), ("verify", "against"),
            ("verify", "min_holders"), ("verify", "loss_ppm"), ("verify", "confidence_ppm"),
            ("forget", "name")}

# a value of the wrong type for an argument of each type
# (the valid nil ones are the nullable text arguments; msgpack here has no floats)
WRONG = {str: [7, b"bytes", ["a"], None], int: ["7", True, None, {"n": 1}],
         bool: [1, "yes", None], type(None): [7, False]}

# well-typed values out of range
OUT_OF_RANGE = [
    ("backup", "path", "relative/disk.img"), ("backup", "path", ""),
    ("backup", "path", "/a\0b"), ("backup", "chunk_size", 1000),
    ("backup", "chunk_size", 16 << 20), ("backup", "zstd_level", 0),
    ("backup", "zstd_level", 20), ("backup", "name", ""),
    ("backup vm", "url", "/x.img"), ("backup vm", "url", ""), ("backup vm", "password", ""),
    ("backup vm", "ca_file", "ca.pem"), ("backup vm", "chunk_size", 1000),
    ("backup vm", "parallel", 0), ("backup vm", "parallel", 17),
    ("backup vm", "parallel_vms", 0), ("backup vm", "url", "vsphere://u@h/D/vm/x /y.img"),
    ("restore vm", "url", "/x"), ("restore vm", "ca_file", "x.pem"), ("restore vm", "ref", ""),
    ("restore", "out", "out.img"), ("restore", "ref", ""), ("restore", "umask", -1),
    ("restore", "umask", 0o1000), ("verify", "against", "disk.img"),
    ("verify", "ref", ""), ("verify", "min_holders", 0), ("verify", "min_holders", 65),
    ("verify", "loss_ppm", 4999), ("verify", "loss_ppm", 990001),
    ("verify", "confidence_ppm", 1000000), ("verify", "confidence_ppm", 0),
    ("delete", "ref", ""), ("fetch", "ref", ""),
    ("forget", "name", ""), ("forget", "name", "a\0b"), ("forget", "keep_last", -1),
    ("forget", "keep_daily", -7), ("forget", "keep_yearly", -1),
    ("join", "addr", ""),
    ("dht provide", "key", "zz"), ("dht provide", "key", "ab" * 31),
    ("dht find", "key", "ab" * 33), ("dht find", "count", 0), ("dht find", "count", 65),
    ("dht find", "count", -1),
]


def cases():
    """(cmd, args, fragments the message must contain)."""
    out = []
    for cmd, (args, required) in VALID.items():
        for name in required:
            out.append((cmd, {k: v for k, v in args.items() if k != name},
                       [f"`{cmd}` needs `{name}` ("]))
        for name, value in args.items():
            for bad in WRONG[type(value)]:
                if bad is None and (cmd, name) in NULLABLE:
                    continue
                out.append((cmd, dict(args, **{name: bad}), [f"`{cmd}` needs `{name}` (",
                                                            "got"]))
        out.append((cmd, dict(args, bogus=1), [f"`{cmd}` takes no argument `bogus`"]))
    for cmd, name, value in OUT_OF_RANGE:
        out.append((cmd, dict(VALID[cmd][0], **{name: value}),
                    [f"`{cmd}` needs `{name}` (", "got"]))
    return out


def exchange(sock_path, doc) -> list[dict]:
    """Send one request frame; every frame the node answers, until it closes."""
    from hypersdk.node.daemon import control
    from hypersdk.protocol import codec
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(budget(REQUEST_BUDGET))
        s.connect(str(sock_path))
        s.sendall(control.frame(doc))
        raw = b""
        while chunk := s.recv(65536):       # the node closes after its final frame
            raw += chunk
    frames = []
    while raw:
        n = int.from_bytes(raw[:4], "big")
        assert len(raw) >= 4 + n, raw
        frames.append(codec.decode(raw[4:4 + n]))
        raw = raw[4 + n:]
    return frames


def assert_one_bad_request(frames, fragments):
    assert len(frames) == 1, frames
    f = frames[0]
    assert f["t"] == "error" and f["exit"] == 2, f
    msg = f["msg"]
    assert msg.startswith("bad request: ") and "\n" not in msg, msg
    for frag in fragments:
        assert frag in msg, (frag, msg)
    for leak in ("KeyError", "TypeError", "ValueError", "ProgrammingError", "Traceback"):
        assert leak not in msg, msg


def test_every_command_has_a_schema_and_a_row_here(tmp_path):
    from hypersdk.node.daemon.daemon import ARGS, COMMANDS, Daemon
    from hypersdk.node.net.identity import Identity
    Daemon(tmp_path / "d", Identity.generate())     # registers store and network ops
    assert set(COMMANDS) == set(ARGS) == set(VALID)
    for cmd, (args, required) in VALID.items():     # the CLI's names, and only those
        assert set(ARGS[cmd]) == set(args), cmd
        assert {n for n, a in ARGS[cmd].items() if a.required} == set(required), cmd
        assert {n for n, a in ARGS[cmd].items() if a.nullable} == \
            {n for c, n in NULLABLE if c == cmd}, cmd


def test_bad_arguments_get_one_clear_error_and_the_node_keeps_serving(tmp_path, nodes):
    n = nodes(Cli(tmp_path / "a"))
    sock = n.cli.data_dir / "control.sock"
    todo = cases()
    assert len(todo) > 60
    for cmd, args, fragments in todo:
        frames = exchange(sock, {"v": 1, "cmd": cmd, "args": args, "progress": False})
        assert_one_bad_request(frames, fragments)
    # unknown commands
    for doc, frag in [({"v": 1, "cmd": "rm -rf /", "args": {}}, "unknown node command `rm -rf /`"),
                      ({"v": 1, "cmd": "", "args": {}}, "unknown node command ``"),
                      ({"v": 1, "cmd": "Status"}, "unknown node command `Status`")]:
        assert_one_bad_request(exchange(sock, doc), [frag])
    # nothing ran, everything was counted, and the node still serves every command
    s = status(n.cli)
    assert s["served"] == {} and s["failed"] == {}, s
    assert s["bad_requests"] == len(todo) + 3
    assert n.cli.json("backups") == []
    assert exchange(sock, {"v": 1, "cmd": "dht find", "args": {"key": KEY}})[0]["t"] == "done"
    assert status(n.cli)["served"] == {"status": 1, "backups": 1, "dht find": 1}
    assert n.proc.poll() is None


def test_cli_shows_a_bad_request_as_one_line_with_exit_2(tmp_path, nodes):
    from test_cli import one_error_line
    n = nodes(Cli(tmp_path / "a"))
    p = n.cli("dht", "find", KEY, "--count", "0", ok=False)
    one_error_line(p, "bad request: `dht find` needs `count` (an integer 1..64), got 0")
    assert p.returncode == 2
