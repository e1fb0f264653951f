"""The node's audit networking: gossip, the possession server, and
`hypersdk verify REF --network`.

AuditNet starts with the daemon: AuditGossip over the node's transport (its
neighbours drawn from the DHT routing table, its scores the DHT's) and a
PossessionServer answering challenges from the store.

verify --network (a control command; it needs the running node):
1. REF: a backup of the local catalog, a full manifest id, or the NAME of a
   backup entry in the audit logs held here (the newest).
2. The backup entry: every `backup` entry for the manifest in the logs held
   (our own and gossiped ones); its author's whole log is re-checked
   (signatures, links, forks, contradicted witnesses), and the witnesses of
   the entry's seq or later by other nodes are listed.
3. The manifest: from the local store or a provider; its BLAKE3 must be the
   id (open_manifest) and its size and chunk count must match the entry.
4. The holders: the backup's author and the holders named by `replica` entries
   (they signed for it), then the DHT's providers (at most 20 in all); each is
   challenged
   (node/audit/possession.py: a fresh nonce, a random sample of the manifest's
   chunks, BLAKE3(nonce || chunk) per chunk) and the answers are checked
   against chunks this node holds or fetches (each fetched chunk verified
   against its id first). A backup with keyed ids is challenged in the sealed
   form (BLAKE3(nonce || sealed record)), which storage-only holders answer
   too: the references are sealed records this node serves or fetches, opened
   and checked under the key; an answer no reference matches is judged against
   the holder's own record, fetched from it (at most 8 per holder).
5. One `verify` entry per holder is appended to our log and gossiped.
Exit 0 when the entry checks out, the manifest matches, at least MIN_HOLDERS
holders (`--min-holders`, default 1) proved possession and no holder that signed
for the backup failed a proof (`judge`); 3 otherwise. Unreachable holders and
providers that signed nothing are reported, not held against the backup: a dead
or hostile announcement must not fail someone else's backup (issue 17, attack 8).
"""
from __future__ import annotations

import logging
import random

import trio

from hypersdk.dht.contact import Contact
from hypersdk.node import runtime
from hypersdk.node.errors import UserError
from hypersdk.protocol.chunks import ZERO_ID
from hypersdk.protocol.errors import ProtocolError
from hypersdk.protocol.manifest import decode_manifest, split_list

log = logging.getLogger(__name__)

CHALLENGE_TIMEOUT = 30.0
FETCH_TIMEOUT = 60.0
MAX_HOLDERS = 20


class AuditNet:
    def __init__(self, d):
        self.d = d
        self.log = None
        self.gossip = None
        self.possession = None
        self.source = None
        self._store = None

    async def start(self, nursery) -> None:
        from hypersdk.node.audit.gossip import AuditGossip
        from hypersdk.node.audit.log import AuditLog
        from hypersdk.node.audit.possession import PROTOCOL_ID, PossessionServer
        from hypersdk.node.config import audit_sync_interval, audit_witness_interval
        from hypersdk.node.exchange.chunk_source import StoreSource
        d = self.d
        def open_log():
            from hypersdk.node.audit.intents import reconcile
            with d.open_store(readonly=True) as store:
                added = reconcile(d.data_dir, store)      # ops killed before their entry
            if added:
                log.warning("audit: appended %d entries missing after an interrupted op",
                            len(added))
            return AuditLog(d.data_dir, identity=d.identity)
        self.log = await runtime.run_sync(open_log)
        self.gossip = AuditGossip(
            d.net, self.log, lambda: [c for b in d.dht.table.buckets() for c in b],
            rng=random.Random(d.rng.getrandbits(64)), scores=d.dht.scores,
            **(getattr(d, "audit_timing", None) or dict(
                sync_interval=audit_sync_interval(), witness_interval=audit_witness_interval())),
            busy=lambda: bool(getattr(getattr(d, "replication", None), "transfers", None)),
            on_new=self._on_new, **({} if d.gate is None else dict(
                author_ok=d.gate.author_ok, certs_of=d.gate.certs_of,
                learn_certs=d.gate.learn_certs,
                # in no network author_ok lets anyone author: new authors are limited
                vetted=lambda: d.gate.network is not None)))
        await nursery.start(self.gossip.run)
        if d.gate is not None:
            nursery.start_soon(self._announce_revocations)
        self._store = d.open_store(readonly=True)
        self.source = StoreSource(self._store, threaded=True)   # challenges and verify --network
        scores = d.dht.scores
        self.possession = PossessionServer(
            self.source, banned=lambda pid: scores.banned(pid, trio.current_time()))
        d.net.set_handler(PROTOCOL_ID, self.possession.handle)

    # -- revocations ride the audit gossip -----------------------------------------------
    def _on_new(self, entries) -> None:
        """Foreign entries just stored: apply the revocations they carry at once."""
        d = self.d
        if d.gate is None:
            return
        learned = sum(d.gate.learn_revocation(e.body["revocation"])
                      for e in entries if e.kind == "revoke")
        if learned:
            d.transport.cut_off_now()

    async def _announce_revocations(self) -> None:
        """On a node that holds the network key, every revocation issued here (by
        `hypersdk revoke`, into DATA/network/state.json) becomes a `revoke` entry of
        our log, which the gossip pushes to every member. Checked each
        ENFORCE_INTERVAL (the daemon's enforce_interval: simnet's whole nodes look
        less often)."""
        from hypersdk.node.net.gate import ENFORCE_INTERVAL
        d = self.d
        every = getattr(d, "enforce_interval", ENFORCE_INTERVAL)
        announced: set[bytes] | None = None
        while True:
            gate = d.gate
            gate.refresh()
            if gate.network is not None and gate.network.has_key and gate.revocations:
                if announced is None:
                    own = self.log.own_author
                    announced = await self.gossip._db(lambda: {
                        e.body["revocation"] for e in self.log.entries(own, verify=False)
                        if e.kind == "revoke"})
                for r in gate.revocations:
                    if r.raw not in announced:
                        await self.gossip.append("revoke", {"revocation": r.raw})
                        announced.add(r.raw)
                        d.transport.cut_off_now()
            await trio.sleep(every)

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None
        if self.log is not None:
            self.log.close()
            self.log = None

    def status(self) -> dict:
        g = self.gossip
        if g is None:
            return {}
        c = g.counters
        return {"neighbours": len(g.neighbours), "subscribers": len(g.subscribers),
                "entries_added": c["entries added"], "duplicates": c["duplicates"],
                "rejected": c["entries rejected"], "pushes": c["pushes"], "syncs": c["syncs"],
                "forks_found": c["forks found"] + c["forks learned"],
                "witness_entries": c["witness entries"],
                "bytes_in": c["bytes in"], "bytes_out": c["bytes out"],
                "non_member_entries_dropped": c["non-member entries dropped"],
                "entries_repaired": c["entries repaired"], "damage_found": c["damage found"],
                # entries each inbound limit stopped (node/audit/limits.py)
                "limited": {k.replace(" ", "_"): n for k, n in
                            sorted({"peer entries": 0, "peer bytes": 0, "author entries": 0,
                                    "author bytes": 0, "new authors": 0,
                                    **g.limits.limited}.items())}}

    # -- verify --network ------------------------------------------------------------
    async def verify(self, ref: str, events, min_holders: int = 1, loss: float | None = None,
                     confidence: float | None = None, quiet_ok_s: float | None = None
                     ) -> tuple[dict, str, int]:
        """quiet_ok_s (replication's health checks, every hour): an "ok" verdict on a
        holder whose last verdict of ours was "ok" less than quiet_ok_s ago is not
        signed again (the log would grow by an entry per holder per hour); failures
        and changes always are."""
        from hypersdk.node.audit.log import AuditLog
        from hypersdk.protocol import possession as pp
        loss = pp.DEFAULT_LOSS if loss is None else loss
        confidence = pp.DEFAULT_CONFIDENCE if confidence is None else confidence
        d = self.d
        mid = await runtime.run_sync(self._resolve, ref)

        def read_log():
            from hypersdk.node.net import datakey
            with AuditLog(d.data_dir, identity=d.identity) as lg:
                return _backup_check(lg, mid, datakey.load(d.data_dir))
        entry = await runtime.run_sync(read_log)
        if entry.get("local_damage"):
            # our copy of the author's log is damaged, not the author's log: mend it
            # from peers and check again before saying anything about the author
            repaired = await self.gossip.repair([bytes.fromhex(entry["author"])])
            entry = await runtime.run_sync(read_log)
            entry["repaired_entries"] = repaired
        providers, _ = await d.dht.find_providers(mid, MAX_HOLDERS)
        cache: dict[bytes, bytes] = {}
        manifest_doc, ids, key = await self._manifest(mid, providers, entry, cache)
        holders, claims = await self._holders(mid, providers, entry)
        cache.clear()                  # hash-list pieces: not needed past the manifest
        results, sampling = [], None
        if ids is not None:
            # keyed ids: the sealed form, which holders without the key answer too
            sealed = key is not None
            reader = self._sealed_reader(providers) if sealed else \
                self._reader(providers, None, key)
            round_no = await runtime.run_sync(self._next_round, mid)
            p = pp.plan(ids, seed=self._rotation_seed(mid), round_no=round_no,
                        rng=random.SystemRandom(), loss=loss, confidence=confidence)
            sampling = {"goal": f"a holder missing {loss:.2%} of the chunks is caught with "
                                f"{confidence:.2%} confidence",
                        "chunks": p.n, "uniform": p.uniform, "asked": len(p.ids),
                        "round": p.round, "rounds": p.rounds, "whole": p.whole}
            extra = {"round": p.round, "rounds": p.rounds, "chunks": p.n,
                     "loss_ppm": round(loss * 1e6), "confidence_ppm": round(confidence * 1e6)}
            from hypersdk.node.audit.possession import prove_holders
            live = [c for c in holders.values() if c is not None]
            results = await prove_holders(
                d.net, live, mid, p.ids, reader, rng=random.SystemRandom(),
                timeout=CHALLENGE_TIMEOUT, chunk_bytes=manifest_doc["chunk_size"],
                threaded=True, key=key, sealed=sealed,
                retrieve=self._records_of if sealed else None, extra=extra)
            for r in results:
                if r.misbehaved:
                    d.dht.penalize(r.holder, "malformed", trio.current_time())
        by_holder = {r.holder: r for r in results}
        rows = []
        for hid, c in sorted(holders.items()):
            r = by_holder.get(hid)
            rows.append({"node_id": hid.hex(), "addr": c.addr if c else None,
                         "claim": claims.get(hid, "provider"),
                         "result": r.result if r else "unreachable",
                         **({"asked": r.asked, "proven": r.proven, "wrong": r.wrong,
                             "not_held": r.not_held, "reason": r.reason,
                             "slowest_s": round(r.slowest, 3),
                             "deadline_s": round(r.allowed, 3), "late": r.late} if r else
                            {"reason": "no address known for this holder"})})
        await runtime.run_sync(self._record, mid, results, quiet_ok_s)
        await self.gossip.spread_own()
        doc = {"manifest": mid.hex(), "backup_entry": entry, "manifest_check": manifest_doc,
               "sampling": sampling, "holders": rows, **judge(entry, manifest_doc, rows, min_holders)}
        return doc, _text(doc), 0 if doc["ok"] else 3

    def _resolve(self, ref: str) -> bytes:
        from hypersdk.node.audit.log import AuditLog
        from hypersdk.node.store import catalog
        with self.d.open_store(readonly=True) as store:
            try:
                return catalog.resolve(store, ref).manifest_id
            except UserError:
                pass
        if len(ref) == 64:
            try:
                return bytes.fromhex(ref)
            except ValueError:
                pass
        from hypersdk.node.net import datakey
        key = datakey.load(self.d.data_dir)
        with AuditLog(self.d.data_dir, identity=self.d.identity) as lg:
            mid = lg.find_backup_by_name(ref, key)
            sealed = lg.sealed_names(key) if mid is None else 0
        if mid is None:
            raise UserError(f"unknown backup {ref!r}: not in the local catalog, not a full "
                            "manifest id, and no backup entry of that name in the audit logs "
                            "held here" + (f" ({sealed} backup entries have names sealed with "
                                           "a data key this node does not have: give the "
                                           "manifest id)" if sealed else ""))
        return mid

    async def _manifest(self, mid, providers, entry, cache) -> tuple[dict, list | None, object]:
        """(check report, the chunk ids, the data key of a keyed manifest or None) of
        the manifest; ids None if unobtainable."""
        data = await self.source.manifest(mid)
        source = "local store"
        if data is None:
            data, source = await self._fetch_manifest(mid, providers)
        if data is None:
            return {"ok": False, "reason": "the manifest is neither held here nor served by "
                                           f"any of {len(providers)} provider(s)"}, None, None
        try:
            from hypersdk.protocol.chunks import chunk_id
            if chunk_id(data) != mid:
                return {"ok": False, "reason": "manifest bytes do not hash to its id"}, None, None
            m = decode_manifest(data)
        except ProtocolError as exc:
            return {"ok": False, "reason": f"manifest does not decode: {exc}"}, None, None
        key = None
        if m.key is not None:                   # keyed ids: checked with the tenant's key
            from hypersdk.node.net import datakey
            key = await runtime.run_sync(datakey.load, self.d.data_dir)
            if key is None or key.fingerprint != m.key:
                return {"ok": False, "reason": f"this backup is encrypted with data key "
                                               f"{m.key.hex()[:16]}; this node does not have "
                                               "it"}, None, None
        problems = []
        b = entry.get("body")
        if b is not None:
            if b["size"] != m.size:
                problems.append(f"size {m.size} != {b['size']} in the backup entry")
            if b["chunks"] != m.n_chunks:
                problems.append(f"{m.n_chunks} chunks != {b['chunks']} in the backup entry")
        ids: list[bytes] = []
        reader = self._reader(providers, cache, key)
        for li, lid in enumerate(m.lists):
            n = m.list_len(li)
            if lid == ZERO_ID:
                ids.extend([ZERO_ID] * n)
                continue
            plain = await reader(lid)
            if plain is None:
                return {"ok": False, "reason": f"hash-list piece {li} unobtainable",
                        "source": source}, None, None
            ids.extend(split_list(plain, n))
        return {"ok": not problems, "source": source, "size": m.size, "chunks": m.n_chunks,
                "chunk_size": m.chunk_size,
                **({"problems": problems} if problems else {})}, ids, key

    async def _fetch_manifest(self, mid, providers):
        from hypersdk.node.exchange.client import open_session
        from hypersdk.protocol.exchange import open_manifest
        for c in providers:
            try:
                with trio.fail_after(FETCH_TIMEOUT):
                    async with open_session(self.d.net, c) as s:
                        msg = await s.get_manifest(mid)
                if open_manifest(msg) is not None:
                    return bytes(msg.data), f"provider {c.id.hex()[:16]}"
            except Exception as exc:             # any failure: try the next provider
                log.info("manifest from %s: %s", c.id.hex()[:12], exc)
        return None, None

    def _reader(self, providers, cache, key=None):
        """async reader(cid) -> verified plaintext: the local store, else a provider
        (kept in `cache` when one is given)."""
        async def read(cid: bytes):
            if cache is not None and cid in cache:
                return cache[cid]
            plain = await self.source.read(cid)
            if plain is None:
                plain = await self._fetch_chunk(cid, providers, key)
            if plain is not None and cache is not None:
                cache[cid] = plain
            return plain
        return read

    def _rotation_seed(self, mid: bytes) -> bytes:
        """The secret that orders this node's rotation through mid's chunks
        (protocol.possession.plan): derived from our signature (Ed25519 signs
        deterministically), so it survives restarts and no holder can compute it."""
        import blake3
        return blake3.blake3(self.d.identity.sign(b"hypersdk possession rotation v1" + mid)
                             ).digest()

    def _next_round(self, mid: bytes) -> int:
        """The round of this verification of mid: one past the round our last verify
        entry for it recorded (its summary), 0 for the first."""
        from hypersdk.node.audit.log import AuditLog
        from hypersdk.protocol import audit
        with AuditLog(self.d.data_dir, identity=self.d.identity) as lg:
            row = lg.db.execute("SELECT raw FROM entries WHERE author=? AND kind='verify' AND "
                                "manifest=? ORDER BY seq DESC LIMIT 1",
                                (lg.own_author, mid)).fetchone()
        if row is None:
            return 0
        got = audit.decode_entry(bytes(row[0]), verify=False).body["summary"].get("round")
        return got + 1 if type(got) is int and 0 <= got < (1 << 62) else 0

    async def _fetch_chunk(self, cid, providers, key=None):
        from hypersdk.protocol.exchange import open_data
        for c in providers:
            msg = (await self._get_from(c, [cid])).get(cid)
            if msg is not None:
                try:
                    return open_data(msg, key)  # (keyed) BLAKE3 checked against cid
                except ProtocolError as exc:
                    log.info("chunk from %s: %s", c.id.hex()[:12], exc)
        return None

    async def _get_from(self, contact, cids) -> dict:
        """{cid: Data} of the chunks `contact` sends for one Get of `cids`."""
        from hypersdk.node.exchange.client import get_some
        with trio.move_on_after(FETCH_TIMEOUT):
            return await get_some(self.d.net, contact, cids)
        return {}

    def _sealed_reader(self, providers):
        """async reader(cid) -> a sealed record of the chunk (possession's sealed
        form): the one this node serves, else a provider's (checked by the caller)."""
        from hypersdk.protocol.exchange import CODEC_SEALED

        async def read(cid: bytes):
            got = await self.source.get(cid)
            if got is not None and got[0] == CODEC_SEALED:
                return bytes(got[2])
            for c in providers:
                msg = (await self._get_from(c, [cid])).get(cid)
                if msg is not None and msg.codec == CODEC_SEALED:
                    return msg.payload
            return None
        return read

    async def _records_of(self, contact, cids) -> dict:
        """{cid: sealed record} that holder `contact` serves (prove_holder's retrieve)."""
        from hypersdk.protocol.exchange import CODEC_SEALED
        got = await self._get_from(contact, cids)
        return {c: m.payload for c, m in got.items() if m.codec == CODEC_SEALED}

    async def _holders(self, mid, providers, entry) -> tuple[dict, dict]:
        """(node id -> contact (None: no address known) of every holder to challenge,
        node id -> its claim: "author" of the backup entry or "replica" (a signed
        replica entry); DHT providers with neither are plain "provider"s)."""
        from hypersdk.node.audit.log import AuditLog
        own = self.d.identity.node_id
        out: dict[bytes, Contact | None] = {c.id: c for c in providers if c.id != own}

        def named():
            with AuditLog(self.d.data_dir, identity=self.d.identity) as lg:
                return lg.replica_holders(mid)
        ids = set(await runtime.run_sync(named))
        claims = {i: "replica" for i in ids}
        if entry.get("author_node_id"):
            ids.add(bytes.fromhex(entry["author_node_id"]))
            claims[bytes.fromhex(entry["author_node_id"])] = "author"
        for hid in sorted(ids - set(out) - {own}):
            c = self.d.dht.table.get(hid)
            if c is None:
                with trio.move_on_after(CHALLENGE_TIMEOUT):
                    found = await self.d.dht.find_node(hid)
                    c = next((x for x in found if x.id == hid), None)
            out[hid] = c
        # the holders that signed for it first, then DHT providers, at most MAX_HOLDERS
        ranked = sorted(out.items(), key=lambda kv: kv[0] not in claims)
        return dict(ranked[:MAX_HOLDERS]), claims

    def _record(self, mid, results, quiet_ok_s: float | None = None) -> None:

        from hypersdk.node.audit.log import AuditLog
        with AuditLog(self.d.data_dir, identity=self.d.identity) as lg:
            last = _last_verdicts(lg, lg.own_author, mid) if quiet_ok_s is not None else {}
            now = runtime.now_ns()
            for r in results:
                result, when = last.get(r.holder, (None, 0))
                if r.result == "ok" and result == "ok" and now - when < quiet_ok_s * 1e9:
                    continue                  # nothing new to sign (see verify's quiet_ok_s)
                lg.append("verify", {"manifest": mid, "holder": r.holder, "result": r.result,
                                     "summary": r.summary})


def _last_verdicts(lg, own: bytes, mid: bytes) -> dict:
    """holder -> (result, time) of our latest verify entry on it for mid."""
    from hypersdk.protocol import audit
    out: dict = {}
    for raw, t in lg.db.execute("SELECT raw, time FROM entries WHERE author=? AND manifest=? "
                                "AND kind='verify' ORDER BY seq DESC LIMIT 256", (own, mid)):
        b = audit.decode_entry(bytes(raw), verify=False).body
        out.setdefault(b["holder"], (b["result"], t))
    return out


def register(commands: dict, command_reply) -> None:
    """`verify REF --network` through the daemon; plain `verify` stays the store op."""
    local_verify = commands["verify"]

    async def verify(d, args, events):
        if not args.get("network"):
            return await local_verify(d, args, events)
        if not args.get("ref"):
            raise UserError("verify --network needs a REF (a backup name, NAME@N or manifest id)")
        per = (lambda v: None if v is None else v / 1e6)
        doc, text, code = await d.audit.verify(str(args["ref"]), events,
                                               min_holders=args.get("min_holders") or 1,
                                               loss=per(args.get("loss_ppm")),
                                               confidence=per(args.get("confidence_ppm")))
        return command_reply(doc, text, code)
    verify.network = True
    commands["verify"] = verify


def _backup_check(lg, mid: bytes, key=None) -> dict:
    """The backup entry for mid in the logs held, and the check of its author's log.
    key: this node's data key, which opens sealed names (protocol/labels.py)."""
    from hypersdk.dht.keys import node_id
    from hypersdk.protocol import audit
    entries = lg.find_backup_entries(mid)
    if not entries:
        return {"found": False, "chain_ok": False,
                "reason": f"no backup entry for this manifest in the {len(lg.authors())} "
                          "audit log(s) held here"}
    e = entries[0]
    rep = lg.verify(e.author)
    # the distinct witnesses (not every cosign: nodes cosign every head hourly, so the
    # entries grow with the backup's age; their signatures were checked on receipt)
    witnesses = sorted(node_id(bytes(w)).hex() for (w,) in lg.db.execute(
        "SELECT DISTINCT witness FROM witnessed WHERE author=? AND seq>=? AND witness!=?",
        (e.author, e.seq, e.author)))
    # a break in our stored copy (a missing, altered or unlinked row: AuditLog.damaged)
    # is our damage until a valid entry of the author shows otherwise; forks and
    # rewrites proven by witnesses are the author's
    from hypersdk.node.audit.log import damage_in
    local = damage_in(rep) is not None      # the report above: no second verify
    opened = audit.open_body(e.body, key)
    return {"found": True, "name": opened["name"] if opened else None,
            "author": e.author.hex(), "local_damage": local,
            "author_node_id": node_id(e.author).hex(), "seq": e.seq,
            "id": e.id.hex(), "time_ns": e.time, "body": e.to_json()["body"],
            "chain_ok": rep.ok, "log_entries": rep.entries,
            "problems": [p.reason for p in rep.problems][:10], "witnessed_by": witnesses,
            "other_backup_entries": len(entries) - 1,
            **_later_entries(lg, mid, e, key),
            # several authors claim this manifest: reported, never settled by claimed time
            "claimed_by": sorted({node_id(x.author).hex() for x in entries}),
            "conflict": len({x.author for x in entries}) > 1}


MAX_LATER = 20


def _later_entries(lg, mid: bytes, backup, key=None) -> dict:
    """What the logs held say about the backup after its entry (issue 18, finding 5):
    deletes (by its author: the backup no longer stands; by another node: that node
    dropped its copy) and verifications whose latest verdict per (verifier, holder)
    is not "ok" (a failure that a later "ok" of the same pair superseded is history).
    At most MAX_LATER of each, newest first."""
    from hypersdk.dht.keys import node_id
    from hypersdk.protocol import audit
    deletes, latest = [], {}
    for (raw,) in lg.db.execute("SELECT raw FROM entries WHERE manifest=? AND kind IN "
                                "('delete', 'verify') ORDER BY time, author, seq", (mid,)):
        x = audit.decode_entry(bytes(raw), verify=False)
        who = node_id(x.author).hex()
        if x.kind == "delete":
            opened = audit.open_body(x.body, key)
            name = opened["name"] if opened else "(name sealed)"
            deletes.append({"by": who, "by_author": x.author == backup.author, "seq": x.seq,
                            "time_ns": x.time, "ref": f"{name}@{x.body['version']}"})
        else:
            latest[(who, x.body["holder"])] = {"by": who, "holder": x.body["holder"].hex(),
                                               "result": x.body["result"], "seq": x.seq,
                                               "time_ns": x.time}
    failed = [v for v in latest.values() if v["result"] != "ok"]
    newest = (lambda rows: sorted(rows, key=lambda r: r["time_ns"], reverse=True)[:MAX_LATER])
    return {"deleted_by_author": any(d["by_author"] for d in deletes),
            "later_deletes": newest(deletes), "later_failed_verifies": newest(failed)}


FAILED_PROOFS = ("damaged", "missing", "failed")


def judge(entry: dict, manifest_doc: dict, rows: list, min_holders: int) -> dict:
    """The verdict on a backup from its holders' results: it is safe when its
    entry and manifest check out, at least `min_holders` holders proved possession,
    and no holder that signed for it (its author, a `replica` entry) failed a
    proof. An unreachable holder is no failure (it may come back: reported), and
    neither is a DHT provider that signed nothing and fails a proof: any member may
    announce itself (reported; one that breaks the protocol is also scored down)."""
    proven = [r for r in rows if r["result"] == "ok"]
    unreachable = [r for r in rows if r["result"] == "unreachable"]
    failed = [r for r in rows if r["result"] in FAILED_PROOFS]
    bad_claims = [r for r in failed if r["claim"] != "provider"]
    ok = (entry["found"] and entry["chain_ok"] and not entry.get("conflict")
          and not entry.get("deleted_by_author")
          and manifest_doc.get("ok", False) and len(proven) >= min_holders and not bad_claims)
    return {"ok": bool(ok), "min_holders": min_holders, "proven_holders": len(proven),
            "unreachable_holders": len(unreachable), "failed_holders": len(failed),
            "failed_signed_holders": len(bad_claims)}


def _utc(ns: int) -> str:
    import datetime
    return datetime.datetime.fromtimestamp(ns / 1e9, datetime.timezone.utc).strftime(
        "%Y-%m-%d %H:%M:%S UTC")


def _text(doc: dict) -> str:
    e, m = doc["backup_entry"], doc["manifest_check"]
    lines = [f"verify {doc['manifest'][:16]} on the network"]
    if e["found"]:
        w = e["witnessed_by"]
        if e["chain_ok"]:
            state = "intact"
        elif e.get("local_damage"):       # ours, not the author's: not blamed
            state = ("OUR COPY IS DAMAGED (not the author's log; repair from peers did not "
                     "finish): " + "; ".join(e["problems"]))
        else:
            state = "BROKEN: " + "; ".join(e["problems"])
        if e.get("repaired_entries"):
            state += f" (our copy was damaged: {e['repaired_entries']} entries repaired)"
        lines.append(f"backup entry  by {e['author_node_id'][:16]} (entry {e['seq']}, "
                     f"'{e['name'] or 'name sealed'}'): log {state}, witnessed by {len(w)} node(s)")
        if e.get("conflict"):
            lines.append(f"CONFLICT      this manifest is claimed by {len(e['claimed_by'])} "
                         f"authors ({', '.join(c[:16] for c in e['claimed_by'])}): not "
                         "settled by the times they claim; check who made it")
        for x in e.get("later_deletes", []):
            lines.append(f"DELETED       {x['ref']} by "
                         + ("its author" if x["by_author"] else f"node {x['by'][:16]} (its copy)")
                         + f" at {_utc(x['time_ns'])} (entry {x['seq']})")
        for x in e.get("later_failed_verifies", []):
            lines.append(f"LATER         {x['by'][:16]} found holder {x['holder'][:16]} "
                         f"{x['result'].upper()} at {_utc(x['time_ns'])} (its latest check)")
    else:
        lines.append(f"backup entry  NOT FOUND: {e['reason']}")
    lines.append(f"manifest      {'matches the entry' if m.get('ok') else 'PROBLEM'}"
                 f" ({m.get('source') or m.get('reason')})"
                 + ("".join(f"; {p}" for p in m.get("problems", []))))
    sp = doc.get("sampling")
    if sp:
        lines.append(f"sample        {sp['asked']} of {sp['chunks']} chunks per holder"
                     + (" (the whole backup)" if sp["whole"] else
                        f" ({sp['uniform']} at random + rotation window "
                        f"{sp['round'] % sp['rounds'] + 1} of {sp['rounds']}: every chunk "
                        f"asked once per {sp['rounds']} verifications)") + f"; goal: {sp['goal']}")
    for h in doc["holders"]:
        detail = (f"{h.get('proven', 0)}/{h.get('asked', 0)} proven"
                  if "asked" in h else "")
        if h.get("deadline_s"):
            detail += f", slowest answer {h['slowest_s']:.2f} s of {h['deadline_s']:.2f} s allowed"
        reason = f" ({h['reason']})" if h.get("reason") else ""
        lines.append(f"holder {h['node_id'][:16]}  {h['result'].upper():<11} "
                     f"{h['claim']:<8} {detail}{reason}")
    if not doc["holders"]:
        lines.append("holders       none found")
    lines.append(f"holders       {doc['proven_holders']} proved possession (at least "
                 f"{doc['min_holders']} needed); {doc['unreachable_holders']} unreachable, "
                 f"{doc['failed_holders']} failed a proof ({doc['failed_signed_holders']} of "
                 "them signed for it)")
    lines.append("OK: backup verified on the network" if doc["ok"] else
                 "FAILED: see above")
    return "\n".join(lines)


__all__ = ["AuditNet", "register"]
