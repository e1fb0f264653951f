"""Half-open connections (issue 17, attack 3) against a real `hypersdk node run`.

From 127.0.0.2, this process opens 500 TCP connections to the victim that never send a
byte of the handshake (before: py-libp2p upgraded 250 inbound connections at once, 10 s
each, and 0 of 15 honest dials got through). Meanwhile 15 honest dials from 127.0.0.1
(fresh identities, one at a time, each bounded) must reach the victim and open a stream:
at least 14 of 15. Then the victim still serves and its status counts the refusals."""
from __future__ import annotations

import socket

import trio
from conftest import Cli
from test_node_cli import nodes, status  # noqa: F401  (fixture)

from hypersdk.node.net.gate import Gate
from hypersdk.node.net.identity import Identity
from hypersdk.node.net.p2p_transport import P2PTransport
from hypersdk.protocol.exchange import PROTOCOL_ID

HALF_OPEN, HONEST = 500, 15
DIAL_LIMIT = 15.0            # one honest dial, generous for a loaded machine


async def test_half_open_connections_do_not_lock_out_honest_dials(tmp_path, nodes):
    v = nodes(Cli(tmp_path / "v"))
    vid = bytes.fromhex(v.cli.json("status")["node_id"])
    host, port = "127.0.0.1", int(v.addr.split("/tcp/")[1].split("/")[0])
    idle = []
    try:
        for _ in range(HALF_OPEN):                   # bounded
            s = socket.socket()
            s.settimeout(5)
            s.bind(("127.0.0.2", 0))
            s.connect((host, port))
            s.sendall(b"\x13/multistream/1.0.0\n")   # and then nothing more
            idle.append(s)
        ok = 0
        async with trio.open_nursery() as n:
            for i in range(HONEST):
                ident = Identity.generate()
                t = P2PTransport(ident, gate=Gate(tmp_path / f"h{i}", ident))
                await n.start(t.run)
                with trio.move_on_after(DIAL_LIMIT):
                    try:
                        st = await t.open_stream(vid, v.addr, PROTOCOL_ID)
                        await st.aclose()
                        ok += 1
                    except Exception:
                        pass
            n.cancel_scope.cancel()
        assert ok >= HONEST - 1, f"only {ok} of {HONEST} honest dials got through"
        # all but PER_IP_HANDSHAKES of them were closed at once
        hs = status(v.cli)["handshakes"]
        assert hs.get("refused: too many handshakes from one address", 0) >= HALF_OPEN // 2
    finally:
        for s in idle:
            s.close()
