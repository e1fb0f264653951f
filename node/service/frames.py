"""One request frame, one answer frame: the shape of the membership protocols
(join, renew, certificate push; protocol/membership.py frame()).

    payload = await read_frame(stream)                   # a 4-byte length, then the body
    await answer_once(stream, peer_id, what, make_answer, timeout=...)

answer_once is a whole stream handler's body: it reads the request within
`timeout`, asks `make_answer(payload)` for the answer frame (a UserError becomes a
refusal in its words, a malformed request or a silent peer a "malformed WHAT
request" refusal), sends it, closes the stream, and never lets an exception
escape (py-libp2p drops the whole host when a handler raises). Returns whether
the request was answered (True) or refused (False).
"""
from __future__ import annotations

import logging

import trio

from hypersdk.node.errors import UserError
from hypersdk.protocol import membership as ms
from hypersdk.protocol.errors import RemoteProtocolError

log = logging.getLogger(__name__)


async def read_exactly(stream, n: int) -> bytes:
    buf = bytearray()
    for _ in range(n + 1):                       # bounded: each read returns >= 1 byte
        if len(buf) >= n:
            break
        got = await stream.receive_some(min(n - len(buf), 65536))
        if not got:
            raise ms.MembershipError("the other side closed the stream mid-frame")
        buf += got
    return bytes(buf)


async def read_frame(stream) -> bytes:
    header = await read_exactly(stream, 4)
    return await read_exactly(stream, ms.frame_length(header))


async def answer_once(stream, peer_id: bytes, what: str, make_answer, *,
                      timeout: float) -> bool:
    answered = False
    try:
        try:
            with trio.fail_after(timeout):
                payload = await read_frame(stream)
            answer = await make_answer(payload)
            answered = True
        except UserError as exc:
            log.info("%s: refused %s: %s", what, peer_id.hex()[:16], exc)
            answer = ms.join_refusal(str(exc))
        except (RemoteProtocolError, trio.TooSlowError) as exc:
            log.info("%s: bad request from %s: %r", what, peer_id.hex()[:16], exc)
            answer = ms.join_refusal(f"malformed {what} request")
        with trio.move_on_after(timeout):
            await stream.send_all(answer)
    except Exception as exc:                     # never into py-libp2p's host
        log.debug("%s handler: %r", what, exc)
    finally:
        with trio.move_on_after(1):
            try:
                await stream.aclose()
            except Exception:
                pass
    return answered
