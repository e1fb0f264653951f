"""Helpers for tests that run real P2PTransports (py-libp2p) on 127.0.0.1."""
from __future__ import annotations

import socket

import trio

from hypersdk.node.net.identity import Identity
from hypersdk.node.net.p2p_transport import P2PTransport

# Upper bound for any single p2p test step on the real clock: a hang fails the
# test instead of stalling the run. Generous; healthy steps take milliseconds.
STEP_LIMIT = 20.0


class Running:
    """A transport whose run() can be stopped on its own (a peer that goes away)."""

    def __init__(self, transport: P2PTransport):
        self.transport = transport
        self.scope = trio.CancelScope()
        self.done = trio.Event()

    async def _run(self, *, task_status=trio.TASK_STATUS_IGNORED):
        try:
            with self.scope:
                await self.transport.run(task_status=task_status)
        finally:
            self.done.set()

    async def stop(self) -> None:
        self.scope.cancel()
        await self.done.wait()


async def start_transport(nursery, transport: P2PTransport | None = None) -> Running:
    r = Running(transport or P2PTransport())
    await nursery.start(r._run)
    return r


def closed_port() -> int:
    """A 127.0.0.1 TCP port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unreachable_peer() -> tuple[bytes, str]:
    """(node id, addr) of a well-formed peer that is not running."""
    ident = Identity.generate()
    return ident.node_id, f"/ip4/127.0.0.1/tcp/{closed_port()}/p2p/{ident.libp2p_peer_id}"
