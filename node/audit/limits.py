"""Inbound limits of audit gossip, per peer and per author (issue 17, attack 6).

Membership is the first defence against audit spam: in a network only members
author (node/net/gate.py author_ok), so throwaway keys are dropped whatever
their number. These limits bound what one peer, or one author (a member that
was compromised, or anyone when the node runs in no network), can make a node
store and forward, and each one that triggers is counted under its own name
in the gossip's counters (`status` audit.limited):

  peer entries   a Push from one peer: at most PEER_RATE entries/s (burst
                 PEER_BURST), and ...
  peer bytes     ... PEER_BYTES_RATE bytes/s (burst PEER_BYTES_BURST). Over
                 either, the Push is refused whole (Ack without wants):
                 anti-entropy brings honest entries later.
  author entries one author's entries, however they arrive (push or pull):
                 AUTHOR_RATE entries/s (burst AUTHOR_BURST), and ...
  author bytes   ... AUTHOR_BYTES_RATE bytes/s (burst AUTHOR_BYTES_BURST).
                 Over either, that author's entries in the batch are dropped
                 from the first one over (the rest could not attach anyway);
                 anti-entropy asks for them again once the bucket refilled.
                 The bursts hold a long log's catch-up (a joining node pulls
                 at most gossip.MAX_PULL_PER_SYNC entries a round in all).
  new authors    only when authors are not vetted by membership (no network):
                 authors we hold no entry of, per sending peer at most
                 NEW_AUTHOR_RATE/s (burst NEW_AUTHOR_BURST). Their entries
                 are dropped; in a network, certificates vet authors instead.

Pure: time is an argument. Memory: at most MAX_TRACKED buckets of each kind;
past that, the least recently used is forgotten (it restarts full, which can
only let a forgotten key burst once more; peers are connection-authenticated
and authors membership-vetted or new-author-limited, so keys are not free).
"""
from __future__ import annotations

import collections

PEER_RATE, PEER_BURST = 2000.0, 4000.0                    # entries
PEER_BYTES_RATE, PEER_BYTES_BURST = 2 << 20, 8 << 20      # bytes
AUTHOR_RATE, AUTHOR_BURST = 50.0, 4096.0                  # entries
AUTHOR_BYTES_RATE, AUTHOR_BYTES_BURST = 256 << 10, 8 << 20  # bytes
NEW_AUTHOR_RATE, NEW_AUTHOR_BURST = 1.0, 256.0            # authors
MAX_TRACKED = 4096


class Buckets:
    """Token buckets by key, same rate and depth, LRU-bounded."""

    def __init__(self, rate: float, burst: float, max_tracked: int = MAX_TRACKED):
        self.rate, self.burst, self.max_tracked = rate, burst, max_tracked
        self._b: collections.OrderedDict[bytes, list[float]] = collections.OrderedDict()

    def level(self, key: bytes, now: float) -> float:
        b = self._b.get(key)
        if b is None:
            return self.burst
        return min(self.burst, b[0] + max(0.0, now - b[1]) * self.rate)

    def take(self, key: bytes, n: float, now: float) -> bool:
        """Take n tokens if there are; False (and nothing taken) if not."""
        tokens = self.level(key, now)
        if tokens < n:
            return False
        self._b[key] = [tokens - n, now]
        self._b.move_to_end(key)
        if len(self._b) > self.max_tracked:
            self._b.popitem(last=False)
        return True

    def __len__(self) -> int:
        return len(self._b)


class InboundLimits:
    def __init__(self, *, peer_rate: float = PEER_RATE, peer_burst: float = PEER_BURST,
                 peer_bytes_rate: float = PEER_BYTES_RATE,
                 peer_bytes_burst: float = PEER_BYTES_BURST,
                 author_rate: float = AUTHOR_RATE, author_burst: float = AUTHOR_BURST,
                 author_bytes_rate: float = AUTHOR_BYTES_RATE,
                 author_bytes_burst: float = AUTHOR_BYTES_BURST,
                 new_author_rate: float = NEW_AUTHOR_RATE,
                 new_author_burst: float = NEW_AUTHOR_BURST):
        self.peer = Buckets(peer_rate, peer_burst)
        self.peer_bytes = Buckets(peer_bytes_rate, peer_bytes_burst)
        self.author = Buckets(author_rate, author_burst)
        self.author_bytes = Buckets(author_bytes_rate, author_bytes_burst)
        self.new_authors = Buckets(new_author_rate, new_author_burst)
        self.limited: collections.Counter = collections.Counter()   # entries, by limit

    def push(self, peer: bytes, entries: int, size: int, now: float) -> bool:
        """May a Push of `entries` entries, `size` bytes in all, from `peer` be read?"""
        if self.peer.level(peer, now) < entries:
            self.limited["peer entries"] += entries
            return False
        if not self.peer_bytes.take(peer, size, now):
            self.limited["peer bytes"] += entries
            return False
        self.peer.take(peer, entries, now)
        return True

    def admit(self, peer: bytes | None, entries, known, vetted: bool, now: float) -> list[int]:
        """The indexes of `entries` ((author, size) pairs, in the order the log
        applies them) that may be stored. known(author) -> True if we hold
        entries of it; vetted: membership vets the authors (no new-author limit).
        Once an author is over a limit, its later entries in the batch go too."""
        out: list[int] = []
        stopped: dict[bytes, str] = {}          # author -> the limit it hit
        new_ok: dict[bytes, bool] = {}
        for i, (author, size) in enumerate(entries):
            reason = stopped.get(author)
            if reason is None and not vetted and not known(author):
                if author not in new_ok:
                    new_ok[author] = peer is None or self.new_authors.take(peer, 1, now)
                if not new_ok[author]:
                    reason = "new authors"
            if reason is None and self.author.level(author, now) < 1:
                reason = "author entries"
            if reason is None and not self.author_bytes.take(author, size, now):
                reason = "author bytes"
            if reason is not None:
                stopped[author] = reason
                self.limited[reason] += 1
                continue
            self.author.take(author, 1, now)
            out.append(i)
        return out
