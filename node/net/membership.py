"""This node's membership of a network: keys, its certificate, invitations, revocations.

DATA/network/ (0700; every file 0600):
    network.pub   the network's Ed25519 public key (32 raw bytes): pinned at
                  create or join, the one key certificates are checked against
    network.key   the network's private key, on nodes that hold it (admins);
                  absent when it was exported for offline custody
    member.cert   this node's own certificate (protocol/membership.py)
    state.json    invitations made here (BLAKE3 of each secret, never the
                  secret), certificates issued here, revocations known, the next
                  serial; rewritten atomically under state.lock

A node without DATA/network/ is in no network and works alone, as before.
The pure records and their checks are protocol/membership.py; this module
keeps them on disk and enforces the rules an issuer owes: a token is used at
most once and only before it expires; every certificate gets a new serial.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from hypersdk.node.errors import UserError
from hypersdk.node.files import flock, private_dir, write_atomic
from hypersdk.node.net.identity import Identity
from hypersdk.protocol import membership as ms

DIR = "network"
S = 10**9
CERT_LIFETIME_NS = 90 * 86400 * S         # certificates renew well before this
DEFAULT_INVITE_NS = 3600 * S              # an invitation is short-lived by default
MAX_INVITE_NS = 30 * 86400 * S
MAX_PENDING_INVITES = 1000


@dataclass
class Network:
    """What DATA/network/ says (read-only view)."""
    public: bytes
    cert: ms.Certificate
    has_key: bool
    name: str

    @property
    def id(self) -> bytes:
        return ms.network_id(self.public)

    def to_json(self) -> dict:
        return {"network": self.id.hex(), "name": self.name, "holds_network_key": self.has_key,
                "certificate": self.cert.to_json()}


def _dir(data_dir) -> Path:
    return Path(data_dir) / DIR


def load(data_dir) -> Network | None:
    """This node's network, or None when it is in none."""
    d = _dir(data_dir)
    if not (d / "network.pub").exists():
        return None
    try:
        public = (d / "network.pub").read_bytes()
        cert = ms.decode_certificate((d / "member.cert").read_bytes())
        name = json.loads((d / "state.json").read_text()).get("name", "")
    except (OSError, ValueError, ms.MembershipError) as exc:
        raise UserError(f"{d}: damaged network state ({exc}); restore it from a backup "
                        "or join again") from None
    if len(public) != ms.KEY_LEN or cert.net != ms.network_id(public):
        raise UserError(f"{d}: member.cert is not of the network in network.pub")
    return Network(public, cert, (d / "network.key").exists(), name)


@contextmanager
def _state(data_dir):
    """The state document, locked for read-modify-write; written back on success."""
    d = _dir(data_dir)
    with flock(d / "state.lock", exclusive=True):
        doc = json.loads((d / "state.json").read_text())
        yield doc
        write_atomic(d / "state.json", json.dumps(doc, indent=1, sort_keys=True).encode())


def create(data_dir, identity: Identity, *, name: str, site: str, now: int,
           key_out: str | None = None, cert_lifetime: int = CERT_LIFETIME_NS) -> Network:
    """Create a network: a new network key, and this node as its first member
    (admin + member). key_out: write the network key there (mode 0600) instead
    of keeping it in the data dir (offline custody)."""
    d = _dir(data_dir)
    if (d / "network.pub").exists():
        raise UserError(f"this node is already in network {load(data_dir).id.hex()[:16]} "
                        f"({d}); a node belongs to one network")
    if key_out is not None and os.path.lexists(key_out):
        raise UserError(f"{key_out} exists: give a new file for the network key")
    private_dir(d)
    key = Identity.generate()
    cert = ms.issue_certificate(key, identity.public_key, site=site,
                                roles=["admin", "member"], serial=1,
                                not_before=now, expires=now + cert_lifetime)
    write_atomic(d / "state.json", json.dumps({"name": name, "next_serial": 2, "invites": {},
                                               "issued": [cert.raw.hex()], "revocations": [],
                                               "cert_lifetime_ns": cert_lifetime},
                                              indent=1, sort_keys=True).encode())
    write_atomic(d / "member.cert", cert.raw)
    if key_out is not None:
        key.save(key_out)
    else:
        key.save(d / "network.key")
    write_atomic(d / "network.pub", key.public_key)       # last: its presence means "created"
    return load(data_dir)


def _network_key(data_dir) -> Identity:
    path = _dir(data_dir) / "network.key"
    if not path.exists():
        raise UserError("this node does not hold the network key (it is kept offline or on "
                        "an admin node): run this on a node that holds it")
    return Identity.load(path)


def _need(data_dir) -> Network:
    net = load(data_dir)
    if net is None:
        raise UserError("this node is in no network: create one (`hypersdk network create`) "
                        "or join one (`hypersdk join TOKEN`)")
    return net


def invite(data_dir, *, site: str, roles, expires_in: int, addrs, now: int,
           share_key: bool = True) -> ms.Token:
    """A one-time invitation token (the secret is returned, only its hash kept)."""
    net = _need(data_dir)
    _network_key(data_dir)                       # only a key holder may admit members
    if not 0 < expires_in <= MAX_INVITE_NS:
        raise UserError("an invitation expires within 30 days")
    if not addrs:
        raise UserError("no address to put in the token: start the node (`hypersdk node "
                        "run`) or give --addr MULTIADDR")
    token = ms.Token(net.public, os.urandom(32), site, tuple(sorted(set(roles))),
                     now + expires_in, tuple(addrs))
    text = token.encode()                        # validates every field
    with _state(data_dir) as st:
        inv = {h: v for h, v in st["invites"].items() if v["expires"] > now or v["used_by"]}
        if sum(1 for v in inv.values() if not v["used_by"]) >= MAX_PENDING_INVITES:
            raise UserError(f"{MAX_PENDING_INVITES} invitations are pending: wait for them "
                            "to be used or to expire")
        inv[token.secret_hash.hex()] = {"site": site, "roles": list(token.roles),
                                        "expires": token.expires, "used_by": None,
                                        "share_key": bool(share_key)}
        st["invites"] = inv
    assert ms.decode_token(text) == token
    return token


def redeem(data_dir, secret: bytes, node: bytes, *, now: int) -> ms.Certificate:
    """Issue the certificate an invitation promised to the node that presents its
    secret (the inviter's side of a join); each invitation works once."""
    return redeem_invitation(data_dir, secret, node, now=now)[0]


def redeem_invitation(data_dir, secret: bytes, node: bytes, *,
                      now: int) -> tuple[ms.Certificate, bool]:
    """redeem(), and whether the invitation shares the tenant's data key."""
    key = _network_key(data_dir)
    h = ms.secret_hash(secret).hex()
    with _state(data_dir) as st:
        inv = st["invites"].get(h)
        if inv is None:
            raise UserError("invitation not known here (made by another node, or garbage)")
        if inv["used_by"]:
            raise UserError("invitation already used: ask for a new one")
        if now >= inv["expires"]:
            raise UserError("invitation expired: ask for a new one")
        serial = st["next_serial"]
        cert = ms.issue_certificate(key, node, site=inv["site"], roles=inv["roles"],
                                    serial=serial, not_before=now,
                                    expires=now + _lifetime(st))
        inv["used_by"] = node.hex()
        st["next_serial"] = serial + 1
        st["issued"].append(cert.raw.hex())
    return cert, bool(inv.get("share_key", True))


def _lifetime(st: dict) -> int:
    return int(st.get("cert_lifetime_ns") or CERT_LIFETIME_NS)


def renew(data_dir, raw: bytes, node: bytes, *, now: int) -> ms.Certificate:
    """The issuer's side of a renewal: a new certificate (same site and roles, a new
    serial, a fresh lifetime) for the member that presents its current one."""
    key = _network_key(data_dir)
    net = _need(data_dir)
    try:
        old = ms.check_certificate(net.public, raw, now=now, node=node,
                                   revocations=revocations(data_dir))
    except ms.MembershipError as exc:
        raise UserError(f"cannot renew: {exc}") from None
    with _state(data_dir) as st:
        serial = max(st["next_serial"], old.serial + 1)
        cert = ms.issue_certificate(key, node, site=old.site, roles=old.roles, serial=serial,
                                    not_before=now, expires=now + _lifetime(st))
        st["next_serial"] = serial + 1
        st["issued"].append(cert.raw.hex())
    return cert


def install_certificate(data_dir, raw: bytes, identity: Identity, *, now: int) -> ms.Certificate:
    """Keep a renewed certificate of this node: of our network, for our key, valid
    now, newer than the one we hold."""
    net = _need(data_dir)
    try:
        cert = ms.check_certificate(net.public, raw, now=now, node=identity.public_key,
                                    revocations=revocations(data_dir))
    except ms.MembershipError as exc:
        raise UserError(f"the renewed certificate does not check: {exc}") from None
    if cert.serial <= net.cert.serial:
        raise UserError(f"the renewed certificate (serial {cert.serial}) is not newer than "
                        f"ours ({net.cert.serial})")
    write_atomic(_dir(data_dir) / "member.cert", cert.raw)
    return cert


def revoke(data_dir, node: bytes, *, now: int, reason: str = "") -> ms.Revocation:
    """Revoke every certificate issued to `node` so far."""
    key = _network_key(data_dir)
    net = _need(data_dir)
    if node == net.cert.node:
        raise UserError("a node cannot revoke itself")
    with _state(data_dir) as st:
        serials = [c.serial for c in map(ms.decode_certificate, map(bytes.fromhex, st["issued"]))
                   if c.node == node]
        if not serials:
            raise UserError(f"no certificate was issued here to node {node.hex()[:16]}")
        r = ms.issue_revocation(key, node, serial=max(serials), time=now, reason=reason)
        st["revocations"].append(r.raw.hex())
    return r


def add_revocation(data_dir, r: ms.Revocation) -> bool:
    """Keep a revocation learned from the network (checked by the caller); False if known."""
    with _state(data_dir) as st:
        if r.raw.hex() in st["revocations"]:
            return False
        st["revocations"].append(r.raw.hex())
    return True


def revocations(data_dir) -> list[ms.Revocation]:
    d = _dir(data_dir)
    if not (d / "state.json").exists():
        return []
    st = json.loads((d / "state.json").read_text())
    return [ms.decode_revocation(bytes.fromhex(r)) for r in st["revocations"]]


def members(data_dir, *, now: int) -> list[dict]:
    """Every certificate this node issued or holds, newest per node, with its status."""
    net = _need(data_dir)
    st = json.loads((_dir(data_dir) / "state.json").read_text())
    certs = [ms.decode_certificate(bytes.fromhex(c)) for c in st["issued"]] + [net.cert]
    seen = _seen(data_dir)
    for v in seen.values():
        try:
            certs.append(ms.check_certificate(net.public, bytes.fromhex(v["cert"]),
                                              now=v["last_seen_ns"]))
        except (ms.MembershipError, ValueError, KeyError, TypeError):
            continue                            # damaged or foreign: not a member we know
    revs = revocations(data_dir)
    newest: dict[bytes, ms.Certificate] = {}
    for c in certs:
        if c.node not in newest or c.serial > newest[c.node].serial:
            newest[c.node] = c
    out = []
    for c in sorted(newest.values(), key=lambda c: (c.site, c.node)):
        try:
            ms.check_certificate(net.public, c.raw, now=now, revocations=revs)
            status = "valid"
        except ms.NotAMember as exc:
            status = str(exc)
        last = seen.get(c.node.hex(), {}).get("last_seen_ns")
        out.append(dict(c.to_json(), status=status, this_node=c.node == net.cert.node,
                        last_seen_ns=last, revoked=any(r.revokes(c) for r in revs)))
    return out


def _seen(data_dir) -> dict:
    """DATA/network/seen.json: members whose certificate a running node checked on a
    connection, with when (node/net/gate.py writes it)."""
    try:
        doc = json.loads((_dir(data_dir) / "seen.json").read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def enroll(data_dir, token: ms.Token, answer: ms.JoinAnswer, identity: Identity, *,
           now: int) -> Network:
    """Keep the certificate a join brought back, after checking it against what the
    token promised: the token's network key (pinned: the answer must name the same
    key), this node's key, the site and roles offered, valid now."""
    d = _dir(data_dir)
    if (d / "network.pub").exists():
        raise UserError(f"this node is already in network {load(data_dir).id.hex()[:16]}")
    if answer.network != token.network:
        raise UserError("the inviter answered for another network than the token names")
    revs = []
    for raw in answer.revocations:
        revs.append(ms.check_revocation(token.network, raw))
    try:
        cert = ms.check_certificate(token.network, answer.cert, now=now, revocations=revs,
                                    node=identity.public_key)
    except ms.MembershipError as exc:
        raise UserError(f"the certificate the inviter sent does not check: {exc}") from None
    if cert.site != token.site or cert.roles != token.roles:
        raise UserError(f"the inviter issued site {cert.site!r} roles {list(cert.roles)}, "
                        f"not what the token offered ({token.site!r}, {list(token.roles)})")
    private_dir(d)
    write_atomic(d / "state.json", json.dumps({"name": answer.name, "next_serial": 0, "invites": {},
                                         "issued": [], "revocations": [r.raw.hex() for r in revs]},
                                        indent=1, sort_keys=True).encode())
    write_atomic(d / "member.cert", cert.raw)
    write_atomic(d / "network.pub", token.network)        # last: its presence means "joined"
    return load(data_dir)
