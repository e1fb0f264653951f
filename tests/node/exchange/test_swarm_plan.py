"""SwarmPlan driven by a tiny discrete-event simulation of peers (no trio, no I/O)."""
import heapq
import math
import random
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hypersdk.node.exchange.swarm_plan import SwarmPlan, Tunables

MiB = 1 << 20


def cid(i: int) -> bytes:
    return i.to_bytes(4, "big") * 8


@dataclass
class SimPeer:
    name: str
    have: set
    rate: float = 100e6               # bytes/s
    rtt: float = 0.02
    kind: str = "honest"              # honest | corrupt | hung | liar (answers Missing)
    busy_until: float = 0.0
    leave_at: float | None = None
    hang_at: float | None = None      # from then on it answers nothing
    stall: tuple | None = None        # (start, seconds): serves nothing in between


@dataclass
class Sim:
    """Peers serve their requests in order at `rate`; answers arrive rtt later."""
    plan: SwarmPlan
    peers: dict
    now: float = 0.0
    events: list = field(default_factory=list)
    seq: int = 0
    completed: dict = field(default_factory=dict)      # chunk -> completions
    requests: list = field(default_factory=list)       # (time, peer, chunk, duplicate)
    max_copies: int = 0
    first_batches: list | None = None
    removed: dict = field(default_factory=dict)         # peer -> in flight when removed
    steps: int = 0
    gets: int = 0                                       # batches issued (one Get each)
    burst: float = 0.0          # the downloader reads arrivals every `burst` s (0: at once)
    slow_seen: set = field(default_factory=set)         # peers ever taken for slow

    def issue(self):
        before = {p: set(self.plan.in_flight(p)) for p in self.peers}
        batches = self.plan.next_requests(self.now)
        self.slow_seen |= {p for p in self.peers if p not in self.removed and self.plan.is_slow(p)}
        if self.first_batches is None:
            self.first_batches = batches
        endgame = self.plan.endgame
        self.gets += len(batches)
        for peer, ids in batches:
            sp = self.peers[peer]
            assert peer not in self.removed
            assert not self.plan.is_banned(peer)
            assert len(ids) == len(set(ids)) and set(ids).isdisjoint(before[peer])
            assert len(self.plan.in_flight(peer)) <= int(self.plan.window(peer))
            for c in ids:
                assert c in sp.have, "asked a peer that does not hold the chunk"
                others = [q for q in self.peers if q != peer and c in before[q]]
                dup = any(c in self.plan.in_flight(q) for q in self.peers if q != peer)
                if dup:   # a duplicate: endgame, or the other copies sit at slow peers
                    assert endgame or all(self.plan.is_slow(q) for q in others) or not others
                self.requests.append((self.now, peer, c, dup))
                self._serve(sp, c)
        for c in {c for _, ids in batches for c in ids}:
            n = sum(c in self.plan.in_flight(q) for q in self.peers if q not in self.removed)
            self.max_copies = max(self.max_copies, n)
        self.plan.take_cancelled()

    def _serve(self, sp: SimPeer, c: bytes):
        if sp.kind == "hung" or (sp.hang_at is not None and self.now >= sp.hang_at):
            return
        start = max(sp.busy_until, self.now + sp.rtt / 2)
        if sp.stall is not None and sp.stall[0] <= start < sp.stall[0] + sp.stall[1]:
            start = sp.stall[0] + sp.stall[1]
        sp.busy_until = start + (MiB / sp.rate if sp.kind != "liar" else 0)
        self.seq += 1
        at = sp.busy_until + sp.rtt / 2
        if self.burst:                  # seen (and stamped) at the next read
            at = math.ceil(at / self.burst - 1e-9) * self.burst
        heapq.heappush(self.events, (at, self.seq, sp.name, c))

    def run(self, max_steps: int = 200_000) -> None:
        leaves = sorted((sp.leave_at, sp.name) for sp in self.peers.values()
                        if sp.leave_at is not None)
        while not self.plan.finished:
            self.steps += 1
            assert self.steps < max_steps, "did not terminate"
            self.issue()
            t_event = self.events[0][0] if self.events else None
            t_dl = self.plan.next_deadline(self.now)
            t_leave = leaves[0][0] if leaves else None
            cands = [t for t in (t_event, t_dl, t_leave) if t is not None]
            if not cands:
                break
            t = min(cands)
            self.now = max(self.now, t)
            if t_leave is not None and t == t_leave:
                _, name = leaves.pop(0)
                inflight = set(self.plan.in_flight(name))
                lost = self.plan.remove_peer(name)
                assert set(lost) == inflight
                self.removed[name] = lost
                continue
            if t_dl is not None and t == t_dl and (t_event is None or t_dl <= t_event):
                self.plan.expire(self.now)
                if self.plan.stuck(self.now):
                    break
                continue
            _, _, name, c = heapq.heappop(self.events)
            if name in self.removed:
                continue
            kind = self.peers[name].kind
            if kind == "corrupt":
                self.plan.on_bad(name, c, self.now)
            elif kind == "liar":
                self.plan.on_missing(name, c)
            elif self.plan.on_data(name, c, MiB, self.now):
                self.completed[c] = self.completed.get(c, 0) + 1
            if self.plan.stuck(self.now) and not self.events:
                break


def make(chunks, peers, seed=1, burst=0.0, **tun) -> Sim:
    plan = SwarmPlan([cid(i) for i in range(chunks)], MiB, random.Random(seed), Tunables(**tun))
    for sp in peers:
        plan.add_peer(sp.name, sp.have)
    return Sim(plan, {sp.name: sp for sp in peers}, burst=burst)


ALL = lambda n: {cid(i) for i in range(n)}   # noqa: E731


def check_complete(sim: Sim, n: int):
    assert sim.plan.finished
    assert set(sim.completed) == ALL(n) and set(sim.completed.values()) == {1}
    assert sim.max_copies <= 3
    prog = sim.plan.progress()
    assert prog.done == prog.needed == n and prog.in_flight == prog.pending == 0


def test_all_chunks_complete_exactly_once_with_mixed_rates():
    n = 300
    peers = [SimPeer(f"p{i}", ALL(n), rate=r) for i, r in enumerate([200e6, 100e6, 50e6, 80e6])]
    sim = make(n, peers)
    sim.run()
    check_complete(sim, n)
    served = sim.plan.progress().bytes_by_peer
    assert sum(served.values()) == n * MiB
    assert served["p0"] > served["p2"]               # the fastest serves more than the slowest
    dups = [r for r in sim.requests if r[3]]
    assert len(dups) <= 2 * 4 * 32                    # endgame only, bounded by the windows


def test_a_busy_peer_is_topped_up_in_batches_not_with_a_get_per_chunk():
    n = 600

    def run(fraction):
        sim = make(n, [SimPeer(f"p{i}", ALL(n), rate=400e6) for i in range(2)],
                   refill_fraction=fraction)
        sim.run()
        check_complete(sim, n)
        return sim

    per_chunk, batched = run(0.0), run(0.25)      # 0.0: a Get as soon as a slot is free
    assert per_chunk.gets >= n // 2                # about one Get per completed chunk
    assert batched.gets * 4 <= per_chunk.gets
    assert batched.now <= per_chunk.now * 1.05     # the windows stay full enough (sim time)


def test_duplicates_only_in_endgame_and_cancelled():
    n = 100
    peers = [SimPeer(f"p{i}", ALL(n), rate=100e6) for i in range(3)]
    sim = make(n, peers)
    sim.run()
    check_complete(sim, n)
    prog = sim.plan.progress()
    assert prog.duplicate_bytes <= 2 * 3 * 32 * MiB


def test_endgame_copies_only_where_they_would_arrive_first():
    """Equal peers with deep queues: every chunk in flight is about to arrive where it
    is, so the endgame copies almost nothing (it copied whole windows before)."""
    n = 400
    sim = make(n, [SimPeer(f"p{i}", ALL(n), rate=100e6, rtt=0.001) for i in range(4)],
               target_latency=2.0)
    sim.run()
    check_complete(sim, n)
    assert max(sim.plan.window(p) for p in sim.peers) == 32        # deep queues
    assert sim.plan.progress().duplicate_bytes <= 2 * MiB


def test_endgame_copies_what_waits_at_a_slower_peer():
    """A peer at 0.3x the other's rate (not slow by rule 5) holds the tail: the idle
    fast peer copies the chunks queued there, and the download ends sooner than
    without endgame copies."""
    n = 200

    def run(**tun):
        sim = make(n, [SimPeer("fast", ALL(n), rate=200e6), SimPeer("slower", ALL(n), rate=60e6)],
                   target_latency=1.0, **tun)
        sim.run()
        check_complete(sim, n)
        assert not sim.plan.is_slow("slower")
        return sim

    with_copies, without = run(), run(max_extra_copies=0)
    assert with_copies.now < 0.95 * without.now
    # within 5% of both rates' sum (copies of chunks about to arrive elsewhere, as
    # the endgame asked for before, took it to 0.90 s, 11% over, here)
    assert with_copies.now < 1.05 * n * MiB / 260e6


def test_endgame_copies_what_a_stalled_peer_holds_before_it_expires():
    """A peer that stops answering halfway: in the endgame its overdue chunks are due
    later the longer they are overdue, so the other peer copies them long before their
    deadlines expire (min_timeout 2 s; waiting for that ended at 2.8 s here)."""
    n = 200
    sim = make(n, [SimPeer("a", ALL(n), rate=100e6),
                   SimPeer("b", ALL(n), rate=100e6, hang_at=0.5)])
    sim.run()
    check_complete(sim, n)
    assert sim.now < 1.5


def test_rarest_first_on_the_first_batch_ties_random():
    # rarity: 0..9 held by 1 peer, 10..19 by 2, 20..29 by 3
    firsts = set()
    for seed in range(8):
        peers = [SimPeer("a", ALL(30)), SimPeer("b", {cid(i) for i in range(10, 30)}),
                 SimPeer("c", {cid(i) for i in range(20, 30)})]
        sim = make(30, peers, seed=seed)
        batches = dict(sim.plan.next_requests(0.0))
        assert set(batches["a"]) <= {cid(i) for i in range(10)}
        assert set(batches["b"]) <= {cid(i) for i in range(10, 20)}
        assert set(batches["c"]) <= {cid(i) for i in range(20, 30)}
        assert all(len(b) == 4 for b in batches.values())     # the initial window
        firsts.add(batches["a"])
    assert len(firsts) > 1                                    # ties broken by the rng


def test_rarity_follows_peers_leaving():
    plan = SwarmPlan([cid(i) for i in range(4)], MiB, random.Random(3),
                     Tunables(initial_window=1))
    plan.add_peer("a", ALL(4))
    plan.add_peer("b", {cid(0), cid(1), cid(2)})
    plan.add_peer("c", {cid(0), cid(1)})
    plan.remove_peer("c")
    plan.remove_peer("b")
    plan.add_peer("b", {cid(0), cid(1), cid(2)})    # 3 is rarest (1 holder), then 2, ...
    assert dict(plan.next_requests(0.0))["a"] == (cid(3),)


def test_corrupt_peer_is_banned_after_max_bad_and_everything_completes():
    n = 120
    peers = [SimPeer("good1", ALL(n)), SimPeer("good2", ALL(n), rate=50e6),
             SimPeer("evil", ALL(n), rate=500e6, kind="corrupt")]
    sim = make(n, peers)
    sim.run()
    check_complete(sim, n)
    assert sim.plan.is_banned("evil")
    ban_time = max(t for t, p, _, _ in sim.requests if p == "evil")
    asked = [r for r in sim.requests if r[1] == "evil"]
    assert len(asked) <= 4 + 2                       # its first window, then halved
    assert sim.plan.progress().bytes_by_peer.get("evil", 0) == 0
    assert ban_time < 1.0
    sim.plan.add_peer("evil", ALL(n))                # a ban sticks
    assert sim.plan.is_banned("evil")


def test_a_peer_removed_mid_transfer_costs_only_its_in_flight_chunks():
    n = 200
    peers = [SimPeer("a", ALL(n)), SimPeer("b", ALL(n)),
             SimPeer("c", ALL(n), leave_at=0.5)]
    sim = make(n, peers)
    # run until just before c leaves, then check what removing it costs
    sim.peers["c"].leave_at = None
    while sim.now < 0.5:
        sim.issue()
        t, _, name, c = heapq.heappop(sim.events)
        sim.now = t
        if sim.plan.on_data(name, c, MiB, sim.now):
            sim.completed[c] = 1
    before = sim.plan.progress()
    inflight_c = set(sim.plan.in_flight("c"))
    elsewhere = {c for c in inflight_c if any(c in sim.plan.in_flight(q) for q in "ab")}
    assert inflight_c
    lost = sim.plan.remove_peer("c")
    sim.removed["c"] = lost
    after = sim.plan.progress()
    assert set(lost) == inflight_c
    assert after.done == before.done
    assert after.bytes_by_peer["c"] == before.bytes_by_peer["c"] > 0   # still reported
    assert after.pending == before.pending + len(inflight_c - elsewhere)
    assert after.in_flight == before.in_flight - len(inflight_c - elsewhere)
    sim.run()
    check_complete(sim, n)


def test_a_slow_peer_serves_a_small_share_and_fast_windows_grow():
    n = 400
    peers = [SimPeer(f"fast{i}", ALL(n), rate=100e6) for i in range(3)]
    peers.append(SimPeer("slow", ALL(n), rate=10e6))
    sim = make(n, peers)
    sim.run()
    check_complete(sim, n)
    served = sim.plan.progress().bytes_by_peer
    share = served["slow"] / sum(served.values())
    print(f"\nslow peer share {share:.1%}; windows "
          f"{[round(sim.plan.window(p), 1) for p in sim.peers]}")
    assert share < 0.08                               # a fair share would be 25%
    assert sim.plan.is_slow("slow")
    assert all(sim.plan.window(f"fast{i}") > 4 for i in range(3))
    # its window holds what it delivers within target_latency, as any peer's does
    assert sim.plan.window("slow") * MiB / 10e6 <= Tunables().target_latency * 1.1


@pytest.mark.parametrize("burst", [0.02, 0.05, 0.1])
def test_equal_peers_are_not_taken_for_slow_when_arrivals_come_in_bursts(burst):
    """A busy downloader reads arrivals in bursts (one receive, several chunks). Rates
    averaged per arrival swung 29-395 MB/s for 150 MB/s peers, and a peer held at one
    request while slow measured the burst period, not its capacity: 12 slow flags, bytes
    by peer 34/34/159/173 MiB. Averaged over busy time, no equal peer is ever slow."""
    n = 400
    sim = make(n, [SimPeer(f"p{i}", ALL(n), rate=150e6, rtt=0.001) for i in range(4)],
               burst=burst)
    sim.run()
    check_complete(sim, n)
    served = sim.plan.progress().bytes_by_peer
    ideal = n * MiB / 600e6
    print(f"\nburst {burst}: {sim.now:.3f} s (ideal {ideal:.3f}), MiB by peer "
          f"{sorted(v >> 20 for v in served.values())}, slow {sim.slow_seen}")
    assert not sim.slow_seen
    assert all(80 * MiB <= v <= 120 * MiB for v in served.values())
    assert sim.now <= ideal + 2 * burst + 0.1


def test_a_peer_that_stalled_once_is_measured_again_at_full_pipeline():
    """A peer stalls for 1 s (a TCP loss recovery, a busy disk) on a 50 ms RTT path and
    is taken for slow. Held at one request, its rate would measure the round trip (1 MiB
    per ~60 ms, under half the others') and it could never recover: it served 80 MiB.
    Sized by rule 2 instead, its pipeline refills and its rate is its capacity again."""
    n = 800
    peers = [SimPeer(f"p{i}", ALL(n), rate=100e6, rtt=0.05, stall=(0.5, 1.0) if i == 0 else None)
             for i in range(4)]
    sim = make(n, peers)
    sim.run()
    check_complete(sim, n)
    served = sim.plan.progress().bytes_by_peer
    print(f"\n{sim.now:.3f} s, MiB by peer {[served[p] >> 20 for p in sim.peers]}")
    assert "p0" in sim.slow_seen and not sim.plan.is_slow("p0")
    assert served["p0"] >= 110 * MiB         # ~1 s of its ~2.4 s lost: 0.6 of a fair share
    assert sim.now < 2.6                     # ideal: 2.35 s


def test_hung_peer_requests_expire_and_go_elsewhere():
    n = 60
    peers = [SimPeer("a", ALL(n)), SimPeer("hung", ALL(n), kind="hung")]
    sim = make(n, peers, initial_timeout=5.0)
    sim.run()
    check_complete(sim, n)
    assert sim.now < 60


def test_a_peer_answering_missing_is_no_longer_asked_for_it():
    n = 50
    peers = [SimPeer("a", ALL(n), rate=20e6), SimPeer("liar", ALL(n), kind="liar")]
    sim = make(n, peers)
    sim.run()
    check_complete(sim, n)
    asked = [c for _, p, c, _ in sim.requests if p == "liar"]
    assert len(asked) == len(set(asked))             # each asked at most once


def test_an_unavailable_chunk_is_reported_as_a_value():
    n = 20
    peers = [SimPeer("a", ALL(n) - {cid(7)}), SimPeer("b", ALL(n) - {cid(7), cid(3)})]
    sim = make(n, peers)
    sim.run()
    assert not sim.plan.finished and sim.plan.stuck(sim.now)
    assert sim.plan.unavailable() == (cid(7),)
    prog = sim.plan.progress()
    assert prog.unavailable == 1 and prog.done == n - 1
    sim.plan.update_have("b", [cid(7)])               # news: it can progress again
    assert not sim.plan.stuck(sim.now)
    assert sim.plan.next_requests(sim.now) == [("b", (cid(7),))]


def test_duplicate_needed_ids_are_dropped_and_unsolicited_data_is_not_new():
    plan = SwarmPlan([cid(1), cid(2), cid(1)], MiB, random.Random(0))
    assert plan.progress().needed == 2
    plan.add_peer("a", lambda c: True)                # a predicate works as a have set
    assert plan.on_data("a", cid(9), MiB, 0.0) is False
    assert plan.on_data("a", cid(1), MiB, 0.0) is True
    assert plan.on_data("a", cid(1), MiB, 0.0) is False
    assert dict(plan.next_requests(0.0)) == {"a": (cid(2),)}


def test_timeouts_return_all_of_a_peers_requests_and_pause_it():
    plan = SwarmPlan([cid(i) for i in range(10)], MiB, random.Random(0),
                     Tunables(initial_timeout=5.0))
    plan.add_peer("a", ALL(10))
    (peer, ids), = plan.next_requests(0.0)
    assert len(ids) == 4 and plan.next_deadline(0.0) == 5.0
    assert plan.expire(4.9) == []
    assert sorted(plan.expire(5.0)) == sorted(("a", c) for c in ids)
    assert plan.progress().pending == 10 and plan.window("a") == 1
    assert plan.next_requests(5.5) == []              # paused for 1 s
    assert len(dict(plan.next_requests(6.0))["a"]) == 1


@st.composite
def scenarios(draw):
    n = draw(st.integers(1, 40))
    n_peers = draw(st.integers(1, 6))
    peers = []
    for i in range(n_peers):
        have = {cid(j) for j in range(n) if draw(st.booleans())}
        kind = draw(st.sampled_from(["honest", "honest", "corrupt", "hung", "liar"]))
        rate = draw(st.sampled_from([5e6, 20e6, 100e6, 300e6]))
        leave = draw(st.none() | st.floats(0.0, 2.0))
        peers.append(SimPeer(f"p{i}", have, rate=rate, kind=kind, leave_at=leave))
    return n, peers, draw(st.integers(0, 2**32))


@given(scenarios())
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_terminates_and_every_chunk_with_an_honest_holder_completes(scenario):
    n, peers, seed = scenario
    sim = make(n, peers, seed=seed, initial_timeout=3.0)
    sim.run(max_steps=20 * n * len(peers) + 500)
    honest = set()
    for sp in peers:
        if sp.kind == "honest" and sp.leave_at is None:
            honest |= sp.have
    assert honest <= set(sim.completed)
    assert all(v == 1 for v in sim.completed.values())
    assert sim.max_copies <= 3
    prog = sim.plan.progress()
    assert prog.done == len(sim.completed)
    assert sim.plan.finished or set(sim.plan.unavailable()) == ALL(n) - set(sim.completed)


def test_a_peer_asked_before_anyone_was_measured_is_timed_by_the_median_rate_once_known():
    """Rule 4: requests sent while no peer has a rate get initial_timeout (30 s);
    once another peer delivers, they expire by the median rate (about min_timeout),
    so a staller asked first is noticed in seconds, not 30."""
    ids = [bytes([i]) * 32 for i in range(1, 41)]
    plan = SwarmPlan(ids, 1 << 20, random.Random(1), Tunables())
    plan.add_peer("staller", set(ids))
    plan.add_peer("honest", set(ids))
    sent = dict(plan.next_requests(0.0))
    assert sent["staller"] and plan.first_request("staller") == 0.0
    assert plan.next_deadline(0.0) == Tunables().initial_timeout
    t = 0.0
    for cid in sent["honest"]:                  # 100 MB/s from the honest peer
        t += (1 << 20) / 100e6
        plan.on_data("honest", cid, 1 << 20, t)
    assert plan.next_deadline(t) <= Tunables().min_timeout + 0.5
    expired = plan.expire(Tunables().min_timeout + 0.5)
    assert {p for p, _ in expired} == {"staller"}
