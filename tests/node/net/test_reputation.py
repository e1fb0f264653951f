"""node/net/reputation.py (pure) and its file (node/daemon/reputation_file.py):
offences, bans, decay, and persistence across a restart with a clock that lies."""
from __future__ import annotations

import json

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from hypersdk.node.daemon import reputation_file
from hypersdk.node.net.reputation import (
    BAN_SCORE,
    BAN_TIME,
    DECAY_HALF_LIFE,
    MAX_CREDIT,
    PENALTIES,
    PeerScores,
)

P, Q = b"p" * 32, b"q" * 32


def test_two_violations_or_silences_ban_a_stranger_and_timeouts_never_do():
    s = PeerScores()
    for i in range(100):                          # a peer that is merely down
        assert not s.penalize(P, "timeout", float(i))
    assert not s.banned(P, 100.0) and s.score(P) == BAN_SCORE / 2
    assert not s.penalize(Q, "silent", 0.0) and s.penalize(Q, "silent", 5.0)
    assert s.banned(Q, 5.0 + BAN_TIME - 1) and not s.banned(Q, 5.0 + BAN_TIME)
    assert s.offences["silent"] == 2 and s.bans == 1
    # timeouts count: then one real offence bans
    assert s.penalize(P, "wrong bytes", 101.0) and s.banned(P, 101.0)


def test_decay_forgets_rare_faults_but_not_a_steady_offender():
    s = PeerScores()
    s.penalize(P, "silent", 0.0)                  # -25
    assert s.score(P, DECAY_HALF_LIFE) == pytest.approx(-12.5)
    assert not s.penalize(P, "silent", 3 * DECAY_HALF_LIFE)   # -25 * 1/8 - 25 > -40
    for t in range(0, 100, 10):                   # one every 10 s: banned quickly
        if s.penalize(Q, "silent", float(t)):
            break
    assert s.banned(Q, float(t)) and t == 10


def test_credit_is_capped_and_a_veteran_survives_more():
    s = PeerScores()
    for i in range(100):
        s.reward(P, float(i))
    assert s.score(P) == MAX_CREDIT
    assert not s.penalize(P, "silent", 100.0) and not s.penalize(P, "silent", 100.0)
    assert s.penalize(P, "silent", 100.0)          # 20 - 75 <= -40


def test_persisted_scores_and_bans_survive_a_restart_and_the_time_down_counts():
    s = PeerScores()
    s.penalize(P, "silent", 10.0)
    s.penalize(P, "silent", 10.0)                  # banned until 10 + BAN_TIME
    s.penalize(Q, "silent", 10.0)                  # -25
    doc = json.loads(json.dumps(s.to_doc(now=10.0, wall=1_000_000.0)))
    assert not s.changed
    # restarted 30 minutes later (trio time starts over at 0)
    t = PeerScores.from_doc(doc, now=0.0, wall=1_000_000.0 + 1800)
    assert t.banned(P, 0.0) and t.banned(P, BAN_TIME - 1800 - 1) and not t.banned(P, BAN_TIME - 1799)
    assert t.score(Q, 0.0) == pytest.approx(-25 * 0.5 ** 0.5)
    # a wall clock that went back counts as no time down; no ban comes back longer
    u = PeerScores.from_doc(doc, now=0.0, wall=0.0)
    assert u.banned(P, BAN_TIME - 1) and not u.banned(P, BAN_TIME)
    # a restart after the ban ran out: gone
    assert not PeerScores.from_doc(doc, now=0.0, wall=1_000_000.0 + 2 * BAN_TIME).banned(P, 0.0)


@pytest.mark.parametrize("doc", [
    None, [], {"version": 2}, {"version": 1, "saved_at": "x", "peers": {}},
    {"version": 1, "saved_at": 0, "peers": {"zz": {"score": 1, "ban_left": None}}},
    {"version": 1, "saved_at": 0, "peers": {"00" * 32: {"score": "nan", "ban_left": None}}},
    {"version": 1, "saved_at": 0, "peers": {"00" * 31: {"score": 1, "ban_left": None}}},
    {"version": 1, "saved_at": 0, "peers": {"00" * 32: {"score": 1}}},
    {"version": 1, "saved_at": float("inf"), "peers": {}},
])
def test_a_document_that_is_not_a_reputation_is_refused(doc):
    with pytest.raises(ValueError):
        PeerScores.from_doc(doc, now=0.0, wall=0.0)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(sorted(PENALTIES) + ["reward"]), st.booleans(),
                          st.floats(0, 4000)), max_size=40), st.floats(0, 10_000))
def test_property_a_round_trip_keeps_every_ban_and_never_raises_a_score(ops, down):
    s, now = PeerScores(), 0.0
    for what, which, dt in ops:
        now += dt
        peer = P if which else Q
        if what == "reward":
            s.reward(peer, now)
        else:
            s.penalize(peer, what, now)
    doc = json.loads(json.dumps(s.to_doc(now, 5000.0)))
    t = PeerScores.from_doc(doc, 0.0, 5000.0 + down)
    for peer in (P, Q):
        if s.banned(peer, now + down):
            assert t.banned(peer, 0.0)
        assert t.score(peer, 0.0) <= max(0.0, s.score(peer, now)) + 1e-9


async def test_the_file_round_trips_and_a_bad_one_is_set_aside(tmp_path, caplog):
    s = PeerScores()
    s.penalize(P, "silent", trio.current_time())
    s.penalize(P, "silent", trio.current_time())
    reputation_file.save(tmp_path, s)
    assert reputation_file.load(tmp_path).banned(P, trio.current_time())
    assert (tmp_path / "reputation.json").stat().st_mode & 0o777 == 0o600
    (tmp_path / "reputation.json").write_text("{not json")
    fresh = reputation_file.load(tmp_path)
    assert len(fresh) == 0 and (tmp_path / "reputation.json.bad").exists()
    assert "not a reputation file" in caplog.text
    assert len(reputation_file.load(tmp_path)) == 0           # no file now: empty
