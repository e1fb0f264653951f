"""Replication that keeps itself: the daemon places copies of its backups on other
sites and holds the copies other members place on it (issue 20).

Author side (every `interval` seconds, and at once after a backup):
  for each backup of ours whose live holders (asked or held, node/replicas/state.py)
  are fewer than its policy wants (node/replicas/policy.py), the node
    1. asks the holders it asked before how far they are (status): "held" makes
       them a confirmed holder and appends a signed `replica` entry naming them to
       our audit log; "failed", "refused" or "unknown" (it lost the request)
       drops them for this backup;
    2. finds candidates: the members it knows (DHT routing table and the nodes
       nearest the manifest id) whose valid member certificate names a site, asks
       their offer (free space), and chooses holders on distinct sites other than
       ours (node/replicas/placement.py);
    3. asks each to replicate: the holder checks its quota, queues the copy durably
       and pulls it from the swarm (every peer that has it, chunks verified), then
       says "held" at our next status request.
  With no reachable candidate the backup simply stays in the queue (a backup made
  offline, or before a restart, is found again from the catalog): `status` shows
  it, and it is placed once peers return.
Holder side: REPLICATE_PROTOCOL requests from members (protocol/replicate.py); a
copy is accepted within `node run --quota SIZE` (the store's bytes plus the copies
already promised) and refused beyond it with the reason; the fetch loop works
through the durable queue (retries with backoff, MAX_ATTEMPTS).
"""
from __future__ import annotations

import logging
import threading

import trio

from hypersdk.dht.keys import node_id
from hypersdk.node import runtime
from hypersdk.node.config import human
from hypersdk.node.errors import UserError
from hypersdk.node.replicas import health
from hypersdk.node.replicas.holder import HolderSide
from hypersdk.node.replicas.pace import Pace
from hypersdk.node.replicas.placement import Candidate, choose
from hypersdk.node.replicas.policy import Policy
from hypersdk.node.replicas.release import ORPHAN_AFTER_S
from hypersdk.node.replicas.state import ReplicaState
from hypersdk.node.replicas.takeover import Takeover
from hypersdk.node.replicas.windows import Windows
from hypersdk.node.service.frames import read_frame
from hypersdk.protocol import replicate as rp
from hypersdk.protocol.errors import ProtocolError

log = logging.getLogger(__name__)

INTERVAL = 30.0                 # seconds between placement passes (and queue looks)
TIMEOUT = 10.0                  # one request to a peer
MAX_CANDIDATES = 256
OFFER_PARALLEL = 16
MAX_SHOWN = 256                 # backups listed in `status` (queue, holders)


class _Quiet:
    """The Events a background fetch reports to: nobody."""

    def progress(self, total, label):
        import contextlib
        return contextlib.nullcontext(lambda n: None)

    def emit(self, ev) -> None:
        pass

    def on_wait(self, msg) -> None:
        pass


class Replicas(HolderSide):
    def __init__(self, daemon, *, default_replicas: int | None = None,
                 quota: int | None = None, interval: float = INTERVAL,
                 health_interval: float = health.HEALTH_INTERVAL, grace: float = health.GRACE,
                 orphan_after: float = ORPHAN_AFTER_S, keep_orphans: bool = False,
                 rate: float | None = None, windows: Windows | None = None):
        self.d = daemon
        self.default_replicas = default_replicas
        self.quota = quota
        self.interval = interval
        self.health_interval, self.grace = health_interval, grace
        self.orphan_after, self.keep_orphans = orphan_after, keep_orphans
        self.pace = Pace(rate) if rate else None       # the repair bandwidth bound
        self.takeover = Takeover(self)                 # repair while an author is away
        self.looked: dict[bytes, int] = {}             # manifest -> its last health check
        self.started_ns = runtime.now_ns()               # holders are judged from here on
        self.windows = windows or Windows()
        self.window = (True, "")
        self.quiet = _Quiet()
        self._lock = threading.Lock()
        self._state: ReplicaState | None = None
        self._wake_author = trio.Event()
        self._wake_holder = trio.Event()
        self.report: dict = {"state": "starting", "queue": []}
        self._notes: dict[bytes, list[str]] = {}       # why a backup waits (last pass)
        self.counters = dict.fromkeys((
            "asked", "confirmed", "refused", "lost", "readopted", "surplus_released",
            "pass_errors",                                         # author side
            "accepted", "refused_quota", "refused_queue", "fetched", "fetched_bytes",
            "fetch_seconds", "fetch_failures", "released"), 0)     # holder side

    # -- plumbing -------------------------------------------------------------------
    async def _db(self, fn, *args):
        def run():
            with self._lock:
                if self._state is None:
                    self._state = ReplicaState(self.d.data_dir)
                return fn(self._state, *args)
        return await runtime.run_sync(run)

    def close(self) -> None:
        with self._lock:
            if self._state is not None:
                self._state.close()
                self._state = None

    def wake(self) -> None:
        self._wake_author.set()

    def start_serving(self) -> None:
        self.d.net.set_handler(rp.REPLICATE_PROTOCOL, self.handle)

    async def run(self) -> None:
        async with trio.open_nursery() as n:
            n.start_soon(self._loop, self._author_pass, "_wake_author")
            n.start_soon(self._loop, self._holder_pass, "_wake_holder")

    async def _author_pass(self) -> None:
        """Check the holders that are due (losing the ones that fail), then place
        what is missing, lost copies included (inside the replication windows)."""
        if self._site() is None:
            await self.place_all()
            return
        if len(self.d.dht.table) == 0:
            await self._rejoin()
            if len(self.d.dht.table) == 0:     # we are the one cut off: judge nobody,
                await self.place_all()         # only list what waits (and why)
                return
        await self.takeover.refresh(interval_s=self.health_interval, grace_s=self.grace)
        lost = await health.check(self, interval_s=self.health_interval, grace_s=self.grace)
        self.counters["lost"] += lost
        self.window = await runtime.run_sync(self.windows.state)
        if self.window[0]:
            await self.place_all()
        else:
            self.report = dict(self.report, state=f"waiting: {self.window[1]}")

    async def _loop(self, work, event: str) -> None:
        while True:
            try:
                await work()
            except (UserError, OSError, ProtocolError) as exc:
                log.warning("replication: %s", exc)
            except Exception:                     # a bug here must not stop the node
                log.exception("replication pass failed")
                self.counters["pass_errors"] += 1
            with trio.move_on_after(self.interval):
                await getattr(self, event).wait()
            setattr(self, event, trio.Event())

    def _site(self) -> str | None:
        net = self.d.gate.network if self.d.gate is not None else None
        return net.cert.site if net is not None else None

    # -- author side ----------------------------------------------------------------
    async def place_all(self) -> None:
        site = self._site()
        if site is None:
            self.report = {"state": "no network: backups stay on this node only", "queue": []}
            return
        pol = await runtime.run_sync(Policy.load, self.d.data_dir,
                                            self.default_replicas)
        offers: dict[bytes, rp.Offer | None] = {}
        queue, holders = [], {}
        rows_of: dict[bytes, list] = {}
        for r in await self._db(ReplicaState.holders):     # one read for the whole pass
            rows_of.setdefault(r.manifest, []).append(r)
        for mid, (name, size, author_site, ours) in (await self.managed()).items():
            rule = pol.rule(name)
            if rule.replicas == 0:
                continue
            rows = rows_of.get(mid, [])
            if any(r.state == "asked" for r in rows):
                rows = await self._poll(mid, rows)
            mine = 0 if ours else 1                  # a coordinator holds a copy itself
            need = rule.replicas - mine - sum(r.state in ("held", "asked") for r in rows)
            if need > 0:
                await self._place(mid, size, need, author_site, offers, rows,
                                  also_taken=set() if ours else {site})
                rows = await self._db(ReplicaState.holders, mid)
            if len(holders) < MAX_SHOWN:
                holders[mid.hex()] = {r.holder.hex(): r.state for r in rows}
            held = mine + sum(r.state == "held" for r in rows)
            if held < rule.replicas:
                def said(state):
                    return [f"{r.holder.hex()[:16]} (site {r.site}): {r.reason}"
                            for r in rows if r.state == state][-8:]
                queue.append({"manifest": mid.hex(), "name": name, "want": rule.replicas,
                              "min": rule.min, "held": held,
                              "asked": sum(r.state == "asked" for r in rows),
                              "under_replicated": held < rule.min,
                              "refusals": said("failed"), "waiting": self._notes.get(mid, []),
                              "lost": said("lost")})
        self.report = {"state": "placing" if queue else "every backup has its copies",
                       "queue": queue[:MAX_SHOWN], "waiting_backups": len(queue),
                       "candidates_offered": len(offers), "holders": holders}

    async def _rejoin(self) -> None:
        """A node that knows nobody (restarted on a new address, its peers not saved)
        dials the holders it placed copies on, at the addresses they had, and joins
        the DHT through the ones that answer."""
        addrs = sorted({h.addr for h in await self._db(ReplicaState.holders) if h.addr})
        contacts = []

        async def one(addr):
            try:
                contacts.append(await self.d.dial(addr))
            except UserError:
                pass
        async with trio.open_nursery() as n:
            for addr in addrs[:16]:
                n.start_soon(one, addr)
        if contacts:
            with trio.move_on_after(TIMEOUT):
                await self.d.dht.bootstrap(contacts)
            log.info("replication: rejoined through %d holder(s)", len(contacts))

    async def managed(self) -> dict:
        """manifest -> (name, bytes a copy takes, the author's site, ours?) of the
        backups whose copies this node keeps: its own, and those it coordinates
        while their author is away (node/replicas/takeover.py)."""
        site = self._site() or ""
        out = {m: (n, z, site, True)
               for m, (n, z) in (await runtime.run_sync(self._own_backups)).items()}
        for m, c in self.takeover.coordinating.items():
            out.setdefault(m, (c["name"], c["size"], c["site"], False))
        return out

    def _own_backups(self) -> dict[bytes, tuple[str, int]]:
        """manifest -> (name, bytes a copy may take) of the backups we made."""
        from hypersdk.node.store import catalog
        out = {}
        with self.d.open_store(readonly=True) as store:
            for b in catalog.list_backups(store):
                if b.stats.get("replica"):
                    continue
                out[b.manifest_id] = (b.name, b.data_bytes)
        return out

    async def _poll(self, mid: bytes, rows: list) -> list:
        """Ask the holders we asked how far they are; mid's rows after that."""
        for h in [r for r in rows if r.state == "asked"]:
            st = await self._ask(h.holder, h.addr, rp.request("status", mid))
            if st is None:
                continue                               # unreachable: ask again later
            if st.state == "held":
                await self._confirmed(mid, h.holder, h.site, h.addr)
            elif st.state in ("failed", "refused", "unknown"):
                await self._db(ReplicaState.set_holder, mid, h.holder, h.site, h.addr,
                               "failed", st.reason or st.state)
        return await self._db(ReplicaState.holders, mid)

    async def _confirmed(self, mid: bytes, holder: bytes, site: str, addr: str) -> None:
        from hypersdk.node.audit.log import record
        await self._db(ReplicaState.set_holder, mid, holder, site, addr, "held")
        await runtime.run_sync(record, self.d.data_dir, "replica",
                                      {"manifest": mid, "holder": holder})
        self.counters["confirmed"] += 1
        log.info("replication: %s holds %s (site %s)", holder.hex()[:16], mid.hex()[:16], site)
        if self.d.audit is not None and self.d.audit.gossip is not None:
            self.d.nursery.start_soon(self.d.audit.gossip.spread_own)

    async def _candidates(self, mid: bytes) -> list:
        """Contacts of members we know, with their sites, nearest mid first."""
        gate, dht = self.d.gate, self.d.dht
        sites = {}
        for key, cert in list(gate.certs.items()):
            if gate.author_ok(key):
                sites[node_id(key)] = cert.site
        contacts = {c.id: c for c in dht.table.closest(mid, MAX_CANDIDATES)}
        with trio.move_on_after(TIMEOUT):
            for c in await dht.find_node(mid):
                contacts.setdefault(c.id, c)
        own = self.d.identity.node_id
        return [(c, sites[n]) for n, c in contacts.items() if n in sites and n != own]

    async def _place(self, mid: bytes, size: int, need: int, site: str, offers: dict,
                     rows: list, also_taken=frozenset()) -> None:
        """Ask `need` more members to hold mid (its holder rows: `rows`); `site` is its
        author's (never asked), also_taken: sites that hold a copy besides the holders
        we asked (our own, when we coordinate)."""
        taken = {r.site for r in rows if r.state in ("asked", "held")} | set(also_taken)
        excluded = {r.holder for r in rows}
        found = await self._candidates(mid)
        ask = [(c, s) for c, s in found if c.id not in offers and c.id not in excluded
               and s != site]
        limiter = trio.CapacityLimiter(OFFER_PARALLEL)

        async def offer_of(contact):
            async with limiter:
                raw = await self._exchange(contact, rp.request("offer"))
            try:
                offers[contact.id] = rp.decode_offer(raw) if raw else None
            except ProtocolError:
                offers[contact.id] = None
        async with trio.open_nursery() as n:
            for c, _ in ask:
                n.start_soon(offer_of, c)
        by_id = {c.id: (c, s) for c, s in found}
        cands = [Candidate(nid, by_id[nid][1], o.free) for nid, o in offers.items()
                 if o is not None and nid in by_id]
        notes = [f"{x.node_id.hex()[:16]} (site {x.site}) can take {human(x.free)}, the copy "
                 f"needs {human(size)}" for x in cands
                 if x.free < size and x.site not in taken and x.site != site]
        if not any(s != site and s not in taken for _, s in found):
            notes.append("no member on another site is known" + (
                " besides the sites that hold it" if taken else ""))
        self._notes[mid] = notes[-8:]
        for cand in choose(mid, size, need, cands, author_site=site, taken_sites=taken,
                           excluded=excluded):
            addr = by_id[cand.node_id][0].addr
            st = await self._ask(cand.node_id, addr, rp.request("replicate", mid, size))
            self.counters["asked"] += 1
            if st is None:
                continue                                   # unreachable now: next pass
            if st.state == "held":
                await self._confirmed(mid, cand.node_id, cand.site, addr)
            elif st.state in ("queued", "fetching"):
                await self._db(ReplicaState.set_holder, mid, cand.node_id, cand.site, addr,
                               "asked")
            else:
                self.counters["refused"] += 1
                log.info("replication: %s refused %s: %s", cand.node_id.hex()[:16],
                         mid.hex()[:16], st.reason)
                await self._db(ReplicaState.set_holder, mid, cand.node_id, cand.site, addr,
                               "failed", st.reason or st.state)
                offers[cand.node_id] = None                # not asked again this pass

    async def _ask(self, nid: bytes, addr: str, frame: bytes) -> rp.State | None:
        """One request to node nid (at the address the routing table knows now, else
        at `addr`); its answer, or None when unreachable."""
        from hypersdk.dht.contact import Contact
        contact = self.d.dht.table.get(nid) or Contact(nid, addr)
        raw = await self._exchange(contact, frame)
        if raw is None:
            return None
        try:
            return rp.decode_state(raw)
        except ProtocolError as exc:
            log.info("replication: bad answer from %s: %s", nid.hex()[:16], exc)
            return None

    async def _exchange(self, contact, frame: bytes) -> bytes | None:
        """Send one request frame, read one answer frame; None if unreachable."""
        try:
            with trio.fail_after(TIMEOUT):
                stream = await self.d.net.open_stream(contact.id, contact.addr,
                                                      rp.REPLICATE_PROTOCOL)
                try:
                    await stream.send_all(frame)
                    return await read_frame(stream)
                finally:
                    with trio.move_on_after(1):
                        await stream.aclose()
        except Exception as exc:                  # unreachable, reset, refused, slow
            log.debug("replication: %s: %r", contact.id.hex()[:16], exc)
            return None

    def status(self) -> dict:
        return {**self.report, "quota": self.quota, **self.counters, **self.takeover.status(),
                "window_open": self.window[0], "window": self.window[1],
                "replicate_rate": self.pace.rate if self.pace else None}
