"""protocol/audit.py: signed entries, the chain checker, certificates (pure, no I/O)."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hypersdk.node.net.identity import Identity
from hypersdk.protocol import audit, codec
from hypersdk.protocol.errors import (
    AuditChainBroken,
    ForkDetected,
    LocalProtocolError,
    RemoteProtocolError,
)

A = Identity.from_private_bytes(bytes(range(32)))
B = Identity.from_private_bytes(bytes(range(1, 33)))
W = Identity.from_private_bytes(bytes(range(2, 34)))
M = bytes(range(32))
T0 = 1_700_000_000 * 10**9


def body(kind: str, i: int = 0) -> dict:
    return {
        "backup": {"manifest": M, "name": f"vm{i}", "size": i, "chunks": i,
                   "source": {"kind": "file", "path": "/img"}},
        "replica": {"manifest": M, "holder": B.node_id},
        "verify": {"manifest": M, "holder": A.node_id, "result": "ok",
                   "summary": {"chunks_checked": i}},
        "restore": {"manifest": M, "size": i, "chunks": i},
        "delete": {"manifest": M, "name": "vm", "version": i + 1},
        "witness": {"heads": [[B.public_key, i, bytes(32)]]},
        "revoke": {"revocation": b"\x82" + bytes([i % 256]) * 40},   # opaque here
    }[kind]


def chain(ident=A, n=6, kinds=audit.KINDS, start_prev=None, start=0):
    out, prev = [], start_prev
    for s in range(start, start + n):
        e = audit.make_entry(ident, s, prev, T0 + s, kinds[s % len(kinds)],
                             body(kinds[s % len(kinds)], s))
        out.append(e)
        prev = e.id
    return out


LOG = chain(n=8)


def test_round_trip_and_id_is_blake3_of_signed_encoding():
    for e in LOG:
        back = audit.decode_entry(e.raw)
        assert back == e and back.id == e.id == audit.entry_id(e.raw)
        assert back.body == e.body and back.kind == e.kind
        # what is signed: SIG_DOMAIN || payload, payload carried as bin in the outer map
        outer = codec.decode(e.raw)
        assert outer == {"entry": e.payload, "sig": e.sig}
        A._key.public_key().verify(e.sig, audit.SIG_DOMAIN + e.payload)
    assert audit.check_chain(LOG).head == LOG[-1]


@given(st.sampled_from(range(len(LOG))), st.data())
@settings(max_examples=400, deadline=None)
def test_every_single_byte_change_is_rejected_or_breaks_the_chain(k, data):
    """Flip one byte of entry k: it does not decode, or its signature fails, or
    (impossible in practice) it has a new id, which breaks the chain at k+1."""
    raw = bytearray(LOG[k].raw)
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] ^= data.draw(st.integers(1, 255))
    try:
        e = audit.decode_entry(bytes(raw))
    except RemoteProtocolError:
        return                                # malformed or bad signature: rejected
    assert e.id != LOG[k].id
    with pytest.raises((AuditChainBroken, ForkDetected)):
        audit.check_chain(LOG[:k] + [e] + LOG[k + 1:])


@given(st.sampled_from(range(len(LOG))), st.data())
@settings(max_examples=200, deadline=None)
def test_single_byte_change_in_a_chain_is_reported_at_its_position(k, data):
    raw = bytearray(LOG[k].raw)
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] ^= data.draw(st.integers(1, 255))
    view = audit.LogView(A.public_key)
    for j, e in enumerate(LOG):
        r = bytes(raw) if j == k else e.raw
        try:
            view.append(audit.decode_entry(r, verify=False), index=j)
        except RemoteProtocolError:
            assert j == k
            return
        except AuditChainBroken as exc:
            # reported at the changed entry's position; its seq is what the changed
            # bytes claim (a flipped seq byte can make entry 3 claim seq 2)
            assert exc.index == k
            return
    pytest.fail("a changed entry was accepted")


@given(st.integers(0, len(LOG) - 1))
def test_dropping_an_entry_is_detected_at_the_next_position(k):
    rest = LOG[:k] + LOG[k + 1:]
    if k == len(LOG) - 1:
        assert audit.check_chain(rest).head == LOG[-2]    # a shorter log is a valid prefix
        return
    with pytest.raises(AuditChainBroken) as ei:
        audit.check_chain(rest)
    assert ei.value.seq == k + 1 and ei.value.index == k and "gap" in ei.value.reason


@given(st.integers(0, len(LOG) - 2))
def test_swapping_neighbours_is_detected_at_the_first_swapped_position(k):
    order = LOG[:k] + [LOG[k + 1], LOG[k]] + LOG[k + 2:]
    with pytest.raises(AuditChainBroken) as ei:
        audit.check_chain(order)
    assert ei.value.index == k and ei.value.seq == k + 1


def test_relinked_entry_with_wrong_prev_is_a_break():
    bad = audit.make_entry(A, 3, bytes(32), T0, "restore", body("restore"))
    with pytest.raises(AuditChainBroken) as ei:
        audit.check_chain(LOG[:3] + [bad])
    assert ei.value.seq == 3 and "prev" in ei.value.reason and ei.value.entry_id == bad.id


def test_fork_is_detected_and_carries_both_signed_entries():
    other = audit.make_entry(A, 4, LOG[3].id, T0 + 99, "delete", body("delete"))
    view = audit.check_chain(LOG)
    with pytest.raises(ForkDetected) as ei:
        view.append(other)
    f = ei.value
    assert f.first == LOG[4] and f.second == other and f.seq == 4 and f.author == A.public_key
    # the proof stands on its own: both decode and verify, same author+seq, different ids
    x, y = audit.decode_entry(f.first.raw), audit.decode_entry(f.second.raw)
    assert (x.author, x.seq) == (y.author, y.seq) and x.id != y.id


def test_fork_through_lookup_view():
    store = {e.seq: e for e in LOG}
    view = audit.LogView(A.public_key, lookup=store.get)
    for e in LOG:
        view.append(e)
    other = audit.make_entry(A, 0, None, T0 + 1, "restore", body("restore"))
    with pytest.raises(ForkDetected) as ei:
        view.append(other)
    assert ei.value.first == LOG[0]


def test_replay_is_a_no_op():
    view = audit.check_chain(LOG)
    assert all(view.append(e) is False for e in LOG)
    assert view.head == LOG[-1] and view.next_seq == len(LOG)


def test_wrong_key_is_rejected():
    # an entry claiming author A but signed by B
    forged = audit.make_entry(B, 0, None, T0, "restore", body("restore"))
    doc = codec.decode(forged.payload)
    doc["author"] = A.public_key
    payload = codec.encode(doc)
    raw = codec.encode({"entry": payload, "sig": B.sign(audit.SIG_DOMAIN + payload)})
    with pytest.raises(audit.BadSignature):
        audit.decode_entry(raw)
    e = audit.decode_entry(raw, verify=False)
    with pytest.raises(AuditChainBroken) as ei:
        audit.LogView(A.public_key).append(e)
    assert "signature" in ei.value.reason
    # another author's valid entry in A's view
    with pytest.raises(AuditChainBroken) as ei:
        audit.LogView(A.public_key).append(chain(B, 1)[0])
    assert "another author" in ei.value.reason
    # signature over the payload without the domain string does not verify
    raw2 = codec.encode({"entry": LOG[0].payload, "sig": A.sign(LOG[0].payload)})
    with pytest.raises(audit.BadSignature):
        audit.decode_entry(raw2)


def test_future_entry_is_rejected_but_accepted_within_skew():
    e = LOG[0]
    skew = 10**9
    with pytest.raises(audit.FutureEntry):
        audit.LogView(A.public_key, max_skew=skew).append(e, now=e.time - skew - 1)
    assert audit.LogView(A.public_key, max_skew=skew).append(e, now=e.time - skew)
    assert isinstance(audit.FutureEntry(e, 0, 1), RemoteProtocolError)


def test_oversized_bodies_and_bad_fields_are_refused_both_ways():
    with pytest.raises(LocalProtocolError):
        audit.make_entry(A, 0, None, T0, "witness",
                         {"heads": [[B.public_key, i, bytes(32)]
                                    for i in range(audit.MAX_WITNESS_HEADS + 1)]})
    with pytest.raises(LocalProtocolError):
        audit.make_entry(A, 0, None, T0, "backup", dict(body("backup"), name="x" * 256))
    with pytest.raises(LocalProtocolError):
        audit.make_entry(A, 0, None, T0, "backup", dict(body("backup"), extra=1))
    with pytest.raises(LocalProtocolError):
        audit.make_entry(A, 0, None, T0, "gossip", {})
    with pytest.raises(LocalProtocolError):
        audit.make_entry(A, 1, None, T0, "restore", body("restore"))     # seq 1 needs prev
    with pytest.raises(LocalProtocolError):
        audit.make_entry(A, 0, M, T0, "restore", body("restore"))        # seq 0 has none
    with pytest.raises(LocalProtocolError):
        audit.make_entry(A, 0, None, T0, "verify", dict(body("verify"), result="great"))
    with pytest.raises(LocalProtocolError):
        audit.make_entry(A, 0, None, -1, "restore", body("restore"))
    # a signed but oversized / schema-violating entry built by hand is refused on decode
    big = {"v": 1, "author": A.public_key, "seq": 0, "prev": None, "time": T0,
           "kind": "backup", "body": dict(body("backup"), name="x" * 300)}
    payload = codec.encode(big)
    raw = codec.encode({"entry": payload, "sig": A.sign(audit.SIG_DOMAIN + payload)})
    with pytest.raises(audit.InvalidEntry, match="name"):
        audit.decode_entry(raw)
    huge = codec.encode({"entry": b"x" * audit.MAX_ENTRY, "sig": bytes(64)})
    with pytest.raises(audit.InvalidEntry, match="exceeds"):
        audit.decode_entry(huge)


@given(st.binary(max_size=600))
@settings(max_examples=300)
def test_malformed_bytes_raise_only_remote_protocol_errors(data):
    with pytest.raises(RemoteProtocolError):
        audit.decode_entry(data)


@given(st.sampled_from(range(len(LOG))), st.integers(1, 200))
def test_truncated_entries_are_rejected(k, cut):
    raw = LOG[k].raw
    with pytest.raises(RemoteProtocolError):
        audit.decode_entry(raw[:max(0, len(raw) - cut)])


def test_not_bytes_and_wrong_outer_shape():
    for bad in (None, 5, "text", codec.encode([1, 2]), codec.encode({"entry": b"", "sig": b""}),
                codec.encode({"entry": LOG[0].payload, "sig": LOG[0].sig, "x": 1})):
        with pytest.raises(RemoteProtocolError):
            audit.decode_entry(bad)


# -- certificates ----------------------------------------------------------------------
def _witness(ident, seq, prev, heads, t=T0):
    return audit.make_entry(ident, seq, prev, t, "witness", {"heads": heads})


def test_certificate_round_trip_with_and_without_witness():
    # LOG[0] is a backup entry
    data = audit.build_certificate(M, LOG, [])
    rep = audit.check_certificate(data)
    assert not rep.witnessed and rep.backup == LOG[0] and rep.head == LOG[-1]
    w = _witness(W, 0, None, [[A.public_key, 7, LOG[7].id], [B.public_key, 3, bytes(32)]])
    rep = audit.check_certificate(audit.build_certificate(M, LOG, [w]))
    assert rep.witnessed and rep.witnessed_seq == 7 and rep.witnesses == [w]


def test_certificate_from_a_later_backup_entry_is_anchored():
    later = len(audit.KINDS)                   # chain() cycles through the kinds
    assert LOG[later].kind == "backup"
    rep = audit.check_certificate(audit.build_certificate(M, LOG[later:], []))
    assert rep.backup == LOG[later]


def test_certificate_witness_contradicting_the_chain_proves_a_rewrite():
    w = _witness(W, 0, None, [[A.public_key, 5, bytes(32)]])
    doc = codec.decode(audit.build_certificate(M, LOG, []))
    doc["witnesses"] = [w.raw]
    doc["keys"] = sorted([A.public_key, W.public_key])
    with pytest.raises(audit.InvalidCertificate, match="rewritten"):
        audit.check_certificate(codec.encode(doc))


def test_certificate_not_starting_with_backup_or_wrong_manifest():
    with pytest.raises(LocalProtocolError):
        audit.build_certificate(M, LOG[1:], [])
    with pytest.raises(LocalProtocolError):
        audit.build_certificate(bytes(32), LOG, [])


_CERT = audit.build_certificate(
    M, LOG, [_witness(W, 0, None, [[A.public_key, 7, LOG[7].id]])])


@given(st.data())
@settings(max_examples=300, deadline=None)
def test_every_single_byte_change_to_a_certificate_fails_or_keeps_its_claim(data):
    raw = bytearray(_CERT)
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] ^= data.draw(st.integers(1, 255))
    try:
        rep = audit.check_certificate(bytes(raw))
    except (RemoteProtocolError, AuditChainBroken, ForkDetected) as exc:
        assert str(exc)
        return
    pytest.fail(f"altered certificate accepted: {rep}")


@given(st.integers(1, len(_CERT)))
@settings(max_examples=100)
def test_truncated_certificate_fails(cut):
    with pytest.raises(RemoteProtocolError, match="truncated"):
        audit.check_certificate(_CERT[:len(_CERT) - cut])


def test_certificate_with_a_dropped_chain_entry_fails_at_its_position():
    doc = codec.decode(_CERT)
    del doc["chain"][3]
    with pytest.raises(AuditChainBroken) as ei:
        audit.check_certificate(codec.encode(doc))
    assert ei.value.seq == 4


_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.binary(max_size=40),
                  st.text(max_size=20))
_tree = st.recursive(_leaf, lambda c: st.one_of(st.lists(c, max_size=4),
                                                st.dictionaries(st.text(max_size=8), c,
                                                                max_size=4)), max_leaves=12)


@given(st.sampled_from(["v", "author", "seq", "prev", "time", "kind", "body"]), _tree,
       st.sampled_from(audit.KINDS))
@settings(max_examples=300, deadline=None)
def test_validly_signed_hostile_fields_raise_only_remote_protocol_errors(key, value, kind):
    """A peer can sign anything with its own key: whatever it puts in a field,
    decoding either yields a schema-valid entry or raises RemoteProtocolError."""
    doc = {"v": 1, "author": A.public_key, "seq": 1, "prev": bytes(32), "time": T0,
           "kind": kind, "body": body(kind)}
    doc[key] = value
    try:
        payload = codec.encode(doc)
    except LocalProtocolError:
        return
    raw = codec.encode({"entry": payload, "sig": A.sign(audit.SIG_DOMAIN + payload)})
    try:
        e = audit.decode_entry(raw)
    except RemoteProtocolError:
        return
    assert audit.body_problem(e.kind, e.body) is None and e.author == A.public_key


# -- issue 18, finding 1: witnesses count only when they are members of the network --------

NET = Identity.from_private_bytes(bytes(range(5, 37)))
FORGER = Identity.from_private_bytes(bytes(range(9, 41)))


def _member(ident, net=NET):
    from hypersdk.protocol import membership as ms
    return ms.issue_certificate(net, ident.public_key, site="s", roles=["member"], serial=1,
                                not_before=0, expires=T0 + 10**15).raw


def _net_cert(witnesses, members, network=NET.public_key):
    return audit.build_certificate(M, LOG, witnesses, network=network, members=members)


def test_only_member_witnesses_count_in_a_network_certificate():
    real = _witness(W, 0, None, [[A.public_key, 7, LOG[7].id]])
    fake = _witness(FORGER, 0, None, [[A.public_key, 7, LOG[7].id]])
    rep = audit.check_certificate(_net_cert([real, fake], [_member(A), _member(W)]))
    assert rep.network == NET.public_key and rep.author in rep.members
    assert rep.witness_keys == sorted([W.public_key, FORGER.public_key])
    assert rep.member_witness_keys == [W.public_key] and rep.witnessed_seq == 7
    # a forged witness alone attests nothing (it was accepted before, for any key)
    rep = audit.check_certificate(_net_cert([fake], [_member(A)]))
    assert not rep.witnessed and rep.member_witness_keys == []
    # the same file without a network cannot vet anybody: every witness is listed as such
    assert audit.check_certificate(audit.build_certificate(M, LOG, [fake])).witnessed


def test_the_network_the_checker_expects_must_be_pinned():
    other = Identity.from_private_bytes(bytes(range(7, 39)))
    real = _witness(W, 0, None, [[A.public_key, 7, LOG[7].id]])
    data = _net_cert([real], [_member(A), _member(W)])
    assert audit.check_certificate(data, network_key=NET.public_key).witnessed
    with pytest.raises(audit.InvalidCertificate, match="pinned to network"):
        audit.check_certificate(data, network_key=other.public_key)
    # stripping the pin (re-encoding as a certificate of no network) does not help
    doc = codec.decode(data)
    del doc["network"], doc["members"]
    with pytest.raises(audit.InvalidCertificate, match="pinned to no network"):
        audit.check_certificate(codec.encode(doc), network_key=NET.public_key)
    # a member certificate of another network does not make a witness count ...
    doc = codec.decode(data)
    doc["members"] = [_member(A), _member(W, net=other)]
    assert not audit.check_certificate(codec.encode(doc)).witnessed
    # ... and one claiming our network with a forged signature makes the file invalid
    outer = codec.decode(_member(W))
    outer["sig"] = bytes(64)                     # the network's signature, forged
    doc["members"] = [_member(A), codec.encode(outer)]
    with pytest.raises(audit.InvalidCertificate, match="member certificate 1"):
        audit.check_certificate(codec.encode(doc))


def test_revocations_travel_in_the_certificate():
    """A certificate carries the network's revocations of its author and witnesses: a
    revoked witness no longer counts (a stolen key signs at any date it likes), a
    revoked author is reported; a forged or foreign revocation makes the file invalid,
    and dropping the revocations is the only way around them (a checker that needs
    them gets them from a member: --network-key pins the network, not its state)."""
    from hypersdk.protocol import membership as ms
    real = _witness(W, 0, None, [[A.public_key, 7, LOG[7].id]])
    members = [_member(A), _member(W)]
    rw = ms.issue_revocation(NET, W.public_key, serial=1, time=T0, reason="laptop stolen")
    ra = ms.issue_revocation(NET, A.public_key, serial=1, time=T0, reason="")

    def cert(revs):
        return audit.check_certificate(audit.build_certificate(
            M, LOG, [real], network=NET.public_key, members=members,
            revocations=[r.raw for r in revs]))
    assert cert([]).witnessed and cert([]).revoked == {}
    rep = cert([rw])
    assert not rep.witnessed and rep.member_witness_keys == [] and W.public_key in rep.revoked
    assert rep.to_json()["revoked"][W.public_key.hex()]["reason"] == "laptop stolen"
    rep = cert([ra])
    assert rep.witnessed and rep.author not in rep.members and A.public_key in rep.revoked
    # revocations of nodes the certificate does not name are not kept
    stranger = ms.issue_revocation(NET, FORGER.public_key, serial=1, time=T0)
    assert cert([stranger]).revoked == {}
    # forged (another network's key signed it) -> invalid
    other = Identity.from_private_bytes(bytes(range(7, 39)))
    forged = ms.issue_revocation(other, W.public_key, serial=1, time=T0)
    doc = codec.decode(audit.build_certificate(M, LOG, [real], network=NET.public_key,
                                               members=members))
    doc["revocations"] = [forged.raw]
    with pytest.raises(audit.InvalidCertificate, match="revocation 0"):
        audit.check_certificate(codec.encode(doc))


# -- issue 18, finding 7: a certificate older than the cosigning interval says so ---------

def test_a_certificate_knows_its_age_against_the_cosigning_interval():
    iv = audit.COSIGN_INTERVAL_S * 10**9
    assert audit.COSIGN_INTERVAL_S > audit.COSIGN_REFRESH_S > audit.WITNESS_INTERVAL_S
    rep = audit.check_certificate(audit.build_certificate(M, LOG, []))
    now = LOG[-1].time + iv
    assert rep.age_ns(now) == iv and not rep.stale(now) and rep.stale(now + 1)
    assert rep.age_ns(LOG[-1].time - 5) == 0 and rep.stale(now, interval_s=60)
    # a later cosign (the refresh of an unchanged head) makes it fresh again
    w = _witness(W, 0, None, [[A.public_key, 7, LOG[7].id]], t=now)
    rep = audit.check_certificate(audit.build_certificate(M, LOG, [w]))
    assert rep.as_of == now and not rep.stale(now + iv)
    # in a network only members' cosigns count: a forged one dated now makes nothing fresh
    fake = _witness(FORGER, 0, None, [[A.public_key, 7, LOG[7].id]], t=now)
    rep = audit.check_certificate(_net_cert([w, fake], [_member(A)]))
    assert rep.as_of == LOG[-1].time and rep.stale(now + 1)
    rep = audit.check_certificate(_net_cert([w, fake], [_member(A), _member(W)]))
    assert rep.as_of == now and rep.member_witness_keys == [W.public_key]
