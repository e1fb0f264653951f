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
import shutil
import threading
import time

import trio

from hypersdk.dht.keys import node_id
from hypersdk.node.config import human
from hypersdk.node.errors import UserError
from hypersdk.node.replicas import health
from hypersdk.node.replicas.pace import Pace
from hypersdk.node.replicas.placement import Candidate, choose
from hypersdk.node.replicas.policy import Policy
from hypersdk.node.replicas.release import ORPHAN_AFTER_S
from hypersdk.node.replicas.state import MAX_ATTEMPTS, ReplicaState
from hypersdk.node.replicas.takeover import Takeover
from hypersdk.node.replicas.windows import Windows
from hypersdk.node.service.frames import answer_once, read_frame
from hypersdk.protocol import replicate as rp
from hypersdk.protocol.errors import ProtocolError

log = logging.getLogger(__name__)

INTERVAL = 30.0                 # seconds between placement passes (and queue looks)
TIMEOUT = 10.0                  # one request to a peer
MAX_CANDIDATES = 256
OFFER_PARALLEL = 16
MAX_SHOWN = 256                 # backups listed in `status` (queue, holders)
MAX_QUEUED_PER_AUTHOR = 64      # copies one member may have waiting here at once
MAX_QUEUED = 1024               # copies waiting here in all


class TooLarge(UserError):
    """A copy larger than its author said: refused after the fact."""


class _Quiet:
    """The Events a background fetch reports to: nobody."""

    def progress(self, total, label):
        import contextlib
        return contextlib.nullcontext(lambda n: None)

    def emit(self, ev) -> None:
        pass

    def on_wait(self, msg) -> None:
        pass


class Replicas:
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
        self.started_ns = time.time_ns()               # holders are judged from here on
        self.windows = windows or Windows()
        self.window = (True, "")
        self.quiet = _Quiet()
        self._lock = threading.Lock()
        self._state: ReplicaState | None = None
        self._wake_author = trio.Event()
        self._wake_holder = trio.Event()
        self.report: dict = {"state": "starting", "queue": []}
        self._notes: dict[bytes, list[str]] = {}       # why a backup waits (last pass)
        self.counters = {"asked": 0, "confirmed": 0, "refused": 0, "accepted": 0,
                         "refused_quota": 0, "fetched": 0, "fetch_failures": 0}

    # -- plumbing -------------------------------------------------------------------
    async def _db(self, fn, *args):
        def run():
            with self._lock:
                if self._state is None:
                    self._state = ReplicaState(self.d.data_dir)
                return fn(self._state, *args)
        return await trio.to_thread.run_sync(run)

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

    async def _holder_pass(self) -> None:
        self.window = await trio.to_thread.run_sync(self.windows.state)
        if self.window[0]:
            await self.fetch_due()
        await self.release_pass()

    async def release_pass(self) -> list:
        """Let go of the copies whose author deleted them or is long gone
        (node/replicas/release.py); stop announcing what is no longer held."""
        from hypersdk.node.replicas.release import release
        if self._site() is None:
            return []
        asked_by = {i.manifest: i.author for i in await self._db(ReplicaState.incoming)}

        def run():
            with self.d.open_store() as store:
                return release(store, self.d.data_dir, asked_by, now_ns=time.time_ns(),
                               orphan_after_s=self.orphan_after, keep_orphans=self.keep_orphans)
        done, gone = await trio.to_thread.run_sync(run)
        for r in done:
            log.info("replication: released %s (%s): %s", r.ref, r.manifest.hex()[:16], r.reason)
            await self._db(ReplicaState.drop_incoming, r.manifest)
        for k in gone:
            self.d.dht.stop_providing(k)
        self.counters["released"] = self.counters.get("released", 0) + len(done)
        if done and self.d.audit is not None and self.d.audit.gossip is not None:
            await self.d.audit.gossip.spread_own()
        return done

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
        self.counters["lost"] = self.counters.get("lost", 0) + lost
        self.window = await trio.to_thread.run_sync(self.windows.state)
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
                self.counters["pass_errors"] = self.counters.get("pass_errors", 0) + 1
            with trio.move_on_after(self.interval):
                await getattr(self, event).wait()
            setattr(self, event, trio.Event())

    def _site(self) -> str | None:
        net = self.d.gate.network if self.d.gate is not None else None
        return net.cert.site if net is not None else None

    # -- holder side ----------------------------------------------------------------
    async def handle(self, stream, peer_id: bytes) -> None:
        async def answer(payload: bytes) -> bytes:
            req = rp.decode_request(payload)
            if self._site() is None:
                raise UserError("this node is in no network: it holds no copies for others")
            if req.op == "offer":
                return rp.offer_answer(await self.offer())
            if req.op == "replicate":
                return rp.state_answer(*await self._accept(req.manifest, req.size, peer_id))
            if req.op == "status":
                return rp.state_answer(*await self._status(req.manifest))
            return rp.state_answer(await self._release_asked(req.manifest, peer_id))
        await answer_once(stream, peer_id, "replicate", answer, timeout=TIMEOUT)

    async def offer(self) -> rp.Offer:
        """What this node can still take: the quota (the most bytes its store may
        hold) less what the store holds and what it already promised, and never
        more than its disk's free space less those promises."""
        def measure():
            with self.d.open_store(readonly=True) as store:
                used = store.stats()["stored_bytes"]
            return used, shutil.disk_usage(self.d.data_dir).free
        used, disk = await trio.to_thread.run_sync(measure)
        pending = await self._db(ReplicaState.pending_bytes)
        free = max(0, disk - pending)
        if self.quota is not None:
            free = min(free, max(0, self.quota - used - pending))
        return rp.Offer(self._site() or "", free, self.quota, used)

    async def _accept(self, mid: bytes, size: int, author: bytes) -> tuple[str, str]:
        from hypersdk.node.service.replication import held_completely
        held = await trio.to_thread.run_sync(self._held, mid, held_completely)
        if held:
            return "held", ""
        have = await self._db(ReplicaState.incoming, mid)
        if have and have[0].state in ("queued", "fetching"):
            return have[0].state, ""
        queued = [i for i in await self._db(ReplicaState.incoming)
                  if i.state in ("queued", "fetching")]
        mine = sum(1 for i in queued if i.author == author)
        if mine >= MAX_QUEUED_PER_AUTHOR or len(queued) >= MAX_QUEUED:
            self.counters["refused_queue"] = self.counters.get("refused_queue", 0) + 1
            return "refused", (f"queue full: {mine} copies of yours and {len(queued)} in all "
                               "are waiting here; ask again later")
        o = await self.offer()
        if size > o.free:
            self.counters["refused_quota"] += 1
            if self.quota is not None:
                return "refused", (f"over quota: the copy needs {human(size)}, this node "
                                   f"can take {human(o.free)} more (quota {human(self.quota)}, "
                                   f"{human(o.used)} stored)")
            return "refused", (f"not enough disk space: the copy needs {human(size)}, "
                               f"{human(o.free)} free")
        await self._db(ReplicaState.enqueue, mid, author, size)
        self.counters["accepted"] += 1
        self._wake_holder.set()
        return "queued", ""

    async def _release_asked(self, mid: bytes, peer_id: bytes) -> str:
        from hypersdk.node.replicas.release import release_asked
        asked_by = {i.manifest: i.author for i in await self._db(ReplicaState.incoming)}

        def run():
            with self.d.open_store() as store:
                return release_asked(store, self.d.data_dir, mid, peer_id, asked_by)
        state = await trio.to_thread.run_sync(run)
        if state == "released":
            await self._db(ReplicaState.drop_incoming, mid)
            self.counters["released"] = self.counters.get("released", 0) + 1
        return state

    async def ask_release(self, mid: bytes, holder: bytes, addr: str) -> bool:
        st = await self._ask(holder, addr, rp.request("release", mid))
        return st is not None and st.state in ("released", "unknown")

    def _collect(self) -> None:
        from hypersdk.node.store.gc import gc
        with self.d.open_store() as store:
            gc(store)

    def _held(self, mid: bytes, held_completely) -> bool:
        with self.d.open_store(readonly=True) as store:
            return held_completely(store, mid)

    async def _status(self, mid: bytes) -> tuple[str, str]:
        from hypersdk.node.service.replication import held_completely
        if await trio.to_thread.run_sync(self._held, mid, held_completely):
            return "held", ""
        have = await self._db(ReplicaState.incoming, mid)
        if not have:
            return "unknown", ""
        return have[0].state, have[0].reason

    async def fetch_due(self) -> None:
        """Fetch every queued copy that is due, one at a time (each is a swarm fetch
        that uses every provider at once)."""
        for item in await self._db(ReplicaState.due):
            await self._db(ReplicaState.set_incoming, item.manifest, "fetching")
            try:
                doc = await self._fetch_within(item)
                self.counters["fetched_bytes"] = (self.counters.get("fetched_bytes", 0)
                                                  + doc.get("bytes_fetched", 0))
                self.counters["fetch_seconds"] = round(self.counters.get("fetch_seconds", 0)
                                                       + doc.get("seconds", 0), 3)
            except TooLarge as exc:               # the author lied about the size: no retry
                self.counters["fetch_failures"] += 1
                await self._db(ReplicaState.set_incoming, item.manifest, "failed", str(exc))
                await trio.to_thread.run_sync(self._collect)     # what it had pulled
                continue
            except Exception as exc:              # one copy's failure never stops the others
                self.counters["fetch_failures"] += 1
                if item.attempts + 1 >= MAX_ATTEMPTS:
                    await self._db(ReplicaState.set_incoming, item.manifest, "failed",
                                   f"gave up after {MAX_ATTEMPTS} attempts: {exc}", 0)
                else:
                    wait = min(600.0, self.interval * 2 ** item.attempts)
                    await self._db(ReplicaState.set_incoming, item.manifest, "queued",
                                   str(exc), wait)
                continue
            self.counters["fetched"] += 1
            await self._db(ReplicaState.set_incoming, item.manifest, "held")

    async def _fetch_within(self, item) -> dict:
        """Fetch one queued copy; TooLarge (and the fetch cancelled) as soon as the
        download knows it needs more bytes than its author said the copy takes, the
        size our quota admitted it on."""
        over = []

        def watch(p):
            if p.phase == "chunks" and p.needed_bytes > item.size and not over:
                over.append(p.needed_bytes)
                scope.cancel()
        with trio.CancelScope() as scope:
            return await self.d.replication.fetch(item.manifest.hex(), self.quiet,
                                                  pace=self.pace, on_progress=watch)
        raise TooLarge(f"the copy needs {human(over[0])}, more than the {human(item.size)} "
                       "its author asked room for")

    # -- author side ----------------------------------------------------------------
    async def place_all(self) -> None:
        site = self._site()
        if site is None:
            self.report = {"state": "no network: backups stay on this node only", "queue": []}
            return
        pol = await trio.to_thread.run_sync(Policy.load, self.d.data_dir,
                                            self.default_replicas)
        offers: dict[bytes, rp.Offer | None] = {}
        queue, holders = [], {}
        for mid, (name, size, author_site, ours) in (await self.managed()).items():
            rule = pol.rule(name)
            if rule.replicas == 0:
                continue
            held, asked = await self._progress(mid)
            mine = 0 if ours else 1                  # a coordinator holds a copy itself
            need = rule.replicas - len(held) - len(asked) - mine
            if need > 0:
                await self._place(mid, size, need, author_site, offers,
                                  also_taken=set() if ours else {site})
                held, asked = await self._progress(mid, poll=False)
            held = held + [None] * mine
            if len(holders) < MAX_SHOWN:
                holders[mid.hex()] = {r.holder.hex(): r.state
                                      for r in await self._db(ReplicaState.holders, mid)}
            if len(held) < rule.replicas:
                failed = [r for r in await self._db(ReplicaState.holders, mid)
                          if r.state == "failed"]
                queue.append({"manifest": mid.hex(), "name": name, "want": rule.replicas,
                              "min": rule.min, "held": len(held), "asked": len(asked),
                              "under_replicated": len(held) < rule.min,
                              "refusals": [f"{r.holder.hex()[:16]} (site {r.site}): {r.reason}"
                                           for r in failed][-8:],
                              "waiting": self._notes.get(mid, []),
                              "lost": [f"{r.holder.hex()[:16]} (site {r.site}): {r.reason}"
                                       for r in await self._db(ReplicaState.holders, mid)
                                       if r.state == "lost"][-8:]})
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
               for m, (n, z) in (await trio.to_thread.run_sync(self._own_backups)).items()}
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
                zeros = b.stats.get("zero_chunks", 0) * b.stats.get("chunk_size", 0)
                out[b.manifest_id] = (b.name, max(0, b.size - zeros))
        return out

    async def _progress(self, mid: bytes, poll: bool = True):
        """(held, asked) holder rows of mid; poll: ask the asked ones first."""
        rows = await self._db(ReplicaState.holders, mid)
        if poll:
            for h in [r for r in rows if r.state == "asked"]:
                st = await self._ask(h.holder, h.addr, rp.request("status", mid))
                if st is None:
                    continue                               # unreachable: ask again later
                if st.state == "held":
                    await self._confirmed(mid, h.holder, h.site, h.addr)
                elif st.state in ("failed", "refused", "unknown"):
                    await self._db(ReplicaState.set_holder, mid, h.holder, h.site, h.addr,
                                   "failed", st.reason or st.state)
            rows = await self._db(ReplicaState.holders, mid)
        return ([r for r in rows if r.state == "held"], [r for r in rows if r.state == "asked"])

    async def _confirmed(self, mid: bytes, holder: bytes, site: str, addr: str) -> None:
        from hypersdk.node.audit.log import record
        await self._db(ReplicaState.set_holder, mid, holder, site, addr, "held")
        await trio.to_thread.run_sync(record, self.d.data_dir, "replica",
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
                     also_taken=frozenset()) -> None:
        """Ask `need` more members to hold mid; `site` is its author's (never asked),
        also_taken: sites that hold a copy besides the holders we asked (our own, when
        we coordinate)."""
        rows = await self._db(ReplicaState.holders, mid)
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
