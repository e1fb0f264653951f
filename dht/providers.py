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
2. Bounds: at most `max_keys` keys and `max_providers_per_key` providers per
   key. Only expiry evicts: when a key is full a new provider is refused, and
   when the store is full a new key is refused (after expired records are
   reclaimed), add() returning False. Live records are never pushed out, so a
   flood of fresh (Sybil) announcements cannot displace established providers,
   which keep their place by republishing (rust-libp2p's MemoryStore does the
   same). Refusals end by themselves within one ttl.
3. get() never returns an expired record, even before expire() ran; providers
   come in order of first announcement (established providers first).
4. A provider republishes every REPUBLISH_INTERVAL (22 h) < ttl (48 h): one
   missed republish (a node down for up to 26 h) does not lose its records.

Memory at the default bounds, worst case: 65,536 keys x 20 providers at about
300 bytes each is about 400 MB; typically a key has a few providers (its
replicas), i.e. a few tens of MB.
"""
from __future__ import annotations

from .contact import Contact
from .keys import ID_BYTES

PROVIDER_TTL = 48 * 3600          # seconds a provider record lives after its last add
REPUBLISH_INTERVAL = 22 * 3600    # seconds between a provider's re-announcements
MAX_KEYS = 1 << 16                # keys one node stores provider records for
MAX_PROVIDERS_PER_KEY = 20        # = Kademlia k; fits one Providers message (<= 64)


class ProviderStore:
    """Provider records by key, bounded and expiring (see module docstring)."""

    def __init__(self, *, ttl: float = PROVIDER_TTL, max_keys: int = MAX_KEYS,
                 max_providers_per_key: int = MAX_PROVIDERS_PER_KEY):
        if not ttl > 0 or max_keys < 1 or max_providers_per_key < 1:
            raise ValueError("ttl and bounds must be positive")
        self.ttl = ttl
        self.max_keys = max_keys
        self.max_providers_per_key = max_providers_per_key
        # key -> provider id -> (contact, expires at); dicts keep first-add order
        self._records: dict[bytes, dict[bytes, tuple[Contact, float]]] = {}
        self._count = 0
        self._earliest = float("inf")   # lower bound of every expiry: expire() is O(1) before it

    def add(self, key: bytes, provider: Contact, now: float) -> bool:
        """Store or refresh a record. False if refused because a bound is reached."""
        if not isinstance(key, bytes) or len(key) != ID_BYTES:
            raise ValueError("key must be 32 bytes")
        providers = self._live(key, now)
        if providers is None:
            if len(self._records) >= self.max_keys:
                self.expire(now)
                if len(self._records) >= self.max_keys:
                    return False
            providers = self._records[key] = {}
        if provider.id not in providers:
            if len(providers) >= self.max_providers_per_key:
                return False
            self._count += 1
        expires = now + self.ttl
        providers[provider.id] = (provider, expires)
        self._earliest = min(self._earliest, expires)
        return True

    def get(self, key: bytes, now: float) -> list[Contact]:
        """The live providers of `key`, one per provider id, oldest announcement first."""
        providers = self._live(key, now)
        return [] if providers is None else [c for c, _ in providers.values()]

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
        return removed

    def __len__(self) -> int:
        """Records held (some may have expired since the last expire())."""
        return self._count

    @property
    def key_count(self) -> int:
        return len(self._records)

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
