"""Saved peers: the addresses a node rejoins through when it restarts.

DATA/peers.json = {"version": 1, "peers": ["/ip4/../tcp/../p2p/12D3KooW...", ...]}
in the order they were added (oldest first), at most MAX_PEERS (the oldest
are dropped). Written atomically (temp file, fsync, rename, fsync of the
directory) so a crash leaves the old list or the new one. A missing file is
an empty list; an unreadable or malformed one is reported (UserError) rather
than silently forgotten, as it is the only way back into the network.
"""
from __future__ import annotations

import json
from pathlib import Path

from hypersdk.node.errors import UserError
from hypersdk.node.files import write_atomic

FILE_NAME = "peers.json"
MAX_PEERS = 256
MAX_FILE = 1 << 20


class SavedPeers:
    def __init__(self, data_dir):
        self.path = Path(data_dir) / FILE_NAME

    def load(self) -> list[str]:
        try:
            with open(self.path, "rb") as f:
                raw = f.read(MAX_FILE + 1)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise UserError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        try:
            if len(raw) > MAX_FILE:
                raise ValueError("file too large")
            doc = json.loads(raw)
            peers = doc["peers"]
            if doc.get("version") != 1 or not all(isinstance(p, str) for p in peers):
                raise ValueError("unexpected layout")
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{self.path} is malformed ({exc}); fix or delete it") from None
        return list(peers)

    def add(self, addr: str) -> bool:
        """Remember addr (moved to the end if known); True if the file changed."""
        peers = self.load()
        if peers and peers[-1] == addr:
            return False
        peers = [p for p in peers if p != addr] + [addr]
        self.save(peers[-MAX_PEERS:])
        return True

    def save(self, peers: list[str]) -> None:
        write_atomic(self.path, json.dumps({"version": 1, "peers": list(peers)},
                                           indent=1).encode())
