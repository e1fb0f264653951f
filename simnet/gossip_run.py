"""Audit gossip on simnet: N real nodes (DhtService + AuditLog + AuditGossip, the
production classes; the audit log in memory) on one SimNetwork, virtual time.

    hypersdk simnet gossip [--nodes 1000] [--latency 0.05] [--seed 1] [--json]

Phases (all virtual time, under MockClock(autojump_threshold=0)):
1. Build and join: every node bootstraps its DHT through node 0; the gossip
   neighbours are drawn from each node's routing table, as in the daemon.
2. Spread: `entries` entries, each appended by a random node at its own time
   (spaced `spacing` s apart); for every (entry, node) the time it was stored
   is recorded. Reported: the distribution of per-node arrival delays and of
   per-entry "reached every node" times, and gossip bytes per entry per node
   (all gossip traffic of the phase, both directions, divided by entries x nodes).
3. Partition and heal: the nodes are split into two halves that cannot reach
   each other; `partition_entries` entries are appended on each side; after
   `partition_time` the network heals and the run measures how long until every
   node holds every entry of both sides (checked every 0.25 s, bounded), and
   that every node's heads digest is the same (no entry lost).

Deterministic from the seed: node keys, the scheduler and every rng derive from it.
"""
from __future__ import annotations

import random
import statistics
import time
from dataclasses import asdict, dataclass

import trio
import trio.testing

from hypersdk.dht.contact import Contact
from hypersdk.node.audit.gossip import FANOUT, AuditGossip
from hypersdk.node.audit.log import AuditLog
from hypersdk.node.kademlia.service import DhtService
from hypersdk.node.net.identity import Identity
from hypersdk.protocol.audit_gossip import digests
from hypersdk.simnet.network import NetworkModel
from hypersdk.simnet.transport import SimNetwork, seed_scheduler

T0_NS = 1_790_000_000 * 10**9           # the simulated epoch (Sept 2026)
M = bytes(range(32))


@dataclass
class GossipConfig:
    nodes: int = 1000
    latency: float = 0.05               # one-way link delay, s
    seed: int = 1
    entries: int = 20
    spacing: float = 2.0                # s between the spread phase's entries
    fanout: int = FANOUT
    sync_interval: float = 5.0
    partition_entries: int = 10         # per side
    partition_time: float = 30.0
    heal_limit: float = 300.0           # give up waiting for convergence after this


def _pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None


def _dist(xs) -> dict:
    return {"min": min(xs), "median": statistics.median(xs), "p90": _pct(xs, 0.9),
            "p99": _pct(xs, 0.99), "max": max(xs), "n": len(xs)} if xs else {}


class _Node:
    def __init__(self, i, ident, transport, dht, log, gossip):
        self.i, self.ident, self.transport = i, ident, transport
        self.dht, self.log, self.gossip = dht, log, gossip


async def _run(cfg: GossipConfig) -> dict:
    root = random.Random(cfg.seed)
    model = NetworkModel({("r", "r"): 2 * cfg.latency}, rng=random.Random(root.getrandbits(64)))
    net = SimNetwork(model)
    arrivals: dict[bytes, dict[int, float]] = {}
    nodes: list[_Node] = []

    def clock_ns():
        return T0_NS + int(trio.current_time() * 1e9)

    async with trio.open_nursery() as nursery:
        await nursery.start(net.run)
        for i in range(cfg.nodes):
            ident = Identity.from_private_bytes(root.randbytes(32))
            addr = f"/ip4/10.{i >> 8 & 255}.{i & 255}.1/tcp/4001"
            model.set_region(addr, "r")
            t = net.add_node(ident.node_id, addr)
            dht = DhtService(t, Contact(ident.node_id, addr, f"site{i}"),
                             rng=random.Random(root.getrandbits(64)))
            log = AuditLog(None, identity=ident)

            def seen(entries, i=i):
                now = trio.current_time()
                for e in entries:
                    arrivals.setdefault(e.id, {}).setdefault(i, now)

            g = AuditGossip(t, log, lambda dht=dht: [c for b in dht.table.buckets() for c in b],
                            rng=random.Random(root.getrandbits(64)), scores=dht.scores,
                            fanout=cfg.fanout, sync_interval=cfg.sync_interval,
                            witness_interval=None, own_poll=None, threaded=False,
                            clock_ns=clock_ns, on_new=seen)
            nodes.append(_Node(i, ident, t, dht, log, g))
        wall0 = time.perf_counter()
        for n in nodes:
            await nursery.start(n.dht.run)
        seed = nodes[0].dht.own
        async with trio.open_nursery() as joins:
            for n in nodes[1:]:
                joins.start_soon(n.dht.bootstrap, [seed])
        join_wall = time.perf_counter() - wall0
        for n in nodes:
            await nursery.start(n.gossip.run)
        await trio.sleep(5.0)            # the overlay forms (neighbours chosen, Hellos sent)

        def traffic(kind="out"):
            return sum(n.gossip.counters[f"bytes {kind}"] for n in nodes)

        # -- phase 2: spread ----------------------------------------------------------
        pick = random.Random(root.getrandbits(64))
        made: list[tuple[bytes, int, float]] = []
        bytes0 = traffic()
        by0 = {k: traffic(k) for k in ("push", "sync", "get_range", "hello")}
        t_spread0 = trio.current_time()
        for k in range(cfg.entries):
            n = pick.choice(nodes)
            t0 = trio.current_time()
            e = await n.gossip.append("verify", {"manifest": M, "holder": n.ident.node_id,
                                                 "result": "ok", "summary": {"k": k}})
            arrivals.setdefault(e.id, {})[n.i] = t0
            made.append((e.id, n.i, t0))
            await trio.sleep(cfg.spacing)
        await trio.sleep(10.0)                        # let the last entries settle
        spread_bytes = traffic() - bytes0
        by = {k: traffic(k) - v for k, v in by0.items()}
        spread_secs = trio.current_time() - t_spread0
        delays, reach = [], []
        missing = 0
        for eid, author_i, t0 in made:
            got = arrivals.get(eid, {})
            missing += cfg.nodes - len(got)
            ds = [t - t0 for i, t in got.items() if i != author_i]
            delays.extend(ds)
            if len(got) == cfg.nodes:
                reach.append(max(ds) if ds else 0.0)
        spread = {"entries": cfg.entries, "per_node_delay_s": _dist(delays),
                  "reached_all_s": _dist(reach),
                  "entries_reaching_all": len(reach), "missing_deliveries": missing,
                  "bytes_per_entry_per_node": round(spread_bytes / (cfg.entries * cfg.nodes), 1),
                  # the push path alone (Push + Ack, both directions) ...
                  "push_bytes_per_entry_per_node": round(by["push"] / (cfg.entries * cfg.nodes),
                                                         1),
                  # ... and the background cost: anti-entropy and Hello renewals
                  "background_bytes_per_node_per_s": round(
                      (by["sync"] + by["get_range"] + by["hello"]) / (cfg.nodes * spread_secs), 1)}

        # -- phase 3: partition and heal ------------------------------------------------
        order = list(range(cfg.nodes))
        pick.shuffle(order)
        half = [set(order[:cfg.nodes // 2]), set(order[cfg.nodes // 2:])]
        model.partition([[nodes[i].transport.addr for i in side] for side in half])
        side_entries: list[bytes] = []
        for _ in range(cfg.partition_entries):
            for side in half:
                n = nodes[pick.choice(sorted(side))]
                e = await n.gossip.append("verify", {"manifest": M, "holder": n.ident.node_id,
                                                     "result": "ok", "summary": {}})
                side_entries.append(e.id)
            await trio.sleep(cfg.partition_time / cfg.partition_entries)
        heal_at = trio.current_time()
        model.heal()
        wanted = len(made) + len(side_entries)

        def held(n):
            return sum(s + 1 for s, _ in n.log.heads().values())

        converged = None
        for _ in range(int(cfg.heal_limit / 0.25)):
            if all(held(n) >= wanted for n in nodes):
                converged = trio.current_time() - heal_at
                break
            await trio.sleep(0.25)
        roots = {digests(n.log.heads())[0] for n in nodes}
        heal = {"partition_entries": len(side_entries), "converged_after_s": converged,
                "nodes_complete": sum(held(n) >= wanted for n in nodes),
                "distinct_head_digests": len(roots)}
        totals = {k: sum(n.gossip.counters[k] for n in nodes)
                  for k in ("pushes", "syncs", "entries added", "duplicates", "entries rejected",
                            "push failed", "queue overflow", "rate limited", "handler errors")}
        nursery.cancel_scope.cancel()
    for n in nodes:
        n.log.close()
    return {"config": asdict(cfg), "join_wall_s": round(join_wall, 1), "spread": spread,
            "heal": heal, "totals": totals, "handler_errors": len(net.handler_errors)}


def run_gossip(cfg: GossipConfig) -> dict:
    seed_scheduler(cfg.seed)
    wall0 = time.perf_counter()
    out = trio.run(_run, cfg, clock=trio.testing.MockClock(autojump_threshold=0))
    out["wall_s"] = round(time.perf_counter() - wall0, 1)
    return out


def summary(r: dict) -> str:
    s, h = r["spread"], r["heal"]
    d, reach = s["per_node_delay_s"], s["reached_all_s"]
    lines = [f"audit gossip on simnet: {r['config']['nodes']} nodes, "
             f"{r['config']['latency'] * 1000:.0f} ms links, fanout {r['config']['fanout']}, "
             f"sync every {r['config']['sync_interval']:g} s",
             f"spread        {s['entries']} entries; {s['entries_reaching_all']} reached every "
             f"node; {s['missing_deliveries']} deliveries missing",
             f"  per node    median {d.get('median', 0):.3f} s  p90 {d.get('p90', 0):.3f} s  "
             f"p99 {d.get('p99', 0):.3f} s  max {d.get('max', 0):.3f} s",
             f"  every node  median {reach.get('median', 0):.3f} s  max "
             f"{reach.get('max', 0):.3f} s",
             f"  bandwidth   {s['bytes_per_entry_per_node']:.0f} bytes per entry per node "
             f"(push path {s['push_bytes_per_entry_per_node']:.0f}; background "
             f"{s['background_bytes_per_node_per_s']:.0f} bytes/s per node)",
             f"partition     {h['partition_entries']} entries during the split; converged "
             f"{'after %.2f s' % h['converged_after_s'] if h['converged_after_s'] is not None else 'NOT'}"
             f"; {h['nodes_complete']} nodes complete; {h['distinct_head_digests']} distinct "
             f"head digest(s)",
             f"wall          {r['wall_s']} s (join {r['join_wall_s']} s)"]
    return "\n".join(lines)


__all__ = ["GossipConfig", "run_gossip", "summary"]
