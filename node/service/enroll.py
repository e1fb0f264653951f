"""Joining a network with an invitation token, over the network (protocol/membership.py
JOIN_PROTOCOL).

The joiner's node dials an address the token names (libp2p: Noise authenticates
both keys), opens a JOIN_PROTOCOL stream and sends the token's secret with its
own public key; the inviter checks that the key is the connection's, redeems
the invitation (once, before it expires: node/net/membership.py) and answers
with the certificate, the network's public key, its revocations and name. The
joiner checks the certificate against the key the token pinned and keeps it.

The inviter's handler reads one bounded frame within READ_TIMEOUT, never lets
an exception escape (py-libp2p drops the whole host when a handler raises) and
answers a refusal with its reason in words, which the joiner prints.
"""
from __future__ import annotations

import logging
import time

import trio

from hypersdk.dht.keys import node_id
from hypersdk.node import runtime
from hypersdk.node.audit.intents import crash_point
from hypersdk.node.errors import UsageError, UserError
from hypersdk.node.net import datakey, membership
from hypersdk.node.net.gate import MembershipRefused
from hypersdk.node.net.p2p_transport import node_id_of_libp2p_key, parse_peer_addr
from hypersdk.node.net.transport import TransportError
from hypersdk.node.service.frames import answer_once, read_frame
from hypersdk.protocol import membership as ms
from hypersdk.protocol.errors import RemoteProtocolError

log = logging.getLogger(__name__)

READ_TIMEOUT = 10.0               # seconds a joiner may take to send its request
ANSWER_TIMEOUT = 20.0             # seconds a joiner waits for the inviter's answer
JOIN_ATTEMPTS = 2                 # a request cut by the inviter's switch to members only
RETRY_DELAY = 0.5                 # is sent once more, after this many seconds


class Enrollment:
    """The daemon's side of joining: serve joiners, and join with a token."""

    def __init__(self, daemon):
        self.d = daemon
        self.refused = 0          # join requests refused (a count for `status`)
        self.admitted = 0

    def start_serving(self) -> None:
        self.d.net.set_handler(ms.JOIN_PROTOCOL, self.handle)

    async def handle(self, stream, peer_id: bytes) -> None:
        async def answer(payload: bytes) -> bytes:
            secret, node = ms.decode_join_request(payload)
            if node_id(node) != peer_id:
                raise UserError("the key in the request is not the connection's key")
            cert, share = await runtime.run_sync(
                lambda: membership.redeem_invitation(self.d.data_dir, secret, node,
                                                     now=time.time_ns()))
            net = membership.load(self.d.data_dir)
            revs = [r.raw for r in membership.revocations(self.d.data_dir)]
            dk = datakey.load(self.d.data_dir) if share else None
            log.info("join: admitted node %s at site %s", node.hex()[:16], cert.site)
            return ms.join_answer(cert.raw, net.public, revs, net.name,
                                  dk.secret if dk is not None else None)

        if await answer_once(stream, peer_id, "join", answer, timeout=READ_TIMEOUT):
            self.admitted += 1
        else:
            self.refused += 1

    async def join(self, text: str) -> dict:
        """Join the network of invitation token `text`; a JSON document."""
        try:
            token = ms.decode_token(text)
        except ms.MembershipError as exc:
            raise UsageError(str(exc)) from None
        d = self.d
        if membership.load(d.data_dir) is not None:
            raise UserError("this node is already in a network (`hypersdk network show`)")
        if time.time_ns() >= token.expires:
            raise UserError("invitation expired: ask for a new one")
        errors = []
        for addr in token.addrs:
            # the connection to the inviter proves the invitation (not a certificate:
            # we have none yet) and is admitted to JOIN_PROTOCOL only; we check that
            # the inviter is a member of the token's network (node/net/gate.py)
            try:
                inviter = node_id_of_libp2p_key(parse_peer_addr(addr)[1].extract_public_key())
            except TransportError as exc:
                errors.append(f"{addr}: {exc}")
                continue
            d.gate.joins[inviter] = (token.secret, token.network)
            try:
                answer = await self._ask(addr, token)
            except ms.JoinRefused as exc:
                raise UserError(f"the inviter refused: {exc}") from None
            except MembershipRefused as exc:
                raise UserError(f"the inviter refused: {exc.reason}") from None
            except (UserError, RemoteProtocolError, trio.TooSlowError, OSError,
                    TransportError) as exc:
                errors.append(f"{addr}: {exc or 'no answer in time'}")
                continue
            finally:
                d.gate.joins.pop(inviter, None)
            # the data key first, then the certificate: a node killed in between holds
            # the key and is not a member yet (a new invitation completes the join,
            # and the same key installs again); the other order left a member without
            # a key, whose next backups would not be sealed
            shared = answer.data_key is not None
            if shared:
                dk = await runtime.run_sync(datakey.install, d.data_dir, answer.data_key)
            else:       # a tenant of its own: its own backups are sealed with its own key
                dk = (await runtime.run_sync(datakey.load, d.data_dir)
                      or await runtime.run_sync(datakey.create, d.data_dir))
            crash_point("join-key-installed")
            net = await runtime.run_sync(
                lambda: membership.enroll(d.data_dir, token, answer, d.identity,
                                          now=time.time_ns()))
            d.saved.add(addr)
            # now a member: the joining connection goes (a new network epoch), and the
            # node joins the DHT through the inviter with its certificate
            d.transport.cut_off_now()
            d.nursery.start_soon(d._join_then_announce)
            return dict(net.to_json(), inviter=addr, data_key_shared=shared,
                        data_key_fingerprint=dk.fingerprint.hex())
        raise UserError("could not reach the inviter: " + "; ".join(errors))

    async def _ask(self, addr: str, token):
        """The inviter's answer to our join request. A connection made before the
        inviter created its network is cut by it (it admits members only from then
        on); a request that met that cut is sent once more on a fresh connection."""
        d = self.d
        for attempt in range(JOIN_ATTEMPTS):
            try:
                contact = await d.dial(addr)
                stream = await d.net.open_stream(contact.id, addr, ms.JOIN_PROTOCOL)
                try:
                    with trio.fail_after(ANSWER_TIMEOUT):
                        await stream.send_all(ms.join_request(token.secret,
                                                              d.identity.public_key))
                        return ms.decode_join_answer(await read_frame(stream))
                finally:
                    with trio.move_on_after(1):
                        await stream.aclose()
            except (ms.JoinRefused, MembershipRefused):
                raise                           # an answer: no second try
            except (RemoteProtocolError, TransportError, OSError):
                if attempt + 1 == JOIN_ATTEMPTS:
                    raise
                await trio.sleep(RETRY_DELAY)   # let the cut connection go first


def register(commands: dict, command_reply) -> None:
    async def join_network(d, args, events):
        return await d.enrollment.join(str(args["token"]))     # the CLI words the reply

    commands["join network"] = join_network
