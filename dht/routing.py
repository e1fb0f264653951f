"""The Kademlia routing table: 256 k-buckets by XOR distance, as a pure state machine.

Theory of operation (the shape follows rust-libp2p `kbucket.rs`; the code is ours).
Nothing here does I/O or reads a clock: the node reports what it heard (`observe`),
what a ping said (`ping_result`) and what failed (`failed`), always with `now`, and
the table answers with decisions (an `Outcome`, possibly "ping this contact").

Rules
1. Bucket `i` holds the contacts whose XOR distance `d` from our id satisfies
   2**i <= d < 2**(i+1) (`dht.keys.bucket_index`). The 256 ranges are disjoint and,
   with our own id (d = 0, never stored), cover the whole keyspace.
2. A bucket holds at most `k` contacts, ordered least-recently-seen first.
3. Hearing from a known contact moves it to most-recently-seen, updates
   `last_seen` and resets its failure count.
4. A new contact enters a bucket with room. If the bucket is full it goes to the
   bucket's replacement cache (at most `k` candidates; the least recently seen
   candidate is dropped first) and the table asks the caller to PING the bucket's
   least-recently-seen contact, at most one ping pending per bucket -- but only
   when that contact is questionable, i.e. last seen `ping_after` (15 min) ago
   or more. A bucket whose every contact was heard from recently is full of
   good contacts and nothing needs checking (BitTorrent's BEP 5 rule); without
   it every newcomer costs a ping and a 10,000-node join spends most of its
   requests on pings. Long-lived contacts are preferred (they are the ones
   most likely to stay up): a live old contact is never evicted for a new one.
5. Ping alive: the old contact stays (moves to most recent), the candidate stays
   cached. Ping dead: the old contact is evicted and the most recently seen
   candidate that the diversity limits permit takes the slot. The caller must
   always report a ping, a timeout being `alive=False`.
6. `MAX_FAILURES` (3) consecutive failed requests evict a contact the same way.
   A failing candidate is dropped from the replacement cache at once.
   `remove` drops a contact at once wherever it is (bucket, replacement cache,
   pending ping), e.g. a peer banned for misbehaving; a slot it frees in a
   bucket is filled as for a dead contact.
7. Diversity (against eclipse attacks, and so that a bucket does not die with one
   site): a bucket holds at most `max_per_prefix24` contacts from one IPv4 /24
   (default 2) and at most `max_per_site` from one declared site (default 4 = k/5,
   so a full bucket spans at least 5 sites). A contact that would break a limit
   is rejected: neither inserted nor cached. Non-IPv4 addresses and an empty
   site are not limited; `None` disables a limit (a test network on 127.0.0.1 has
   every node in one /24). The replacement cache obeys the same limits on its
   own, a newer candidate replacing the oldest of its group, so one /24 cannot
   flush the honest candidates out of the cache.
   A known contact whose address or site changed keeps its old record when the
   new one would break a limit.
8. Refresh: a bucket is stale when, within `interval`, no lookup into its range
   completed (`touch_bucket`) and no contact in it was heard from (`observe`
   of a contact that is or becomes a member, a live `ping_result`); a
   never-touched bucket is stale. Traffic keeps the busy far buckets fresh, so
   refresh lookups go where no traffic goes (BEP 5 refreshes buckets that
   have not changed in 15 minutes). Only
   buckets from the farthest down to the nearest non-empty one are refreshed:
   the nearer ones are (almost surely) empty, and the lookup of the nearest
   non-empty bucket already covers them. `refresh_target(i)` draws a random id
   in bucket i's range from the injected `random.Random`.
9. Learned contacts: peers named in replies (`learn`) that never answered us.
   They are kept apart, per bucket, only while the bucket and its learned
   list together hold fewer than k (a bucket with room is where a lookup
   lacks contacts), never handed to other peers (`closest` includes them
   only with `learned=True`, for our own lookups) and never counted as
   fresh. One failure forgets a learned contact; when it answers, `observe`
   makes it a member like any other. Learned contacts seed our walks (a
   join's refresh walk into a bucket asks them first, so it is short), but
   only members count as covering a bucket (`size`): other peers' lookups
   see our members only.
"""
from __future__ import annotations

import bisect
import enum
import random
from dataclasses import dataclass

from .contact import Contact
from .keys import ID_BITS, ID_BYTES, as_int

K = 20
MAX_PER_PREFIX24 = 2
MAX_PER_SITE = 4
MAX_FAILURES = 3
REFRESH_INTERVAL = 3600.0
REFRESH_K = 5            # a refresh walk ends once this many closest peers answered,
REFRESH_ANSWERS = 2      # or once this many peers in the bucket's range did
PING_AFTER = 900.0       # a contact not heard from for this long is questionable


class Status(enum.Enum):
    UPDATED = "updated"      # already known: moved to most recent
    INSERTED = "inserted"    # new, and the bucket had room
    CACHED = "cached"        # bucket full: kept as a replacement candidate
    REJECTED = "rejected"    # own id, or a diversity limit


@dataclass(frozen=True, slots=True)
class Outcome:
    status: Status
    ping: Contact | None = None   # CACHED: ping this contact, report with ping_result()
    reason: str = ""              # REJECTED: "own id", "ip /24" or "site"


@dataclass(slots=True)
class _Entry:
    contact: Contact
    last_seen: float
    failures: int = 0


class RoutingTable:
    def __init__(self, own_id: bytes, *, rng: random.Random, k: int = K,
                 max_per_prefix24: int | None = MAX_PER_PREFIX24,
                 max_per_site: int | None = MAX_PER_SITE,
                 max_failures: int = MAX_FAILURES, ping_after: float = PING_AFTER):
        if len(own_id) != ID_BYTES:
            raise ValueError("own id must be 32 bytes")
        self.own_id = own_id
        self._own_n = as_int(own_id)
        self.k = k
        self.max_per_prefix24 = max_per_prefix24
        self.max_per_site = max_per_site
        self.max_failures = max_failures
        self.ping_after = ping_after
        self._rng = rng
        self._buckets: list[list[_Entry]] = [[] for _ in range(ID_BITS)]   # oldest first
        self._cache: list[list[_Entry]] = [[] for _ in range(ID_BITS)]     # oldest first
        self._pending: dict[int, bytes] = {}       # bucket index -> id being pinged
        self._touched: dict[int, float] = {}       # bucket index -> last lookup or contact heard
        self._learned: dict[int, list[Contact]] = {}  # rule 9: bucket index -> unverified

    # -- inputs --------------------------------------------------------------

    def observe(self, contact: Contact, now: float) -> Outcome:
        """We heard from `contact` (it answered us or contacted us)."""
        if contact.id == self.own_id:
            return Outcome(Status.REJECTED, reason="own id")
        b = self._index(contact.id)
        bucket = self._buckets[b]
        entry = _find(bucket, contact.id)
        if entry is not None:
            _seen(bucket, entry, now)
            self._touched[b] = now
            if entry.contact != contact and self._crowding(bucket, contact) is None:
                entry.contact = contact
            return Outcome(Status.UPDATED)
        if b in self._learned:
            self._unlearn(b, contact.id)
        crowded = self._crowding(bucket, contact)
        if crowded is not None:
            return Outcome(Status.REJECTED, reason=crowded[0])
        if len(bucket) < self.k:
            _pop(self._cache[b], contact.id)    # it may have waited there
            bucket.append(_Entry(contact, now))
            self._touched[b] = now
            return Outcome(Status.INSERTED)
        self._add_candidate(b, contact, now)
        if b in self._pending or now - bucket[0].last_seen < self.ping_after:
            return Outcome(Status.CACHED)
        oldest = bucket[0].contact
        self._pending[b] = oldest.id
        return Outcome(Status.CACHED, ping=oldest)

    def ping_result(self, contact_id: bytes, alive: bool, now: float) -> Contact | None:
        """The answer to a ping asked for by `observe`. Returns the contact that
        replaced a dead one, if any."""
        if contact_id == self.own_id:
            return None
        b = self._index(contact_id)
        if self._pending.get(b) == contact_id:
            del self._pending[b]
        entry = _find(self._buckets[b], contact_id)
        if entry is None:
            return None
        if alive:
            _seen(self._buckets[b], entry, now)
            self._touched[b] = now
            return None
        return self._evict(b, entry)

    def failed(self, contact_id: bytes, now: float) -> Contact | None:
        """A request to the peer failed or timed out. Returns the contact that
        replaced it if this failure evicted it. (`now` is unused today; it keeps
        the inputs uniform and leaves room for failures that decay with time.)"""
        if contact_id == self.own_id:
            return None
        b = self._index(contact_id)
        _pop(self._cache[b], contact_id)
        if b in self._learned:
            self._unlearn(b, contact_id)
        entry = _find(self._buckets[b], contact_id)
        if entry is None:
            return None
        entry.failures += 1
        if entry.failures >= self.max_failures:
            return self._evict(b, entry)
        return None

    def remove(self, contact_id: bytes) -> Contact | None:
        """Forget `contact_id` now: out of its bucket (the most recently seen
        candidate the limits permit takes the slot, as in rule 5), out of the
        replacement cache, and no longer awaiting a ping. Returns the contact
        that took its slot, if any. Unknown ids are ignored."""
        if contact_id == self.own_id:
            return None
        b = self._index(contact_id)
        _pop(self._cache[b], contact_id)
        if b in self._learned:
            self._unlearn(b, contact_id)
        if self._pending.get(b) == contact_id:
            del self._pending[b]
        entry = _find(self._buckets[b], contact_id)
        return None if entry is None else self._evict(b, entry)

    def learn(self, contact: Contact) -> bool:
        """A peer named in a reply (rule 9): remember it unverified if its bucket
        has room. True if it was added."""
        if contact.id == self.own_id:
            return False
        b = (self._own_n ^ contact.n).bit_length() - 1
        bucket = self._buckets[b]
        learned = self._learned.get(b)
        if len(bucket) + (len(learned) if learned else 0) >= self.k:
            return False
        cid = contact.id
        if learned is not None:
            for c in learned:
                if c.id == cid:
                    return False
        for e in bucket:
            if e.contact.id == cid:
                return False
        if learned is None:
            self._learned[b] = [contact]
        else:
            learned.append(contact)
        return True

    def size(self, index: int) -> int:
        """Members of bucket `index` (contacts that answered or contacted us)."""
        return len(self._buckets[index])

    def known(self, index: int) -> int:
        """Members plus learned contacts of bucket `index`."""
        return len(self._buckets[index]) + len(self._learned.get(index, ()))

    def learned(self, index: int) -> list[Contact]:
        return list(self._learned.get(index, ()))

    def touch_bucket(self, index: int, now: float) -> None:
        """A lookup for a target in bucket `index`'s range completed."""
        self._touched[index] = now

    # -- queries -------------------------------------------------------------

    def closest(self, target: bytes, n: int, *, learned: bool = False) -> list[Contact]:
        """The n stored contacts nearest to target, nearest first; with
        `learned`, the learned contacts too (rule 9: for our own lookups only)."""
        # By rule 1 the buckets order the distances to target without sorting
        # the whole table: with b the bucket target falls in, bucket b's
        # contacts are nearest (below 2**b), then all of buckets < b (in
        # [2**b, 2**(b+1))), then bucket b+1, b+2, ... (bucket i: [2**i, 2**(i+1))).
        t = as_int(target)
        key = lambda c: t ^ c.n                 # noqa: E731
        buckets = self._buckets
        extra = self._learned if learned and self._learned else None
        b = (t ^ self._own_n).bit_length() - 1
        if extra is None:
            out = sorted((e.contact for e in buckets[b]), key=key) if b >= 0 else []
            if len(out) < n:
                out += sorted((e.contact for bucket in buckets[:max(b, 0)] for e in bucket),
                              key=key)
                for i in range(b + 1, ID_BITS):
                    if len(out) >= n:
                        break
                    if buckets[i]:
                        out += sorted((e.contact for e in buckets[i]), key=key)
            return out[:n]

        def members(i: int) -> list[Contact]:
            got = [e.contact for e in buckets[i]]
            more = extra.get(i)
            return got + more if more else got

        out = sorted(members(b), key=key) if b >= 0 else []
        if len(out) < n:
            out += sorted((c for i in range(max(b, 0)) for c in members(i)), key=key)
            for i in range(b + 1, ID_BITS):
                if len(out) >= n:
                    break
                if buckets[i] or i in extra:
                    out += sorted(members(i), key=key)
        return out[:n]

    def stale_buckets(self, now: float, interval: float = REFRESH_INTERVAL) -> list[int]:
        """Buckets to refresh, farthest first (rule 8)."""
        nearest = next((i for i, bucket in enumerate(self._buckets) if bucket), None)
        if nearest is None:
            return []
        return [i for i in range(ID_BITS - 1, nearest - 1, -1)
                if now - self._touched.get(i, float("-inf")) >= interval]

    def refresh_target(self, index: int) -> bytes:
        """A random id whose distance from ours falls in bucket `index`."""
        d = (1 << index) | self._rng.getrandbits(index)
        return (as_int(self.own_id) ^ d).to_bytes(ID_BYTES, "big")

    @staticmethod
    def bucket_range(index: int) -> tuple[int, int]:
        """Distances held by bucket `index`: [lo, hi)."""
        return 1 << index, 1 << (index + 1)

    def get(self, contact_id: bytes) -> Contact | None:
        if contact_id == self.own_id:
            return None
        entry = _find(self._buckets[self._index(contact_id)], contact_id)
        return entry.contact if entry else None

    def __contains__(self, contact_id: bytes) -> bool:
        return self.get(contact_id) is not None

    def __len__(self) -> int:
        return sum(map(len, self._buckets))

    def buckets(self) -> list[list[Contact]]:
        """The 256 buckets' contacts, least-recently-seen first (for tests)."""
        return [[e.contact for e in bucket] for bucket in self._buckets]

    def replacements(self, index: int) -> list[Contact]:
        """Bucket `index`'s replacement candidates, least-recently-seen first."""
        return [e.contact for e in self._cache[index]]

    def pending_ping(self, index: int) -> bytes | None:
        return self._pending.get(index)

    # -- internals -----------------------------------------------------------

    def _index(self, contact_id: bytes) -> int:
        return (self._own_n ^ int.from_bytes(contact_id, "big")).bit_length() - 1

    def _unlearn(self, b: int, contact_id: bytes) -> None:
        learned = self._learned[b]
        for j, c in enumerate(learned):
            if c.id == contact_id:
                del learned[j]
                break
        if not learned:
            del self._learned[b]

    def _crowding(self, entries: list[_Entry], contact: Contact):
        """(reason, crowding entries oldest first) for the first diversity limit
        `contact` would break among `entries`, or None."""
        for reason, key, limit in (("ip /24", _prefix24, self.max_per_prefix24),
                                   ("site", _site, self.max_per_site)):
            value = key(contact)
            if limit is None or not value:
                continue
            same = [e for e in entries if e.contact.id != contact.id and key(e.contact) == value]
            if len(same) >= limit:
                return reason, same
        return None

    def _add_candidate(self, b: int, contact: Contact, now: float) -> None:
        cache = self._cache[b]
        _pop(cache, contact.id)
        while (crowded := self._crowding(cache, contact)) is not None:
            cache.remove(crowded[1][0])
        if len(cache) >= self.k:
            del cache[0]
        cache.append(_Entry(contact, now))

    def _evict(self, b: int, entry: _Entry) -> Contact | None:
        bucket, cache = self._buckets[b], self._cache[b]
        bucket.remove(entry)
        if self._pending.get(b) == entry.contact.id:
            del self._pending[b]
        for candidate in reversed(cache):       # most recently seen first
            if self._crowding(bucket, candidate.contact) is None:
                cache.remove(candidate)
                bisect.insort(bucket, candidate, key=lambda e: e.last_seen)
                return candidate.contact
        return None


def _find(entries: list[_Entry], contact_id: bytes) -> _Entry | None:
    return next((e for e in entries if e.contact.id == contact_id), None)


def _seen(bucket: list[_Entry], entry: _Entry, now: float) -> None:
    """Rule 3: move to most-recently-seen, reset the failure count."""
    bucket.remove(entry)
    bucket.append(entry)
    entry.last_seen, entry.failures = now, 0


def _pop(entries: list[_Entry], contact_id: bytes) -> _Entry | None:
    entry = _find(entries, contact_id)
    if entry is not None:
        entries.remove(entry)
    return entry


def _prefix24(c: Contact) -> str:
    return c.ip_prefix24


def _site(c: Contact) -> str:
    return c.site
