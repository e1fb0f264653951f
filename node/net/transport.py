"""The Transport interface every node runs on (DESIGN.md, Transport).

Two implementations: py-libp2p (node/, networking issue) and the in-memory
simnet network (simnet/transport.py). One conformance suite runs on both.

    open_stream(peer_id, addr, protocol) -> Stream   # authenticated peer
    set_handler(protocol, async handler(stream, peer_id))
    Stream: send_all(bytes), receive_some(max) -> bytes (b"" at EOF), aclose()

peer_id is the 32-byte node id (BLAKE3 of the node's public key); addr is a
multiaddr-style string ("/ip4/10.0.0.7/tcp/4001"). Failures to reach a peer
or a stream reset raise TransportError; callers bound waits with
trio.fail_after (no timeout parameters in this API).
"""
from __future__ import annotations

from typing import Awaitable, Callable, Protocol


class TransportError(Exception):
    """The peer could not be reached, or the stream was reset."""


class Stream(Protocol):
    async def send_all(self, data: bytes) -> None: ...

    async def receive_some(self, max_bytes: int = 65536) -> bytes: ...

    async def aclose(self) -> None: ...


Handler = Callable[[Stream, bytes], Awaitable[None]]


class Transport(Protocol):
    peer_id: bytes
    addr: str

    async def open_stream(self, peer_id: bytes, addr: str, protocol: str) -> Stream: ...

    def set_handler(self, protocol: str, handler: Handler) -> None: ...
