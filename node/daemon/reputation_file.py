"""The node's peer reputation on disk: data_dir/reputation.json (node/net/reputation.py
rule 6). Loaded when the daemon starts, saved every SAVE_EVERY seconds when it
changed and when the daemon stops, atomically (write_atomic: a crash leaves the
old file or the new one). A file that is not a reputation document is set aside
as reputation.json.bad with a warning, and the node starts with no scores: it
loses memory of old offenders, never its ability to start."""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import trio

from hypersdk.node import runtime
from hypersdk.node.files import write_atomic
from hypersdk.node.net.reputation import PeerScores

log = logging.getLogger(__name__)
FILE = "reputation.json"
SAVE_EVERY = 30.0            # seconds between saves of a changed reputation
MAX_BYTES = 4 << 20          # a larger file is not ours (4,096 peers are ~500 KB)


def load(data_dir: Path) -> PeerScores:
    path = Path(data_dir) / FILE
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        return PeerScores()
    except OSError as exc:
        log.warning("cannot read %s (%s): starting with no peer scores", path, exc)
        return PeerScores()
    try:
        if len(raw) > MAX_BYTES:
            raise ValueError(f"larger than {MAX_BYTES} bytes")
        return PeerScores.from_doc(json.loads(raw), trio.current_time(), time.time())
    except (ValueError, UnicodeDecodeError) as exc:
        log.warning("%s is not a reputation file (%s): set aside as %s.bad; starting with "
                    "no peer scores", path, exc, FILE)
        try:
            os.replace(path, path.with_name(FILE + ".bad"))
        except OSError:
            pass
        return PeerScores()


def save(data_dir: Path, scores: PeerScores) -> None:
    doc = scores.to_doc(trio.current_time(), time.time())
    write_atomic(Path(data_dir) / FILE, json.dumps(doc, sort_keys=True).encode())


async def keep_saved(data_dir: Path, scores: PeerScores) -> None:
    """Save every SAVE_EVERY seconds when changed; and once more when cancelled."""
    try:
        while True:
            await trio.sleep(SAVE_EVERY)
            if scores.changed:
                await runtime.run_sync(save, data_dir, scores)
    finally:
        with trio.CancelScope(shield=True):
            try:
                save(data_dir, scores)
            except OSError as exc:
                log.warning("cannot save the peer scores: %s", exc)


def status(scores: PeerScores) -> dict:
    now = trio.current_time()
    return {"tracked": len(scores), "bans": scores.bans,
            "banned": sorted(p.hex() for p in scores.banned_peers(now)),
            "offences": dict(sorted(scores.offences.items()))}
