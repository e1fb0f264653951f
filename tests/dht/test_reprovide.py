"""dht.reprovide: the keyspace sweep that re-announces many keys with few lookups.

Two ways of answering the sweep's lookups, both pure Python and seeded:

* `oracle`: the exact k closest peers to the target (the provider excluded),
  i.e. Lookup's contract on an honest network, at no message cost. The
  Hypothesis properties use it: they test the coverage rule and the batching,
  not the lookup, on small networks of every shape.
* `real`: dht.lookup.Lookup driven to FINISHED over `Net`, N random ids each
  with a Kademlia routing table built as in tests/test_lookup.py (every peer of
  each bucket's range up to 20, sampled: the near keyspace known completely,
  the far keyspace sparsely), built lazily per node so 10,000 nodes cost only
  the tables the lookups touch. Replies arrive in virtual time with random
  latency; the sweep is charged the lookup's real `queries`. Used end to end
  on 2,000 nodes and for the efficiency figures on 10,000 nodes, where every
  lookup result is also checked against the true k closest.

"Messages" are requests (each has one reply): FIND_NODE queries + AddProviders
batches; messages/key = messages / keys.
"""
from __future__ import annotations

import bisect
import functools
import heapq
import random
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hypersdk.dht import reprovide
from hypersdk.dht.contact import Contact
from hypersdk.dht.lookup import FINISHED, WAITING, Lookup
from hypersdk.dht.reprovide import (
    MAX_BATCH_KEYS,
    Batch,
    IntervalSet,
    LookupRequest,
    Sweep,
    ball_inner,
    ball_outer,
    max_xor_upto,
)

K = 20
LATENCY = (0.01, 0.3)


def _id(x: int) -> bytes:
    return x.to_bytes(32, "big")


def _int(b: bytes) -> int:
    return int.from_bytes(b, "big")


def _contact(x: int) -> Contact:
    return Contact(_id(x), f"/ip4/10.{x >> 16 & 255}.{x >> 8 & 255}.{x & 255}/tcp/4001")


class Net:
    """N node ids; routing tables built on first use (see module docstring)."""

    def __init__(self, ids, bucket: int = 20):
        self.ids = sorted(set(ids))
        self.bucket = bucket
        self._tables: dict[int, list[int]] = {}
        self._contacts: dict[int, Contact] = {}

    @classmethod
    def random(cls, n: int, seed: int) -> "Net":
        rng = random.Random(seed)
        return cls(rng.getrandbits(256) for _ in range(n))

    def contact(self, x: int) -> Contact:
        c = self._contacts.get(x)
        if c is None:
            c = self._contacts[x] = _contact(x)
        return c

    def _range(self, prefix: int, shift: int) -> tuple[int, int]:
        return (bisect.bisect_left(self.ids, prefix << shift),
                bisect.bisect_left(self.ids, (prefix + 1) << shift))

    def table(self, x: int) -> list[int]:
        known = self._tables.get(x)
        if known is None:
            rng, known = random.Random(x), []
            for common in range(256):           # peers sharing exactly `common` top bits
                shift = 255 - common
                lo, hi = self._range((x >> shift) ^ 1, shift)
                known += (self.ids[i] for i in rng.sample(range(lo, hi), min(self.bucket, hi - lo)))
                lo, hi = self._range(x >> shift, shift)
                if hi - lo <= 1:
                    break
            self._tables[x] = known
        return known

    def closest_known(self, x: int, target: int, k: int = K) -> list[Contact]:
        near = heapq.nsmallest(k, self.table(x), key=lambda y: y ^ target)
        return [self.contact(y) for y in near]

    def true_closest(self, target: int, k: int, exclude: int) -> list[int]:
        """Brute force: the k ids closest to target, `exclude` left out."""
        return heapq.nsmallest(k, (y for y in self.ids if y != exclude), key=lambda y: y ^ target)

    def subtree_closest(self, target: int, k: int, exclude: int) -> list[int]:
        """The same, fast: the k closest lie in the smallest aligned subtree
        around target holding >= k ids (all ids in it are closer than any
        outside). Checked against true_closest below."""
        ids = [y for y in self._subtree(target, k + 1) if y != exclude]
        return heapq.nsmallest(k, ids, key=lambda y: y ^ target)

    def _subtree(self, target: int, k: int) -> list[int]:
        lo_h, hi_h = 0, 256
        while lo_h < hi_h:
            h = (lo_h + hi_h) // 2
            a, b = self._range(target >> h, h)
            lo_h, hi_h = (lo_h, h) if b - a >= k else (h + 1, hi_h)
        a, b = self._range(target >> lo_h, lo_h)
        return self.ids[a:b]


@functools.lru_cache(maxsize=None)
def net_2k() -> Net:
    return Net.random(2000, seed=2024)


@functools.lru_cache(maxsize=None)
def net_10k() -> Net:
    return Net.random(10_000, seed=10_000)


def drive(lookup: Lookup, net: Net, rng: random.Random) -> Lookup:
    """Run `lookup` to FINISHED over `net` in virtual time (every node honest)."""
    target = _int(lookup.target)
    now, seq, events = 0.0, 0, []
    for _ in range(100_000):
        step = lookup.next(now)
        if step is FINISHED:
            return lookup
        if step is WAITING:
            now = max(now, events[0][0])
            while events and events[0][0] <= now:
                _, _, peer_id, closer = heapq.heappop(events)
                lookup.on_success(peer_id, closer, now)
            continue
        seq += 1
        reply = net.closest_known(_int(step.id), target, lookup.k)
        heapq.heappush(events, (now + rng.uniform(*LATENCY), seq, step.id, reply))
    raise AssertionError("lookup did not finish")


def oracle(net: Net, me: int, k: int):
    def lookup(req: LookupRequest) -> tuple[list[Contact], int]:
        return [net.contact(y) for y in net.true_closest(_int(req.target), k, me)], 0
    return lookup


def real(net: Net, me: int, rng: random.Random, check: bool = True):
    """Real lookups, seeded as a node would: the sweep's known peers near the
    target plus the node's own routing table."""
    def lookup(req: LookupRequest) -> tuple[list[Contact], int]:
        t = _int(req.target)
        seeds = list(req.seeds) + net.closest_known(me, t, K)
        lk = drive(Lookup(req.target, seeds, own_id=_id(me), k=K), net, rng)
        if check:       # the contract the coverage rule relies on holds in this network
            assert [_int(c.id) for c in lk.result()] == net.subtree_closest(t, K, me)
        return lk.result(), lk.queries
    return lookup


def sweep_all(sweep: Sweep, lookup) -> dict[bytes, list[int]]:
    """Drive `sweep` to FINISHED; return key -> the peers it was announced to,
    checking the event invariants on the way."""
    sent: dict[bytes, list[int]] = {}
    batches = 0
    for _ in range(10_000_000):
        ev = sweep.next_event()
        if ev is FINISHED:
            break
        assert ev is not WAITING
        if isinstance(ev, LookupRequest):
            assert len(ev.seeds) <= sweep.k
            result, queries = lookup(ev)
            sweep.on_lookup(ev.target, result, queries)
        else:
            assert isinstance(ev, Batch) and 1 <= len(ev.keys) <= sweep.max_batch_keys
            batches += 1
            for key in ev.keys:
                sent.setdefault(key, []).append(_int(ev.peer.id))
    assert sweep.finished and sweep.next_event() is FINISHED
    st_ = sweep.stats
    assert st_.batches == batches
    assert st_.announcements == sum(map(len, sent.values()))
    for peers in sent.values():
        assert len(peers) == len(set(peers)) <= sweep.k      # never twice to one peer
    return sent


def random_keys(rng: random.Random, n: int) -> list[bytes]:
    return [_id(rng.getrandbits(256)) for _ in range(n)]


# -- XOR geometry ---------------------------------------------------------------------

BITS = 10
small = st.integers(0, (1 << BITS) - 1)


@given(small, small)
def test_max_xor_upto_is_the_brute_force_maximum(c, d):
    assert max_xor_upto(c, d) == max(c ^ z for z in range(d + 1))


def _points(pieces):
    return {y for lo, hi in pieces for y in range(lo, hi)}


@settings(max_examples=300)
@given(small, small, st.integers(1, 12))
def test_ball_approximations_are_on_the_safe_side(t, r, precision):
    ball = {y for y in range(1 << BITS) if t ^ y <= r}
    old = reprovide.PRECISION_BITS
    reprovide.PRECISION_BITS = precision
    try:
        inner, outer = ball_inner(t, r), ball_outer(t, r)
    finally:
        reprovide.PRECISION_BITS = old
    assert t in _points(inner) and _points(inner) <= ball <= _points(outer)
    assert all(lo < hi and (hi - lo) & (hi - lo - 1) == 0 and lo % (hi - lo) == 0
               for lo, hi in inner + outer)          # aligned subtrees
    assert len(outer) <= precision + 1
    if r < 1 << precision:                           # exact below the precision
        assert _points(inner) == ball == _points(outer)


@given(st.lists(st.tuples(small, small), max_size=12), small, small, small)
def test_interval_set_matches_a_set_of_points(adds, a, b, x):
    s, model = IntervalSet(), set()
    for lo, hi in adds:
        s.add(lo, hi)
        model |= set(range(lo, hi))
    assert all(e < s2 for e, s2 in zip(s.ends, s.starts[1:]))      # disjoint, not adjacent
    assert _points(zip(s.starts, s.ends)) == model
    lo, hi = min(a, b), max(a, b) + 1
    assert s.contains(lo, hi) == (set(range(lo, hi)) <= model)
    gaps = [y for y in range(lo, hi) if y not in model]
    assert s.first_gap(lo, hi) == (gaps[0] if gaps else None)
    g = s.nearest_gap(x, lo, hi)
    assert (g is None) == (not gaps) and (g is None or g in gaps)


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**32), st.integers(1, 300), st.integers(1, 30))
def test_subtree_oracle_matches_brute_force(seed, n, k):
    rng = random.Random(seed)
    net = Net.random(n, seed)
    for _ in range(20):
        t, me = rng.getrandbits(256), rng.choice(net.ids)
        assert net.subtree_closest(t, k, me) == net.true_closest(t, k, me)


# -- correctness: every key reaches exactly its true k closest ------------------------

def _shaped_ids(rng: random.Random, n: int, shape: str, prefixes: list[int]) -> list[int]:
    """uniform ids, or ids in a few tight clusters (long shared prefixes)."""
    if shape == "uniform":
        return [rng.getrandbits(256) for _ in range(n)]
    return [rng.choice(prefixes) ^ rng.getrandbits(rng.choice((8, 40, 120))) for _ in range(n)]


@st.composite
def scenarios(draw):
    return dict(seed=draw(st.integers(0, 2**32)), n=draw(st.integers(0, 250)),
                n_keys=draw(st.integers(0, 250)), k=draw(st.integers(1, 20)),
                shape=draw(st.sampled_from(["uniform", "clustered"])),
                me_in_net=draw(st.booleans()), batch=draw(st.sampled_from([1, 3, MAX_BATCH_KEYS])))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_property_every_key_reaches_exactly_its_k_closest(sc):
    rng = random.Random(sc["seed"])
    prefixes = [rng.getrandbits(256) for _ in range(3)]
    net = Net(_shaped_ids(rng, sc["n"], sc["shape"], prefixes))
    me = rng.choice(net.ids) if net.ids and sc["me_in_net"] else rng.getrandbits(256)
    keys = [_id(x) for x in _shaped_ids(rng, sc["n_keys"], sc["shape"], prefixes)]
    keys += [_id(x) for x in rng.sample(net.ids, min(5, len(net.ids)))]   # keys equal to node ids
    keys += keys[:3]                                                       # duplicates
    sweep = Sweep(keys, own_id=_id(me), k=sc["k"], max_batch_keys=sc["batch"])
    sent = sweep_all(sweep, oracle(net, me, sc["k"]))
    assert sweep.stats.lookups <= 2 * len(set(keys))
    others = [x for x in net.ids if x != me]
    assert sweep.stats.keys == len(set(keys))
    if not others:                                   # nobody to tell: counted, nothing sent
        assert not sent and sweep.stats.unannounced == len(set(keys))
        return
    assert sweep.stats.unannounced == 0
    assert set(sent) == set(keys)
    for key, peers in sent.items():
        assert sorted(peers) == sorted(net.true_closest(_int(key), sc["k"], me)), key.hex()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32), st.integers(0, 60), st.integers(1, 6))
def test_property_any_lookup_results_terminate(seed, n_keys, k):
    """Results that break the lookup contract (random peers, empty, our own id,
    repeats) can make announcements wrong but never hang the sweep."""
    rng = random.Random(seed)
    me = rng.getrandbits(256)
    pool = [rng.getrandbits(256) for _ in range(30)] + [me]

    def liar(req):
        if rng.random() < 0.05:
            return [], 0
        return [_contact(rng.choice(pool)) for _ in range(rng.randrange(0, 2 * k))], 3

    sweep = Sweep(random_keys(rng, n_keys), own_id=_id(me), k=k)
    sent = sweep_all(sweep, liar)
    s = sweep.stats
    assert s.lookups <= 2 * n_keys
    assert len(sent) + s.unannounced == n_keys
    assert all(me not in peers for peers in sent.values())


# -- plain cases ------------------------------------------------------------------------

def test_no_keys_no_messages():
    sweep = Sweep([], own_id=_id(1))
    assert sweep.next_event() is FINISHED and sweep.stats.messages_per_key == 0.0


def test_nobody_reachable_leaves_keys_unannounced():
    keys = random_keys(random.Random(1), 50)
    sweep = Sweep(keys, own_id=_id(1))
    ev = sweep.next_event()
    sweep.on_lookup(ev.target, [], queries=20)
    assert sweep.next_event() is FINISHED
    assert sweep.stats.unannounced == 50 and sweep.stats.batches == 0
    assert sweep.stats.lookups == 1 and sweep.stats.lookup_queries == 20


def test_network_smaller_than_k_gets_every_key():
    net = Net.random(6, seed=3)
    me = net.ids[0]
    keys = random_keys(random.Random(3), 100)
    sweep = Sweep(keys, own_id=_id(me))
    sent = sweep_all(sweep, oracle(net, me, K))
    assert sweep.stats.lookups == 1                      # a short result is the whole network
    assert sweep.stats.batches == 5 and all(sorted(p) == net.ids[1:] for p in sent.values())
    assert sweep.network_size() == 6


def test_batches_are_bounded_and_split():
    net = Net.random(300, seed=4)
    me = net.ids[0]
    keys = random_keys(random.Random(4), 3000)
    sweep = Sweep(keys, own_id=_id(me), max_batch_keys=64)
    sent = sweep_all(sweep, oracle(net, me, K))          # asserts <= 64 keys per batch
    assert len(sent) == 3000 and sweep.stats.batches > 3000 * K // 64


def test_a_batch_fits_one_frame():
    from hypersdk.protocol.framing import MAX_FRAME
    peer_info = 34 + 259 + 66 + 40          # id, addr, site, field names (msgpack)
    assert MAX_BATCH_KEYS * 34 + 2 * peer_info + 64 <= MAX_FRAME * 0.6


def test_misuse_is_refused():
    with pytest.raises(ValueError):
        Sweep([b"short"], own_id=_id(1))
    with pytest.raises(ValueError):
        Sweep([], own_id=b"x")
    with pytest.raises(ValueError):
        Sweep([], own_id=_id(1), k=0)
    sweep = Sweep([_id(5)], own_id=_id(1))
    with pytest.raises(ValueError):
        sweep.on_lookup(_id(5), [])                      # nothing was asked
    ev = sweep.next_event()
    assert isinstance(ev, LookupRequest) and ev.target == _id(5) and ev.seeds == ()
    assert sweep.next_event() is WAITING
    with pytest.raises(ValueError):
        sweep.on_lookup(_id(6), [])                      # not the target asked for


# -- end to end with the real Lookup ----------------------------------------------------

def test_real_lookups_end_to_end_on_2000_nodes():
    net, rng = net_2k(), random.Random(7)
    me = rng.choice(net.ids)
    keys = random_keys(rng, 2500) + [_id(x) for x in rng.sample(net.ids, 20)]
    sweep = Sweep(keys, own_id=_id(me))
    sent = sweep_all(sweep, real(net, me, rng))
    for key in keys:                                     # brute force, every key
        assert sorted(sent[key]) == sorted(net.true_closest(_int(key), K, me))
    s = sweep.stats
    print(f"\n2,000 nodes, {len(keys)} keys, real lookups: {s.lookups} lookups, "
          f"{s.lookup_queries} queries, {s.batches} batches, {s.messages_per_key:.2f} messages/key")
    assert s.lookups < len(keys) / 10 and s.messages_per_key < 3


def _measure(n_keys: int, seed: int = 1):
    net, rng = net_10k(), random.Random(seed)
    me = rng.choice(net.ids)
    keys = random_keys(rng, n_keys)
    t0 = time.perf_counter()
    sweep = Sweep(keys, own_id=_id(me))
    sent = sweep_all(sweep, real(net, me, rng))
    elapsed = time.perf_counter() - t0
    for key in keys:                                     # exact, every key (fast oracle)
        assert sorted(sent[key]) == sorted(net.subtree_closest(_int(key), K, me))
    for key in rng.sample(keys, min(50, n_keys)):        # and brute force on a sample
        assert sorted(sent[key]) == sorted(net.true_closest(_int(key), K, me))
    s = sweep.stats
    print(f"\n10,000 nodes, {n_keys:,} keys: {s.lookups} lookups ({s.lookup_queries} queries, "
          f"{s.lookup_queries / max(1, s.lookups):.1f}/lookup), {s.batches} batches, "
          f"{s.messages_per_key:.3f} messages/key, size estimate {sweep.network_size():,.0f}, "
          f"sweep {elapsed:.1f} s")
    return sweep


def test_few_keys_cost_about_one_lookup_each():
    sweep = _measure(10)
    s = sweep.stats
    # measured: 10 lookups, 25.0 queries each, 200 batches: 45 messages/key,
    # what announcing the keys one by one costs
    assert s.lookups <= 12 and s.batches <= 10 * K and s.messages_per_key < 60
    assert abs(sweep.network_size() / 10_000 - 1) < 0.25     # from 10 lookups (measured -6%)


@pytest.mark.parametrize("n_keys, bound", [
    (1_000, 30),        # measured 23.8: sparse (0.1 key per node), ~0.6 lookups per key
    (10_000, 4),        # measured 2.83: 760 lookups complete the keyspace, 1 batch per node
    (100_000, 2),       # the target (measured 0.283): same lookups and batches, 10x the keys
])
def test_messages_per_key_on_10000_nodes(n_keys, bound):
    sweep = _measure(n_keys)
    s = sweep.stats
    assert s.messages_per_key <= bound
    if n_keys >= 10_000:                                      # lookups set by the network
        assert s.lookups <= 1_000 and s.batches < 10_000 * 1.05
        assert abs(sweep.network_size() / 10_000 - 1) < 0.05   # the estimator (measured +1%)
