"""node/net/membership.py and its commands: creating a network, inviting, redeeming
an invitation exactly once before it expires, revoking, listing members.

(Joining over the network and refusing non-members on every connection are the
next part of issue 16; redeem() here is the inviter's side of a join.)
"""
from __future__ import annotations

import json
import os
import stat

import pytest
from conftest import Cli

from hypersdk.node.errors import UserError
from hypersdk.node.net import membership
from hypersdk.node.net.identity import Identity
from hypersdk.protocol import membership as ms

S = 10**9
NOW = 1_800_000_000 * S
ADDR = ("/ip4/127.0.0.1/tcp/4001",)


@pytest.fixture
def admin(tmp_path):
    d = tmp_path / "admin"
    ident = Identity.generate()
    net = membership.create(d, ident, name="acme", site="hq", now=NOW)
    return d, ident, net


def test_create_makes_a_private_network_dir_and_an_admin_certificate(admin):
    d, ident, net = admin
    assert net.has_key and net.name == "acme"
    c = ms.check_certificate(net.public, net.cert.raw, now=NOW, node=ident.public_key)
    assert c.roles == ("admin", "member") and c.site == "hq"
    assert stat.S_IMODE(os.stat(d / "network").st_mode) == 0o700
    for f in (d / "network").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) & 0o077 == 0, f"{f.name} is readable by others"
    with pytest.raises(UserError, match="already in network"):
        membership.create(d, ident, name="again", site="hq", now=NOW)


def test_an_invitation_is_redeemed_once_before_it_expires(admin):
    d, _, net = admin
    t = membership.invite(d, site="plant-7", roles=["member"], expires_in=3600 * S,
                          addrs=ADDR, now=NOW)
    assert ms.decode_token(t.encode()).network == net.public
    assert t.secret.hex() not in (d / "network" / "state.json").read_text()   # hash only
    joiner = Identity.generate()
    c = membership.redeem(d, t.secret, joiner.public_key, now=NOW + S)
    ms.check_certificate(net.public, c.raw, now=NOW + 2 * S, node=joiner.public_key)
    assert c.site == "plant-7" and c.roles == ("member",) and c.serial == 2
    with pytest.raises(UserError, match="already used"):
        membership.redeem(d, t.secret, Identity.generate().public_key, now=NOW + 2 * S)
    late = membership.invite(d, site="x", roles=["member"], expires_in=60 * S, addrs=ADDR,
                             now=NOW)
    with pytest.raises(UserError, match="expired"):
        membership.redeem(d, late.secret, joiner.public_key, now=NOW + 60 * S)
    with pytest.raises(UserError, match="not known"):
        membership.redeem(d, os.urandom(32), joiner.public_key, now=NOW)


def test_revocation_and_members(admin):
    d, ident, net = admin
    joiner = Identity.generate()
    t = membership.invite(d, site="plant-7", roles=["member"], expires_in=3600 * S,
                          addrs=ADDR, now=NOW)
    c = membership.redeem(d, t.secret, joiner.public_key, now=NOW)
    assert {m["site"]: m["status"] for m in membership.members(d, now=NOW)} == {
        "hq": "valid", "plant-7": "valid"}
    r = membership.revoke(d, joiner.public_key, now=NOW, reason="site closed")
    assert r.serial == c.serial
    with pytest.raises(ms.NotAMember, match="revoked"):
        ms.check_certificate(net.public, c.raw, now=NOW, revocations=membership.revocations(d))
    assert {m["site"]: m["status"] for m in membership.members(d, now=NOW)}["plant-7"] == \
        "revoked"
    with pytest.raises(UserError, match="cannot revoke itself"):
        membership.revoke(d, ident.public_key, now=NOW)
    with pytest.raises(UserError, match="no certificate was issued"):
        membership.revoke(d, Identity.generate().public_key, now=NOW)


def test_offline_key_custody_means_no_invitations_here(tmp_path):
    d = tmp_path / "n"
    key_file = tmp_path / "offline.key"
    net = membership.create(d, Identity.generate(), name="", site="hq", now=NOW,
                            key_out=str(key_file))
    assert not net.has_key and stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert ms.network_id(Identity.load(key_file).public_key) == net.id
    with pytest.raises(UserError, match="does not hold the network key"):
        membership.invite(d, site="x", roles=["member"], expires_in=S, addrs=ADDR, now=NOW)


def test_commands_through_real_processes(tmp_path):
    cli = Cli(tmp_path / "data")
    assert cli.json("network", "show") == {"network": None}
    for args in (["members"], ["invite", "--site", "x", "--addr", ADDR[0]]):
        p = cli(*args, ok=False)                     # no network yet: one clear line
        assert p.returncode == 1 and "in no network" in p.stderr
    net = cli.json("network", "create", "--name", "acme", "--site", "hq")
    tok = cli.json("invite", "--site", "plant-7", "--expires", "30m", "--addr", ADDR[0])
    t = ms.decode_token(tok["token"])
    assert t.network.hex() != net["network"] and ms.network_id(t.network).hex() == \
        net["network"]
    assert tok["site"] == "plant-7" and tok["roles"] == ["member"]
    for bad, code in ((["invite", "--site", "x", "--expires", "soon"], 2),
                      (["invite", "--site", "x", "--expires", "31d", "--addr", ADDR[0]], 1),
                      (["revoke", "zz"], 2), (["revoke", "0000"], 1)):
        p = cli(*bad, ok=False)
        assert p.returncode == code and len(p.stderr.strip().splitlines()) == 1, p.stderr
    rows = cli.json("members")
    assert [r["site"] for r in rows] == ["hq"] and rows[0]["this_node"]
    state = json.loads((tmp_path / "data" / "network" / "state.json").read_text())
    assert len(state["invites"]) == 1


def test_a_joiner_whose_clock_runs_far_behind_gets_one_clear_reason(admin):
    """The inviter issues a certificate valid from its own 'now'; a joiner whose clock
    is more than MAX_SKEW behind cannot use it yet and is told to check the clocks;
    within the tolerance it joins."""
    d, _, net = admin
    for behind, ok in ((ms.MAX_SKEW_NS - S, True), (ms.MAX_SKEW_NS + 60 * S, False)):
        joiner = Identity.generate()
        t = membership.invite(d, site="p", roles=["member"], expires_in=3600 * S,
                              addrs=ADDR, now=NOW)
        cert = membership.redeem(d, t.secret, joiner.public_key, now=NOW)
        answer = ms.JoinAnswer(cert.raw, net.public, (), "acme")
        where = d.parent / f"j{behind}"
        if ok:
            assert membership.enroll(where, t, answer, joiner, now=NOW - behind).cert == cert
        else:
            with pytest.raises(UserError, match=r"not valid yet \(check the clocks\)"):
                membership.enroll(where, t, answer, joiner, now=NOW - behind)
            assert membership.load(where) is None            # nothing half-written
