"""Audit gossip in a network: entries travel with their authors' member certificates,
and a node stores and forwards only entries of authors it can check are members now
(node/net/gate.py author_ok). Simnet nodes (virtual time for the gossip; the
certificates' times are wall-clock, as the gate checks them)."""
from __future__ import annotations

import time

import trio
from test_audit_gossip import Net, body
from test_gate import Net as Members

from hypersdk.node.net import membership
from hypersdk.node.net.gate import Gate
from hypersdk.node.net.identity import Identity
from hypersdk.protocol import membership as ms


def _gated(gate: Gate) -> dict:
    return dict(author_ok=gate.author_ok, certs_of=gate.certs_of, learn_certs=gate.learn_certs)


async def test_only_members_entries_are_stored_and_forwarded(nursery, autojump_clock, tmp_path):
    acme = Members(tmp_path)
    net = Net(nursery, 0, sync_interval=1e6)
    await net.start()
    members, gates = [], []
    for i in range(4):
        d, ident = acme.member(f"m{i}")
        gates.append(Gate(d, ident))
        members.append(await net.add(ident=ident, **_gated(gates[-1])))
    stranger = await net.add()                 # in no network: no certificate to send
    # another network's member, whose certificate does not check against our key
    other = Members(tmp_path / "o", name="other")
    od, oid = other.member("x")
    outsider = await net.add(ident=oid, **_gated(Gate(od, oid)))

    e = await members[0].append("verify", body(1))
    await net.until(lambda: all(g.log.entry(e.author, 0) == e for g in members), "spread")
    # the others never met m0: its certificate came with its entry
    assert all(members[0].ident.public_key in g.certs for g in gates[1:])
    # and is kept in their audit databases, for the certificates they export
    # (issue 18, finding 1: a witness counts with its member certificate)
    for g in members[1:]:
        (raw,) = g.log.member_certs([e.author])
        assert ms.decode_certificate(raw).node == e.author

    s = await stranger.append("verify", body(2))
    o = await outsider.append("verify", body(3))
    await net.until(lambda: sum(g.counters["non-member entries dropped"] for g in members) >= 2
                    * len(members) - 2, "the outsiders' pushes dropped", limit=60)
    for g in members:
        assert g.log.entry(s.author, 0) is None and g.log.entry(o.author, 0) is None
    assert sum(g.counters["certificates refused"] for g in gates) >= 1   # the other network's

    # a revoked member: its later entries are dropped everywhere
    r = membership.revoke(acme.admin_dir, members[3].ident.public_key, now=time.time_ns())
    for g in gates[:3]:
        assert g.learn_revocation(r.raw)
    late = await members[3].append("verify", body(4))
    await net.until(lambda: sum(g.counters["non-member entries dropped"] for g in members[:3])
                    >= 2 * len(members) - 2 + 1, "the revoked member's push dropped", limit=60)
    with trio.move_on_after(5):
        await net.until(lambda: any(g.log.entry(late.author, late.seq) for g in members[:3]),
                        "never")
    assert not any(g.log.entry(late.author, late.seq) for g in members[:3])


def test_a_forged_certificate_teaches_nothing(tmp_path):
    acme = Members(tmp_path)
    d, ident = acme.member("m")
    gate = Gate(d, ident)
    forger = Identity.generate()                 # signs a "certificate" with its own key
    fake = ms.issue_certificate(forger, Identity.generate().public_key, site="x",
                                roles=["member"], serial=1, not_before=time.time_ns(),
                                expires=time.time_ns() + 10**12,
                                network=None)
    assert gate.learn_certs([fake.raw, b"garbage"]) == 0
    assert gate.counters["certificates refused"] == 2
    assert not gate.author_ok(fake.node)
