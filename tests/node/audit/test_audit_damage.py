"""Local damage to a stored copy of another author's log (issue 18, finding 4):
re-verify before blaming, repair from a valid entry, never crash, never record a
false fork proof against an honest author."""
from __future__ import annotations

import pytest
import trio
from test_audit_gossip import T0, Net, body

from hypersdk.node.audit.log import AuditLog, NameConflict
from hypersdk.node.net.identity import Identity
from hypersdk.node.service.net_verify import _backup_check
from hypersdk.protocol import audit
from hypersdk.protocol import audit_gossip as msg

AUTHOR = Identity.from_private_bytes(b"a" * 32)
OTHER = Identity.from_private_bytes(b"o" * 32)


def chain(ident, n):
    out, prev = [], None
    for seq in range(n):
        e = audit.make_entry(ident, seq, prev, T0 + seq, "verify", body(seq))
        out.append(e)
        prev = e.id
    return out


def holder(tmp_path):
    lg = AuditLog(tmp_path, identity=Identity.from_private_bytes(b"h" * 32))
    es = chain(AUTHOR, 6)
    assert lg.add_foreign([e.raw for e in es], now_ns=T0).added == 6
    return lg, es


def test_a_hole_in_our_copy_is_found_and_repaired_by_the_valid_entry(tmp_path):
    lg, es = holder(tmp_path)
    lg.db.execute("DELETE FROM entries WHERE author=? AND seq=2", (AUTHOR.public_key,))
    assert lg.damaged() == {AUTHOR.public_key: 2}
    res = lg.add_foreign([es[3].raw, es[2].raw], now_ns=T0)   # used to raise TypeError
    assert res.repaired == 1 and not res.forks and not res.rejected
    assert lg.verify(AUTHOR.public_key).ok and lg.damaged() == {}
    assert lg.forks(AUTHOR.public_key) == []


def test_a_forged_row_of_ours_is_not_blamed_on_the_author(tmp_path):
    lg, es = holder(tmp_path)
    forged = audit.make_entry(OTHER, 2, es[1].id, T0 + 2, "verify", body(99))
    lg.db.execute("UPDATE entries SET id=?, raw=? WHERE author=? AND seq=2",
                  (forged.id, forged.raw, AUTHOR.public_key))
    assert lg.damaged() == {AUTHOR.public_key: 2}
    res = lg.add_foreign([es[2].raw], now_ns=T0)
    assert res.forks == [] and res.repaired == 1
    assert lg.forks(AUTHOR.public_key) == [] and lg.verify(AUTHOR.public_key).ok


def test_a_genuine_fork_is_still_proven(tmp_path):
    lg, es = holder(tmp_path)
    other = audit.make_entry(AUTHOR, 2, es[1].id, T0 + 2, "verify", body(42))
    res = lg.add_foreign([other.raw], now_ns=T0)
    assert len(res.forks) == 1 and res.repaired == 0
    assert len(lg.forks(AUTHOR.public_key)) == 1


def test_an_entry_that_does_not_link_with_the_damage_is_neither_stored_nor_blamed(tmp_path):
    lg, es = holder(tmp_path)
    lg.db.execute("DELETE FROM entries WHERE author=? AND seq IN (2, 3)", (AUTHOR.public_key,))
    res = lg.add_foreign([es[3].raw], now_ns=T0)              # entry 2 is missing too
    assert res.repaired == 0 and res.unplaced and not res.rejected and not res.forks
    assert lg.add_foreign([es[2].raw, es[3].raw], now_ns=T0).repaired == 2
    assert lg.verify(AUTHOR.public_key).ok


async def test_gossip_repairs_a_hole_that_heads_cannot_show(nursery, autojump_clock):
    """Anti-entropy compares heads; a hole in the middle of our copy of a log is
    found by re-verifying it and pulled again as a range (AuditGossip.repair)."""
    net = await Net(nursery, 3, sync_interval=1e6).start()
    author, holder, other = net.nodes
    for k in range(10):
        await author.append("verify", body(k))
    a = author.own_author
    await net.until(lambda: all(g.log.head_seq(a) == 9 for g in (holder, other))
                    and not any(q for g in net.nodes for q in g._queues.values())
                    and not any(g._senders for g in net.nodes), "spread, pushes done")
    holder.log.db.execute("DELETE FROM entries WHERE author=? AND seq IN (3, 4)", (a,))
    assert holder.log.damaged() == {a: 3}
    with trio.fail_after(60):
        fixed = await holder.repair()
    assert fixed == 2 and holder.log.damaged() == {} and holder.log.verify(a).ok
    assert holder.counters["entries repaired"] == 2 and holder.counters["damage found"] == 1
    assert holder.log.forks(a) == [] and holder.counters["entries rejected"] == 0


async def test_a_rewrite_plus_extension_leaves_a_fork_proof_everywhere(nursery, autojump_clock):
    """Issue 18, finding 3: the author rewrites gossiped entries 5..9 and appends
    10, 11 (head 11 where peers hold 9). The extension does not link to what the
    peers hold; they fetch the author's other entry 9 from the sender and keep
    the pair as a fork proof, gossiped to everyone; the relay is not blamed."""
    net = await Net(nursery, 3, sync_interval=1e6).start()
    rogue = Identity.from_private_bytes(b"r" * 32)
    h1 = chain(rogue, 10)
    await net.nodes[0]._request(net.nodes[1].contact, msg.Push(1, tuple(e.raw for e in h1)))
    a = rogue.public_key
    await net.until(lambda: all(g.log.head_seq(a) == 9 for g in net.nodes), "history 1")
    h2, prev = h1[:5], h1[4].id
    for seq in range(5, 12):
        e = audit.make_entry(rogue, seq, prev, T0 + seq, "verify", body(100 + seq))
        h2.append(e)
        prev = e.id
    relay = await net.add(peers=lambda: [])            # holds history 2 (from the author)
    assert relay.log.add_foreign([e.raw for e in h2], now_ns=T0).added == 12
    await relay._request(net.nodes[1].contact, msg.Push(2, (h2[10].raw, h2[11].raw)))
    with trio.fail_after(60):
        await net.until(lambda: all(a in g.log.fork_authors() for g in net.nodes), "the proof")
    (f,) = net.nodes[1].log.forks(a)
    assert f.seq == 9 and {f.first.id, f.second.id} == {h1[9].id, h2[9].id}
    assert net.nodes[1].scores.score(relay.own_id) >= 0      # the relay told the truth
    assert net.nodes[1].counters["divergences"] == 1


# -- issue 18, finding 2: claimed time decides nothing across authors -----------------------

def test_an_entry_dated_before_its_predecessor_is_refused_and_own_time_never_goes_back(tmp_path):
    lg, es = holder(tmp_path)
    late = audit.make_entry(AUTHOR, 6, es[5].id, 0, "verify", body(6))      # dated 1970
    res = lg.add_foreign([late.raw], now_ns=T0)
    assert res.added == 0 and res.rejected and "time goes back" in str(res.rejected[0])
    a = lg.append("verify", body(1), now_ns=T0 + 100)
    b = lg.append("verify", body(2), now_ns=T0)                  # our clock was set back
    assert b.time == a.time and lg.verify(lg.own_author).ok


def test_a_name_or_manifest_claimed_by_two_authors_is_a_conflict_not_a_time_contest(tmp_path):
    lg = AuditLog(tmp_path, identity=Identity.from_private_bytes(b"h" * 32))
    m1, m2 = b"\x01" * 32, b"\x02" * 32

    def backup(ident, manifest, t):
        return audit.make_entry(ident, 0, None, t, "backup", {
            "manifest": manifest, "name": "vm1", "size": 1, "chunks": 1, "source": {}})
    lg.add_foreign([backup(AUTHOR, m1, T0).raw], now_ns=T0)
    assert lg.find_backup_by_name("vm1") == m1
    lg.add_foreign([backup(OTHER, m2, T0 + 10**9).raw], now_ns=T0 + 10**9)  # "newer" squatter
    with pytest.raises(NameConflict, match="claimed by 2 authors"):
        lg.find_backup_by_name("vm1")
    lg.add_foreign([backup(Identity.from_private_bytes(b"x" * 32), m1, 0).raw], now_ns=T0)
    doc = _backup_check(lg, m1)                   # an "older" claim of m1 by a third key
    assert doc["conflict"] and len(doc["claimed_by"]) == 2


def test_witness_entries_cannot_be_crowded_out_by_authors_dated_ahead(tmp_path):
    lg, es = holder(tmp_path)                    # AUTHOR's head: seq 5, dated T0 + 5
    ahead = T0 + 9 * 60 * 10**9
    for i in range(audit.MAX_WITNESS_HEADS):     # 64 throwaway authors dated 9 min ahead
        e = audit.make_entry(Identity.from_private_bytes(bytes([i + 1]) * 32), 0, None,
                             ahead, "verify", body(i))
        lg.add_foreign([e.raw], now_ns=T0)
    named = set()
    for _ in range(2):                           # every author within two rounds
        w = lg.witness(now_ns=T0 + 10**9)
        named |= {a for a, _, _ in audit.witness_heads(w)}
    assert AUTHOR.public_key in named
