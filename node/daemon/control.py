"""The node's control socket: how `hypersdk` commands talk to a running node.

Where: DATA/control.sock, a Unix stream socket, mode 0600 (bound in a fresh
0700 directory, chmod'ed, then renamed into place, so it is never reachable
by others). Only the data dir's owner can talk to the node; there is no
other authentication.

Framing: every message is a frame, a 4-byte big-endian length followed by one
canonical msgpack map (protocol/codec.py). Requests are at most MAX_REQUEST
bytes, replies at most MAX_REPLY; a bigger length prefix is refused before
its body is read.

One request per connection (no pipelining): it keeps the server a plain
"read one frame, answer, close" loop and lets a client's disconnect mean
exactly "cancel my request".

    client -> node   {"v": 1, "cmd": "backup", "args": {...}, "progress": bool}
    node -> client   zero or more events, then exactly one final frame:
      {"t": "bar",  "total": int, "label": str}   a progress bar starts
      {"t": "adv",  "n": int}                     it advanced by n (coalesced, ~10/s)
      {"t": "end"}                                it is done
      {"t": "wait", "msg": str}                   waiting for a lock (one stderr line)
      {"t": "done", "exit": int, "doc": bytes, "text": bytes|nil}   final: the JSON
                   document (UTF-8 JSON text, as JSON floats are not canonical
                   msgpack) and the human text the command prints, and its exit code
      {"t": "error", "exit": int, "msg": str}     final: the one-line error and exit code

Arguments. Every command declares its arguments once, as a map of name ->
Arg (type, required or default, allowed values): node/daemon/daemon.py ARGS. The
node checks a request against it before running anything and refuses, with
one error frame of exit code 2 and nothing run, an unknown command, a
missing or unknown argument, or a value of the wrong type or out of range:

      {"t": "error", "exit": 2, "msg": "bad request: `restore` needs `ref` (text: ...)"}

The client keeps its side open until the final frame; if it goes away (EOF)
the node cancels the request (a store op stops at its next progress step and
cleans up as an interrupted local run would). The command names are those of
node/daemon/daemon.py COMMANDS (store ops use the CLI names: "backup", "store stats").

This module is the client side and the frame helpers shared with the server;
it imports no trio so that the CLI stays quick to start. (The CLI's
run_store_op, node/cli/app.py, draws a store op's progress from these frames.)
"""
from __future__ import annotations

import errno
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from hypersdk.node.errors import UserError
from hypersdk.protocol import codec
from hypersdk.protocol.errors import RemoteProtocolError

VERSION = 1
HEADER = 4
MAX_REQUEST = 64 << 10          # requests are small: a command name and its arguments
                                # (paths, tokens); 128 silent connections hold <= 8 MiB
MAX_REPLY = codec.MAX_DOC       # a reply carries e.g. a `backups --json` listing
SOCKET_NAME = "control.sock"
CONNECT_TIMEOUT = 5.0


class NodeError(UserError):
    """The node answered a request with an error (message and exit code as given)."""

    def __init__(self, msg: str, exit_code: int = 1):
        super().__init__(msg)
        self.exit_code = exit_code


class NoNode(UserError):
    """No node runs on this data dir."""


def socket_path(data_dir) -> Path:
    return Path(data_dir) / SOCKET_NAME


def frame(doc) -> bytes:
    payload = codec.encode(doc)
    return len(payload).to_bytes(HEADER, "big") + payload


def frame_length(header: bytes, limit: int) -> int:
    n = int.from_bytes(header, "big")
    if n > limit:
        raise RemoteProtocolError(f"frame of {n} bytes exceeds {limit}")
    return n


def check_request(doc) -> tuple[str, dict, bool]:
    """(cmd, args, progress) of a decoded request; RemoteProtocolError otherwise."""
    if not isinstance(doc, dict) or doc.get("v") != VERSION:
        raise RemoteProtocolError("not a version-1 control request")
    cmd, args, progress = doc.get("cmd"), doc.get("args", {}), doc.get("progress", False)
    if not isinstance(cmd, str) or not isinstance(args, dict) or not isinstance(progress, bool):
        raise RemoteProtocolError("request needs cmd (str), args (map), progress (bool)")
    if set(doc) - {"v", "cmd", "args", "progress"}:
        extra = sorted(set(doc) - {"v", "cmd", "args", "progress"})
        raise RemoteProtocolError(f"unknown request fields {extra}")
    return cmd, args, progress


# -- command arguments -----------------------------------------------------------------------

class BadRequest(RemoteProtocolError):
    """A request the node refuses before running it: an unknown command, or an
    argument that is missing, unknown, of the wrong type or out of range."""


_KINDS = {str: "text", int: "an integer", bool: "true or false"}


@dataclass(frozen=True)
class Arg:
    """One argument of a control command.

    kind      str, int or bool, exactly (true/false is not an integer here)
    required  must be given; otherwise `default` stands in for it
    nullable  nil is a value too (the command's "none", e.g. no name)
    valid     a further check of a value of the right kind (range, syntax)
    desc      what a good value is, as the error message says it"""
    kind: type
    required: bool = True
    default: Any = None
    nullable: bool = False
    valid: Callable[[Any], bool] | None = None
    desc: str | None = None

    def describe(self) -> str:
        d = self.desc or _KINDS[self.kind]
        return f"nil or {d}" if self.nullable else d


def _show(value) -> str:
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "true" if value else "false"
    r = repr(value)
    return r if len(r) <= 40 else r[:37] + "..."


def check_args(cmd: str, schema: dict[str, Arg], args: dict) -> dict:
    """The args of a `cmd` request checked against its schema, with the defaults
    of the arguments not given filled in. BadRequest names the first problem."""
    unknown = sorted((k for k in args if k not in schema), key=str)
    if unknown:
        takes = ", ".join(f"`{n}`" for n in schema)
        raise BadRequest(f"`{cmd}` takes no argument `{unknown[0]}`"
                         + (f" (it takes {takes})" if takes else " (it takes none)"))
    out = {}
    for name, arg in schema.items():
        if name not in args:
            if arg.required:
                raise BadRequest(f"`{cmd}` needs `{name}` ({arg.describe()})")
            out[name] = arg.default
            continue
        value = args[name]
        if value is None and arg.nullable:
            out[name] = None
            continue
        if type(value) is not arg.kind or (arg.valid is not None and not arg.valid(value)):
            raise BadRequest(f"`{cmd}` needs `{name}` ({arg.describe()}), got {_show(value)}")
        out[name] = value
    return out


# -- client --------------------------------------------------------------------------------

def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        got = sock.recv(min(n - len(buf), 1 << 20))
        if not got:
            raise NodeError("the node closed the control connection mid-reply "
                            "(did it stop?)")
        buf += got
    return bytes(buf)


def connect(data_dir) -> socket.socket | None:
    """A connection to the node on data_dir, or None when no node runs there
    (no socket file, or a stale one nobody listens on)."""
    path = socket_path(data_dir)
    if not os.path.exists(path):
        return None
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(CONNECT_TIMEOUT)
    try:
        s.connect(str(path))
    except OSError as exc:
        s.close()
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK):
            return None                 # a stale socket file left by a killed node
        raise NodeError(f"cannot talk to the node at {path}: {exc.strerror or exc}") from None
    return s


def call(data_dir, cmd: str, args: dict | None = None, *, progress: bool = False,
         on_event=None, timeout: float | None = 120.0, sock: socket.socket | None = None):
    """Send one request; return the final "done" frame. NoNode if no node runs,
    NodeError for an "error" frame. on_event(frame) hears every other frame.
    timeout bounds each wait for the next frame (None: wait as long as it takes)."""
    s = sock or connect(data_dir)
    if s is None:
        raise NoNode(f"no node is running on data dir {data_dir} "
                     "(start one with `hypersdk node run`)")
    with s:
        s.settimeout(timeout)
        try:
            s.sendall(frame({"v": VERSION, "cmd": cmd, "args": args or {},
                             "progress": progress}))
            while True:
                n = frame_length(_recv_exactly(s, HEADER), MAX_REPLY)
                msg = codec.decode(_recv_exactly(s, n), max_size=MAX_REPLY)
                if not isinstance(msg, dict):
                    raise RemoteProtocolError("reply is not a map")
                t = msg.get("t")
                if t == "done":
                    return msg
                if t == "error":
                    raise NodeError(str(msg.get("msg")), int(msg.get("exit", 1)))
                if on_event is not None:
                    on_event(msg)
        except socket.timeout:
            raise NodeError(f"the node did not answer `{cmd}` in time") from None
        except RemoteProtocolError as exc:
            raise NodeError(f"bad reply from the node: {exc}") from None
        except OSError as exc:
            raise NodeError(f"lost the node's control connection: {exc.strerror or exc}") from None


def call_json(data_dir, cmd: str, args: dict | None = None, **kw):
    """call() and decode the reply's JSON document."""
    return json.loads(call(data_dir, cmd, args, **kw)["doc"])
