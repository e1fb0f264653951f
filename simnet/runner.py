"""Run a Scenario: N real DhtService nodes on one SimNetwork, virtual time.

Everything happens in one trio.run under MockClock(autojump_threshold=0), so
simulated hours take as long as the CPU work they contain. A run is a
function of the scenario and its seed: trio's scheduler is pinned with
seed_scheduler(seed) and every random choice (node ids, regions, faults,
churn, workload, each node's own rng, the network model's rng) is drawn from
random.Random objects derived from random.Random(seed). Nothing here
iterates a set or reads the wall clock inside the simulation.

Phases, all in virtual time:

1. Build: a NetworkModel with the default 5-region RTT matrix (regions
   assigned round-robin over [network] regions, or drawn by region_weights),
   per-node up/downlinks, jitter and loss. Node i gets the address
   /ip4/A.B.C.1/tcp/4001 with a /24 of its own and the site "site{i}": each
   simulated node stands for one edge site, so the routing table's diversity
   limits (max 2 per /24, 4 per site in a bucket; dht/routing.py) are kept
   switched on but never bind between honest nodes -- they exist against one
   operator filling a bucket, which a scenario does not model.
2. Faults: a fraction of non-bootstrap nodes is made "malicious" before the
   join (they lie from the start; node/kademlia/rpc.py strategies; "eclipse"
   liars collude, each knowing the others); "drop" and "hang" nodes fail right
   after the join. With [faults] flood_keys, every malicious node also floods
   FLOOD_TARGETS peers of its table with provider records for random keys at a
   random time in the workload's first half (the metrics' "flood").
3. Join: the bootstrap nodes join one after the other; then every other node
   bootstraps through all of them, joins starting spread uniformly over
   [network] join_window, all concurrently.
4. Workload over `duration`: each key is provided by a random honest live
   node at a uniform random time in the first half; each lookup
   (find_providers, count=1) runs from a random honest live node at a uniform
   random time in the second half, for a random key whose provide finished.
   A lookup succeeds when the key's provider is among the providers found
   (under churn the provider may have left since: owner_left counts those;
   its record lives on until its ttl, as in any Kademlia).
   Churn, if configured, runs during the whole workload: a Poisson process
   (simnet/churn.py) replaces replace_per_hour * nodes nodes per hour; a
   newcomer bootstraps through 3 random live nodes. A lookup whose requester
   left during it is recorded with requester_left and left out of the
   success rate (its count is reported).
5. Reprovide cost: one random honest live node provides [workload]
   reprovide_keys fresh keys at once with DhtService.provide_many, the
   keyspace sweep its republish loop runs every 22 h (node/kademlia/republish.py:
   a few FIND_NODE walks + about one AddProviders per peer, not a walk and k
   ADD_PROVIDERs per key); every request it causes is counted, and for 50
   sampled keys the runner counts how many of the k closest honest live
   nodes hold the record (the truth, from the nodes' own stores).

Messages: every request is one stream (node/kademlia/rpc.py) or, on the fast
path runs use (simnet/transport.py, "Fast requests"), one rpc, so
CountingNetwork.connect and .rpc count requests. A contextvar names the operation
a task works for; trio copies it into the tasks a task starts, so the
requests of a lookup's parallel queries (and the pings its replies trigger)
are charged to that lookup. What no operation claims is background upkeep
(bucket refresh, pings).
"""
from __future__ import annotations

import contextvars
import random
import resource
import statistics
import time
from dataclasses import dataclass, field

import trio
import trio.testing

from hypersdk.dht.contact import Contact
from hypersdk.dht.keys import node_id
from hypersdk.dht.providers import ProviderStore
from hypersdk.node.kademlia.rpc import to_info
from hypersdk.node.kademlia.service import DhtService
from hypersdk.protocol.dht_messages import MAX_BATCH_KEYS, AddProviders
from hypersdk.simnet.churn import churn
from hypersdk.simnet.network import NetworkModel
from hypersdk.simnet.scenario import Scenario
from hypersdk.simnet.transport import SimNetwork, seed_scheduler

FLOOD_TARGETS = 20            # peers each flooding node floods ([faults] flood_keys)
_op: contextvars.ContextVar[list | None] = contextvars.ContextVar("simnet_op", default=None)


class CountingNetwork(SimNetwork):
    """A SimNetwork that counts opened streams (= requests), in total and for
    the operation named by the caller's context."""

    def __init__(self, model, *, fast_rpc: bool = True):
        super().__init__(model, fast_rpc=fast_rpc)
        self.requests = 0
        self.attributed = 0

    def _count(self) -> None:
        self.requests += 1
        box = _op.get()
        if box is not None:
            box[0] += 1
            self.attributed += 1

    async def connect(self, src, peer_id, addr, protocol):
        self._count()
        return await super().connect(src, peer_id, addr, protocol)

    async def rpc(self, src, peer_id, addr, protocol, data, timeout=None):
        self._count()
        return await super().rpc(src, peer_id, addr, protocol, data, timeout)


@dataclass
class RunResult:
    metrics: dict
    wall_seconds: float
    peak_rss_bytes: int


@dataclass
class _Node:
    svc: DhtService
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


def _address(i: int) -> str:
    return f"/ip4/{10 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}.1/tcp/4001"


class _Sim:
    def __init__(self, sc: Scenario, progress=None):
        self.sc = sc
        self.progress = progress or (lambda msg: None)
        self.wall0 = time.perf_counter()
        root = random.Random(sc.seed)
        self.rng_ids = random.Random(root.getrandbits(64))
        self.rng_nodes = random.Random(root.getrandbits(64))
        self.rng_regions = random.Random(root.getrandbits(64))
        self.rng_faults = random.Random(root.getrandbits(64))
        self.rng_work = random.Random(root.getrandbits(64))
        self.rng_churn = random.Random(root.getrandbits(64))
        n = sc.network
        mbps = lambda v: v * 1e6 / 8 if v > 0 else None
        self.model = NetworkModel(rng=random.Random(root.getrandbits(64)),
                                  jitter=n.jitter_ms / 1000, loss=n.loss,
                                  uplink=mbps(n.uplink_mbps), downlink=mbps(n.downlink_mbps))
        self.net = CountingNetwork(self.model)
        self.live: dict[str, _Node] = {}        # insertion order: deterministic
        self.bad: dict[str, str] = {}           # addr -> fault kind
        self.next_index = 0
        self.nursery: trio.Nursery | None = None
        self.churn_events = 0

    # -- nodes ----------------------------------------------------------------------------
    def _region(self, i: int) -> str:
        n = self.sc.network
        if n.region_weights:
            names, weights = zip(*n.region_weights)
            return self.rng_regions.choices(names, weights)[0]
        return n.regions[i % len(n.regions)]

    async def spawn(self, seeds: list[Contact] | None = None) -> _Node:
        i, self.next_index = self.next_index, self.next_index + 1
        c = Contact(node_id(self.rng_ids.randbytes(32)), _address(i), f"site{i}")
        self.model.set_region(c.addr, self._region(i))
        d = self.sc.dht
        store = ProviderStore(max_records=d.provider_capacity) if d.provider_capacity else None
        svc = DhtService(self.net.add_node(c.id, c.addr), c,
                         rng=random.Random(self.rng_nodes.getrandbits(64)), k=d.k,
                         alpha=d.alpha, request_timeout=d.request_timeout,
                         disjoint_paths=d.disjoint_paths, providers=store)
        node = self.live[c.addr] = _Node(svc)
        await self.nursery.start(self._node_task, node, seeds)
        return node

    async def _node_task(self, node: _Node, seeds, task_status=trio.TASK_STATUS_IGNORED):
        with node.scope:
            async with trio.open_nursery() as n:
                await n.start(node.svc.run)
                task_status.started()
                if seeds:
                    n.start_soon(node.svc.bootstrap, seeds)

    def retire(self, addr: str) -> None:
        node = self.live.pop(addr, None)
        if node is not None:
            node.scope.cancel()
        self.bad.pop(addr, None)
        self.churn_events += 1

    async def spawn_churned(self) -> None:
        seeds = [n.svc.own for n in self.rng_churn.sample(list(self.live.values()),
                                                           min(3, len(self.live)))]
        await self.spawn(seeds)

    def honest(self) -> list[_Node]:
        return [n for a, n in self.live.items() if a not in self.bad]

    # -- phases ---------------------------------------------------------------------------
    async def run(self) -> dict:
        sc, net = self.sc, self.net
        async with trio.open_nursery() as root:
            await root.start(net.run)
            self.nursery = root
            nodes = [await self.spawn() for _ in range(sc.network.nodes)]
            boot, rest = nodes[:sc.network.bootstrap_nodes], nodes[sc.network.bootstrap_nodes:]
            self._set_faults(rest, ("malicious",))
            t0 = trio.current_time()
            for i, node in enumerate(boot[1:], 1):
                await node.svc.bootstrap([b.svc.own for b in boot[:i]])
            seeds = [b.svc.own for b in boot]

            async def join_one(node: _Node, at: float):
                await trio.sleep_until(at)
                await node.svc.bootstrap(seeds)

            async with trio.open_nursery() as joins:
                for node in rest:
                    joins.start_soon(join_one, node,
                                     t0 + self.rng_work.uniform(0, sc.network.join_window))
            join_seconds = trio.current_time() - t0
            join_requests = net.requests
            self._say(f"{len(nodes)} nodes joined in {join_seconds:.0f} s simulated, "
                      f"{join_requests} requests")
            sizes = sorted(len(n.svc.table) for n in nodes)
            self._set_faults(rest, ("drop", "hang"))
            workload = await self._workload()
            root.cancel_scope.cancel()
        return {
            "nodes": sc.network.nodes,
            "join": {"seconds": join_seconds, "requests": join_requests,
                     "requests_per_node": join_requests / len(nodes),
                     "table_size": {"min": sizes[0], "median": statistics.median(sizes),
                                    "max": sizes[-1]}},
            **workload,
            "faulty_nodes": {kind: sum(1 for v in self.bad.values() if v == kind)
                             for kind in ("malicious", "drop", "hang")},
            "churn_replacements": self.churn_events,
            "handler_errors": len(net.handler_errors),
            "service_handler_errors": sum(n.svc.counters["handler errors"]
                                          for n in self.live.values()),
            "requests_total": net.requests,
        }

    def _set_faults(self, candidates: list[_Node], kinds) -> None:
        f, n = self.sc.faults, self.sc.network.nodes
        free = [c for c in candidates if c.svc.own.addr not in self.bad]
        for kind in kinds:
            count = min(len(free), int(round(n * getattr(f, kind))))
            chosen = self.rng_faults.sample(free, count)
            picked = {id(c) for c in chosen}
            free = [c for c in free if id(c) not in picked]
            params = {}
            if kind == "malicious":
                params = {"strategy": f.malicious_strategy}
                if f.malicious_strategy == "eclipse":     # the liars know each other
                    params["accomplices"] = tuple(to_info(c.svc.own) for c in chosen)
            for c in chosen:
                addr = c.svc.own.addr
                self.model.set_fault(addr, kind, **params)
                self.bad[addr] = kind

    async def _workload(self) -> dict:
        sc, net, rng = self.sc, self.net, self.rng_work
        w, duration = sc.workload, sc.duration
        t0 = trio.current_time()
        base_requests, base_attr = net.requests, net.attributed
        keys = [rng.randbytes(32) for _ in range(w.provides)]
        provide_at = sorted(rng.uniform(0, duration / 2) for _ in keys)
        lookup_at = sorted(duration / 2 + rng.uniform(0, duration / 2) for _ in range(w.lookups))
        owners: dict[bytes, _Node] = {}
        done: list[bytes] = []                  # keys whose provide finished, in order
        provides: list[dict] = []
        lookups: list[dict] = []

        async def provide(key: bytes, at: float):
            await trio.sleep_until(t0 + at)
            node = rng.choice(self.honest())
            owners[key] = node
            box = [0]
            _op.set(box)
            start = trio.current_time()
            stored = await node.svc.provide(key)
            provides.append({"t": start - t0, "latency": trio.current_time() - start,
                             "stored": stored, "requests": box[0]})
            done.append(key)

        async def lookup(at: float):
            await trio.sleep_until(t0 + at)
            key = rng.choice(done or keys) if keys else rng.randbytes(32)
            owner = owners.get(key)
            node = rng.choice([n for n in self.honest() if n is not owner] or self.honest())
            box = [0]
            _op.set(box)
            start = trio.current_time()
            found, stats = await node.svc.find_providers(key)
            lookups.append({"t": start - t0, "latency": trio.current_time() - start,
                            "hops": stats.hops, "queries": stats.queries,
                            "failures": stats.failures, "requests": box[0],
                            "ok": owner is not None and owner.svc.own in found,
                            "requester_left": node.svc.own.addr not in self.live,
                            "owner_left": owner is not None
                            and owner.svc.own.addr not in self.live})

        flood = {"messages": 0, "keys": 0}
        async with trio.open_nursery() as work:
            if sc.churn.replace_per_hour > 0:
                work.start_soon(self._churn, duration)
            if sc.faults.flood_keys:
                for addr in [a for a, kind in self.bad.items() if kind == "malicious"]:
                    work.start_soon(self._flood, self.live[addr],
                                    t0 + rng.uniform(0, duration / 2), flood)
            async with trio.open_nursery() as ops:
                for key, at in zip(keys, provide_at):
                    ops.start_soon(provide, key, at)
                for at in lookup_at:
                    ops.start_soon(lookup, at)
            work.cancel_scope.cancel()          # stop churn once the workload is done
        ops_end = trio.current_time() - t0
        self._say(f"workload done: {len(provides)} provides, {len(lookups)} lookups")
        workload_requests = net.requests - base_requests
        background = workload_requests - (net.attributed - base_attr)

        reprovide = await self._reprovide() if w.reprovide and w.reprovide_keys else None
        provides.sort(key=lambda r: r["t"])
        lookups.sort(key=lambda r: r["t"])
        honest = self.honest()
        return {"provides": provides, "lookups": lookups,
                "reprovide": reprovide,
                "flood": {**flood, "refused_by_honest": sum(
                    n.svc.counters["provider records refused"] for n in honest),
                    "honest_stores_full": sum(
                        len(n.svc.providers) >= n.svc.providers.max_records for n in honest)},
                "workload_seconds": ops_end,
                "background_requests": background,
                "background_requests_per_node_hour":
                    background / len(self.live) / (ops_end / 3600) if ops_end > 0 else 0.0}

    async def _reprovide(self) -> dict | None:
        """Phase 5: one random honest live node provides reprovide_keys fresh keys
        at once (DhtService.provide_many, the keyspace sweep its republish loop
        runs), every request it causes counted. Then a sample of keys is checked
        against the truth: how many of each key's k closest honest live nodes
        hold the node's provider record."""
        sc, rng = self.sc, self.rng_work
        honest = self.honest()
        if not honest:
            return None
        node = rng.choice(honest)
        keys = [rng.randbytes(32) for _ in range(sc.workload.reprovide_keys)]
        box = [0]
        token = _op.set(box)
        start = trio.current_time()
        stats = await node.svc.provide_many(keys)
        seconds = trio.current_time() - start
        _op.reset(token)
        now = trio.current_time()
        k, own = sc.dht.k, node.svc.own
        others = [n for n in honest if n is not node and n.svc.own.addr in self.live]
        held = []
        for key in rng.sample(keys, min(50, len(keys))):
            t = int.from_bytes(key, "big")
            nearest = sorted(others, key=lambda n: t ^ n.svc.own.n)[:k]
            held.append(sum(1 for n in nearest
                            if any(c.id == own.id for c in n.svc.providers.get(key, now))))
        self._say(f"reprovide: {len(keys)} keys, {box[0]} requests")
        return {"keys": len(keys), "requests": box[0],
                "requests_per_key": box[0] / len(keys),
                "lookups": stats.lookups, "lookup_queries": stats.lookup_queries,
                "batches": stats.batches, "batches_failed": stats.batches_failed,
                "unannounced": stats.unannounced, "seconds": seconds,
                "sample_held_by_k_closest": held}

    async def _flood(self, node: _Node, at: float, tally: dict) -> None:
        """An active adversary: at `at`, announce ourselves for flood_keys random
        keys (AddProviders batches, the most a message holds) to FLOOD_TARGETS
        random peers of our table, as fast as the replies come."""
        await trio.sleep_until(at)
        svc, rng = node.svc, random.Random(self.rng_faults.getrandbits(64))
        peers = svc.table.closest(rng.randbytes(32), 4 * FLOOD_TARGETS)
        me, n = svc.info, self.sc.faults.flood_keys
        for peer in rng.sample(peers, min(FLOOD_TARGETS, len(peers))):
            for start in range(0, n, MAX_BATCH_KEYS):
                keys = tuple(sorted(rng.randbytes(32) for _ in range(min(MAX_BATCH_KEYS,
                                                                          n - start))))
                await svc.request(peer, AddProviders(svc._rid(), keys, me, me))
                tally["messages"] += 1
                tally["keys"] += len(keys)

    def _say(self, msg: str) -> None:
        self.progress(f"{msg} (wall {time.perf_counter() - self.wall0:.0f} s)")

    async def _churn(self, duration: float) -> None:
        await churn(self.net, rate_per_hour=self.sc.churn.replace_per_hour * self.sc.network.nodes,
                    rng=self.rng_churn, spawn=self.spawn_churned, retire=self.retire,
                    duration=duration)


def run(sc: Scenario, progress=None) -> RunResult:
    """Run the scenario; metrics depend only on the scenario (and its seed).
    progress(msg), if given, hears about finished phases."""
    seed_scheduler(sc.seed)
    t = time.perf_counter()
    metrics = trio.run(_Sim(sc, progress).run, clock=trio.testing.MockClock(autojump_threshold=0))
    wall = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024     # Linux: KiB
    return RunResult(metrics, wall, rss)
