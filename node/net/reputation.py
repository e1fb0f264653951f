"""Peer reputation: one score per peer, shared by every protocol of a node.

The DHT (node/kademlia), the chunk exchange (its server refuses banned peers,
the swarm downloader reports wrong bytes and stalls), audit gossip and the
possession server all read and write the same PeerScores, so a peer caught
lying or stalling in one protocol is not trusted in another. `find_providers`
drops banned peers, the exchange and possession servers answer none of their
streams, the DHT answers none of their requests and queries none.

Rules (time is an argument, trio time in the node; nothing here does I/O):
1. A peer starts at 0. Each useful answer adds REWARD, up to MAX_CREDIT, so a
   long-serving peer survives a rare fault, but credit cannot be banked
   without limit.
2. Each offence subtracts its PENALTIES weight: a protocol violation
   (malformed or oversized frame, a reply with the wrong rid or type, bytes
   after the one frame, a forged signature), wrong bytes (a chunk that does
   not verify) or silence (chunk or Have requests accepted and not one byte
   answered within deadlines other peers meet: the swarm's staller) costs 25;
   a stall of the DHT's kind (bytes trickle but no frame completes before
   the deadline, or a requester opens a stream and sends nothing) costs 20,
   a little less because a very slow honest link could look the same; a plain
   timeout costs 4 but can never ban on its own (a peer that is merely down
   is not an offender): timeouts take a score down to BAN_SCORE / 2 at most, so
   they count (a peer that also violates the protocol once is then banned),
   and alone they never ban.
3. At or below BAN_SCORE (-40) the peer is banned for BAN_TIME (1 h). So a
   stranger is banned on its second violation, a peer with full credit on its
   third (violations) or fourth (DHT stalls). When the ban ends the peer starts
   over at 0.
4. Decay: a negative score halves every DECAY_HALF_LIFE (1 h) without new
   offences, so old, rare faults are forgotten and only a steady offender
   reaches a ban.
5. Memory is bounded: at most MAX_TRACKED peers; past that, the oldest
   unbanned entry is forgotten. A flood of fresh ids can therefore at worst
   reset unbanned scores to 0; it cannot unban anybody.
6. Persistence: to_doc()/from_doc() carry scores and the time left of each
   ban across a restart (the daemon keeps them in reputation.json). The time
   spent down counts, by the wall clock: decay goes on and bans run out while
   the node is down; a wall clock that went back counts as no time; no ban
   comes back longer than BAN_TIME.
"""
from __future__ import annotations

import collections
import math
from dataclasses import dataclass

REWARD, MAX_CREDIT = 1, 20
PENALTIES = {"malformed": 25, "oversized": 25, "wrong reply": 25, "trailing data": 25,
             "not a request": 25, "bad signature": 25, "wrong bytes": 25, "silent": 25,
             "stalled": 20, "timeout": 4}
CANNOT_BAN = frozenset({"timeout"})
BAN_SCORE = -40
BAN_TIME = 3600.0
DECAY_HALF_LIFE = 3600.0
MAX_TRACKED = 4096
DOC_VERSION = 1


@dataclass(slots=True)
class _Score:
    value: float = 0.0
    at: float = 0.0                      # when value was last brought up to date
    banned_until: float | None = None


class PeerScores:
    """The reputation service (module docstring)."""

    def __init__(self, *, ban_score: int = BAN_SCORE, ban_time: float = BAN_TIME,
                 max_tracked: int = MAX_TRACKED, half_life: float = DECAY_HALF_LIFE):
        self.ban_score = ban_score
        self.ban_time = ban_time
        self.max_tracked = max_tracked
        self.half_life = half_life
        self._peers: dict[bytes, _Score] = {}
        self.offences: collections.Counter = collections.Counter()   # by reason
        self.bans = 0                    # bans given (a counter)
        self.changed = False             # since the last to_doc() (the daemon saves then)

    def reward(self, peer_id: bytes, now: float) -> None:
        s = self._entry(peer_id, now)
        if s.banned_until is None:
            s.value = min(MAX_CREDIT, s.value + REWARD)

    def penalize(self, peer_id: bytes, reason: str, now: float) -> bool:
        """Lower the score; True if this offence banned the peer."""
        s = self._entry(peer_id, now)
        self.offences[reason] += 1
        self.changed = True
        value = s.value - PENALTIES[reason]
        if reason in CANNOT_BAN:              # down to half the ban score at most
            value = max(value, min(s.value, self.ban_score / 2))
        s.value = value
        # rounded: a second offence seconds after the first bans as if undecayed
        if s.banned_until is None and round(s.value) <= self.ban_score:
            s.banned_until = now + self.ban_time
            self.bans += 1
            return True
        return False

    def banned(self, peer_id: bytes, now: float) -> bool:
        s = self._peers.get(peer_id)
        if s is None or s.banned_until is None:
            return False
        if now >= s.banned_until:            # rule 3: the ban is over, start at 0
            del self._peers[peer_id]
            self.changed = True
            return False
        return True

    def score(self, peer_id: bytes, now: float | None = None) -> float:
        s = self._peers.get(peer_id)
        if s is None:
            return 0
        return s.value if now is None else self._decayed(s, now)

    def banned_peers(self, now: float) -> list[bytes]:
        return [p for p in list(self._peers) if self.banned(p, now)]

    def __len__(self) -> int:
        return len(self._peers)

    # -- persistence (rule 6) ----------------------------------------------------------

    def to_doc(self, now: float, wall: float) -> dict:
        """A JSON-able document of every score and ban, at trio time `now` and wall
        clock `wall` (seconds since the epoch)."""
        self.changed = False
        peers = {}
        for pid, s in list(self._peers.items()):
            if s.banned_until is not None and now >= s.banned_until:
                continue
            value = self._decayed(s, now)
            left = None if s.banned_until is None else s.banned_until - now
            if left is None and value == 0:
                continue
            peers[pid.hex()] = {"score": value, "ban_left": left}
        return {"version": DOC_VERSION, "saved_at": wall, "peers": peers}

    @classmethod
    def from_doc(cls, doc: dict, now: float, wall: float, **kw) -> "PeerScores":
        """Scores from to_doc(); ValueError for a document that is not one."""
        if not isinstance(doc, dict) or doc.get("version") != DOC_VERSION:
            raise ValueError("not a reputation document of version 1")
        saved, peers = doc.get("saved_at"), doc.get("peers")
        if not isinstance(saved, (int, float)) or not isinstance(peers, dict) \
                or not math.isfinite(saved):
            raise ValueError("saved_at or peers missing")
        out = cls(**kw)
        down = min(max(0.0, wall - saved), 10 * 365 * 86400.0)  # a clock gone back: 0
        for hexid, e in list(peers.items())[:out.max_tracked]:
            try:
                pid = bytes.fromhex(hexid)
                value = float(e["score"])
                left = e["ban_left"]
                left = None if left is None else float(left)
            except (ValueError, TypeError, KeyError, AttributeError):
                raise ValueError(f"bad reputation entry for {hexid!r}") from None
            if len(pid) != 32 or not math.isfinite(value) or \
                    (left is not None and not math.isfinite(left)):
                raise ValueError(f"bad reputation entry for {hexid!r}")
            value = max(-1e6, min(MAX_CREDIT, value))
            s = _Score(value, now - down, None)
            s.value = out._decayed(s, now)
            s.at = now
            if left is not None:
                left = min(left, out.ban_time) - down
                if left <= 0:
                    continue                   # the ban ran out while we were down
                s.banned_until = now + left
            out._peers[pid] = s
        return out

    # -- internals ---------------------------------------------------------------------

    def _decayed(self, s: _Score, now: float) -> float:
        if s.value >= 0 or now <= s.at:
            return s.value
        return s.value * 0.5 ** ((now - s.at) / self.half_life)

    def _entry(self, peer_id: bytes, now: float) -> _Score:
        s = self._peers.get(peer_id)
        if s is not None and (s.banned_until is None or self.banned(peer_id, now)):
            if s.banned_until is None:
                s.value, s.at = self._decayed(s, now), now
            return s
        if len(self._peers) >= self.max_tracked:
            victim = next((p for p, e in self._peers.items() if e.banned_until is None), None)
            if victim is not None:
                del self._peers[victim]
        s = self._peers[peer_id] = _Score(0.0, now)
        return s
