"""Repair while the author is away: a holder takes over (issue 20).

Repair is the author's (node/replicas/service.py), so a backup whose author is
offline for days, or gone with its site, would wait, or never be repaired. So a
holder of a copy also watches the copy's author: when the author has not answered
for longer than the grace, the copy's holders elect one coordinator, the live
holder nearest the manifest id in the DHT key space (each holder challenges the
nearer ones, named by replica entries, with the possession proof of `verify
--network`: the nearest that proves its copy coordinates, so exactly the nearest
live, honest holder does; a member that only claims a copy cannot hold repair
back), and the coordinator
runs the author's health checks and placement for that backup: it counts itself
and the holders that prove their copies, loses the ones that fail, and asks new
members on other sites (never the author's) until the backup has its copies
again, signing a `replica` entry for each one it confirms.

When the author answers again, the coordinator stops; the author's own health
check finds the holders the coordinator placed proving their copies and counts
them (or asks the surplus to release: a holder honours that from the author too).
Authorship is settled by the audit log: the one member whose `backup` entry names
the manifest (a manifest claimed by several is left alone).
"""
from __future__ import annotations

import trio

from hypersdk.dht.keys import node_id
from hypersdk.node import runtime
from hypersdk.node.replicas.placement import distance
from hypersdk.protocol import replicate as rp


class Takeover:
    def __init__(self, replicas):
        self.r = replicas
        self.away: dict[bytes, float] = {}         # author -> first time it did not answer
        self.coordinating: dict[bytes, dict] = {}   # manifest -> {author, name, size, site}
        self._looked: dict[bytes, float] = {}       # manifest -> when last decided

    def _copies(self) -> list:
        """(manifest, name, size, author key, holders named by replica entries) of the
        copies we hold for others (run in a worker thread)."""
        from hypersdk.node.audit.log import AuditLog
        from hypersdk.node.store import catalog
        out = []
        d = self.r.d
        with d.open_store(readonly=True) as store, AuditLog(d.data_dir) as log:
            for b in catalog.list_backups(store):
                if not b.stats.get("replica"):
                    continue
                author = log.sole_author(b.manifest_id)
                if author is not None:
                    out.append((b.manifest_id, b.name, b.data_bytes, author,
                                log.replica_holders(b.manifest_id)))
        return out

    async def _answers(self, nid: bytes, op: str, mid: bytes | None = None):
        """nid's answer to one request (an Offer or a State), None if it gives none."""
        contact = self.r.d.dht.table.get(nid)
        if contact is None:
            with trio.move_on_after(10):
                found = await self.r.d.dht.find_node(nid)
                contact = next((c for c in found if c.id == nid), None)
        if contact is None:
            return None
        raw = await self.r._exchange(contact, rp.request(op, mid))
        if raw is None:
            return None
        try:
            return rp.decode_offer(raw) if op == "offer" else rp.decode_state(raw)
        except Exception:                      # a malformed answer: no answer
            return None

    async def refresh(self, *, interval_s: float, grace_s: float, clock=trio.current_time) -> None:
        """Decide, for each copy we hold whose decision is due, whether we coordinate it."""
        own = self.r.d.identity.node_id
        copies = await runtime.run_sync(self._copies)
        held = {c[0] for c in copies}
        for mid in list(self.coordinating):
            if mid not in held:
                del self.coordinating[mid]
        now = clock()
        for mid, name, size, author_key, holders in copies:
            if now - self._looked.get(mid, -1e18) < min(interval_s, grace_s):
                continue
            self._looked[mid] = now
            author = node_id(author_key)
            if await self._answers(author, "offer") is not None:
                self.away.pop(author, None)
                self.coordinating.pop(mid, None)
                continue
            since = self.away.setdefault(author, now)
            if now - since < grace_s:
                continue
            nearer = sorted((h for h in holders if h not in (own, author)
                             and distance(h, mid) < distance(own, mid)),
                            key=lambda h: distance(h, mid))
            leader = await self._nearer_proven(mid, nearer) if nearer else None
            if leader is False:
                continue                       # could not check: decide at the next look
            if leader is not None:
                self.coordinating.pop(mid, None)
                continue
            cert = next((c for k, c in self.r.d.gate.certs.items() if k == author_key), None)
            self.coordinating[mid] = {"author": author, "name": name, "size": size,
                                      "site": cert.site if cert is not None else ""}

    async def _nearer_proven(self, mid: bytes, nearer: list):
        """The nearest of `nearer` that proves it holds the copy right now (the
        possession challenge of `verify --network`, not its word: a member that
        only claimed a copy cannot hold repair back), None if none does, False if
        the check could not run."""
        from hypersdk.node.errors import UserError
        from hypersdk.node.replicas.health import QUIET_OK_S
        from hypersdk.protocol.errors import ProtocolError
        try:
            doc, _, _ = await self.r.d.audit.verify(mid.hex(), self.r.quiet,
                                                    quiet_ok_s=QUIET_OK_S)
        except (UserError, ProtocolError, OSError):
            return False
        ok = {bytes.fromhex(r["node_id"]) for r in doc.get("holders", [])
              if r.get("result") == "ok"}
        return next((h for h in nearer if h in ok), None)

    def status(self) -> dict:
        return {"coordinating": [{"manifest": m.hex(), "author": v["author"].hex()}
                                 for m, v in sorted(self.coordinating.items())][:64],
                "authors_away": len(self.away)}
