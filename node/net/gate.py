"""The membership gate: every connection proves membership before anything runs on it.

    gate = Gate(data_dir, identity)          # reads DATA/network/ (node/net/membership.py)
    P2PTransport(identity, listen, gate=gate)

Where it sits. py-libp2p upgrades a TCP connection in three steps: the security
handshake (Noise: both node keys proven), the muxer (yamux), then streams and
their protocol handlers. The transport's Noise transport is wrapped
(node/net/p2p_transport.py `_GatedNoise`) so that the step after Noise is
`Gate.exchange`: one Noise message each way (protocol/membership.py, Proof). The
initiator speaks first; the responder admits it or sends a refusal with the
reason and closes. A refused connection never reaches the muxer, so no handler
(DHT, chunk exchange, audit gossip, possession, the fast channel's offer,
anything added later) ever sees it: a stranger learns the refusal and nothing
else. Refusals are counted by reason (`status`) and logged.

What admits a peer (protocol/membership.py `admit`):
- a certificate of this node's network, signed by the pinned network key, for
  the very key the peer proved in Noise, valid now, not revoked: "member";
- the secret of an invitation pending here: "joiner", allowed JOIN_PROTOCOL only;
- when this node is in no network: anyone ("open": a node alone works as before;
  `status` says so).

Keeping it true over time. `refresh()` re-reads DATA/network/ when a file
changed (a `network create`, `join`, `revoke` or new invitation by the CLI) and
`enforce()` (every ENFORCE_INTERVAL seconds, and at once when a revocation
arrives) returns the peers whose admission no longer holds: revoked, expired,
or admitted under another network state; the transport closes their
connections. A revocation learned from the network (`learn_revocation`, fed by
the audit gossip) is checked against the network key, kept in state.json and
enforced at once. Stated bound: a revoked member is cut off by a node within
ENFORCE_INTERVAL of the node learning the revocation.

The gate is the one place that knows who is a member now: the DHT, audit gossip
and the fast channel ask `is_member(node_id)`.
"""
from __future__ import annotations

import collections
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import trio

from hypersdk.dht.keys import node_id as _node_id
from hypersdk.node import runtime
from hypersdk.node.errors import UserError
from hypersdk.node.files import write_atomic
from hypersdk.node.net import membership
from hypersdk.node.net.transport import TransportError
from hypersdk.protocol import membership as ms
from hypersdk.protocol.errors import RemoteProtocolError

log = logging.getLogger(__name__)

PROOF_TIMEOUT = 5.0           # seconds the whole proof exchange may take
ENFORCE_INTERVAL = 1.0        # seconds between re-checks of every admitted peer
SEEN_FLUSH = 30.0             # seconds between writes of DATA/network/seen.json
MAX_SEEN = 10_000             # members remembered as seen


class MembershipRefused(TransportError):
    """A connection refused by membership (either side); the message says why,
    `reason` is the bare reason."""

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason or message


@dataclass
class Admitted:
    kind: str                          # "member", "joiner", "open"
    cert: ms.Certificate | None
    epoch: int                         # the gate's network epoch it was admitted under


class Gate:
    def __init__(self, data_dir, identity, *, clock=runtime.now_ns):
        self.data_dir = Path(data_dir)
        self.identity = identity
        self.clock = clock
        self.network: membership.Network | None = None
        self.revocations: list[ms.Revocation] = []
        self.epoch = 0                 # bumped when the network itself changes
        self.admitted: dict[bytes, Admitted] = {}      # node id -> its admission
        self.counters: collections.Counter = collections.Counter()
        self.joins: dict[bytes, tuple[bytes, bytes]] = {}   # node id -> (secret, network pub)
        self.seen: dict[str, dict] = {}                # node key hex -> {cert, last_seen}
        self.certs: dict[bytes, ms.Certificate] = {}   # node key -> newest valid certificate
        self._seen_dirty = False
        self._stamp = None
        self._invites: dict = {}
        self.refresh()
        self._load_seen()

    # -- the node's own state -----------------------------------------------------------
    def _files_stamp(self):
        d = self.data_dir / membership.DIR
        out = []
        for name in ("network.pub", "member.cert", "state.json"):
            try:
                st = (d / name).stat()
                out.append((st.st_mtime_ns, st.st_size, st.st_ino))
            except FileNotFoundError:
                out.append(None)
        return tuple(out)

    def refresh(self) -> bool:
        """Re-read DATA/network/ if it changed; True if it did."""
        stamp = self._files_stamp()
        if stamp == self._stamp:
            return False
        try:
            net = membership.load(self.data_dir)
            revs = membership.revocations(self.data_dir) if net is not None else []
            st = json.loads((self.data_dir / membership.DIR / "state.json").read_text()) \
                if net is not None else {}
        except (UserError, OSError, ValueError) as exc:
            log.warning("membership state unreadable, keeping the last one: %s", exc)
            return False
        self._stamp = stamp
        old = self.network
        if (old is None) != (net is None) or (old and net and old.id != net.id):
            self.epoch += 1
        if old is None or net is None or old.id != net.id:
            self.certs.clear()
        self.network = net
        self.revocations = [r for r in revs if net is not None and r.net == net.id]
        self._invites = st.get("invites", {})
        if net is not None:
            self._know(net.cert)
        return True

    # -- the certificates of members (a directory fed by handshakes and gossip) -----------
    def _know(self, cert: ms.Certificate) -> None:
        have = self.certs.get(cert.node)
        if have is None and len(self.certs) >= MAX_SEEN:
            return
        if have is None or cert.serial > have.serial or (
                cert.serial == have.serial and cert.expires > have.expires):
            self.certs[cert.node] = cert

    def learn_certs(self, raws) -> int:
        """Certificates that came with gossiped entries: kept if they admit their
        holder into our network now. Returns how many were new or newer."""
        if self.network is None:
            return 0
        n = 0
        for raw in raws:
            try:
                c = ms.check_certificate(self.network.public, raw, now=self.clock(),
                                         revocations=self.revocations)
            except RemoteProtocolError:
                self.counters["certificates refused"] += 1
                continue
            before = self.certs.get(c.node)
            self._know(c)
            n += self.certs.get(c.node) is not before
        return n

    def certs_of(self, keys) -> list[bytes]:
        """The certificates we know of these node keys (raw), to send along."""
        return [self.certs[k].raw for k in keys if k in self.certs]

    def _valid(self, cert: ms.Certificate | None) -> str | None:
        if cert is None:
            return "no certificate known"
        if self.clock() >= cert.expires:
            return "certificate expired"
        for r in self.revocations:
            if r.revokes(cert):
                return "revoked"
        return None

    @property
    def mode(self) -> str:
        return "open" if self.network is None else "members only"

    def _invitation_state(self, secret_hash: bytes) -> str | None:
        """None if the invitation is pending here, else why not (as redeem says it)."""
        self.refresh()
        inv = self._invites.get(secret_hash.hex())
        if not inv:
            return "invitation not known here (made by another node, or garbage)"
        if inv.get("used_by"):
            return "invitation already used: ask for a new one"
        if self.clock() >= inv["expires"]:
            return "invitation expired: ask for a new one"
        return None

    # -- the exchange (runs right after Noise) ---------------------------------------------
    def our_proof(self, peer: bytes) -> bytes:
        join = self.joins.get(peer)
        if join is not None:
            return ms.proof(ms.network_id(join[1]), None, join[0])
        net = self.network
        return ms.proof(net.id if net else None, net.cert.raw if net else None)

    def judge(self, payload: bytes, peer_key: bytes) -> Admitted:
        """Admit or refuse (NotAMember / MembershipError) the proof a peer sent."""
        p = ms.decode_proof(payload)
        nid = _node_id(peer_key)
        join = self.joins.get(nid)
        if join is not None:           # we are joining: the inviter must be of the token's network
            if p.cert is None:
                raise ms.NotAMember("the inviter showed no certificate of the token's network")
            cert = ms.check_certificate(join[1], p.cert, now=self.clock(), node=peer_key)
            return Admitted("member", cert, self.epoch)
        pub = self.network.public if self.network is not None else None
        a = ms.admit(pub, p, peer_key, now=self.clock(), revocations=self.revocations,
                     invitation_state=self._invitation_state)
        return Admitted(a.kind, a.cert, self.epoch)

    async def exchange(self, conn, peer_key: bytes, *, initiator: bool) -> Admitted:
        """Prove and check membership on a secured connection (conn: write(bytes),
        read() -> one message). MembershipRefused when either side refuses."""
        self.refresh()
        nid = _node_id(peer_key)
        try:
            with trio.fail_after(PROOF_TIMEOUT):
                if initiator:
                    await conn.write(self.our_proof(nid))
                    try:
                        adm = self.judge(await conn.read(), peer_key)
                    except ms.Refused as exc:
                        self.counters["refused by peer"] += 1
                        raise MembershipRefused(f"refused by the peer: {exc}", str(exc)) from None
                else:
                    try:
                        adm = self.judge(await conn.read(), peer_key)
                    except ms.Refused:
                        raise ms.MembershipError("a refusal where a proof belongs") from None
                    except RemoteProtocolError as exc:      # MembershipError included
                        await conn.write(ms.refusal(_reason(exc)))
                        raise
                    await conn.write(self.our_proof(nid))
        except ms.MembershipError as exc:
            self._refused(nid, _reason(exc))
            raise MembershipRefused(f"refused: {_reason(exc)}", _reason(exc)) from None
        except trio.TooSlowError:
            self._refused(nid, "no proof in time")
            raise MembershipRefused("refused: no membership proof in time") from None
        except RemoteProtocolError as exc:
            self._refused(nid, "malformed proof")
            raise MembershipRefused(f"refused: malformed proof ({exc})") from None
        self.admitted[nid] = adm
        self.counters[f"admitted {adm.kind}"] += 1
        if adm.cert is not None and adm.kind == "member":
            self._saw(adm.cert)
            self._know(adm.cert)
        return adm

    def _refused(self, nid: bytes, reason: str) -> None:
        """Count (by a fixed set of reasons: a peer's garbage must not grow the
        counters) and log (bounded) a refusal."""
        self.counters["refused"] += 1
        self.counters[f"refused: {_category(reason)}"] += 1
        log.info("membership: refused node %s: %s", nid.hex()[:16], reason[:200])

    # -- who may do what ------------------------------------------------------------------
    def allows(self, nid: bytes, protocol: str) -> bool:
        """May this (admitted) peer's stream of `protocol` run?"""
        a = self.admitted.get(nid)
        if a is None:
            return self.network is None
        if a.kind == "joiner":
            return protocol == ms.JOIN_PROTOCOL
        return True

    def is_member(self, nid: bytes) -> bool:
        """Is this node a member now (always True when we are in no network)?"""
        if self.network is None:
            return True
        a = self.admitted.get(nid)
        return a is not None and a.kind == "member" and self._still(a) is None

    def author_ok(self, author_key: bytes) -> bool:
        """May entries (audit) or records (DHT) signed by this node key be kept and
        forwarded? Only if we know a certificate of this network for it (from a
        handshake, or sent along with its entries) that is valid now and not revoked."""
        if self.network is None:
            return True
        if any(r.node == author_key for r in self.revocations):
            return False
        return self._valid(self.certs.get(author_key)) is None

    def _still(self, a: Admitted) -> str | None:
        """None if the admission holds now, else why not."""
        if a.epoch != self.epoch:
            return "the network changed"
        if a.kind == "open":
            return None if self.network is None else "not a member of this network"
        if a.kind == "joiner":
            return None
        # the newest certificate we know of the peer: a member that renewed its
        # certificate (sent along with its entries) stays connected past the old one
        newest = self.certs.get(a.cert.node)
        cert = newest if newest is not None and newest.serial >= a.cert.serial else a.cert
        return self._valid(cert)

    def enforce(self) -> list[tuple[bytes, str]]:
        """Refresh the state; the admitted peers that must be cut off, with why."""
        self.refresh()
        out = []
        for nid, a in list(self.admitted.items()):
            why = self._still(a)
            if why is not None:
                del self.admitted[nid]
                self.counters[f"cut off: {why}"] += 1
                log.info("membership: cutting off node %s: %s", nid.hex()[:16], why)
                out.append((nid, why))
        return out

    def forget(self, nid: bytes) -> None:
        self.admitted.pop(nid, None)

    def learn_revocation(self, raw: bytes) -> bool:
        """A revocation from the network: kept if signed by our network key and new."""
        if self.network is None:
            return False
        try:
            r = ms.check_revocation(self.network.public, raw)
        except RemoteProtocolError as exc:
            self.counters["bad revocations"] += 1
            log.info("membership: ignoring a revocation: %s", exc)
            return False
        if any(x.raw == r.raw for x in self.revocations):
            return False
        membership.add_revocation(self.data_dir, r)
        self.revocations.append(r)
        self._stamp = None             # state.json changed under us: re-read next time
        self.counters["revocations learned"] += 1
        return True

    # -- members seen ---------------------------------------------------------------------
    def _seen_path(self) -> Path:
        return self.data_dir / membership.DIR / "seen.json"

    def _load_seen(self) -> None:
        try:
            self.seen = json.loads(self._seen_path().read_text())
        except (OSError, ValueError):
            self.seen = {}

    def _saw(self, cert: ms.Certificate) -> None:
        key = cert.node.hex()
        if key not in self.seen and len(self.seen) >= MAX_SEEN:
            return
        self.seen[key] = {"cert": cert.raw.hex(), "last_seen_ns": self.clock()}
        self._seen_dirty = True

    def flush_seen(self) -> None:
        if self._seen_dirty and self.network is not None:
            self._seen_dirty = False
            write_atomic(self._seen_path(), json.dumps(self.seen, sort_keys=True).encode())

    def status(self) -> dict:
        net = self.network
        doc = {"mode": self.mode, "admitted": sum(1 for a in self.admitted.values()
                                                   if self._still(a) is None),
               "counters": dict(self.counters)}
        if net is None:
            doc["note"] = ("in no network: any node that knows this node's address can "
                           "connect (create or join a network to admit members only)")
        else:
            doc.update(network=net.id.hex(), name=net.name, site=net.cert.site,
                       roles=list(net.cert.roles), certificate_expires_ns=net.cert.expires,
                       revocations=len(self.revocations))
        return doc


REASONS = ("not a member of this network", "a member of another network", "revoked",
           "certificate expired", "certificate not valid yet (check the clocks)",
           "a certificate of another node", "not signed by this network's key",
           "invitation not known here", "invitation already used", "invitation expired",
           "no proof in time", "the inviter showed no certificate")


def _category(reason: str) -> str:
    """The counter name for a refusal: one of REASONS, else "malformed proof"."""
    for r in REASONS:
        if r in reason:
            return r
    return "malformed proof"


def _reason(exc: Exception) -> str:
    text = str(exc)
    for prefix in ("certificate: ",):
        if text.startswith(prefix):
            return text
    return text or type(exc).__name__
