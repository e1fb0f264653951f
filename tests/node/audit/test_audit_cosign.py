"""Issue 18, finding 7 (withholding): nodes cosign the heads they hold at a regular
interval, an unchanged head too (protocol/audit.py's cosigning rule), so a
certificate of an idle log stays fresh and an old one can be told from it."""
from __future__ import annotations

import trio
from test_audit_gossip import T0, Net

from hypersdk.node.audit.log import AuditLog
from hypersdk.node.net.identity import Identity
from hypersdk.protocol import audit

S = 10**9
A = Identity.from_private_bytes(b"a" * 32)           # the author
H = Identity.from_private_bytes(b"h" * 32)           # the node holding and cosigning
M = bytes(range(32))


def backup_body(name="vm"):
    return {"manifest": M, "name": name, "size": 1, "chunks": 1, "source": {}}


def verify_body(k):
    return {"manifest": M, "holder": bytes(32), "result": "ok", "summary": {"k": k}}


def entries(ident, n, t, start=0, prev=None, kind="verify"):
    out = []
    for s in range(start, start + n):
        e = audit.make_entry(ident, s, prev, t + s,
                             kind, backup_body() if kind == "backup" else verify_body(s))
        out.append(e)
        prev = e.id
    return out


def named(w):
    return {a: (s, i) for a, s, i in audit.witness_heads(w)} if w is not None else {}


def test_an_unchanged_head_is_cosigned_again_once_our_cosign_is_older_than_the_refresh():
    R = 3600 * S
    lg = AuditLog(None, identity=H)
    log_a = entries(A, 2, T0, kind="backup")
    lg.add_foreign([e.raw for e in log_a], now_ns=T0)
    head = (1, log_a[1].id)
    first = lg.witness(T0 + S, refresh_ns=R)
    assert named(first) == {A.public_key: head}
    # unchanged and cosigned less than R ago: nothing to cosign
    assert lg.witness(T0 + R, refresh_ns=R) is None and not lg.cosign_due(T0 + R, R)
    # without a refresh (the rule before finding 7) an unchanged head is never cosigned again
    assert lg.witness(T0 + 10 * R, refresh_ns=None) is None
    # our cosign is R old: the same head, cosigned again
    assert lg.cosign_due(T0 + R + S, R)
    again = lg.witness(T0 + R + S, refresh_ns=R)
    assert named(again) == {A.public_key: head} and again.time == T0 + R + S
    assert [w.seq for w in lg.witnesses_of(A.public_key, 0)] == [first.seq, again.seq]
    assert not lg.cosign_due(T0 + R + 2 * S, R)


def test_the_refresh_is_fair_under_authors_flooding_entries_dated_ahead():
    """64 authors gain an entry (dated 9 min ahead) before every witness round: with
    the idle author's head due for a refresh there are 65 candidates for 64 places;
    the idle author, cosigned longest ago, is never the one left out."""
    R = 3600 * S
    lg = AuditLog(None, identity=H)
    log_a = entries(A, 1, T0, kind="backup")
    lg.add_foreign([log_a[0].raw], now_ns=T0)
    assert named(lg.witness(T0 + S, refresh_ns=R)) == {A.public_key: (0, log_a[0].id)}
    floods = [Identity.from_private_bytes(bytes([i + 1]) * 32) for i in range(64)]
    prev: dict = {}
    ahead = 9 * 60 * S
    rounds = []
    for k in range(10):                         # a round every 10 min, 100 min in all
        now = T0 + (k + 1) * 600 * S
        for f in floods:
            e = audit.make_entry(f, k, prev.get(f), now + ahead, "verify", verify_body(k))
            prev[f] = e.id
            assert lg.add_foreign([e.raw], now_ns=now).added == 1
        rounds.append((now, named(lg.witness(now, refresh_ns=R))))
    assert all(len(heads) == audit.MAX_WITNESS_HEADS for _, heads in rounds)
    # the idle head is cosigned again in the first round after our cosign (T0 + 1 s) is
    # R old, and not before ...
    assert [now for now, heads in rounds if A.public_key in heads] == [T0 + 4200 * S]
    # ... and no flooder was left out twice in a row
    for f in floods:
        missed = [k for k, (_, heads) in enumerate(rounds) if f.public_key not in heads]
        assert all(b - a > 1 for a, b in zip(missed, missed[1:]))


def test_the_newest_cosign_of_each_witness_is_chosen_for_a_certificate():
    R = 3600 * S
    lg = AuditLog(None, identity=H)
    log_a = entries(A, 1, T0, kind="backup")
    ws = [AuditLog(None, identity=Identity.from_private_bytes(bytes([0x70 + i]) * 32))
          for i in range(3)]
    for w in ws:
        w.add_foreign([log_a[0].raw], now_ns=T0)
        w.witness(T0 + 600 * S, refresh_ns=R)                 # all three: seq 0 at 10 min
    log_a += entries(A, 1, T0 + 1200 * S, start=1, prev=log_a[0].id)
    assert ws[0].add_foreign([log_a[1].raw], now_ns=T0 + 1800 * S).added == 1
    ws[0].witness(T0 + 1800 * S, refresh_ns=R)                # w0: seq 1 at 30 min
    ws[1].witness(T0 + 5400 * S, refresh_ns=R)                # w1: seq 0 again at 90 min
    ws[0].witness(T0 + 6000 * S, refresh_ns=R)                # w0: seq 1 again at 100 min
    later = T0 + 7200 * S
    assert lg.add_foreign([e.raw for e in log_a], now_ns=later).added == 2
    for w in ws:
        raws = w.raw_range(w.own_author, 0, 100)
        assert lg.add_foreign(raws, now_ns=later).added == len(raws)
    ids = {e.seq: e.id for e in log_a}
    got = lg.newest_cosigns(A.public_key, ids)
    assert [(w.author, w.time) for w in got] == [
        (ws[0].own_author, T0 + 6000 * S), (ws[1].own_author, T0 + 5400 * S),
        (ws[2].own_author, T0 + 600 * S)]
    assert len(lg.witnesses_of(A.public_key, 0)) == 6          # what was exported before
    rep = audit.check_certificate(audit.build_certificate(M, log_a, got))
    assert rep.as_of == T0 + 6000 * S and rep.witnessed_seq == 1
    # a chain exported up to seq 0: w0's cosigns of seq 1 name a head past it and are
    # left out, its older cosign of seq 0 stands in
    got0 = lg.newest_cosigns(A.public_key, {0: log_a[0].id})
    assert (got0[0].author, got0[0].time) == (ws[1].own_author, T0 + 5400 * S)
    assert {(w.author, w.time) for w in got0[1:]} == {
        (ws[0].own_author, T0 + 600 * S), (ws[2].own_author, T0 + 600 * S)}
    audit.check_certificate(audit.build_certificate(M, log_a[:1], got0))
    assert len(lg.newest_cosigns(A.public_key, ids, limit=2)) == 2


async def until(cond, limit):
    """Poll cond once per virtual second (witnesses_of decodes entries: a 50 ms poll
    over hundreds of virtual seconds would cost real minutes)."""
    with trio.fail_after(limit):
        while not cond():
            await trio.sleep(1.0)


async def quiet(net):
    await net.until(lambda: all(not any(g._queues.values()) and not g._senders
                                for g in net.nodes), "gossip queues empty")


async def test_an_idle_authors_head_is_cosigned_at_every_refresh_without_a_cascade(
        nursery, autojump_clock):
    """The author appends a backup entry and stays idle (it does not even witness:
    its head never changes). Every other node cosigns that head again at every
    refresh, so the newest cosign, and with it a certificate's as_of, advances;
    and in the idle network each node appends one witness entry per refresh, not
    one per witness tick (witness entries are no news by themselves)."""
    R, I = 120.0, 30.0
    net = await Net(nursery, 3, sync_interval=5.0, witness_interval=I,
                    cosign_refresh=R).start()
    witnesses = list(net.nodes)
    author = await net.add(witness_interval=None)
    t0 = trio.current_time()
    b = await author.append("backup", backup_body())
    obs = witnesses[0].log

    def cosigns(w):
        return [x for x in obs.witnesses_of(b.author, b.seq) if x.author == w.own_author]

    await net.until(lambda: all(cosigns(w) for w in witnesses), "first cosigns", limit=4 * I)
    first = max(x.time for x in obs.witnesses_of(b.author, b.seq))
    await until(lambda: all(len(cosigns(w)) >= 5 for w in witnesses), limit=8 * R)
    await quiet(net)
    elapsed = trio.current_time() - t0
    for w in witnesses:
        assert w.log.head_seq(b.author) == b.seq                # the head never changed
        times = [x.time for x in cosigns(w)]
        assert all(set(named(x)) >= {b.author} for x in cosigns(w))
        # after the first two (news, then the first refresh) they are R apart
        assert all(t2 - t1 >= R * S for t1, t2 in zip(times[1:], times[2:]))
        # no cascade: one witness entry per refresh (plus the first two), far fewer
        # than one per witness tick
        own = [e for e in w.log.entries(w.own_author) if e.kind == "witness"]
        assert len(own) <= 2 + elapsed / R < elapsed / (1.25 * I)
    newest = max(x.time for x in obs.witnesses_of(b.author, b.seq))
    assert newest - first >= 2 * R * S
    # the certificate of the idle backup is fresh now; one made from the first cosigns is not
    now = T0 + int(trio.current_time() * S)
    chain = list(obs.entries(b.author, b.seq))
    fresh = audit.check_certificate(audit.build_certificate(
        M, chain, obs.newest_cosigns(b.author, {e.seq: e.id for e in chain})))
    interval = int(R + 2 * I)
    assert fresh.as_of == newest and not fresh.stale(now, interval)
    assert len(fresh.witness_keys) == 3
    old = [x for x in obs.witnesses_of(b.author, b.seq) if x.time == first]
    stale = audit.check_certificate(audit.build_certificate(M, chain, old))
    assert stale.as_of == first and stale.stale(now, interval)
