"""Member certificates renew themselves before they expire, without downtime.

Every member checks its certificate every CHECK_EVERY seconds (at most; a tenth of
the certificate's lifetime when that is shorter). Once two thirds of its lifetime
are used (protocol/membership.py renewal_due), it gets a new one: from itself when
it holds the network key, otherwise from a connected member whose certificate
carries the admin role (RENEW_PROTOCOL, over a members-only connection: the
issuer checks the presented certificate is this very peer's, valid and not
revoked, and keeps site and roles). The new certificate is written atomically
(DATA/network/member.cert), used by every later handshake, sent to every
connected member (CERT_PROTOCOL) and pushed with our newest audit entry
(certificates travel with gossiped entries), so peers that admitted us under
the old one keep us past its expiry (node/net/gate.py checks the newest
certificate it knows). Open connections are
never cut for a renewal. A renewal that fails is retried at the next check and
counted in `status`.
"""
from __future__ import annotations

import logging
import time

import trio

from hypersdk.dht.keys import node_id
from hypersdk.node import runtime
from hypersdk.node.errors import UserError
from hypersdk.node.net import membership
from hypersdk.node.net.transport import TransportError
from hypersdk.node.service.frames import answer_once, read_frame
from hypersdk.protocol import membership as ms
from hypersdk.protocol.errors import RemoteProtocolError

log = logging.getLogger(__name__)

CHECK_EVERY = 3600.0              # seconds between checks (shorter for short lifetimes)
MIN_CHECK = 0.5
IDLE_CHECK = 2.0                  # seconds between looks while the node is in no network
TIMEOUT = 20.0


class Renewal:
    def __init__(self, daemon):
        self.d = daemon
        self.counters = {"renewed": 0, "issued": 0, "refused": 0, "failed": 0}
        self.last_error = ""

    def start_serving(self) -> None:
        self.d.net.set_handler(ms.RENEW_PROTOCOL, self.handle)
        self.d.net.set_handler(ms.CERT_PROTOCOL, self.handle_cert)

    async def handle_cert(self, stream, peer_id: bytes) -> None:
        """A connected member's renewed certificate: learnt if it is that peer's."""
        try:
            with trio.fail_after(TIMEOUT):
                raw = ms.decode_renew_answer(await read_frame(stream))
            if node_id(ms.decode_certificate(raw).node) == peer_id:
                self.d.gate.learn_certs([raw])
        except Exception as exc:                     # never into py-libp2p's host
            log.debug("certificate push from %s: %r", peer_id.hex()[:12], exc)

    # -- the issuer's side ------------------------------------------------------------
    async def handle(self, stream, peer_id: bytes) -> None:
        async def answer(payload: bytes) -> bytes:
            raw = ms.decode_renew_request(payload)
            cert = ms.decode_certificate(raw)
            if node_id(cert.node) != peer_id:
                raise UserError("that certificate is not the connection's")
            new = await runtime.run_sync(
                lambda: membership.renew(self.d.data_dir, raw, cert.node, now=runtime.now_ns()))
            log.info("renewed the certificate of %s (serial %d)", cert.node.hex()[:16],
                     new.serial)
            return ms.renew_answer(new.raw)

        ok = await answer_once(stream, peer_id, "renew", answer, timeout=TIMEOUT)
        self.counters["issued" if ok else "refused"] += 1

    # -- the member's side ------------------------------------------------------------
    async def run(self) -> None:
        """Check, and renew when due, until cancelled."""
        while True:
            wait = IDLE_CHECK               # in no network yet: a join may come any time
            net = self.d.gate.network
            if net is not None:
                lifetime_s = (net.cert.expires - net.cert.not_before) / 1e9
                wait = max(MIN_CHECK, min(CHECK_EVERY, lifetime_s / 10))
                if ms.renewal_due(net.cert, runtime.now_ns()):
                    try:
                        await self.renew_now()
                    except UserError as exc:
                        self.counters["failed"] += 1
                        self.last_error = str(exc)
                        log.warning("certificate renewal: %s (retrying in %.0f s)", exc, wait)
            await trio.sleep(wait)

    async def renew_now(self) -> ms.Certificate:
        d = self.d
        net = d.gate.network
        if net is None:
            raise UserError("this node is in no network")
        if net.has_key:
            raw = await runtime.run_sync(
                lambda: membership.renew(d.data_dir, net.cert.raw, net.cert.node,
                                         now=runtime.now_ns()).raw)
        else:
            raw = await self._ask_an_admin(net.cert.raw)
        cert = await runtime.run_sync(
            lambda: membership.install_certificate(d.data_dir, raw, d.identity,
                                                   now=runtime.now_ns()))
        d.gate.refresh()
        self.counters["renewed"] += 1
        self.last_error = ""
        log.info("certificate renewed: serial %d until %s", cert.serial,
                 time.strftime("%Y-%m-%d %H:%M", time.gmtime(cert.expires / 1e9)))
        await self._tell_peers(cert.raw)
        if d.audit is not None and d.audit.gossip is not None:
            await d.audit.gossip.announce_own_certificate()
        return cert

    async def _tell_peers(self, raw: bytes) -> None:
        """Send the renewed certificate to every member we are connected to."""
        d = self.d
        peers = [c for b in d.dht.table.buckets() for c in b
                 if d.transport.connection_count(c.id) > 0]

        async def one(c):
            try:
                with trio.fail_after(TIMEOUT):
                    s = await d.net.open_stream(c.id, c.addr, ms.CERT_PROTOCOL)
                    try:
                        await s.send_all(ms.renew_answer(raw))
                    finally:
                        await s.aclose()
            except (TransportError, trio.TooSlowError) as exc:
                log.debug("telling %s our certificate: %r", c.id.hex()[:12], exc)

        async with trio.open_nursery() as n:
            for c in peers:
                n.start_soon(one, c)

    def _admins(self) -> list:
        gate = self.d.gate
        contacts = [c for b in self.d.dht.table.buckets() for c in b]
        out = []
        for c in contacts:
            a = gate.admitted.get(c.id)
            if a is not None and a.cert is not None and "admin" in a.cert.roles \
                    and gate.is_member(c.id):
                out.append(c)
        return out

    async def _ask_an_admin(self, current: bytes) -> bytes:
        errors = []
        admins = self._admins()
        if not admins:
            raise UserError("no connected member holds the admin role to renew our "
                            "certificate")
        for c in admins:
            try:
                with trio.fail_after(TIMEOUT):
                    s = await self.d.net.open_stream(c.id, c.addr, ms.RENEW_PROTOCOL)
                    try:
                        await s.send_all(ms.renew_request(current))
                        return ms.decode_renew_answer(await read_frame(s))
                    finally:
                        with trio.move_on_after(1):
                            await s.aclose()
            except ms.RenewRefused as exc:
                errors.append(f"{c.id.hex()[:12]} refused: {exc}")
            except (TransportError, RemoteProtocolError, trio.TooSlowError) as exc:
                errors.append(f"{c.id.hex()[:12]}: {exc or 'no answer in time'}")
        raise UserError("could not renew the certificate: " + "; ".join(errors))

    def status(self) -> dict:
        net = self.d.gate.network
        doc = dict(self.counters)
        if net is not None:
            due = net.cert.expires - (net.cert.expires - net.cert.not_before) // 3
            doc.update(serial=net.cert.serial, expires_ns=net.cert.expires, renew_from_ns=due)
        if self.last_error:
            doc["last_error"] = self.last_error
        return doc
