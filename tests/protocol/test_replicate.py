"""The replication protocol's frames (protocol/replicate.py): round trips, and
malformed or oversized input refused with ReplicateError, never anything else."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hypersdk.protocol import codec
from hypersdk.protocol import replicate as rp
from hypersdk.protocol.errors import LocalProtocolError, RemoteProtocolError

M = bytes(range(32))


def _payload(frame: bytes) -> bytes:
    assert rp.frame_length(frame[:4]) == len(frame) - 4
    return frame[4:]


def test_requests_and_answers_round_trip():
    assert rp.decode_request(_payload(rp.request("offer"))) == rp.Request("offer")
    assert rp.decode_request(_payload(rp.request("replicate", M, 5))) == \
        rp.Request("replicate", M, 5)
    for op in ("status", "release"):
        assert rp.decode_request(_payload(rp.request(op, M))) == rp.Request(op, M)
    o = rp.Offer("site-b", 10, None, 3)
    assert rp.decode_offer(_payload(rp.offer_answer(o))) == o
    assert rp.decode_state(_payload(rp.state_answer("refused", "over quota\n"))) == \
        rp.State("refused", "over quota ")                 # printable only
    refusal = codec.encode({"v": 1, "refused": "not a member"})   # frames.answer_once's
    assert rp.decode_state(refusal) == rp.State("refused", "not a member")


@pytest.mark.parametrize("doc", [
    {"v": 1, "op": "replicate", "manifest": M}, {"v": 2, "op": "offer"},
    {"v": 1, "op": "status", "manifest": M[:31]}, {"v": 1, "op": "replicate", "manifest": M,
                                                   "size": -1},
    {"v": 1, "op": "nuke"}, {"v": 1, "op": "offer", "x": 1}, [1, 2], "offer",
])
def test_malformed_requests_are_refused(doc):
    with pytest.raises(rp.ReplicateError):
        rp.decode_request(codec.encode(doc))


def test_bounds():
    with pytest.raises(rp.ReplicateError):
        rp.frame_length((rp.MAX_FRAME + 1).to_bytes(4, "big"))
    with pytest.raises(rp.ReplicateError):
        rp.frame_length(bytes(4))
    with pytest.raises(rp.ReplicateError):
        rp.decode_state(codec.encode({"v": 1, "state": "held", "reason": "x" * 301}))
    with pytest.raises(LocalProtocolError):
        rp.request("replicate", M, -5)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_raises_only_protocol_errors(data):
    for decode in (rp.decode_request, rp.decode_offer, rp.decode_state):
        try:
            decode(data)
        except RemoteProtocolError:
            pass
