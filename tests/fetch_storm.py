"""A kill storm: a node fetching a backup is killed (-9) again and again mid-transfer,
restarted each time, and finally completes the fetch. Shared by
tests/test_fetch_kills.py (asserts) and bench/bench_fetch_kills.py (prints).

    r = kill_storm(workdir, start, size=256 << 20, kills=10, rate="40M")

start(cli, *node_args, env=...) -> a started, ready test_node_cli.Node (the `nodes`
fixture, or bench's own). A (the server) backs up an image of `size` random bytes
(1 MiB chunks: every chunk distinct and incompressible, so each crosses the wire as
is: the bytes a fetch needs are the image's bytes) and serves at most `rate` bytes/s
(HYPERSDK_TEST_SERVE_RATE, a test-only cap: the transfer takes size/rate seconds
however fast the machine is, so every kill lands mid-transfer). E joins A and runs
`hypersdk fetch`; kill i comes once E holds (i+1)/(kills+1) of the chunks, read
from E's `status` transfers (chunks held before this attempt + done_chunks of this
attempt; polled over the control socket, bounded in time). After each kill E is
restarted on its data dir (it rejoins A from peers.json) and fetches again.

What crossed the wire: A's byte counter for E (`peers` bytes_out: every byte A
wrote to E's connections, libp2p streams and the fast channel, DHT and gossip
traffic included), read after the final fetch. A never restarts, so the counter
covers the whole storm; it counts the chunks E received and lost with each kill
as well as those A had written when E died.

Lost per kill (chunks): what E last reported holding before the kill minus what
it holds when the next attempt starts (a lower bound: E may have received a few
more chunks after its last report).
"""
from __future__ import annotations

import random
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from conftest import HYPERSDK, Cli, cli_env, same_bytes

CS = 1 << 20
STEP_LIMIT = 120.0            # seconds any one wait of the storm may take
POLL = 0.01                   # seconds between status polls


class StormError(AssertionError):
    pass


@dataclass
class StormResult:
    needed: int                          # bytes the fetch needs (the image's bytes)
    sent: int                            # bytes A sent to E over the whole storm
    kills: int
    seconds: float
    held_at_kill: list = field(default_factory=list)    # chunks E reported before each kill
    held_at_start: list = field(default_factory=list)   # chunks E held as each attempt began
    identical: bool = False
    final: dict = field(default_factory=dict)           # the completing fetch's document

    @property
    def ratio(self) -> float:
        return self.sent / self.needed

    @property
    def lost_chunks(self) -> list:
        """Chunks each kill cost (lower bounds; see the module docstring)."""
        return [k - s for k, s in zip(self.held_at_kill, self.held_at_start[1:])]

    def summary(self) -> str:
        mib = 1 << 20
        return (f"needed {self.needed} bytes ({self.needed / mib:.1f} MiB), sent "
                f"{self.sent} bytes ({self.sent / mib:.1f} MiB), ratio {self.ratio:.3f} "
                f"over {self.kills} kills in {self.seconds:.1f} s; chunks held at each "
                f"kill {self.held_at_kill}, at each start {self.held_at_start}, lost per "
                f"kill {self.lost_chunks}")


def _wait(cond, what: str, limit: float = STEP_LIMIT, interval: float = POLL):
    deadline = time.monotonic() + limit
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise StormError(f"timed out after {limit} s waiting for {what}")
        time.sleep(interval)


def _random_image(path: Path, size: int, seed: int) -> Path:
    rng = random.Random(seed)
    with open(path, "wb") as f:
        for off in range(0, size, CS):
            f.write(rng.randbytes(min(CS, size - off)))
    return path


def _status(data_dir: Path) -> dict | None:
    from hypersdk.node.daemon.control import NodeError, call_json
    try:
        return call_json(data_dir, "status", timeout=10)
    except NodeError:
        return None


def kill_storm(work: Path, start, *, size: int = 256 << 20, kills: int = 10,
               rate: str = "40M", seed: int = 14) -> StormResult:
    t0 = time.monotonic()
    img = _random_image(work / "img", size, seed)
    a = start(Cli(work / "a"), env={"HYPERSDK_TEST_SERVE_RATE": rate})
    mid = a.cli.json("backup", img, "--chunk-size", str(CS))["manifest"]
    total = -(-size // CS)
    e_cli = Cli(work / "e")
    e = start(e_cli, "--bootstrap", a.addr)
    e_id = e_cli.json("status")["node_id"]
    res = StormResult(needed=size, sent=0, kills=kills, seconds=0.0)

    def providers():
        return e_cli.json("dht", "find", mid)["providers"]

    for i in range(kills):
        _wait(providers, "A's provider record")
        p = subprocess.Popen([str(HYPERSDK), "fetch", mid, "--json"],
                             env=cli_env(e_cli.data_dir), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        target = (i + 1) * total // (kills + 1)
        seen = {}

        def reached():
            if p.poll() is not None:
                out, err = p.communicate()
                raise StormError(f"fetch attempt {i + 1} ended before kill {i + 1} "
                                 f"(exit {p.returncode}): {out[-300:]} {err[-300:]}")
            s = _status(e_cli.data_dir)
            t = s and s["transfers"]
            if not t or t[0]["phase"] != "chunks" or not t[0]["needed_chunks"]:
                return False
            held = total - t[0]["needed_chunks"] + t[0]["done_chunks"]
            if "start" not in seen:
                seen["start"] = total - t[0]["needed_chunks"]
            seen["held"] = held
            return held >= target

        _wait(reached, f"{target} of {total} chunks held before kill {i + 1}")
        e.proc.send_signal(signal.SIGKILL)
        e.proc.communicate(timeout=60)
        p.communicate(timeout=60)
        if p.returncode == 0:
            raise StormError(f"fetch attempt {i + 1} completed although its node was killed")
        res.held_at_start.append(seen["start"])
        res.held_at_kill.append(seen["held"])
        (e_cli.data_dir / "node.addrs").unlink(missing_ok=True)   # left by the killed node
        e = start(e_cli)                                # rejoins A from peers.json

    _wait(providers, "A's provider record")
    final = e_cli.json("fetch", mid, timeout=STEP_LIMIT)
    if final["already_held"]:
        raise StormError("the fetch completed before the storm ended")
    # (chunks_fetched counts the hash-list piece too when the kills lost it)
    res.held_at_start.append(max(0, total - final["chunks_fetched"]))
    res.final = final

    def sent():
        row = [x for x in a.cli.json("peers") if x["node_id"] == e_id]
        return row and row[0]["bytes_out"]
    res.sent = _wait(sent, "A's byte counter for E", interval=0.2)
    out = work / "out"
    from hypersdk.node.daemon.control import call  # what `hypersdk restore MID OUT` asks E
    call(e_cli.data_dir, "restore", {"ref": mid, "out": str(out)}, timeout=STEP_LIMIT)
    res.identical = same_bytes(img, out)
    res.seconds = time.monotonic() - t0
    return res
