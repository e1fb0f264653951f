"""Streams that never read (issue 17, attack 1) against a real `hypersdk node run`.

Four attacker identities (real P2PTransports in this process) open 250 chunk-exchange
streams each to the victim, send one Get for 64 of its chunks on every stream and
never read. Before the serve budget the victim went from 136 MB to 4.9 GB RSS. Now:
it refuses streams past 8 per peer at once, holds at most its budget of chunk bytes
(the default: 256 MiB in all, 16 MiB and 8 streams a peer), its RSS stays under 400 MB, an honest
node fetches the whole backup from it during the attack, and once the attackers
leave it holds no bytes and no streams for them. Every wait is bounded.
"""
from __future__ import annotations

import trio
from conftest import Cli, random_image, same_bytes
from test_node_cli import nodes, poll, status  # noqa: F401  (fixture)

from hypersdk.node.net.gate import Gate
from hypersdk.node.net.identity import Identity
from hypersdk.node.net.p2p_transport import P2PTransport
from hypersdk.node.store import catalog
from hypersdk.node.store.store import ChunkStore
from hypersdk.protocol.chunks import ZERO_ID
from hypersdk.protocol.exchange import PROTOCOL_ID, Get
from hypersdk.protocol.exchange_framing import encode_message

MiB = 1 << 20
IDENTITIES, STREAMS, IDS = 4, 250, 64
RSS_LIMIT = 400 * MiB


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


async def test_streams_that_never_read_cannot_exhaust_the_victim(tmp_path, nodes):
    img = random_image(tmp_path / "img", 96 * MiB, seed=17)      # incompressible
    v = nodes(Cli(tmp_path / "v"))                 # the default budget: 256 MiB, 32 MiB a peer
    mid = v.cli.json("backup", img, "--name", "vm")["manifest"]
    with ChunkStore(tmp_path / "v", readonly=True) as s:
        m = catalog.load_manifest(s, bytes.fromhex(mid))
        ids = [c for _, c in catalog.iter_chunk_ids(s, m) if c != ZERO_ID][:IDS]
    assert len(ids) == IDS
    base = rss(v.proc.pid)
    vid = bytes.fromhex(v.cli.json("status")["node_id"])
    peak = [base]
    held: list = []
    errors: list = []

    async def watch(done: trio.Event):
        while not done.is_set():                     # bounded by the test's fail_after
            peak[0] = max(peak[0], rss(v.proc.pid))
            await trio.sleep(0.05)                   # the sampling pace, not a wait

    async def attacker(t: P2PTransport):
        for i in range(STREAMS):
            try:
                s = await t.open_stream(vid, v.addr, PROTOCOL_ID)
                await s.send_all(encode_message(Get(i, tuple(ids))))
                held.append(s)                        # never read
            except Exception as exc:                  # refused streams: expected
                errors.append(repr(exc))

    async with trio.open_nursery() as n:
        done = trio.Event()
        n.start_soon(watch, done)
        attackers = []
        for i in range(IDENTITIES):                  # the victim is in no network: open
            ident = Identity.generate()
            attackers.append(P2PTransport(ident, gate=Gate(tmp_path / f"x{i}", ident)))
        for t in attackers:
            await n.start(t.run)
        with trio.fail_after(120):
            async with trio.open_nursery() as a:
                for t in attackers:
                    a.start_soon(attacker, t)
            # an honest node fetches the whole backup from the victim meanwhile
            h = nodes(Cli(tmp_path / "h"), "--bootstrap", v.addr)
            doc = await trio.to_thread.run_sync(lambda: h.cli.json("fetch", mid))
            assert doc["bad_chunks"] == 0
            h.cli("restore", mid, tmp_path / "out.img")
            assert same_bytes(img, tmp_path / "out.img")
            st = await trio.to_thread.run_sync(lambda: v.cli.json("status"))
        serving = st["serving"]
        assert len(held) == IDENTITIES * STREAMS, errors[:3]   # every stream opened
        # 8 a peer at a time: most are refused at once (a few more get in where a
        # stream the node gave up on, its yamux send timing out, freed a slot)
        assert serving["streams refused: per peer"] >= IDENTITIES * STREAMS // 2
        assert serving["streams"] <= IDENTITIES * 8 + 1
        assert serving["high_water"] <= 256 * MiB
        assert peak[0] <= RSS_LIMIT, f"victim RSS peaked at {peak[0] / MiB:.0f} MiB"
        # the attackers leave: nothing stays held for them
        for s in held:
            with trio.move_on_after(1):
                try:
                    await s.reset()
                except Exception:
                    pass
        n.cancel_scope.cancel()                      # their transports stop: connections go
    poll(lambda: status(v.cli)["serving"]["bytes_held"] == 0
         and status(v.cli)["serving"]["streams"] == 0, 60, "the victim to free the attackers' "
         "streams and bytes", interval=0.2)
    # and gives memory back (malloc_trim once nothing is held): what glibc can release
    # depends on what else lives in its arenas, so the bound is loose (+160 MiB; the
    # flood without the budget held 1.4 GiB)
    poll(lambda: status(v.cli)["serving"]["memory_trims"] >= 1, 60, "a malloc_trim",
         interval=0.5)
    after = rss(v.proc.pid)
    assert after <= base + 160 * MiB, (base // MiB, peak[0] // MiB, after // MiB)
