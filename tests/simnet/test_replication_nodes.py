"""Replication on simnet with whole nodes (simnet/replication_nodes.py): the daemon's
own services (node/daemon/daemon.py start_services) on SimNetwork and virtual time.
The scenario places copies by itself, loses a whole site, repairs, and restores the
lost site's backups byte for byte; the membership handshake is the real Gate's."""
from __future__ import annotations

import random

import pytest
import trio
import trio.testing

from hypersdk.node import runtime
from hypersdk.node.net.identity import Identity
from hypersdk.node.net.transport import TransportError
from hypersdk.protocol.exchange import PROTOCOL_ID as EXCHANGE
from hypersdk.simnet.node_host import SimNode, World
from hypersdk.simnet.replication_nodes import T0_NS, Config, _addr, enroll_all, run_nodes
from hypersdk.simnet.transport import SimNetwork


def _check(r: dict, cfg: Config) -> None:
    loss_h = cfg.site_loss_h
    before = [s for s in r["samples"] if 0.3 < s["hour"] < loss_h]
    after = [s for s in r["samples"] if s["hour"] > loss_h]
    assert r["backups"] == cfg.nodes and r["backups_lost"] == 0
    # placed without any command: every backup at its count before the loss
    assert before and all(s["under_replicated"] == 0 for s in before)
    # the loss hit copies, they were repaired, and stayed repaired
    assert r["lost_copies"] > 0
    assert any(s["under_replicated"] > 0 for s in after)
    assert r["back_at_count_after_site_loss_hours"] is not None
    assert after[-1]["under_replicated"] == 0 and after[-1]["min_copies"] >= cfg.replicas
    # the lost site's own backups restore byte-identical on nodes that held no copy
    lost_authors = sum(1 for i in range(cfg.nodes) if i % cfg.sites == 0)
    assert r["restored_identical"] == lost_authors and r["restore_failed"] == 0, r["errors"]


def test_a_site_loss_is_repaired_by_the_nodes_own_code(tmp_path):
    cfg = Config(nodes=8, sites=4, hours=5, site_loss_h=1, churn=0.0, grace_h=1.5,
                 health_min=30, image_kib=256, seed=4)
    r = run_nodes(cfg, root=tmp_path)
    _check(r, cfg)
    # with no churn, repair pulls each lost copy once (chunks plus the manifest)
    assert r["lost_bytes"] <= r["repair_bytes"] <= 1.1 * r["lost_bytes"]


@pytest.mark.slow
def test_churn_and_a_site_loss_lose_nothing(tmp_path):
    cfg = Config(nodes=16, sites=4, hours=10, site_loss_h=2, churn=1.0, max_down_h=4,
                 grace_h=2, health_min=30, image_kib=256, seed=5)
    r = run_nodes(cfg, root=tmp_path)
    assert r["restarts"] > 0                        # nodes came back on their data dirs
    _check(r, cfg)


def test_a_stranger_cannot_reach_the_members(tmp_path):
    """SimHost runs the real membership handshake: a node outside the network is
    refused before any stream, and no handler of a member sees it."""
    rng = random.Random(1)
    idents = [Identity.from_private_bytes(rng.randbytes(32)) for _ in range(3)]
    enroll_all(tmp_path, idents[:2], sites=2)                # node 2 is not enrolled
    clock = trio.testing.MockClock(autojump_threshold=0)
    served = []

    async def main():
        with runtime.simulated(clock, T0_NS):
            world = World(SimNetwork(fast_rpc=True))
            async with trio.open_nursery() as n:
                await n.start(world.net.run)
                nodes = []
                for i, ident in enumerate(idents):
                    node = SimNode(world, tmp_path / f"n{i}", ident, _addr(i, ident),
                                   replicas=0, rng=random.Random(i))
                    nodes.append(await n.start(node.run))
                member, other, stranger = nodes
                orig = member.replication.server.handle

                async def spy(stream, peer_id):
                    served.append(peer_id)
                    await orig(stream, peer_id)
                member.net.set_handler(EXCHANGE, spy)
                assert await other.transport.connect(member.addr) == member.identity.node_id
                with pytest.raises(TransportError, match="refused"):
                    await stranger.transport.connect(member.addr)
                with pytest.raises(TransportError, match="refused"):
                    await stranger.net.open_stream(member.identity.node_id, member.addr,
                                                   EXCHANGE)
                assert not member.gate.is_member(stranger.identity.node_id)
                assert member.gate.counters["refused"] >= 2
                s = await other.net.open_stream(member.identity.node_id, member.addr, EXCHANGE)
                await s.aclose()
                await trio.sleep(1)
                n.cancel_scope.cancel()
    trio.run(main, clock=clock)
    assert served == [idents[1].node_id]


def test_the_cli_runs_whole_nodes_and_writes_the_report(tmp_path):
    from conftest import Cli
    out = tmp_path / "rep"
    doc = Cli(tmp_path / "data").json("simnet", "replication-nodes", "--nodes", "6", "--sites",
                                      "3", "--hours", "2", "--site-loss-hour", "1",
                                      "--replicas", "1", "--out", out)
    assert doc["backups"] == 6 and doc["backups_lost"] == 0 and doc["restore_failed"] == 0
    assert doc["restored_identical"] == 2
    assert {p.name for p in out.iterdir()} == {"replication-nodes.json",
                                               "repair_traffic_per_hour.png",
                                               "under_replicated.png"}


async def _until(cond, hours: float, step: float = 60.0) -> None:
    """Poll cond every `step` virtual seconds, at most `hours` of virtual time."""
    for _ in range(int(hours * 3600 / step)):
        if cond():
            return
        await trio.sleep(step)
    raise AssertionError(f"not within {hours} h of virtual time")


def _flip_packs(data_dir) -> None:
    for p in sorted((data_dir / "packs").glob("pack-*.dat")):
        data = bytearray(p.read_bytes())
        for at in range(64, len(data), 4096):
            data[at] ^= 0x5A
        p.write_bytes(data)


def test_a_nearer_holder_that_only_claims_its_copy_cannot_hold_repair_back(tmp_path):
    """The author goes away; the holder nearest the manifest id still says "held" (its
    catalog row stands) but its chunks rotted. The other holder checks it by
    possession proof, not by its word: it coordinates, loses the liar, and places
    a new copy on a third site."""
    from hypersdk.node.audit.log import AuditLog
    from hypersdk.node.replicas.placement import distance
    from hypersdk.node.replicas.state import ReplicaState
    from hypersdk.simnet.replication_nodes import Sim, simulate
    cfg = Config(nodes=6, sites=6, replicas=2, grace_h=1, health_min=20, churn=0.0,
                 image_kib=256, seed=7)

    async def body(sim: Sim):
        async with trio.open_nursery() as n:
            await sim.boot(n)
            mid = await sim.backup(0)

            def holders():
                return sorted(i for i, got in sim.held().items() if mid in got and i != 0)
            await _until(lambda: len(holders()) == 2, hours=1)
            liar, honest = sorted(holders(), key=lambda i: distance(sim.idents[i].node_id, mid))

            def known(i):        # the author's backup and both replica entries, by gossip
                with AuditLog(sim.root / f"n{i}") as log:
                    return (log.sole_author(mid) is not None
                            and len(set(log.replica_holders(mid))) == 2)
            await _until(lambda: known(liar) and known(honest), hours=1)
            _flip_packs(sim.root / f"n{liar}")
            assert (await sim.nodes[liar].replicas._status(mid))[0] == "held"   # its word
            sim.stop(0)                                       # the author is away
            await _until(lambda: len(set(holders()) - {liar, honest}) >= 1, hours=4)
            keeper = sim.nodes[honest].replicas
            assert mid in keeper.takeover.coordinating
            rows = {h.holder: h for h in await keeper._db(ReplicaState.holders, mid)}
            row = rows[sim.idents[liar].node_id]
            assert row.state == "lost" and row.reason.startswith("failed a possession"), row
            n.cancel_scope.cancel()
    simulate(cfg, tmp_path, body)
