"""Yamux whose receive windows are enforced: a peer that sends past one loses the connection.

Why. Yamux gives each stream a receive window (py-libp2p 0.8.1: 256 KiB, grown by
auto-tuning up to 16 MiB as the application reads); a sender may have at most that
many unread bytes in flight. py-libp2p counts the window but, when a peer sends
past it, only logs "peer exceeded receive window" and keeps buffering: one stream
whose reader never reads held 2 GiB (issue 17, attack 2). Here the per-stream
buffer itself refuses: GuardedYamux keeps every stream's receive buffer in a
_Guarded bytearray whose extend() checks the bytes buffered plus the frame
against the stream's window (target_recv_window, the most the receiver ever
granted, plus SLACK) before it stores anything. A violation drops the whole
connection (a peer that ignores flow control is broken or hostile; resetting
one stream would let it open the next): the muxer is marked shutting down and
the frame's handler gets WindowViolation, a trio.TooSlowError, which py-libp2p's
reader loop answers by closing the connection ("timed out reading a DATA frame
body"; our own log line and counter say what happened).

Installing it. py-libp2p 0.8.1's MuxerMultistream.new_conn builds `Yamux(...)` by
name for the yamux protocol id, whatever class muxer_opt gives; install() points
that module's name at GuardedYamux (once per process; P2PTransport calls it), and
P2PTransport also passes GuardedYamux in muxer_opt, for a version that honours it.

How it stays honest across py-libp2p versions. It relies on two facts of
Yamux's code, both checked by tests/node/net/test_yamux_guard.py: received DATA
goes into `stream_buffers[stream_id]` with bytearray.extend, and a TooSlowError
raised there closes the connection. If an upgrade changes either, that test
fails (an attacker's 64 MiB is buffered, or the connection stays up), not the
node silently.

Cost: one dict lookup and a comparison per DATA frame.
"""
from __future__ import annotations

import logging
from collections import Counter

import trio
from libp2p.stream_muxer.yamux.yamux import DEFAULT_WINDOW_SIZE, Yamux

log = logging.getLogger(__name__)

SLACK = 64 << 10          # bytes over the window tolerated (frame boundaries, races)
counters: Counter = Counter()     # "window violations": connections dropped, this process


class WindowViolation(trio.TooSlowError):
    """A peer sent more on a stream than its receive window allows."""


class _Guarded(bytearray):
    """A stream's receive buffer that refuses bytes beyond the stream's window."""

    def bind(self, mux: "GuardedYamux", sid: int) -> "_Guarded":
        self.mux, self.sid = mux, sid
        return self

    def extend(self, data) -> None:
        n = len(self) + len(data)
        if n > self.mux.buffer_limit(self.sid):
            self.mux.violated(self.sid, n)
        super().extend(data)


class _Buffers(dict):
    """stream id -> _Guarded: whatever Yamux stores here is guarded."""

    def __init__(self, mux: "GuardedYamux"):
        super().__init__()
        self.mux = mux

    def __setitem__(self, sid, buf) -> None:
        super().__setitem__(sid, buf if isinstance(buf, _Guarded)
                            else _Guarded(buf).bind(self.mux, sid))


class GuardedYamux(Yamux):
    """py-libp2p's Yamux with receive windows enforced (module docstring)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.stream_buffers = _Buffers(self)
        self.violation: str | None = None

    def buffer_limit(self, sid: int) -> int:
        """The most a stream may hold unread: the largest window it granted + SLACK."""
        stream = self.streams.get(sid)
        window = getattr(stream, "target_recv_window", DEFAULT_WINDOW_SIZE)
        return max(window, DEFAULT_WINDOW_SIZE) + SLACK

    def violated(self, sid: int, n: int) -> None:
        if self.violation is None:
            self.violation = (f"stream {sid}: {n} bytes unread, over the receive window "
                              f"({self.buffer_limit(sid) - SLACK})")
            counters["window violations"] += 1
            log.warning("peer %s ignored yamux flow control (%s): connection dropped",
                        self.peer_id, self.violation)
        self.event_shutting_down.set()
        raise WindowViolation(self.violation)


def install() -> None:
    """Make every yamux connection of this process a GuardedYamux (module doc)."""
    from libp2p.stream_muxer import muxer_multistream
    if getattr(muxer_multistream, "Yamux", None) is not GuardedYamux:
        muxer_multistream.Yamux = GuardedYamux


__all__ = ["GuardedYamux", "WindowViolation", "SLACK", "counters", "install"]
