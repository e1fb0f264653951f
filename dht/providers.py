"""Provider records ("peer P can serve key K") and when to republish our own.

A DHT node stores the provider records that other peers announce (ADD_PROVIDER)
for keys close to its id, and answers GET_PROVIDERS from them. Pure: time is
the `now` argument (seconds), no I/O.

Rules
-----
1. A record lives `ttl` (48 h) after its last add(): it is alive while
   now < added + ttl, so at exactly added + ttl it is gone. Re-adding the same
   (key, provider id) refreshes the expiry and the address in place; it never
   creates a second record (py-libp2p's store returns duplicates; ours cannot).
2. Bounds: at most `max_records` records in all and `max_providers_per_key`
   providers per key. (That a peer announces only itself is the caller's
   rule: node/kademlia/rpc.py checks the transport-authenticated id.)
3. A full store is shared fairly (per-provider quotas without a fixed quota):
   expired records are reclaimed first; then a new record takes the place of
   the least recently refreshed record of the provider holding the most
   records, unless that is the newcomer itself (or it holds no more than the
   newcomer would), which is refused. A peer flooding random keys therefore
   fills only the room nobody else uses and then pushes out its own records:
   it can never make the store refuse a provider holding fewer records than
   it does.
4. A full key prefers providers that are alive over ones that are not. The
   caller reports what it learns of a provider (mark_ok: it answered or asked
   something; mark_failed: a request to it failed, or it is banned). A new
   provider of a full key takes the place of the key's most suspect provider
   (banned first, then most failures since its last success); when none is
   suspect the newcomer waits (one per key, at most `max_waiting` in all,
   oldest dropped) and add() returns False: the caller should check the
   key's providers it has not heard from lately (`to_check`), and the first
   of them that fails makes room for the waiting newcomer (mark_failed).
   Live providers are never pushed out of a key by newcomers, so a flood of
   fresh (Sybil) announcements cannot displace established, live providers.
5. get() never returns an expired record, even before expire() ran; providers
   come in order of first announcement (established providers first), banned
   ones never.
6. A provider republishes every REPUBLISH_INTERVAL (22 h) < ttl (48 h): one
   missed republish (a node down for up to 26 h) does not lose its records.

Memory at the default bounds, worst case: 2^19 records at about 250 bytes each
(the record, its place in its provider's order) is about 130 MB; typically a
key has a few providers (its replicas).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .contact import Contact
from .keys import ID_BYTES

PROVIDER_TTL = 48 * 3600          # seconds a provider record lives after its last add
REPUBLISH_INTERVAL = 22 * 3600    # seconds between a provider's re-announcements
MAX_RECORDS = 1 << 19             # records one node stores, all keys and providers
MAX_PROVIDERS_PER_KEY = 20        # = Kademlia k; fits one Providers message (<= 64)
MAX_WAITING = 1024                # newcomers waiting for a full key's suspect to fail
CHECK_AFTER = 600.0               # seconds without news before a provider is worth a check


@dataclass(slots=True)
class _Provider:
    """What the store knows of one provider: its keys (least recently refreshed
    first) and its health."""
    keys: dict = field(default_factory=dict)
    failures: int = 0               # failed requests since its last success
    banned: bool = False
    last_ok: float = float("-inf")  # when it last answered or asked something


class ProviderStore:
    """Provider records by key, bounded, fair and expiring (see module docstring)."""

    def __init__(self, *, ttl: float = PROVIDER_TTL, max_records: int = MAX_RECORDS,
                 max_providers_per_key: int = MAX_PROVIDERS_PER_KEY,
                 max_waiting: int = MAX_WAITING):
        if not ttl > 0 or max_records < 1 or max_providers_per_key < 1 or max_waiting < 0:
            raise ValueError("ttl and bounds must be positive")
        self.ttl = ttl
        self.max_records = max_records
        self.max_providers_per_key = max_providers_per_key
        self.max_waiting = max_waiting
        # key -> provider id -> (contact, expires at); dicts keep first-add order
        self._records: dict[bytes, dict[bytes, tuple[Contact, float]]] = {}
        self._providers: dict[bytes, _Provider] = {}
        self._waiting: dict[bytes, tuple[Contact, float]] = {}   # key -> newcomer
        self._count = 0
        self._earliest = float("inf")   # lower bound of every expiry: expire() is O(1) before it
        # the provider with the most records (rule 3): kept by _put; when its
        # count drops it may no longer be, and _dirty says so
        self._largest: bytes | None = None
        self._dirty = False
        self.evicted = 0                # records pushed out by rules 3 and 4 (a counter)

    def add(self, key: bytes, provider: Contact, now: float) -> bool:
        """Store or refresh a record. False if refused (rule 3) or waiting (rule 4)."""
        if not isinstance(key, bytes) or len(key) != ID_BYTES:
            raise ValueError("key must be 32 bytes")
        pid = provider.id
        prov = self._providers.get(pid)
        providers = self._live(key, now)
        if providers is not None and pid in providers:          # a refresh
            self._put(key, providers, provider, now)
            return True
        if providers is not None and len(providers) >= self.max_providers_per_key:
            victim = self._most_suspect(providers)
            if victim is None:
                self._wait(key, provider, now)
                return False
            self._remove(key, victim)
            self.evicted += 1
            providers = self._records.get(key)
        elif self._count >= self.max_records:
            self.expire(now)
            if self._count >= self.max_records and not self._evict_for(pid, prov):
                return False
            providers = self._records.get(key)
        if providers is None:
            providers = self._records[key] = {}
        self._put(key, providers, provider, now)
        return True

    def get(self, key: bytes, now: float) -> list[Contact]:
        """The live providers of `key`, one per provider id, oldest announcement
        first, banned ones left out."""
        providers = self._live(key, now)
        if providers is None:
            return []
        found = self._providers
        return [c for pid, (c, _) in providers.items() if not found[pid].banned]

    # -- what the caller learns of providers (rule 4) ------------------------------------

    def mark_ok(self, provider_id: bytes, now: float) -> None:
        prov = self._providers.get(provider_id)
        if prov is not None:
            prov.failures, prov.last_ok = 0, now

    def mark_failed(self, provider_id: bytes, now: float, *, banned: bool = False) -> int:
        """A request to the provider failed (or it is banned). Its records stay
        (a restarting node keeps its place) but are the first to go: every key
        of it with a newcomer waiting gives the place to the newcomer now.
        Returns how many newcomers were let in."""
        prov = self._providers.get(provider_id)
        if prov is None:
            return 0
        prov.failures += 1
        prov.banned = prov.banned or banned
        let_in = 0
        for key in [k for k in prov.keys if k in self._waiting]:
            newcomer, since = self._waiting.pop(key)
            if now >= since + self.ttl:
                continue
            self._remove(key, provider_id)
            self.evicted += 1
            providers = self._records.setdefault(key, {})
            self._put(key, providers, newcomer, now)
            let_in += 1
        return let_in

    def to_check(self, key: bytes, now: float, limit: int = 4) -> list[Contact]:
        """The providers of a full key with a newcomer waiting that nobody heard
        from in CHECK_AFTER seconds, least recently heard first: the caller
        pings them and reports mark_ok / mark_failed."""
        providers = self._live(key, now)
        if providers is None or key not in self._waiting:
            return []
        stale = [(self._providers[pid].last_ok, c) for pid, (c, _) in providers.items()
                 if now - self._providers[pid].last_ok >= CHECK_AFTER]
        stale.sort(key=lambda t: t[0])
        return [c for _, c in stale[:limit]]

    def waiting(self, key: bytes) -> Contact | None:
        entry = self._waiting.get(key)
        return None if entry is None else entry[0]

    def expire(self, now: float) -> int:
        """Remove every record expired at `now`; return how many were removed."""
        if now < self._earliest:
            return 0
        removed = 0
        earliest = float("inf")
        for key in list(self._records):
            removed += self._purge(key, now)
            for _, expires in self._records.get(key, {}).values():
                earliest = min(earliest, expires)
        self._earliest = earliest
        for key in [k for k, (_, since) in self._waiting.items() if now >= since + self.ttl]:
            del self._waiting[key]
        self._recompute_largest()
        return removed

    def _recompute_largest(self) -> None:
        self._dirty = False
        self._largest = max(self._providers, key=lambda p: len(self._providers[p].keys),
                            default=None)

    def records_of(self, provider_id: bytes) -> int:
        prov = self._providers.get(provider_id)
        return 0 if prov is None else len(prov.keys)

    def __len__(self) -> int:
        """Records held (some may have expired since the last expire())."""
        return self._count

    @property
    def key_count(self) -> int:
        return len(self._records)

    # -- internals -----------------------------------------------------------------------

    def _put(self, key: bytes, providers: dict, provider: Contact, now: float) -> None:
        pid = provider.id
        prov = self._providers.get(pid)
        if prov is None:
            prov = self._providers[pid] = _Provider()
        if pid in providers:
            del prov.keys[key]                  # refreshed: now the most recent
        else:
            self._count += 1
        prov.keys[key] = None
        # it announced itself (rule 2: nobody else may), so it is alive and not banned
        prov.failures, prov.banned, prov.last_ok = 0, False, max(prov.last_ok, now)
        expires = now + self.ttl
        providers[pid] = (provider, expires)
        self._earliest = min(self._earliest, expires)
        largest = self._providers.get(self._largest) if self._largest is not None else None
        if largest is None or len(prov.keys) > len(largest.keys):
            self._largest = pid

    def _evict_for(self, pid: bytes, prov: _Provider | None) -> bool:
        """Rule 3: room for one record of `pid` in a full store, or False."""
        if self._dirty:
            self._recompute_largest()
        victim_id = self._largest
        victim = self._providers.get(victim_id) if victim_id is not None else None
        if victim is None:
            return False
        mine = 0 if prov is None else len(prov.keys)
        if victim_id == pid or len(victim.keys) <= mine + 1:
            return False
        self._remove(next(iter(victim.keys)), victim_id)
        self.evicted += 1
        return True

    def _most_suspect(self, providers: dict) -> bytes | None:
        """Rule 4: the provider of a full key to replace, or None (all look alive)."""
        best, rank = None, (False, 0)
        for pid in providers:
            p = self._providers[pid]
            r = (p.banned, p.failures)
            if (p.banned or p.failures) and r > rank:
                best, rank = pid, r
        return best

    def _wait(self, key: bytes, provider: Contact, now: float) -> None:
        self._waiting.pop(key, None)
        if self.max_waiting and len(self._waiting) >= self.max_waiting:
            del self._waiting[next(iter(self._waiting))]
        if self.max_waiting:
            self._waiting[key] = (provider, now)

    def _remove(self, key: bytes, pid: bytes) -> None:
        providers = self._records[key]
        del providers[pid]
        self._count -= 1
        self._forget(key, pid)
        if not providers:
            del self._records[key]

    def _forget(self, key: bytes, pid: bytes) -> None:
        prov = self._providers[pid]
        del prov.keys[key]
        self._dirty = self._dirty or pid == self._largest
        if not prov.keys:               # no records: nothing left to judge it by
            del self._providers[pid]

    def _live(self, key: bytes, now: float) -> dict[bytes, tuple[Contact, float]] | None:
        """The records of `key` with the expired ones dropped, or None if none remain."""
        if key in self._records:
            self._purge(key, now)
        return self._records.get(key)

    def _purge(self, key: bytes, now: float) -> int:
        providers = self._records[key]
        dead = [pid for pid, (_, expires) in providers.items() if now >= expires]
        for pid in dead:
            del providers[pid]
            self._forget(key, pid)
        self._count -= len(dead)
        if not providers:
            del self._records[key]
        return len(dead)


class Republisher:
    """When to re-announce the keys this node provides (one schedule for all).

    Due at once when it holds keys and has never run (after a restart our
    records elsewhere may have expired), then every `interval` after the last
    mark_done(). New keys are announced by the caller when first provided; a
    republish announces all of them with one keyspace sweep (dht/reprovide.py).
    """

    def __init__(self, interval: float = REPUBLISH_INTERVAL):
        if not interval > 0:
            raise ValueError("interval must be positive")
        self.interval = interval
        self._keys: set[bytes] = set()
        self._last: float | None = None

    def provide(self, key: bytes) -> None:
        self._keys.add(key)

    def withdraw(self, key: bytes) -> None:
        self._keys.discard(key)

    @property
    def keys(self) -> list[bytes]:
        """The provided keys, sorted (a deterministic order for announcing)."""
        return sorted(self._keys)

    def next_due(self) -> float | None:
        """When the next republish is due (None: never ran, due as soon as there are keys)."""
        return None if self._last is None else self._last + self.interval

    def due(self, now: float) -> bool:
        return bool(self._keys) and (self._last is None or now >= self._last + self.interval)

    def mark_done(self, now: float) -> None:
        self._last = now
