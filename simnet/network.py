"""NetworkModel: regions, RTT matrix, bandwidth, loss, partitions, node faults.

A `LinkModel` for simnet/transport.py. SimNetwork asks it, for every send,
when the bytes arrive and what bytes arrive; everything here is plain state
plus draws from the injected `random.Random` (never the module-level one),
so a run is a function of its seed (see transport.seed_scheduler for trio's
own scheduling order).

Theory of operation, for one send of n bytes from src to dst at time `now`:

1. Faults and partitions. If src or dst is "drop"ped, or they sit in
   different groups of the active partition, the send is lost: arrival()
   returns None and SimStream breaks the connection. If either "hang"s, the
   bytes never arrive (math.inf): the connection stays open, receivers wait
   forever and callers time out with trio.fail_after.
2. Propagation: one-way delay d = RTT(region(src), region(dst)) / 2, plus
   uniform(0, jitter), plus the "delay" fault seconds of src and of dst.
3. Loss is modelled as retransmission delay, not as a broken stream: a send
   is ceil(n / mss) packets, each lost with the link's probability p. If any
   is lost the message waits one retransmission timeout (RTO = RTT + 200 ms,
   Linux's tcp_rto_min on top of the smoothed RTT) and is tried again, with
   the RTO doubling each time; after `max_retransmits` failed tries the
   connection breaks (None), as TCP gives up. One rng draw per try. The
   retransmitted bytes cost time, not bandwidth (a simplification).
4. Bandwidth. Every node has an uplink and a downlink (bytes/s; None =
   unlimited), each a FIFO resource made of busy intervals, so concurrent
   transfers share it:
     uplink:   start = first free slot >= now;  up_done = start + n/up
     downlink: the n/down slot is placed as late as the sender allows:
               earliest = max(start + d, up_done + d - n/down), then the first
               free gap of that length at or after `earliest`;
     arrival = end of the downlink slot (>= up_done + d).
   So one flow over a 100 Mbit/s uplink into a fast downlink takes
   n*8/1e8 + d, and two flows into one 1 Gbit/s downlink take as long as
   2n bytes would. A downlink slot fills the earliest gap that fits (not the
   end of the queue): a far sender's reservation does not block a near
   sender whose bytes reach the link first. Transfers are not split across
   gaps, so sharing is per send_all call: send large data in frames.
5. Corruption (transform): a "corrupt" node flips `flips` distinct random
   bytes of each message it sends, with probability `rate`.
6. "malicious" changes nothing on the wire: it is a flag the DHT service
   reads through is_malicious(addr) (and faults(addr) for its parameters).

Streams already open when a partition or fault starts keep the bytes already
in flight; the next send decides. A hung stream stays hung after
clear_fault (its pipe has an infinite arrival time queued), as a blackholed
TCP connection does; new streams work.
"""
from __future__ import annotations

import bisect
import math
import random
from typing import Iterable, Mapping

from hypersdk.simnet.transport import LinkModel

REGIONS = ("na-east", "na-west", "eu-west", "ap-east", "sa-east")

# Round-trip times in seconds, rounded from public inter-region cloud pings;
# 10 ms inside a region.
DEFAULT_RTT: dict[tuple[str, str], float] = {
    **{(r, r): 0.010 for r in REGIONS},
    ("na-east", "na-west"): 0.070, ("na-east", "eu-west"): 0.080,
    ("na-east", "ap-east"): 0.200, ("na-east", "sa-east"): 0.120,
    ("na-west", "eu-west"): 0.140, ("na-west", "ap-east"): 0.120,
    ("na-west", "sa-east"): 0.170, ("eu-west", "ap-east"): 0.180,
    ("eu-west", "sa-east"): 0.190, ("ap-east", "sa-east"): 0.250,
}

MIN_RTO = 0.2           # Linux tcp_rto_min
FAULT_KINDS = ("drop", "delay", "hang", "corrupt", "malicious")
# Allowed parameters and defaults per fault kind (malicious: anything, for
# the service that reads them); a default of None means required.
_FAULT_PARAMS = {"drop": {}, "hang": {}, "delay": {"seconds": None},
                 "corrupt": {"rate": 1.0, "flips": 1}}


class _Resource:
    """A link of one node: sorted, disjoint, merged busy intervals [s, e)."""

    __slots__ = ("busy",)

    def __init__(self):
        self.busy: list[list[float]] = []

    def reserve(self, earliest: float, duration: float, now: float) -> float:
        """Book the first gap of `duration` at or after `earliest`; its start."""
        busy = self.busy
        drop = 0
        while drop < len(busy) and busy[drop][1] <= now:     # forget the past
            drop += 1
        del busy[:drop]
        t = earliest
        for s, e in busy:
            if e <= t:
                continue
            if s >= t + duration:                             # fits before this one
                break
            t = e
        end = t + duration
        i = bisect.bisect_left(busy, [t, end])
        if i > 0 and busy[i - 1][1] >= t:                     # touches the previous
            busy[i - 1][1] = max(busy[i - 1][1], end)
            i -= 1
        else:
            busy.insert(i, [t, end])
        if i + 1 < len(busy) and busy[i + 1][0] <= busy[i][1]:  # touches the next
            busy[i][1] = max(busy[i][1], busy.pop(i + 1)[1])
        return t


class NetworkModel(LinkModel):
    """See the module docstring. Addresses are SimNetwork addrs (strings)."""

    def __init__(self, rtt: Mapping[tuple[str, str], float] | None = None, *,
                 rng: random.Random, regions: Mapping[str, str] | None = None,
                 jitter: float = 0.0, loss: float = 0.0,
                 uplink: float | None = None, downlink: float | None = None,
                 dial_timeout: float | None = None, mss: int = 1460,
                 max_retransmits: int = 6):
        self.rng = rng
        self._rtt: dict[tuple[str, str], float] = {}
        for (a, b), v in (DEFAULT_RTT if rtt is None else rtt).items():
            self._rtt[a, b] = self._rtt[b, a] = v
        names = sorted({a for a, _ in self._rtt})
        missing = [(a, b) for a in names for b in names if (a, b) not in self._rtt]
        if missing:
            raise ValueError(f"RTT matrix lacks {missing[:5]}")
        self.region_names = tuple(names)
        self.regions: dict[str, str] = {}
        for addr, region in (regions or {}).items():
            self.set_region(addr, region)
        self.jitter, self.loss = jitter, loss
        self.uplink, self.downlink = uplink, downlink
        self.dial_timeout, self.mss, self.max_retransmits = dial_timeout, mss, max_retransmits
        self._bw: dict[str, tuple[float | None, float | None]] = {}
        self._up: dict[str, _Resource] = {}
        self._down: dict[str, _Resource] = {}
        self._link_loss: dict[tuple[str, str], float] = {}
        self._group: dict[str, int] = {}                # addr -> partition group
        self._faults: dict[str, dict[str, dict]] = {}

    # -- configuration -----------------------------------------------------
    def set_region(self, addr: str, region: str) -> None:
        if region not in self.region_names:
            raise ValueError(f"unknown region {region!r}")
        self.regions[addr] = region

    def set_bandwidth(self, addr: str, up: float | None = None,
                      down: float | None = None) -> None:
        """Uplink/downlink of one node in bytes/s (None: the model default)."""
        self._bw[addr] = (up, down)

    def set_loss(self, a: str, b: str, p: float) -> None:
        """Packet loss probability on the link a <-> b (overrides `loss`)."""
        self._link_loss[a, b] = self._link_loss[b, a] = p

    def partition(self, groups: Iterable[Iterable[str]]) -> None:
        """Nodes in different groups cannot reach each other until heal().
        Replaces any active partition; nodes in no group reach everyone."""
        self._group = {addr: i for i, group in enumerate(groups) for addr in group}

    def heal(self) -> None:
        self._group = {}

    def set_fault(self, addr: str, kind: str, **params) -> None:
        """Switch a fault on for one node (kinds: FAULT_KINDS; several may be
        active at once, setting a kind again replaces its parameters)."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {kind!r}; one of {FAULT_KINDS}")
        allowed = _FAULT_PARAMS.get(kind)
        if allowed is not None:
            if set(params) - set(allowed):
                raise TypeError(f"{kind} takes {sorted(allowed)}, got {sorted(params)}")
            params = {**allowed, **params}
            if None in params.values():
                raise TypeError(f"{kind} requires {sorted(k for k, v in params.items() if v is None)}")
        self._faults.setdefault(addr, {})[kind] = params

    def clear_fault(self, addr: str, kind: str | None = None) -> None:
        """Clear one fault kind of a node, or all of them."""
        if kind is None:
            self._faults.pop(addr, None)
        else:
            self._faults.get(addr, {}).pop(kind, None)

    def faults(self, addr: str) -> dict[str, dict]:
        """The active faults of a node: kind -> parameters."""
        return self._faults.get(addr, {})

    def is_malicious(self, addr: str) -> bool:
        return "malicious" in self._faults.get(addr, ())

    # -- queries -----------------------------------------------------------
    def region(self, addr: str) -> str:
        try:
            return self.regions[addr]
        except KeyError:
            raise KeyError(f"{addr} has no region: call model.set_region first") from None

    def rtt(self, src: str, dst: str) -> float:
        """The base round-trip time between two nodes (no jitter, no faults)."""
        return self._rtt[self.region(src), self.region(dst)]

    def _has(self, addr: str, kind: str) -> bool:
        return kind in self._faults.get(addr, ())

    def reachable(self, src: str, dst: str) -> bool:
        if self._has(src, "drop") or self._has(dst, "drop"):
            return False
        g = self._group
        return src not in g or dst not in g or g[src] == g[dst]

    def dial_failure_delay(self, src: str, dst: str) -> float:
        """dial_timeout if set (silence); else one RTT (refused / no route).
        Addresses with no region (e.g. invented by a malicious peer) use the
        largest RTT of the matrix."""
        if self.dial_timeout is not None:
            return self.dial_timeout
        if src in self.regions and dst in self.regions:
            return self.rtt(src, dst)
        return max(self._rtt.values())

    def arrival(self, src: str, dst: str, nbytes: int, now: float) -> float | None:
        if not self.reachable(src, dst):
            return None
        if self._has(src, "hang") or self._has(dst, "hang"):
            return math.inf
        rtt = self.rtt(src, dst)
        d = rtt / 2
        if self.jitter:
            d += self.rng.uniform(0.0, self.jitter)
        for addr in (src, dst):
            f = self._faults.get(addr, {}).get("delay")
            if f:
                d += f["seconds"]
        p = self._link_loss.get((src, dst), self.loss)
        if p > 0:
            hit = 1.0 - (1.0 - p) ** max(1, math.ceil(nbytes / self.mss))
            rto = rtt + MIN_RTO
            tries = 0
            while self.rng.random() < hit:
                tries += 1
                if tries > self.max_retransmits:
                    return None
                d += rto
                rto *= 2
        up = self._bw.get(src, (None, None))[0] or self.uplink
        down = self._bw.get(dst, (None, None))[1] or self.downlink
        start = up_done = now
        if up and nbytes:
            start = self._up.setdefault(src, _Resource()).reserve(now, nbytes / up, now)
            up_done = start + nbytes / up
        if not (down and nbytes):
            return up_done + d
        t_down = nbytes / down
        earliest = max(start + d, up_done + d - t_down)
        return self._down.setdefault(dst, _Resource()).reserve(earliest, t_down, now) + t_down

    def transform(self, src: str, dst: str, data: bytes) -> bytes:
        f = self._faults.get(src, {}).get("corrupt")
        if not f or not data or self.rng.random() >= f["rate"]:
            return data
        out = bytearray(data)
        for i in self.rng.sample(range(len(out)), min(f["flips"], len(out))):
            out[i] ^= self.rng.randrange(1, 256)
        return bytes(out)
