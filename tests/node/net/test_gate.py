"""The membership gate on real libp2p connections over 127.0.0.1 (node/net/gate.py):
members talk; a stranger, a member of another network, an expired or revoked member
get the refusal and no stream; a joiner reaches the join protocol only; a revocation
cuts an open connection off; a node in no network is open, as before."""
from __future__ import annotations

import time

import pytest
import trio

from hypersdk.node.net import membership
from hypersdk.node.net.gate import ENFORCE_INTERVAL, Gate, MembershipRefused
from hypersdk.node.net.identity import Identity
from hypersdk.node.net.p2p_transport import P2PTransport
from hypersdk.node.net.transport import TransportError
from hypersdk.protocol import membership as ms

S = 10**9
ECHO = "/test/echo/1"
LISTEN = "/ip4/127.0.0.1/tcp/0"


class Net:
    """A network made on disk: an admin dir, and members enrolled with real tokens."""

    def __init__(self, root, name="acme"):
        self.root = root
        self.admin_id = Identity.generate()
        self.admin_dir = root / f"{name}-admin"
        self.net = membership.create(self.admin_dir, self.admin_id, name=name, site="hq",
                                     now=time.time_ns())

    def member(self, label, *, lifetime_ns=None, site="plant"):
        ident = Identity.generate()
        d = self.root / label
        now = time.time_ns()
        tok = membership.invite(self.admin_dir, site=site, roles=["member"],
                                expires_in=600 * S, addrs=["/ip4/127.0.0.1/tcp/1"], now=now)
        cert = membership.redeem(self.admin_dir, tok.secret, ident.public_key, now=now)
        if lifetime_ns is not None:       # a short-lived certificate, signed by the same key
            key = Identity.load(self.admin_dir / "network" / "network.key")
            cert = ms.issue_certificate(key, ident.public_key, site=site, roles=["member"],
                                        serial=cert.serial, not_before=now - S,
                                        expires=now + lifetime_ns)
        membership.enroll(d, tok, ms.JoinAnswer(cert.raw, self.net.public, (), "acme"), ident,
                          now=now)
        return d, ident


async def echo(stream, peer_id):
    data = await stream.receive_some(100)
    await stream.send_all(data)


async def start(nursery, ident, data_dir):
    t = P2PTransport(ident, LISTEN, gate=Gate(data_dir, ident))
    t.set_handler(ECHO, echo)
    t.set_handler(ms.JOIN_PROTOCOL, echo)
    await nursery.start(t.run)
    return t


async def roundtrip(a, b, protocol=ECHO):
    s = await a.open_stream(b.peer_id, b.addr, protocol)
    await s.send_all(b"ping")
    got = await s.receive_some(100)
    await s.aclose()
    return got


@pytest.fixture
def acme(tmp_path):
    return Net(tmp_path)


async def test_members_talk_and_strangers_get_only_the_refusal(acme, tmp_path):
    a_dir, a_id = acme.member("a")
    b_dir, b_id = acme.member("b")
    stranger = Identity.generate()
    async with trio.open_nursery() as n:
        a = await start(n, a_id, a_dir)
        b = await start(n, b_id, b_dir)
        s = await start(n, stranger, tmp_path / "stranger")       # in no network: open
        with trio.fail_after(10):
            assert await roundtrip(a, b) == b"ping"
            assert b.gate.is_member(a.peer_id) and a.gate.is_member(b.peer_id)
            t0 = time.monotonic()
            with pytest.raises(MembershipRefused, match="not a member of this network"):
                await roundtrip(s, b)
            refused_in = time.monotonic() - t0
        assert refused_in < 5                     # the bench measures it; here: no timeout
        assert b.gate.counters["refused: not a member of this network"] == 1
        assert b.connection_count(stranger.node_id) == 0
        assert not b.gate.is_member(stranger.node_id)
        # and a member that dials the stranger hangs up on it (both sides check)
        with pytest.raises(MembershipRefused, match="not a member"):
            await roundtrip(a, s)
        n.cancel_scope.cancel()


async def test_other_network_expired_and_revoked_members_are_refused(acme, tmp_path):
    other = Net(tmp_path / "o", name="other")
    (tmp_path / "o").mkdir(exist_ok=True)
    a_dir, a_id = acme.member("a")
    x_dir, x_id = other.member("x")
    e_dir, e_id = acme.member("e", lifetime_ns=2 * S)
    r_dir, r_id = acme.member("r")
    membership.revoke(acme.admin_dir, r_id.public_key, now=time.time_ns(), reason="lost")
    membership.add_revocation(a_dir, membership.revocations(acme.admin_dir)[0])
    async with trio.open_nursery() as n:
        a = await start(n, a_id, a_dir)
        x = await start(n, x_id, x_dir)
        r = await start(n, r_id, r_dir)
        e = await start(n, e_id, e_dir)
        with trio.fail_after(20):
            with pytest.raises(MembershipRefused, match="another network"):
                await roundtrip(x, a)
            with pytest.raises(MembershipRefused, match="revoked"):
                await roundtrip(r, a)
            assert await roundtrip(e, a) == b"ping"      # valid for 2 s
            while time.time_ns() < e.gate.network.cert.expires:
                await trio.sleep(0.05)
            # the open connection is cut within the enforcement interval...
            deadline = time.monotonic() + ENFORCE_INTERVAL * 5 + 2
            while a.connection_count(e_id.node_id) and time.monotonic() < deadline:
                await trio.sleep(0.05)
            assert a.connection_count(e_id.node_id) == 0
            # ...and a new one is refused
            with pytest.raises(MembershipRefused, match="expired"):
                await roundtrip(e, a)
        assert a.gate.counters["cut off: certificate expired"] == 1
        n.cancel_scope.cancel()


async def test_a_revocation_learned_cuts_an_open_connection(acme):
    a_dir, a_id = acme.member("a")
    b_dir, b_id = acme.member("b")
    async with trio.open_nursery() as n:
        a = await start(n, a_id, a_dir)
        b = await start(n, b_id, b_dir)
        with trio.fail_after(20):
            assert await roundtrip(b, a) == b"ping"
            assert a.connection_count(b.peer_id) == 1
            r = membership.revoke(acme.admin_dir, b_id.public_key, now=time.time_ns())
            assert a.gate.learn_revocation(r.raw)
            assert not a.gate.learn_revocation(r.raw)             # once
            assert not a.gate.learn_revocation(b"garbage")
            assert a.cut_off_now() == 1
            deadline = time.monotonic() + 10
            while a.connection_count(b.peer_id) and time.monotonic() < deadline:
                await trio.sleep(0.02)
            assert a.connection_count(b.peer_id) == 0
            assert not a.gate.is_member(b.peer_id)
            with pytest.raises((MembershipRefused, TransportError)):
                await roundtrip(b, a)
        # kept on disk: a restarted node still refuses it
        assert [x.raw for x in membership.revocations(a_dir)] == [r.raw]
        assert Gate(a_dir, a_id).revocations[0].raw == r.raw
        n.cancel_scope.cancel()


async def test_a_joiner_reaches_the_join_protocol_only(acme, tmp_path):
    inviter = Identity.generate()
    # the admin dir itself runs as the inviter (it holds the network key)
    tok = membership.invite(acme.admin_dir, site="p", roles=["member"], expires_in=600 * S,
                            addrs=["/ip4/127.0.0.1/tcp/1"], now=time.time_ns())
    del inviter
    joiner = Identity.generate()
    async with trio.open_nursery() as n:
        adm = await start(n, acme.admin_id, acme.admin_dir)
        j = await start(n, joiner, tmp_path / "joiner")
        with trio.fail_after(20):
            # with a made-up secret: refused at the handshake
            j.gate.joins[adm.peer_id] = (b"\x07" * 32, tok.network)
            with pytest.raises(MembershipRefused, match="invitation not known"):
                await roundtrip(j, adm, ms.JOIN_PROTOCOL)
            j.gate.joins[adm.peer_id] = (tok.secret, tok.network)
            assert await roundtrip(j, adm, ms.JOIN_PROTOCOL) == b"ping"
            with pytest.raises(TransportError):
                await roundtrip(j, adm, ECHO)                 # anything else: reset
        assert adm.gate.counters["streams refused"] >= 1, adm.gate.counters
        n.cancel_scope.cancel()


async def test_nodes_in_no_network_are_open_as_before(tmp_path):
    async with trio.open_nursery() as n:
        a = await start(n, Identity.generate(), tmp_path / "a")
        b = await start(n, Identity.generate(), tmp_path / "b")
        with trio.fail_after(10):
            assert await roundtrip(a, b) == b"ping"
        assert b.gate.status()["mode"] == "open"
        assert "any node that knows" in b.gate.status()["note"]
        n.cancel_scope.cancel()


async def test_clock_skew_between_members_is_tolerated_up_to_five_minutes(acme):
    """A member whose clock runs behind sees a fresh certificate as not yet valid: up
    to ms.MAX_SKEW_NS that is tolerated, beyond it the refusal says to check the
    clocks (one clear reason, on both sides)."""
    a_dir, a_id = acme.member("a")
    b_dir, b_id = acme.member("b")
    skew = {"ns": 0}
    async with trio.open_nursery() as n:
        a = P2PTransport(a_id, LISTEN,
                         gate=Gate(a_dir, a_id, clock=lambda: time.time_ns() - skew["ns"]))
        a.set_handler(ECHO, echo)
        await n.start(a.run)
        b = await start(n, b_id, b_dir)
        with trio.fail_after(20):
            skew["ns"] = ms.MAX_SKEW_NS - 30 * S           # a's clock 4.5 min behind
            assert await roundtrip(b, a) == b"ping"
            b.disconnect(a.peer_id)
            a.disconnect(b.peer_id)
            for _ in range(200):                            # bounded: the close is quick
                if not a.connection_count(b.peer_id) and not b.connection_count(a.peer_id):
                    break
                await trio.sleep(0.02)
            skew["ns"] = ms.MAX_SKEW_NS + 60 * S           # 6 minutes behind
            with pytest.raises(MembershipRefused, match="check the clocks"):
                await roundtrip(b, a)
        assert a.gate.counters["refused: certificate not valid yet (check the clocks)"] == 1
        n.cancel_scope.cancel()


def test_garbage_proofs_are_refused_and_counted_in_a_fixed_set(acme):
    """Whatever a stranger sends as its proof: a MembershipError (never anything else),
    and the counters grow by a fixed set of names, not one per distinct garbage."""
    import random

    from hypersdk.node.net.gate import REASONS
    from hypersdk.protocol import codec
    from hypersdk.protocol.errors import RemoteProtocolError
    d, ident = acme.member("a")
    g = Gate(d, ident)
    rng = random.Random(5)
    peer = Identity.generate().public_key
    samples = [rng.randbytes(rng.randrange(0, 300)) for _ in range(200)]
    samples += [codec.encode({"v": 1, f"x{i}": i}) for i in range(200)]
    samples += [codec.encode({"v": 1, "net": None, "cert": rng.randbytes(100), "join": None})]
    for payload in samples:
        with pytest.raises(RemoteProtocolError):
            g.judge(payload, peer)
        try:
            g.judge(payload, peer)
        except RemoteProtocolError as exc:
            from hypersdk.node.net.gate import _reason
            g._refused(ident.node_id, _reason(exc))
    names = {k for k in g.counters if k.startswith("refused: ")}
    assert names <= {f"refused: {r}" for r in (*REASONS, "malformed proof")}
    assert g.counters["refused"] == len(samples)
