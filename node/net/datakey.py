"""The tenant data key: what encryption at rest derives every key and chunk id from.

DATA/network/data.key (0600): 32 random bytes (protocol/sealing.py DataKey). A node
has one when it created a network (`network create` makes it), joined with an
invitation that shared it (the sites of one tenant share it, so they deduplicate
and restore each other's backups), or imported it (`hypersdk key import FILE`).
A node without it stores and serves what it is given but cannot read it.

Losing the key loses every backup sealed with it: `hypersdk key export FILE` writes
it in a text form meant for offline custody (a password manager, paper, a safe):

    hypersdk data key v1
    fingerprint <64 hex>          (BLAKE3 of a derived subkey: safe to show)
    key <64 hex>

`key import FILE` reads that form back (the fingerprint line must match the key:
a damaged copy is refused, not installed). The key never appears in argv or logs;
only its fingerprint is printed.
"""
from __future__ import annotations

import os
from pathlib import Path

from hypersdk.node.errors import UserError
from hypersdk.node.files import private_dir, write_atomic
from hypersdk.protocol.errors import RemoteProtocolError
from hypersdk.protocol.sealing import DataKey

FILE = "data.key"
HEADER = "hypersdk data key v1"
MAX_EXPORT = 4096


def path(data_dir) -> Path:
    return Path(data_dir) / "network" / FILE


def load(data_dir) -> DataKey | None:
    """This node's data key, or None when it has none."""
    p = path(data_dir)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise UserError(f"cannot read the data key {p}: {exc.strerror or exc}") from None
    try:
        return DataKey.from_bytes(raw)
    except RemoteProtocolError:
        raise UserError(f"{p} is damaged (not a 32-byte key): restore it with "
                        "`hypersdk key import FILE` from your exported copy") from None


def _install(data_dir, key: DataKey) -> DataKey:
    have = load(data_dir)
    if have is not None:
        if have == key:
            return have
        raise UserError(f"this node already has another data key ({have.fingerprint.hex()[:16]}); "
                        "it cannot hold two")
    private_dir(path(data_dir).parent)
    write_atomic(path(data_dir), key.secret)
    return key


def create(data_dir) -> DataKey:
    """A new random data key for this node (refused if it has one)."""
    if load(data_dir) is not None:
        raise UserError("this node already has a data key")
    return _install(data_dir, DataKey.generate(os.urandom(32)))


def install(data_dir, secret: bytes) -> DataKey:
    """Keep a data key received from the network (a join that shares it)."""
    try:
        key = DataKey.from_bytes(secret)
    except RemoteProtocolError as exc:
        raise UserError(f"the data key received is not valid: {exc}") from None
    return _install(data_dir, key)


def export_text(key: DataKey) -> str:
    return (f"{HEADER}\nfingerprint {key.fingerprint.hex()}\nkey {key.secret.hex()}\n")


def export(data_dir, out) -> DataKey:
    """Write the key to `out` (a new file, mode 0600)."""
    key = load(data_dir)
    if key is None:
        raise UserError("this node has no data key (create or join a network first)")
    if os.path.lexists(out):
        raise UserError(f"{out} exists: give a new file")
    write_atomic(Path(out), export_text(key).encode())
    return key


def parse_export(text: str) -> DataKey:
    """The key of an exported file's text; UserError naming what is wrong."""
    lines = [ln.strip() for ln in text.strip().splitlines()]
    if len(lines) != 3 or lines[0] != HEADER:
        raise UserError(f"not an exported data key (it must start with {HEADER!r} and have "
                        "3 lines)")
    fields = dict(ln.split(" ", 1) for ln in lines[1:] if " " in ln)
    try:
        key = DataKey.from_bytes(bytes.fromhex(fields.get("key", "")))
        fp = bytes.fromhex(fields.get("fingerprint", ""))
    except (ValueError, RemoteProtocolError):
        raise UserError("the exported data key is damaged (bad hex or length)") from None
    if key.fingerprint != fp:
        raise UserError("the exported data key is damaged (its fingerprint does not match)")
    return key


def import_(data_dir, src) -> DataKey:
    try:
        with open(src, "rb") as f:
            data = f.read(MAX_EXPORT + 1)
    except OSError as exc:
        raise UserError(f"cannot read {src}: {exc.strerror or exc}") from None
    if len(data) > MAX_EXPORT:
        raise UserError(f"{src} is not an exported data key (too large)")
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise UserError(f"{src} is not an exported data key (not text)") from None
    return _install(data_dir, parse_export(text))
