"""The holder's side of replication (a mixin of node/replicas/service.py Replicas).

REPLICATE_PROTOCOL requests from members (protocol/replicate.py): `offer` (what we
can take), `replicate` (accepted within the quota: the store's bytes plus the
copies already promised; refused beyond it, or when the member already has
MAX_QUEUED_PER_AUTHOR copies waiting here, with the reason), `status`, `release`
(from the member that placed the copy, or its author). The fetch loop pulls the
durable queue (node/replicas/state.py) through the swarm at --replicate-rate,
cutting off a copy larger than its author said; the release pass drops copies
whose author deleted them or fell silent (node/replicas/release.py).
"""
from __future__ import annotations

import logging
import shutil

import trio

from hypersdk.node import runtime
from hypersdk.node.config import human
from hypersdk.node.errors import UserError
from hypersdk.node.replicas.state import MAX_ATTEMPTS, ReplicaState
from hypersdk.node.service.frames import answer_once
from hypersdk.protocol import replicate as rp

log = logging.getLogger(__name__)

TIMEOUT = 10.0                  # one request
MAX_QUEUED_PER_AUTHOR = 64      # copies one member may have waiting here at once
MAX_QUEUED = 1024               # copies waiting here in all


class TooLarge(UserError):
    """A copy larger than its author said: refused after the fact."""


class HolderSide:
    """Needs, from Replicas: d (the daemon), quota, pace, quiet, counters, windows,
    _db, _site, _ask, _wake_holder, orphan_after, keep_orphans."""

    async def _holder_pass(self) -> None:
        self.window = await runtime.run_sync(self.windows.state)
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
                return release(store, self.d.data_dir, asked_by, now_ns=runtime.now_ns(),
                               orphan_after_s=self.orphan_after, keep_orphans=self.keep_orphans)
        done, gone = await runtime.run_sync(run)
        for r in done:
            log.info("replication: released %s (%s): %s", r.ref, r.manifest.hex()[:16], r.reason)
            await self._db(ReplicaState.drop_incoming, r.manifest)
        for k in gone:
            self.d.dht.stop_providing(k)
        self.counters["released"] += len(done)
        if done and self.d.audit is not None and self.d.audit.gossip is not None:
            await self.d.audit.gossip.spread_own()
        return done

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
        used, disk = await runtime.run_sync(measure)
        pending = await self._db(ReplicaState.pending_bytes)
        free = max(0, disk - pending)
        if self.quota is not None:
            free = min(free, max(0, self.quota - used - pending))
        return rp.Offer(self._site() or "", free, self.quota, used)

    async def _accept(self, mid: bytes, size: int, author: bytes) -> tuple[str, str]:
        state = await self._status(mid)
        if state[0] in ("held", "queued", "fetching"):
            return state
        queued = [i for i in await self._db(ReplicaState.incoming)
                  if i.state in ("queued", "fetching")]
        mine = sum(1 for i in queued if i.author == author)
        if mine >= MAX_QUEUED_PER_AUTHOR or len(queued) >= MAX_QUEUED:
            self.counters["refused_queue"] += 1
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
        state = await runtime.run_sync(run)
        if state == "released":
            await self._db(ReplicaState.drop_incoming, mid)
            self.counters["released"] += 1
        return state

    async def ask_release(self, mid: bytes, holder: bytes, addr: str) -> bool:
        st = await self._ask(holder, addr, rp.request("release", mid))
        return st is not None and st.state in ("released", "unknown")

    def _collect(self) -> None:
        from hypersdk.node.store.gc import gc
        with self.d.open_store() as store:
            gc(store)

    def _held(self, mid: bytes, fetched_here: bool) -> bool:
        """Do we hold all of mid? A copy our queue fetched is held while its catalog
        row stands (one lookup, asked at every status poll); any other is checked
        chunk by chunk (held_completely reads every chunk id of the image)."""
        from hypersdk.node.service.replication import held_completely
        with self.d.open_store(readonly=True) as store:
            if fetched_here:
                return store.db.execute("SELECT 1 FROM backups WHERE manifest=?",
                                        (mid,)).fetchone() is not None
            return held_completely(store, mid)

    async def _status(self, mid: bytes) -> tuple[str, str]:
        have = await self._db(ReplicaState.incoming, mid)
        fetched = bool(have) and have[0].state == "held"
        if await runtime.run_sync(self._held, mid, fetched):
            return "held", ""
        if not have or fetched:              # fetched, then deleted here: nothing left
            return "unknown", ""
        return have[0].state, have[0].reason

    async def fetch_due(self) -> None:
        """Fetch every queued copy that is due, one at a time (each is a swarm fetch
        that uses every provider at once)."""
        for item in await self._db(ReplicaState.due):
            await self._db(ReplicaState.set_incoming, item.manifest, "fetching")
            try:
                doc = await self._fetch_within(item)
                self.counters["fetched_bytes"] += doc.get("bytes_fetched", 0)
                self.counters["fetch_seconds"] = round(self.counters["fetch_seconds"]
                                                       + doc.get("seconds", 0), 3)
            except TooLarge as exc:               # the author lied about the size: no retry
                self.counters["fetch_failures"] += 1
                await self._db(ReplicaState.set_incoming, item.manifest, "failed", str(exc))
                await runtime.run_sync(self._collect)     # what it had pulled
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
