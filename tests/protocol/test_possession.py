"""protocol/possession.py: messages, frames, answers, sampling, checks (pure, no I/O)."""
from __future__ import annotations

import random
from collections import Counter

import blake3
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hypersdk.protocol import codec
from hypersdk.protocol.chunks import ZERO_ID, chunk_id
from hypersdk.protocol.errors import LocalProtocolError, RemoteProtocolError
from hypersdk.protocol.framing import HEADER
from hypersdk.protocol.possession import (
    MAX_MESSAGE,
    MAX_REASON,
    MAX_SAMPLE,
    REQUEST_TAGS,
    RESPONSE_TAGS,
    Challenge,
    OversizedFrame,
    PossessionDecoder,
    Precomputed,
    Proof,
    Refused,
    answer,
    check,
    decode_frame,
    decode_payload,
    encode_message,
    encode_payload,
    reference,
    sample,
)

MID = b"\x4d" * 32
NONCE = b"\x11" * 32


def cid(i: int) -> bytes:
    return blake3.blake3(i.to_bytes(8, "big")).digest()


ids32 = st.binary(min_size=32, max_size=32).filter(lambda b: b != ZERO_ID)
u64 = st.integers(0, (1 << 64) - 1)
challenges = st.builds(
    Challenge, u64, st.binary(min_size=32, max_size=32), st.binary(min_size=32, max_size=32),
    st.lists(ids32, min_size=1, max_size=MAX_SAMPLE, unique=True).map(tuple), st.booleans())
proofs = st.builds(
    Proof, u64, st.binary(min_size=32, max_size=32),
    st.lists(st.none() | st.binary(min_size=32, max_size=32), min_size=1,
             max_size=MAX_SAMPLE).map(tuple))
refusals = st.builds(Refused, u64, st.text(max_size=MAX_REASON))
messages = challenges | proofs | refusals


# -- messages and frames ------------------------------------------------------------------

@given(messages)
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_round_trip_and_canonical(msg):
    frame = encode_message(msg)
    assert decode_frame(frame) == msg
    payload = encode_payload(msg)
    assert frame == len(payload).to_bytes(HEADER, "big") + payload
    doc = codec.decode(payload)
    assert doc["v"] == 1 and doc["t"] == msg.TAG
    assert codec.encode(doc) == payload          # one encoding per message


def test_worst_case_messages_fit():
    big = Challenge((1 << 64) - 1, MID, NONCE, tuple(cid(i) for i in range(MAX_SAMPLE)))
    proof = Proof((1 << 64) - 1, MID, tuple(cid(i) for i in range(MAX_SAMPLE)))
    ref = Refused((1 << 64) - 1, "\U0001F600" * MAX_REASON)   # 4-byte characters
    for m in (big, proof, ref):
        assert len(encode_payload(m)) <= MAX_MESSAGE
        assert decode_frame(encode_message(m)) == m


@pytest.mark.parametrize("make", [
    lambda: Challenge(0, MID, NONCE, ()),                                 # no ids
    lambda: Challenge(0, MID, NONCE, tuple(cid(i) for i in range(MAX_SAMPLE + 1))),
    lambda: Challenge(0, MID, NONCE, (cid(1), cid(1))),                   # duplicate
    lambda: Challenge(0, MID, NONCE, (ZERO_ID,)),                         # zero chunk
    lambda: Challenge(0, MID, b"short", (cid(1),)),                       # nonce length
    lambda: Challenge(-1, MID, NONCE, (cid(1),)),
    lambda: Challenge(1 << 64, MID, NONCE, (cid(1),)),
    lambda: Challenge(0, MID[:31], NONCE, (cid(1),)),
    lambda: Challenge(0, MID, NONCE, [cid(1)]),                           # not a tuple
    lambda: Challenge(0, MID, NONCE, (cid(1),), 1),                       # sealed: a bool
    lambda: Proof(0, MID, ()),
    lambda: Proof(0, MID, (b"x" * 31,)),
    lambda: Proof(0, MID, (None,) * (MAX_SAMPLE + 1)),
    lambda: Refused(0, "x" * (MAX_REASON + 1)),
    lambda: Refused(True, "busy"),                                        # bool is no rid
])
def test_invalid_messages_cannot_be_built(make):
    with pytest.raises(LocalProtocolError):
        make()


def test_requests_and_responses_are_told_apart():
    ch = encode_message(Challenge(1, MID, NONCE, (cid(1),)))
    pr = encode_message(Proof(1, MID, (None,)))
    assert decode_frame(ch, REQUEST_TAGS).rid == 1
    with pytest.raises(RemoteProtocolError):
        decode_frame(ch, RESPONSE_TAGS)          # a holder's reply must not be a challenge
    with pytest.raises(RemoteProtocolError):
        decode_frame(pr, REQUEST_TAGS)


def _doc_frame(doc) -> bytes:
    payload = codec.encode(doc)
    return len(payload).to_bytes(HEADER, "big") + payload


@pytest.mark.parametrize("doc", [
    {"v": 2, "t": "refused", "rid": 1, "reason": ""},                     # version
    {"v": 1, "t": "nope", "rid": 1, "reason": ""},                        # tag
    {"v": 1, "t": "refused", "rid": 1},                                   # missing field
    {"v": 1, "t": "refused", "rid": 1, "reason": "", "x": 1},             # unknown field
    {"v": 1, "t": "proof", "rid": 1, "manifest": MID, "answers": b"x" * 32},  # not a list
    {"v": 1, "t": "proof", "rid": 1, "manifest": MID, "answers": [[b"x"]]},
    {"v": 1, "t": "challenge", "rid": 1, "manifest": MID, "nonce": NONCE,
     "ids": [ZERO_ID]},
    {"v": 1, "t": "challenge", "rid": -5, "manifest": MID, "nonce": NONCE, "ids": [cid(1)],
     "sealed": False},
    {"v": 1, "t": "challenge", "rid": 5, "manifest": MID, "nonce": NONCE, "ids": [cid(1)]},
    {"v": 1, "t": "challenge", "rid": 5, "manifest": MID, "nonce": NONCE, "ids": [cid(1)],
     "sealed": 0},
    [1, 2, 3],                                                            # not a map
])
def test_malformed_documents_are_remote_errors(doc):
    with pytest.raises(RemoteProtocolError):
        decode_frame(_doc_frame(doc))


def test_decoder_bounds_and_pieces():
    msg = Challenge(7, MID, NONCE, tuple(cid(i) for i in range(MAX_SAMPLE)))
    frame = encode_message(msg)
    dec = PossessionDecoder(REQUEST_TAGS)
    assert dec.room == HEADER + MAX_MESSAGE and not dec.started
    for i in range(0, len(frame), 5):                # byte by byte-ish
        assert dec.next_message() is None
        dec.receive_data(frame[i:i + 5])
    assert dec.started
    assert dec.next_message() == msg
    assert dec.next_message() is None and not dec.trailing

    dec = PossessionDecoder()
    dec.receive_data(frame + b"\x00")
    assert dec.next_message() == msg and dec.trailing

    dec = PossessionDecoder()                        # oversized prefix: at its 4th byte
    dec.receive_data((MAX_MESSAGE + 1).to_bytes(4, "big")[:3])
    with pytest.raises(OversizedFrame):
        dec.receive_data(b"\x01")
    with pytest.raises(RemoteProtocolError):         # and stays failed
        dec.next_message()

    dec = PossessionDecoder()                        # truncated frame
    dec.receive_data(frame[:-1])
    dec.receive_data(b"")
    with pytest.raises(RemoteProtocolError):
        dec.next_message()

    dec = PossessionDecoder()                        # silence is not an error
    dec.receive_data(b"")
    assert dec.next_message() is None and dec.ended_empty
    with pytest.raises(LocalProtocolError):
        dec.receive_data(b"late")

    with pytest.raises(RemoteProtocolError):
        decode_frame(b"")
    with pytest.raises(RemoteProtocolError):
        decode_payload(b"\x80" * (MAX_MESSAGE + 1))


@given(st.binary(max_size=400))
@settings(max_examples=500)
def test_random_bytes_raise_only_remote_errors(data):
    for tags in (REQUEST_TAGS, RESPONSE_TAGS):
        try:
            msg = decode_frame(data, tags)
        except RemoteProtocolError:
            continue
        assert encode_message(msg) == data       # accepted only if it is the canonical frame


@given(messages, st.data())
@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
def test_mutated_frames_raise_only_remote_errors(msg, data):
    frame = bytearray(encode_message(msg))
    op = data.draw(st.sampled_from(["flip", "truncate", "insert", "delete", "prefix"]))
    i = data.draw(st.integers(0, len(frame) - 1))
    if op == "flip":
        frame[i] ^= data.draw(st.integers(1, 255))
    elif op == "truncate":
        del frame[i:]
    elif op == "insert":
        frame[i:i] = data.draw(st.binary(min_size=1, max_size=8))
    elif op == "delete":
        del frame[i]
    else:
        frame[:HEADER] = data.draw(st.integers(0, (1 << 32) - 1)).to_bytes(4, "big")
    pieces = data.draw(st.integers(1, 7))
    dec = PossessionDecoder()
    try:
        step = max(1, len(frame) // pieces)
        for j in range(0, len(frame), step):
            piece = bytes(frame[j:j + step])
            if len(piece) > dec.room:
                break                              # the caller never reads more than room
            dec.receive_data(piece)
        if dec.room:
            dec.receive_data(b"")
        got = dec.next_message()
    except RemoteProtocolError:
        return
    if got is not None:                            # a mutation that is still a valid frame
        assert encode_message(got) == bytes(frame)[:len(encode_message(got))]


# -- answers, sampling, checking ------------------------------------------------------------

def test_answer_binds_nonce_and_plaintext():
    plain = b"chunk bytes" * 100
    a = answer(NONCE, plain)
    assert a == blake3.blake3(NONCE + plain).digest()
    assert answer(NONCE, memoryview(plain)) == a == answer(NONCE, bytearray(plain))
    assert answer(b"\x12" * 32, plain) != a                  # fresh nonce, fresh answer
    assert answer(NONCE, plain[:-1] + b"X") != a
    with pytest.raises(LocalProtocolError):
        answer(NONCE[:16], plain)


def test_sample_distinct_nonzero_deterministic():
    ids = [cid(i % 50) for i in range(200)] + [ZERO_ID] * 30
    s = sample(ids, 20, random.Random(1))
    assert len(s) == len(set(s)) == 20
    assert ZERO_ID not in s and set(s) <= set(ids)
    assert s == sample(ids, 20, random.Random(1))
    assert sorted(sample(ids, MAX_SAMPLE, random.Random(2))) == sorted({cid(i) for i in range(50)})
    assert sample([ZERO_ID] * 4, 8, random.Random(0)) == []
    assert sample([], 8, random.Random(0)) == []
    for bad in (0, MAX_SAMPLE + 1, -1):
        with pytest.raises(LocalProtocolError):
            sample(ids, bad, random.Random(0))


def test_sample_is_uniform():
    ids = [cid(i) for i in range(40)]
    rng = random.Random(9)
    counts = Counter()
    for _ in range(2000):
        counts.update(sample(ids, 5, rng))
    # each id expected 2000 * 5 / 40 = 250 times; binomial sd ~ 15
    assert set(counts) == set(ids)
    assert all(170 < n < 330 for n in counts.values()), counts


def _case(n=6):
    plains = [(b"%d" % i) * 1000 for i in range(n)]
    ids = tuple(chunk_id(p) for p in plains)
    return plains, ids, Challenge(5, MID, NONCE, ids)


def test_check_verdicts():
    plains, ids, ch = _case()
    ref = dict(zip(ids, plains))
    honest = Proof(5, MID, tuple(answer(NONCE, p) for p in plains))
    r = check(ch, honest, ref)
    assert (r.result, r.asked, r.proven, r.wrong, r.not_held) == ("ok", 6, 6, 0, 0)
    pre = {c: reference(c, NONCE, p) for c, p in ref.items()}       # precomputed works too
    assert all(type(v) is Precomputed for v in pre.values())
    assert check(ch, honest, pre) == r

    lost = Proof(5, MID, (None,) + honest.answers[1:])
    r = check(ch, lost, ref)
    assert (r.result, r.proven, r.not_held, r.missing_ids) == ("missing", 5, 1, (ids[0],))

    bad = bytearray(plains[2])
    bad[10] ^= 1
    damaged = Proof(5, MID, honest.answers[:2] + (answer(NONCE, bytes(bad)),)
                    + (None,) + honest.answers[4:])
    r = check(ch, damaged, ref)
    assert (r.result, r.wrong, r.not_held, r.proven, r.wrong_ids) == ("damaged", 1, 1, 4,
                                                                      (ids[2],))

    stale = Proof(5, MID, tuple(answer(b"\x99" * 32, p) for p in plains))   # an old nonce
    r = check(ch, stale, ref)
    assert (r.result, r.wrong, r.proven) == ("damaged", 6, 0)


def test_check_without_references_and_mismatched_proofs():
    plains, ids, ch = _case(3)
    honest = Proof(5, MID, tuple(answer(NONCE, p) for p in plains))
    r = check(ch, honest, {})
    assert (r.result, r.unverifiable) == ("failed", 3)
    # a wrong reference copy is no reference: it must not make the holder look damaged
    r = check(ch, honest, {ids[0]: b"not the chunk", ids[1]: plains[1], ids[2]: None})
    assert (r.result, r.proven, r.unverifiable, r.wrong) == ("ok", 1, 2, 0)
    for other in (Proof(6, MID, honest.answers), Proof(5, b"\x01" * 32, honest.answers),
                  Proof(5, MID, honest.answers[:2]), Refused(5, "busy")):
        r = check(ch, other, dict(zip(ids, plains)))
        assert r.result == "failed" and r.proven == 0


def test_sealed_references_are_checked_records_of_the_keyed_id():
    """reference_sealed: the expected sealed-form answer from a record that opens
    under the key to a plaintext with the keyed id; anything else is no reference."""
    from hypersdk.protocol.possession import reference_sealed
    from hypersdk.protocol.sealing import KIND_CHUNK, KIND_HASHLIST, DataKey, keyed_id, seal
    k = DataKey.generate(bytes(range(32)))
    other = DataKey.generate(bytes(range(1, 33)))
    plain = b"a sealed chunk " * 100
    c = keyed_id(k, plain)
    rec = bytes(seal(k, KIND_CHUNK, c, 0, len(plain), plain))
    assert reference_sealed(c, NONCE, rec, k).answer == answer(NONCE, rec)
    assert reference_sealed(c, NONCE, rec, k).answer != answer(NONCE, plain)
    bad = bytearray(rec)
    bad[-1] ^= 1
    wrong_id = keyed_id(k, plain + b"!")
    for args in ((c, NONCE, bytes(bad), k),                     # does not open
                 (c, NONCE, rec, other),                        # another key
                 (c, NONCE, rec, None),                         # no key
                 (c, NONCE, None, k),                           # no record
                 (c, NONCE, rec[:20], k),                       # truncated
                 (wrong_id, NONCE, bytes(seal(k, KIND_CHUNK, wrong_id, 0, len(plain), plain)),
                  k),                                           # plaintext is not the id
                 (c, NONCE, bytes(seal(k, KIND_HASHLIST, c, 0, len(plain), plain)), k)):
        assert reference_sealed(*args) is None, args[2][:8] if args[2] else None


# -- sample size from a stated goal, rotation (issue 18, finding 6) ---------------------

def _lost(n, loss=0.01):
    import math
    return max(1, math.ceil(loss * n - 1e-9))


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 20_000), loss=st.sampled_from([0.005, 0.01, 0.05, 0.2]),
       confidence=st.sampled_from([0.5, 0.9, 0.99, 0.999]))
def test_sample_size_is_the_smallest_that_meets_the_goal(n, loss, confidence):
    from hypersdk.protocol.possession import miss_probability, sample_size
    s = sample_size(n, loss, confidence)
    k = _lost(n, loss)
    assert 1 <= s <= n
    assert miss_probability(n, k, s) <= 1 - confidence + 1e-12
    if s > 1:          # one fewer would miss the goal
        assert miss_probability(n, k, s - 1) > 1 - confidence


def test_sample_size_default_goal_figures():
    """1% at 99%: the whole of a small backup, 459 of a large one (16 was the old
    fixed sample: it catches 1% loss in 15% of the runs)."""
    from hypersdk.protocol.possession import miss_probability, sample_size
    assert [sample_size(n) for n in (0, 1, 50, 100)] == [0, 1, 50, 99]
    assert sample_size(10**6) == 459 and sample_size(10**9) == 459
    assert 1 - miss_probability(10**6, 10**4, 16) < 0.16
    with pytest.raises(LocalProtocolError):
        sample_size(100, loss=0.001)
    with pytest.raises(LocalProtocolError):
        sample_size(100, confidence=1.0)


def _ids(n):
    return [blake3.blake3(i.to_bytes(4, "big")).digest() for i in range(n)]


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 3000), seed=st.binary(min_size=32, max_size=32),
       start=st.integers(0, 50))
def test_plan_covers_every_chunk_in_each_pass(n, seed, start):
    """Rounds p*R .. p*R+R-1 (one pass) ask every distinct chunk; each plan asks
    the goal's uniform sample plus its window, all distinct, never ZERO_ID."""
    from hypersdk.protocol.possession import plan, sample_size
    ids = _ids(n) + [ZERO_ID] * 3 + _ids(min(n, 5))          # duplicates and zeros skipped
    first = plan(ids, seed=seed, round_no=0, rng=random.Random(0))
    rounds = first.rounds
    assert first.n == n and rounds == -(-n // sample_size(n))
    asked, windows = set(), set()
    p0 = start * rounds
    for r in range(p0, p0 + rounds):
        p = plan(ids, seed=seed, round_no=r, rng=random.Random(r))
        assert p.rounds == rounds and p.round == r
        assert len(set(p.ids)) == len(p.ids) and ZERO_ID not in p.ids
        assert set(p.window) <= set(p.ids) and len(p.ids) >= min(n, p.uniform)
        assert not windows & set(p.window)                   # windows of a pass are disjoint
        windows |= set(p.window)
        asked |= set(p.ids)
    assert windows == asked == set(_ids(n))


def test_plan_rotation_is_secret_and_per_pass():
    from hypersdk.protocol.possession import plan
    ids = _ids(5000)
    a = plan(ids, seed=b"\1" * 32, round_no=0, rng=random.Random(1))
    b = plan(ids, seed=b"\2" * 32, round_no=0, rng=random.Random(1))
    nxt = plan(ids, seed=b"\1" * 32, round_no=a.rounds, rng=random.Random(1))
    assert a.window != b.window and a.window != nxt.window      # another seed, another pass
    assert a.ids != plan(ids, seed=b"\1" * 32, round_no=0, rng=random.Random(2)).ids
    with pytest.raises(LocalProtocolError):
        plan(ids, seed=b"short", round_no=0, rng=random.Random(1))


def test_check_all_merges_frames():
    from hypersdk.protocol.possession import check_all
    chunks = [bytes([i]) * 100 for i in range(1, 5)]
    ids = [chunk_id(c) for c in chunks]
    ch1, ch2 = Challenge(1, MID, NONCE, tuple(ids[:2])), Challenge(2, MID, NONCE, tuple(ids[2:]))
    good = {cid: c for cid, c in zip(ids, chunks)}
    p1 = Proof(1, MID, tuple(answer(NONCE, c) for c in chunks[:2]))
    p2 = Proof(2, MID, (answer(NONCE, chunks[2]), None))
    r = check_all([(ch1, p1), (ch2, p2)], good)
    assert (r.result, r.asked, r.proven, r.not_held, r.missing_ids) == ("missing", 4, 3, 1,
                                                                        (ids[3],))
    bad = Proof(2, MID, (b"\0" * 32, answer(NONCE, chunks[3])))
    r = check_all([(ch1, p1), (ch2, bad)], good)
    assert (r.result, r.wrong, r.wrong_ids) == ("damaged", 1, (ids[2],))
    assert check_all([(ch1, p1)], good).result == "ok"
    assert check_all([(ch1, p2)], good).result == "failed"       # answers another challenge
