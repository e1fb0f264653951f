"""protocol/membership.py: certificates, revocations and invitation tokens.

What must hold: only the network key makes a certificate or revocation that
checks; any change to a signed record is refused; a certificate admits its
holder only in its network, to its node key, between not_before (less the
allowed skew) and expiry, and not once revoked; malformed input of any kind
raises RemoteProtocolError subclasses only, with a reason.
"""
from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given, settings
from hypothesis import strategies as st

from hypersdk.protocol import codec
from hypersdk.protocol import membership as ms
from hypersdk.protocol.errors import LocalProtocolError, RemoteProtocolError

S = 10**9
NOW = 1_800_000_000 * S
DAY = 86400 * S


class Key:
    """An Ed25519 signer (the interface node.net.identity.Identity offers)."""

    def __init__(self, seed: int):
        self._k = Ed25519PrivateKey.from_private_bytes(bytes([seed]) * 32)
        self.public_key = self._k.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def sign(self, data: bytes) -> bytes:
        return self._k.sign(data)


NET, OTHER, NODE, NODE2 = Key(1), Key(2), Key(3), Key(4)


def cert(net=NET, node=NODE, serial=1, not_before=NOW - DAY, expires=NOW + 30 * DAY,
         roles=("member",), site="plant-7"):
    return ms.issue_certificate(net, node.public_key, site=site, roles=roles, serial=serial,
                                not_before=not_before, expires=expires)


def check(c, *, now=NOW, revocations=(), node=NODE, net=NET):
    return ms.check_certificate(net.public_key, c.raw, now=now, revocations=revocations,
                                node=node.public_key)


def test_a_certificate_admits_its_node_in_its_network():
    c = check(cert(roles=("member", "admin")))
    assert c.node == NODE.public_key and c.site == "plant-7" and c.roles == ("admin", "member")
    assert c.net == ms.network_id(NET.public_key)
    assert c.to_json()["fingerprint"] == c.fingerprint.hex()


@pytest.mark.parametrize("case, reason", [
    ("another network", "another network"),
    ("another node", "another node"),
    ("expired", "expired"),
    ("not yet valid", "not valid yet"),
    ("revoked", "revoked"),
])
def test_a_certificate_refuses_with_the_reason(case, reason):
    c = cert()
    kw = {}
    if case == "another network":
        kw["net"] = OTHER
    elif case == "another node":
        kw["node"] = NODE2
    elif case == "expired":
        kw["now"] = c.expires
    elif case == "not yet valid":
        c = cert(not_before=NOW + ms.MAX_SKEW_NS + 1)
    elif case == "revoked":
        kw["revocations"] = [ms.issue_revocation(NET, NODE.public_key, serial=1, time=NOW)]
    with pytest.raises(ms.NotAMember, match=reason):
        check(c, **kw)


def test_clock_skew_up_to_the_bound_is_tolerated():
    check(cert(not_before=NOW + ms.MAX_SKEW_NS))


def test_a_revocation_covers_older_serials_only_and_only_for_its_node():
    r = ms.issue_revocation(NET, NODE.public_key, serial=5, time=NOW, reason="site lost")
    for serial in (1, 5):
        with pytest.raises(ms.NotAMember):
            check(cert(serial=serial), revocations=[r])
    check(cert(serial=6), revocations=[r])                 # renewed after the revocation
    check(cert(node=NODE2), node=NODE2, revocations=[r])   # another member is untouched


def test_only_the_network_key_makes_records_that_check():
    # another key cannot issue for this network...
    forged_doc = {"v": 1, "net": ms.network_id(NET.public_key), "node": NODE.public_key,
                  "site": "x", "roles": ["admin"], "serial": 1, "not_before": 0,
                  "expires": NOW * 2}
    payload = codec.encode(forged_doc)
    forged = codec.encode({"rec": payload, "sig": OTHER.sign(ms.CERT_DOMAIN + payload)})
    with pytest.raises(ms.MembershipError, match="not signed by this network"):
        ms.check_certificate(NET.public_key, forged, now=NOW)
    with pytest.raises(LocalProtocolError, match="not this network's key"):
        ms.issue_certificate(OTHER, NODE.public_key, site="x", roles=["member"], serial=1,
                             not_before=0, expires=1, network=NET.public_key)
    # ...nor revoke in it
    r = ms.issue_revocation(OTHER, NODE.public_key, serial=9, time=NOW)
    with pytest.raises(ms.MembershipError, match="another network"):
        ms.check_revocation(NET.public_key, r.raw)
    assert ms.check_revocation(NET.public_key, ms.issue_revocation(
        NET, NODE.public_key, serial=9, time=NOW).raw).serial == 9


def test_a_revocation_signature_is_not_a_certificate_signature():
    """Domain separation: the network key's signature over a payload as one kind
    of record never verifies as another kind."""
    c = cert()
    payload = codec.decode(c.raw)["rec"]
    resigned = codec.encode({"rec": payload, "sig": NET.sign(ms.REVOKE_DOMAIN + payload)})
    with pytest.raises(ms.MembershipError, match="not signed"):
        ms.check_certificate(NET.public_key, resigned, now=NOW)


def test_every_single_byte_change_of_a_certificate_is_refused():
    raw = cert().raw
    for i in range(len(raw)):
        for delta in (1, 0x80):
            b = bytearray(raw)
            b[i] = (b[i] + delta) % 256
            with pytest.raises(RemoteProtocolError):
                ms.check_certificate(NET.public_key, bytes(b), now=NOW, node=NODE.public_key)


@settings(max_examples=300)
@given(st.binary(max_size=3000))
def test_garbage_raises_only_protocol_errors(data):
    for fn in (ms.decode_certificate, ms.decode_revocation):
        try:
            fn(data)
        except RemoteProtocolError:
            pass
    try:
        ms.decode_token(ms.TOKEN_PREFIX + data.decode("latin-1"))
    except RemoteProtocolError:
        pass


def test_issuing_refuses_bad_fields():
    for kw in ({"roles": ["root"]}, {"roles": []}, {"site": ""}, {"site": "x" * 65},
               {"expires": NOW - 2 * DAY}, {"site": "bad\nsite"}):
        with pytest.raises(LocalProtocolError):
            cert(**kw)


def token(**kw):
    base = dict(network=NET.public_key, secret=bytes(range(32)), site="plant-7",
                roles=("member",), expires=NOW + 3600 * S,
                addrs=("/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWExample",))
    base.update(kw)
    return ms.Token(**base)


def test_a_token_round_trips_through_its_text():
    t = token()
    text = t.encode()
    assert text.startswith("hsdk1.") and "\n" not in text
    assert ms.decode_token("  " + text + "\n") == t
    assert len(t.secret_hash) == 32 and t.secret_hash != t.secret


@pytest.mark.parametrize("text, reason", [
    ("", "starts with"),
    ("hello", "starts with"),
    ("hsdk1.!!!", "base64"),
    ("hsdk1." + "A" * 40, "damaged"),
    ("hsdk1.", "damaged"),
    ("hsdk1." + "x" * 5000, "too long"),
])
def test_garbage_tokens_say_why(text, reason):
    with pytest.raises(ms.MembershipError, match=reason):
        ms.decode_token(text)


def test_a_truncated_or_altered_token_is_refused():
    text = token().encode()
    for cut in range(len(ms.TOKEN_PREFIX), len(text) - 1, 7):
        with pytest.raises(ms.MembershipError):
            ms.decode_token(text[:cut])
    import base64
    doc = codec.decode(base64.urlsafe_b64decode(text[6:] + "=" * (-len(text[6:]) % 4)))
    doc["extra"] = 1
    bad = ms.TOKEN_PREFIX + base64.urlsafe_b64encode(codec.encode(doc)).decode().rstrip("=")
    with pytest.raises(ms.MembershipError, match="fields"):
        ms.decode_token(bad)


def test_join_frames_round_trip_and_refusals_carry_their_reason():
    c = cert()
    payload = ms.join_answer(c.raw, NET.public_key, [], "acme")[4:]
    a = ms.decode_join_answer(payload)
    assert a.cert == c.raw and a.network == NET.public_key and a.name == "acme"
    with pytest.raises(ms.JoinRefused, match="invitation expired"):
        ms.decode_join_answer(ms.join_refusal("invitation expired")[4:])
    req = ms.join_request(bytes(32), NODE.public_key)
    assert ms.frame_length(req[:4]) == len(req) - 4
    assert ms.decode_join_request(req[4:]) == (bytes(32), NODE.public_key)
    for n in (0, ms.MAX_JOIN_FRAME + 1):
        with pytest.raises(ms.MembershipError):
            ms.frame_length(n.to_bytes(4, "big"))


@settings(max_examples=300)
@given(st.binary(max_size=2000))
def test_join_frames_of_garbage_raise_only_protocol_errors(data):
    for fn in (ms.decode_join_request, ms.decode_join_answer):
        try:
            fn(data)
        except RemoteProtocolError:
            pass
