"""Network membership: the network key, member certificates, revocations, invitations.

Pure: no I/O, no clock (time is an argument, nanoseconds since the epoch).

A network is an Ed25519 key pair. Its id is BLAKE3 of the public key; a node
learns the public key itself when it joins and pins it, so the id alone is
never trusted. The network key signs two kinds of record:

    certificate  {v, net, node, site, roles, serial, not_before, expires}
                 node: the member's 32-byte Ed25519 node key (its peer id);
                 roles: sorted, from ROLES ("member": store, serve, verify;
                 "admin": invite and revoke, i.e. may hold the network key)
    revocation   {v, net, node, serial, time, reason}
                 revokes every certificate of `node` whose serial <= serial
                 (so a renewed certificate, serial + 1, outlives a revocation
                 of an older one only if it was issued after it)

Both are `{"rec": payload, "sig": Ed25519(network key, DOMAIN + payload)}` in
canonical msgpack (protocol/codec.py), with a domain string per kind so a
signature over one kind can never be replayed as another. Decoding bounds
every size and raises RemoteProtocolError subclasses only.

An invitation token is a bearer secret, not a signed record: it names the
network (its public key, so the joiner can check the certificate it gets
back), where to reach the inviter, a random one-time secret, the site and
roles offered and an expiry. The inviter keeps BLAKE3(secret) until it is
used or expires; `hypersdk join TOKEN` presents the secret over an
authenticated connection, so a token works once and only for the node that
used it first. Text form: "hsdk1." + base64url(canonical msgpack), no padding.

Checking a certificate (check_certificate) answers, for a given network
public key and time: valid, or exactly why not (another network, a bad
signature, not yet valid, expired, revoked). Clock skew between members is
tolerated up to MAX_SKEW_NS on not_before; expiry is strict.
"""
from __future__ import annotations

import base64
from dataclasses import dataclass

import blake3
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from . import codec
from .errors import LocalProtocolError, RemoteProtocolError

VERSION = 1
KEY_LEN = 32
ROLES = ("admin", "member")
MAX_SITE = 64
MAX_REASON = 256
MAX_ADDRS = 8
MAX_ADDR = 256
MAX_RECORD = 2048                         # bytes of one encoded certificate / revocation
MAX_TOKEN = 4096                          # bytes of a token's text form
MAX_SKEW_NS = 5 * 60 * 10**9              # a member's clock may run 5 minutes behind
MAX_TIME = (1 << 63) - 1
TOKEN_PREFIX = "hsdk1."
CERT_DOMAIN = b"hypersdk member certificate v1\0"
REVOKE_DOMAIN = b"hypersdk revocation v1\0"


class MembershipError(RemoteProtocolError):
    """A certificate, revocation or token is malformed or does not check out."""


class NotAMember(MembershipError):
    """A well-formed certificate that does not admit its holder (the reason says why)."""


def network_id(network_public: bytes) -> bytes:
    """The network's id: BLAKE3 of its Ed25519 public key."""
    return blake3.blake3(b"hypersdk network\0" + network_public).digest()


# -- field checks ------------------------------------------------------------------
def _key(v) -> bool:
    return type(v) is bytes and len(v) == KEY_LEN


def _time(v) -> bool:
    return type(v) is int and 0 <= v <= MAX_TIME


def _text(v, n: int) -> bool:
    return type(v) is str and 0 < len(v) <= n and v.isprintable()


def _roles(v) -> bool:
    return (type(v) is list and 0 < len(v) <= len(ROLES) and all(r in ROLES for r in v)
            and v == sorted(set(v)))


_CERT = {"v": lambda v: v == VERSION, "net": _key, "node": _key,
         "site": lambda v: _text(v, MAX_SITE), "roles": _roles, "serial": _time,
         "not_before": _time, "expires": _time}
_REVOKE = {"v": lambda v: v == VERSION, "net": _key, "node": _key, "serial": _time,
           "time": _time, "reason": lambda v: type(v) is str and len(v) <= MAX_REASON}


def _problem(doc, schema) -> str | None:
    if type(doc) is not dict:
        return "not a map"
    if doc.keys() != schema.keys():
        return f"fields {sorted(doc)} are not {sorted(schema)}"
    for k, check in schema.items():
        if not check(doc[k]):
            return f"field {k!r} is invalid or out of bounds"
    return None


# -- signed records ----------------------------------------------------------------
@dataclass(frozen=True)
class Certificate:
    net: bytes                    # the network id
    node: bytes                   # the member's node key
    site: str
    roles: tuple[str, ...]
    serial: int
    not_before: int
    expires: int
    raw: bytes                    # the signed encoding

    @property
    def fingerprint(self) -> bytes:
        return blake3.blake3(self.raw).digest()

    def to_json(self) -> dict:
        return {"network": self.net.hex(), "node": self.node.hex(), "site": self.site,
                "roles": list(self.roles), "serial": self.serial,
                "not_before_ns": self.not_before, "expires_ns": self.expires,
                "fingerprint": self.fingerprint.hex()}


@dataclass(frozen=True)
class Revocation:
    net: bytes
    node: bytes
    serial: int
    time: int
    reason: str
    raw: bytes

    def revokes(self, cert: Certificate) -> bool:
        return cert.net == self.net and cert.node == self.node and cert.serial <= self.serial

    def to_json(self) -> dict:
        return {"network": self.net.hex(), "node": self.node.hex(), "serial": self.serial,
                "time_ns": self.time, "reason": self.reason}


def _sign(signer, domain: bytes, doc: dict, schema) -> bytes:
    problem = _problem(doc, schema)
    if problem:
        raise LocalProtocolError(problem)
    if network_id(signer.public_key) != doc["net"]:
        raise LocalProtocolError("the signer's key is not this network's key")
    payload = codec.encode(doc)
    raw = codec.encode({"rec": payload, "sig": signer.sign(domain + payload)})
    if len(raw) > MAX_RECORD:
        raise LocalProtocolError(f"record of {len(raw)} bytes exceeds {MAX_RECORD}")
    return raw


def issue_certificate(network_key, node: bytes, *, site: str, roles, serial: int,
                      not_before: int, expires: int,
                      network: bytes | None = None) -> Certificate:
    """Sign a member certificate with the network key (an object with .public_key
    and .sign, e.g. node.net.identity.Identity). network: the network's public key,
    when the caller means a particular one (refused unless it is the signer's)."""
    net = network_id(network if network is not None else network_key.public_key)
    doc = {"v": VERSION, "net": net, "node": node,
           "site": site, "roles": sorted(set(roles)), "serial": serial,
           "not_before": not_before, "expires": expires}
    if expires <= not_before:
        raise LocalProtocolError("a certificate must expire after it becomes valid")
    return decode_certificate(_sign(network_key, CERT_DOMAIN, doc, _CERT))


def issue_revocation(network_key, node: bytes, *, serial: int, time: int,
                     reason: str = "") -> Revocation:
    doc = {"v": VERSION, "net": network_id(network_key.public_key), "node": node,
           "serial": serial, "time": time, "reason": reason}
    return decode_revocation(_sign(network_key, REVOKE_DOMAIN, doc, _REVOKE))


def _open(raw, what: str) -> tuple[bytes, bytes, dict]:
    if not isinstance(raw, (bytes, bytearray, memoryview)) or len(raw) > MAX_RECORD:
        raise MembershipError(f"{what}: not a record of at most {MAX_RECORD} bytes")
    outer = codec.decode(bytes(raw), max_size=MAX_RECORD)
    if (type(outer) is not dict or outer.keys() != {"rec", "sig"}
            or type(outer["rec"]) is not bytes or type(outer["sig"]) is not bytes
            or len(outer["sig"]) != 64):
        raise MembershipError(f"{what}: not a signed record")
    doc = codec.decode(outer["rec"], max_size=MAX_RECORD)
    return outer["rec"], outer["sig"], doc


def decode_certificate(raw) -> Certificate:
    """Parse a certificate (signature not checked: check_certificate does that)."""
    payload, _, doc = _open(raw, "certificate")
    problem = _problem(doc, _CERT)
    if problem:
        raise MembershipError(f"certificate: {problem}")
    if doc["expires"] <= doc["not_before"]:
        raise MembershipError("certificate: expires before it becomes valid")
    return Certificate(doc["net"], doc["node"], doc["site"], tuple(doc["roles"]),
                       doc["serial"], doc["not_before"], doc["expires"], bytes(raw))


def decode_revocation(raw) -> Revocation:
    payload, _, doc = _open(raw, "revocation")
    problem = _problem(doc, _REVOKE)
    if problem:
        raise MembershipError(f"revocation: {problem}")
    return Revocation(doc["net"], doc["node"], doc["serial"], doc["time"], doc["reason"],
                      bytes(raw))


def _verify(network_public: bytes, domain: bytes, raw: bytes, what: str) -> None:
    payload, sig, _ = _open(raw, what)
    try:
        Ed25519PublicKey.from_public_bytes(network_public).verify(sig, domain + payload)
    except (InvalidSignature, ValueError):
        raise MembershipError(f"{what}: not signed by this network's key") from None


def check_revocation(network_public: bytes, raw) -> Revocation:
    """A revocation signed by this network's key; MembershipError otherwise."""
    r = decode_revocation(raw)
    if r.net != network_id(network_public):
        raise MembershipError("revocation: for another network")
    _verify(network_public, REVOKE_DOMAIN, r.raw, "revocation")
    return r


def check_certificate(network_public: bytes, raw, *, now: int,
                      revocations=(), node: bytes | None = None) -> Certificate:
    """The certificate if it admits its holder into this network at `now`;
    NotAMember (saying why) if well-formed but not admitting, MembershipError if
    malformed or forged. node: the key the peer proved it holds (the handshake's
    peer key), which must be the certificate's."""
    cert = decode_certificate(raw)
    if cert.net != network_id(network_public):
        raise NotAMember("a member of another network")
    _verify(network_public, CERT_DOMAIN, cert.raw, "certificate")
    if node is not None and cert.node != node:
        raise NotAMember("a certificate of another node")
    if now + MAX_SKEW_NS < cert.not_before:
        raise NotAMember("certificate not valid yet (check the clocks)")
    if now >= cert.expires:
        raise NotAMember("certificate expired")
    for r in revocations:
        if r.revokes(cert):
            raise NotAMember("revoked")
    return cert


# -- invitation tokens -------------------------------------------------------------
def secret_hash(secret: bytes) -> bytes:
    """BLAKE3 of an invitation's secret: what its inviter keeps."""
    return blake3.blake3(b"hypersdk invitation\0" + secret).digest()


_TOKEN = {"v": lambda v: v == VERSION, "network": _key, "secret": _key,
          "site": lambda v: _text(v, MAX_SITE), "roles": _roles, "expires": _time,
          "addrs": lambda v: (type(v) is list and 0 < len(v) <= MAX_ADDRS
                              and all(_text(a, MAX_ADDR) for a in v))}


@dataclass(frozen=True)
class Token:
    network: bytes                # the network's public key
    secret: bytes                 # 32 random bytes, used once
    site: str
    roles: tuple[str, ...]
    expires: int
    addrs: tuple[str, ...]        # the inviter's multiaddrs

    @property
    def secret_hash(self) -> bytes:
        """What the inviter keeps: the secret itself never needs to be stored."""
        return secret_hash(self.secret)

    def encode(self) -> str:
        doc = {"v": VERSION, "network": self.network, "secret": self.secret,
               "site": self.site, "roles": sorted(set(self.roles)), "expires": self.expires,
               "addrs": list(self.addrs)}
        problem = _problem(doc, _TOKEN)
        if problem:
            raise LocalProtocolError(f"token: {problem}")
        text = TOKEN_PREFIX + base64.urlsafe_b64encode(codec.encode(doc)).decode().rstrip("=")
        if len(text) > MAX_TOKEN:
            raise LocalProtocolError("token too long (too many or too long addresses)")
        return text


def decode_token(text: str) -> Token:
    """Parse an invitation token's text; MembershipError with the reason otherwise."""
    if type(text) is not str or len(text) > MAX_TOKEN:
        raise MembershipError("not an invitation token (too long)")
    text = text.strip()
    if not text.startswith(TOKEN_PREFIX):
        raise MembershipError(f"not an invitation token (it starts with {TOKEN_PREFIX!r})")
    body = text[len(TOKEN_PREFIX):]
    try:
        data = base64.b64decode(body + "=" * (-len(body) % 4), altchars=b"-_", validate=True)
    except ValueError:
        raise MembershipError("not an invitation token (damaged: not base64)") from None
    try:
        doc = codec.decode(data, max_size=MAX_TOKEN)
    except RemoteProtocolError as exc:
        raise MembershipError(f"not an invitation token (damaged: {exc})") from None
    problem = _problem(doc, _TOKEN)
    if problem:
        raise MembershipError(f"not an invitation token ({problem})")
    return Token(doc["network"], doc["secret"], doc["site"], tuple(doc["roles"]),
                 doc["expires"], tuple(doc["addrs"]))


# -- joining with a token (protocol JOIN_PROTOCOL) ------------------------------------
# One request and one answer on a fresh stream from the joiner to the inviter,
# each a frame: a 4-byte big-endian length and a canonical msgpack map.
#   request  {v, secret, node}        node: the joiner's public key, which must be the
#                                     key of the authenticated connection
#   answer   {v, cert, network, revocations, name, data_key}  or  {v, refused: reason}
#            data_key: the tenant's 32-byte data key when the invitation shares it
#            (nil for a storage-only member); confidential: the join runs over Noise
JOIN_PROTOCOL = "/hypersdk/join/1"
MAX_JOIN_FRAME = 256 << 10
MAX_JOIN_REVOCATIONS = 100
MAX_NAME = 128
_JOIN_REQ = {"v": lambda v: v == VERSION, "secret": _key, "node": _key}
_JOIN_OK = {"v": lambda v: v == VERSION, "cert": lambda v: type(v) is bytes,
            "network": _key, "name": lambda v: type(v) is str and len(v) <= MAX_NAME,
            "revocations": lambda v: (type(v) is list and len(v) <= MAX_JOIN_REVOCATIONS
                                      and all(type(r) is bytes for r in v)),
            "data_key": lambda v: v is None or _key(v)}
_JOIN_NO = {"v": lambda v: v == VERSION,
            "refused": lambda v: _text(v, MAX_REASON)}     # printed to users: printable


def frame(doc: dict) -> bytes:
    payload = codec.encode(doc)
    if len(payload) > MAX_JOIN_FRAME:
        raise LocalProtocolError(f"join frame of {len(payload)} bytes exceeds {MAX_JOIN_FRAME}")
    return len(payload).to_bytes(4, "big") + payload


def frame_length(header: bytes) -> int:
    n = int.from_bytes(header, "big")
    if not 0 < n <= MAX_JOIN_FRAME:
        raise MembershipError(f"join frame of {n} bytes (at most {MAX_JOIN_FRAME})")
    return n


def join_request(secret: bytes, node: bytes) -> bytes:
    return frame({"v": VERSION, "secret": secret, "node": node})


def decode_join_request(payload: bytes) -> tuple[bytes, bytes]:
    doc = codec.decode(payload, max_size=MAX_JOIN_FRAME)
    problem = _problem(doc, _JOIN_REQ)
    if problem:
        raise MembershipError(f"join request: {problem}")
    return doc["secret"], doc["node"]


def join_answer(cert: bytes, network: bytes, revocations, name: str,
                data_key: bytes | None = None) -> bytes:
    return frame({"v": VERSION, "cert": cert, "network": network, "name": name[:MAX_NAME],
                  "revocations": list(revocations)[-MAX_JOIN_REVOCATIONS:],
                  "data_key": data_key})


def join_refusal(reason: str) -> bytes:
    return frame({"v": VERSION, "refused": (reason or "refused")[:MAX_REASON]})


@dataclass(frozen=True)
class JoinAnswer:
    cert: bytes
    network: bytes
    revocations: tuple[bytes, ...]
    name: str
    data_key: bytes | None = None


class JoinRefused(MembershipError):
    """The inviter refused (the reason is its words)."""


def _answer(payload: bytes, schema: dict, what: str, refused) -> dict:
    """An answer frame's document: `refused(reason)` raised for a refusal,
    MembershipError if it is neither a valid refusal nor a valid `schema` answer."""
    doc = codec.decode(payload, max_size=MAX_JOIN_FRAME)
    if type(doc) is dict and "refused" in doc:
        problem = _problem(doc, _JOIN_NO)
        if problem:
            raise MembershipError(f"{what}: {problem}")
        raise refused(doc["refused"])
    problem = _problem(doc, schema)
    if problem:
        raise MembershipError(f"{what}: {problem}")
    return doc


def decode_join_answer(payload: bytes) -> JoinAnswer:
    """The inviter's answer; JoinRefused with its reason, MembershipError if malformed."""
    doc = _answer(payload, _JOIN_OK, "join answer", JoinRefused)
    return JoinAnswer(doc["cert"], doc["network"], tuple(doc["revocations"]), doc["name"],
                      doc["data_key"])


# -- proving membership on every connection -------------------------------------------
# Right after the Noise handshake of every libp2p connection, before the muxer and
# before any protocol handler, each side proves what it is in ONE Noise message
# (node/net/gate.py runs the exchange; this is the message and the decision):
#   initiator -> responder   Proof {v, net, cert, join}
#   responder -> initiator   Proof (admitted)   or  {v, refused: reason} and close
# net: the network id the sender is in (nil: in no network); cert: its member
# certificate (nil without one); join: an invitation's secret (a node joining with
# `hypersdk join TOKEN`; admitted to JOIN_PROTOCOL only). The initiator speaks
# first, so a stranger that dials a member learns nothing but the refusal (not
# the member's certificate, site or roles); a member that dials a node checks
# the answer the same way and hangs up on a non-member.
MAX_PROOF = 4096
_PROOF = {"v": lambda v: v == VERSION, "net": lambda v: v is None or _key(v),
          "cert": lambda v: v is None or (type(v) is bytes and 0 < len(v) <= MAX_RECORD),
          "join": lambda v: v is None or _key(v)}


@dataclass(frozen=True)
class Proof:
    net: bytes | None
    cert: bytes | None
    join: bytes | None


class Refused(MembershipError):
    """The other side refused us (its reason)."""


def proof(net: bytes | None, cert: bytes | None, join: bytes | None = None) -> bytes:
    doc = {"v": VERSION, "net": net, "cert": cert, "join": join}
    problem = _problem(doc, _PROOF)
    if problem:
        raise LocalProtocolError(f"proof: {problem}")
    return codec.encode(doc)


def refusal(reason: str) -> bytes:
    return codec.encode({"v": VERSION, "refused": (reason or "refused")[:MAX_REASON]})


def decode_proof(payload: bytes) -> Proof:
    """A Proof; Refused (with the peer's reason) or MembershipError if malformed."""
    if type(payload) is not bytes or not 0 < len(payload) <= MAX_PROOF:
        raise MembershipError(f"membership proof: not 1..{MAX_PROOF} bytes")
    doc = codec.decode(payload, max_size=MAX_PROOF)
    if type(doc) is dict and "refused" in doc:
        problem = _problem(doc, _JOIN_NO)
        if problem:
            raise MembershipError(f"membership refusal: {problem}")
        raise Refused(doc["refused"])
    problem = _problem(doc, _PROOF)
    if problem:
        raise MembershipError(f"membership proof: {problem}")
    return Proof(doc["net"], doc["cert"], doc["join"])


@dataclass(frozen=True)
class Admission:
    kind: str                        # "member", "joiner" (JOIN_PROTOCOL only) or "open"
    cert: Certificate | None = None


def admit(network_public: bytes | None, p: Proof, peer_key: bytes, *, now: int,
          revocations=(), invitation_state=lambda secret_hash: "invitation not known here"
          ) -> Admission:
    """Does this proof let the peer (which proved it holds peer_key) in?
    network_public None: we are in no network and admit anyone ("open").
    NotAMember with the reason otherwise. invitation_state(secret_hash): None if
    that invitation is pending here (unused, unexpired), else why not."""
    if network_public is None:
        return Admission("open")
    if p.cert is not None:
        return Admission("member", check_certificate(network_public, p.cert, now=now,
                                                     revocations=revocations, node=peer_key))
    if p.join is not None:
        why = invitation_state(secret_hash(p.join))
        if why is None:
            return Admission("joiner")
        raise NotAMember(why)
    if p.net is not None and p.net != network_id(network_public):
        raise NotAMember("a member of another network")
    raise NotAMember("not a member of this network")


# -- renewing a certificate (RENEW_PROTOCOL) ---------------------------------------------
# A member whose certificate has used two thirds of its life asks a node that holds
# the network key, over a members-only connection, for a new one: one request
# frame {v, renew: its current certificate}, one answer {v, cert} or {v, refused}.
# The issuer keeps the site and roles, gives a new serial and a fresh lifetime.
RENEW_PROTOCOL = "/hypersdk/renew/1"
# ... and then tells every connected member, on CERT_PROTOCOL, one frame {v, cert}
# (renew_answer's shape): peers that admitted it under the old certificate keep it.
CERT_PROTOCOL = "/hypersdk/cert/1"
_RENEW_REQ = {"v": lambda v: v == VERSION,
              "renew": lambda v: type(v) is bytes and 0 < len(v) <= MAX_RECORD}
_RENEW_OK = {"v": lambda v: v == VERSION,
             "cert": lambda v: type(v) is bytes and 0 < len(v) <= MAX_RECORD}


class RenewRefused(MembershipError):
    """The issuer refused to renew (its reason)."""


def renew_request(cert: bytes) -> bytes:
    return frame({"v": VERSION, "renew": cert})


def decode_renew_request(payload: bytes) -> bytes:
    doc = codec.decode(payload, max_size=MAX_JOIN_FRAME)
    problem = _problem(doc, _RENEW_REQ)
    if problem:
        raise MembershipError(f"renew request: {problem}")
    return doc["renew"]


def renew_answer(cert: bytes) -> bytes:
    return frame({"v": VERSION, "cert": cert})


def decode_renew_answer(payload: bytes) -> bytes:
    return _answer(payload, _RENEW_OK, "renew answer", RenewRefused)["cert"]


def renewal_due(cert: Certificate, now: int) -> bool:
    """Has the certificate used two thirds of its lifetime?"""
    return now >= cert.expires - (cert.expires - cert.not_before) // 3
