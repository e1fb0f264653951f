"""Hostile DHT members against real nodes (issue 17, attack 4), over libp2p on 127.0.0.1.

Eight real `hypersdk node run` processes (k = 4, provider stores of 1,024
records so that a flood fills them) and two hostile members in this process,
a fifth of the network. The hostile ones run the real DhtService over a real
P2PTransport, and attack actively: they collude to eclipse lookups (every
FIND_NODE and GET_PROVIDERS is answered with the two of them closest to the
target, and no provider record), and each floods every honest node's
provider store with itself as provider of 4,096 random keys. Then the honest
nodes announce keys and look them up through the CLI: every lookup finds its
provider (>= 99% required), and the stores the flood filled still took the
genuine records (node/kademlia, dht/providers.py rules 3 and 4).
"""
from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import pytest
import trio
from conftest import Cli
from test_node_cli import (  # noqa: F401  (fixture)
    JOIN_BUDGET,
    REQUEST_BUDGET,
    budget,
    nodes,
    poll,
    status,
    wait_all_ready,
)

from hypersdk.dht.contact import Contact
from hypersdk.node.kademlia.rpc import to_info
from hypersdk.node.kademlia.service import DhtService
from hypersdk.node.net.gate import Gate
from hypersdk.node.net.identity import Identity
from hypersdk.node.net.p2p_transport import P2PTransport
from hypersdk.protocol.dht_messages import MAX_BATCH_KEYS, AddProviders

HONEST, HOSTILE, K = 8, 2, 4
STORE = 1024                  # provider records an honest node keeps (the CLI's minimum)
FLOOD = 4 * MAX_BATCH_KEYS    # keys each hostile member announces to each honest node
KEYS, FINDS, PARALLEL = 8, 24, 4


class Collusion:
    """The network-model hook node/kademlia/rpc.py reads (Responder._malicious):
    every one of us lies, with the "eclipse" strategy, naming the accomplices."""

    def __init__(self):
        self.accomplices: tuple = ()

    def is_malicious(self, addr: str) -> bool:
        return True

    def faults(self, addr: str) -> dict:
        return {"malicious": {"strategy": "eclipse", "accomplices": self.accomplices}}


class _Net:
    def __init__(self, model):
        self.model = model


@pytest.mark.slow                   # ~15 s: 8 node processes (runs in CI)
def test_lookups_succeed_with_a_fifth_of_the_members_hostile(tmp_path, nodes):
    clis = [Cli(tmp_path / f"n{i}") for i in range(HONEST)]
    opts = ("--dht-k", str(K), "--provider-records", str(STORE))
    first = nodes(clis[0], *opts)
    rest = wait_all_ready([nodes(c, *opts, "--bootstrap", first.addr, wait=False)
                           for c in clis[1:]])
    poll(lambda: all(status(n.cli)["bootstrap"]["state"] == "joined" for n in rest),
         budget(JOIN_BUDGET, len(rest)), f"{len(rest)} nodes to join", interval=0.5)
    honest = [first, *rest]
    contacts = [Contact(bytes.fromhex(status(n.cli)["node_id"]), n.addr) for n in honest]
    flooded: list[int] = []
    rng = random.Random(17)

    async def hostile():
        collusion = Collusion()
        services = []
        async with trio.open_nursery() as nursery:
            for i in range(HOSTILE):
                ident = Identity.generate()
                t = P2PTransport(ident, gate=Gate(tmp_path / f"h{i}", ident))
                await nursery.start(t.run)
                t.net = _Net(collusion)       # the hook: we lie, together
                own = Contact(ident.node_id, f"{t.listen_addrs[0]}/p2p/{ident.libp2p_peer_id}")
                svc = DhtService(t, own, rng=random.Random(i), k=K)
                await nursery.start(svc.run)
                services.append(svc)
            collusion.accomplices = tuple(to_info(s.own) for s in services)
            with trio.fail_after(budget(JOIN_BUDGET, HOSTILE)):
                for svc in services:
                    await svc.bootstrap([contacts[0]])
            with trio.fail_after(budget(REQUEST_BUDGET, HOSTILE * HONEST)):
                for svc in services:          # the flood: every honest node, 4 batches each
                    me = svc.info
                    for c in contacts:
                        for b in range(FLOOD // MAX_BATCH_KEYS):
                            keys = tuple(sorted(rng.randbytes(32) for _ in range(MAX_BATCH_KEYS)))
                            if await svc.request(c, AddProviders(b, keys, me, me)) is not None:
                                flooded.append(len(keys))
            ready.set()
            await done.wait()                 # keep lying while the honest nodes work
            nursery.cancel_scope.cancel()

    async def honest_work():
        await ready.wait()
        await trio.to_thread.run_sync(work)
        done.set()

    results: dict = {}

    def work():
        full = [status(n.cli)["dht"] for n in honest]
        results["full"] = sum(d["provider_records"] >= STORE for d in full)
        keys = [rng.randbytes(32).hex() for _ in range(KEYS)]
        owner = {k: rng.randrange(HONEST) for k in keys}
        limit = budget(REQUEST_BUDGET, PARALLEL)
        with ThreadPoolExecutor(PARALLEL) as pool:
            results["stored"] = list(pool.map(
                lambda k: honest[owner[k]].cli.json("dht", "provide", k, timeout=limit)["stored"],
                keys))
            asks = [(k, rng.choice([i for i in range(HONEST) if i != owner[k]]))
                    for k in rng.choices(keys, k=FINDS)]
            found = list(pool.map(
                lambda a: honest[a[1]].cli.json("dht", "find", a[0], timeout=limit), asks))
        ids = [status(n.cli)["node_id"] for n in honest]
        results["ok"] = sum(ids[owner[k]] in {p["node_id"] for p in f["providers"]}
                            for (k, _), f in zip(asks, found))
        results["dht"] = [status(n.cli)["dht"] for n in honest]

    ready, done = trio.Event(), trio.Event()

    async def main():
        async with trio.open_nursery() as n:
            n.start_soon(hostile)
            n.start_soon(honest_work)

    trio.run(main)
    assert sum(flooded) == HOSTILE * HONEST * FLOOD          # every flood batch was answered
    assert results["full"] >= HONEST // 2                     # the flood filled the stores
    assert all(s >= 1 for s in results["stored"])
    print(f"\nfound {results['ok']}/{FINDS}; stored on {results['stored']}; "
          f"stores full {results['full']}/{HONEST}; refused "
          f"{sum(d['provider_records_refused'] for d in results['dht'])}")
    assert results["ok"] >= 0.99 * FINDS, results
    assert sum(d["provider_records_refused"] for d in results["dht"]) > 0
    assert all(d["provider_records"] <= STORE for d in results["dht"])
