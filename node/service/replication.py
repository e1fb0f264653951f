"""The node's network side of the store: serve chunks, announce, fetch, restore.

Registered on the daemon (node/daemon/daemon.py COMMANDS) when it starts:

    serve      the chunk exchange (protocol/exchange.py) on the node's transport,
               from a StoreSource on the node's data dir
    backup     the CLI's store op, then announce the new backup
    fetch REF  copy a backup's chunks from the network into the store
               (replication without writing an image), record it, announce it
    restore    the CLI's store op; when REF is not held completely here (a
               manifest id known only to the network, or chunks missing),
               fetch what is missing first, writing OUT's temporary file as the
               chunks arrive (node.service.restore_staged.StagedImage), so that the restore
               only adds the chunks that were held locally, syncs and renames;
               its reply's seconds (and the rate its text shows) cover the whole
               restore, fetch included (local_seconds: the part after the fetch)

Announce: provider records for the manifest id and every chunk id, through
DhtService.provide_many (one keyspace sweep, not a lookup per key), after a
backup, after a fetch, and for the whole catalog when the node starts (once
its bootstrap ended) and after a `join`; the republish loop keeps them alive. A node that fetched a
backup announces and
serves it like its own (edge caching).

A storage-only member (no data key of the backup's tenant) fetches a keyed backup
as its sealed records, kept for the key's holders ("opaque": Downloader opaque_ok,
StoreSink.begin_opaque): it serves them and answers possession challenges over
them, and cannot read them; a restore there refuses with one line.

A fetched backup is recorded in the catalog (node/store/catalog.py) as the next
version of its manifest's name, with stats {"replica": true, ...}, so that
`backups` lists it, gc keeps its chunks and `restore NAME` finds it; a
manifest already recorded here is not recorded twice.

REF resolution for fetch/restore: what the local catalog resolves (NAME,
NAME@N, hex prefix), else a full 64-digit manifest id, which may be known
only to the network.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
from pathlib import Path

import trio

# everything a fetch or restore uses is imported here, when the daemon starts: imported
# inside fetch(), the first network command of a node's life paid 16 ms for it
from hypersdk.node import runtime
from hypersdk.node.audit import intents as audit_intents
from hypersdk.node.config import commit_bytes, human
from hypersdk.node.errors import UserError
from hypersdk.node.exchange.chunk_source import StoreSink, StoreSource
from hypersdk.node.exchange.server import ExchangeServer
from hypersdk.node.exchange.swarm import Downloader, DownloadError
from hypersdk.node.net.fast_channel import OFFER_PROTOCOL, FastChannelServer, FastDialer, host_of
from hypersdk.node.service.restore_staged import discard_staged, stage
from hypersdk.node.store import catalog
from hypersdk.node.store import intents as store_intents
from hypersdk.node.store.store import ChunkStore
from hypersdk.protocol.chunks import ZERO_ID
from hypersdk.protocol.exchange import PROTOCOL_ID as EXCHANGE
from hypersdk.protocol.manifest import decode_manifest

log = logging.getLogger(__name__)

ANNOUNCE_TIMEOUT = 120.0
MAX_PROVIDERS = 32               # holders a fetch asks for (and swarms over)
# A fetch makes what it received durable in small steps (node/exchange/chunk_source.py
# StoreSink): every FETCH_COMMIT_BYTES (or HYPERSDK_COMMIT_BYTES if smaller) and at
# least every FETCH_COMMIT_SECONDS. A kill -9 then loses at most the batch filling and
# the one committing, < 2 x 16 MiB, and on a link slower than 160 MiB/s about the last
# 0.2 s of transfer (plus the few chunks between the socket and the store), instead of
# up to 2 x 256 MiB: a storm of 10 kills during a 256 MiB fetch at 40 MiB/s costs the
# server 1.08-1.12x the bytes (bench/bench_fetch_kills.py), not 6.0x (16 MiB steps
# without the time rule: 1.3x). Committing 16 MiB of records the
# O_DIRECT appender already wrote is one sub-millisecond fdatasync and one SQLite
# transaction in PackWriter's commit thread; the puts do not wait for it.
FETCH_COMMIT_BYTES = 16 << 20
FETCH_COMMIT_SECONDS = 0.1
_FULL_ID = re.compile(r"^[0-9a-f]{64}$")


def fetch_commit_bytes() -> int:
    """A fetch's durability step in bytes (see FETCH_COMMIT_BYTES)."""
    return min(commit_bytes(), FETCH_COMMIT_BYTES)


def resolve_ref(store, ref: str, data_dir=None) -> bytes:
    """The manifest id REF names: locally, as a full id, or (data_dir given) as a
    NAME or NAME@N of a backup in the audit logs gossiped here (any member's)."""
    try:
        return catalog.resolve(store, ref).manifest_id
    except UserError as exc:
        if _FULL_ID.match(ref.lower()):
            return bytes.fromhex(ref)
        if data_dir is not None:
            mid = _network_ref(data_dir, ref)
            if mid is not None:
                return mid
        raise exc from None


def _network_ref(data_dir, ref: str) -> bytes | None:
    """NAME (latest) or NAME@N in the gossiped logs; N counts that author's backup
    entries of NAME in order, as its catalog numbers versions. NameConflict (a
    UserError) when several authors use NAME."""
    from hypersdk.node.audit.log import DB_NAME, AuditLog
    from hypersdk.node.net import datakey
    if not (Path(data_dir) / DB_NAME).exists():
        return None
    name, at, ver = ref.rpartition("@")
    if not at or not ver.isdigit():
        name, ver = ref, None
    key = datakey.load(data_dir)
    with AuditLog(data_dir) as log:
        return log.find_backup_by_name(name, key, version=int(ver) if ver else None)


def held_completely(store, mid: bytes) -> bool:
    """The manifest and every chunk of its image are in the store."""
    body = catalog.manifest_body(store, mid)          # opened, if sealed here
    if body is None:
        return False
    m = decode_manifest(body)
    if any(lid != ZERO_ID and not store.has(lid) for lid in m.lists):
        return False
    return all(cid == ZERO_ID or store.has(cid) for _, cid in catalog.iter_chunk_ids(store, m))


def announce_keys(store, mid: bytes) -> list[bytes]:
    """The manifest id, its hash-list pieces and its distinct non-zero chunk ids."""
    m = catalog.load_manifest(store, mid, opaque_ok=True)
    keys = {mid}
    keys.update(lid for lid in m.lists if lid != ZERO_ID)
    keys.update(cid for _, cid in catalog.iter_chunk_ids(store, m) if cid != ZERO_ID)
    return sorted(keys)


def record_replica(store, mid: bytes, result) -> bool:
    """Add a catalog row for a fetched manifest unless one exists. True if added."""
    db = store.db
    with store.write_lock():
        if db.execute("SELECT 1 FROM backups WHERE manifest=?", (mid,)).fetchone():
            return False
        m = catalog.load_manifest(store, mid, opaque_ok=True)
        stats = {"replica": True, "chunks": m.n_chunks,
                 "zero_chunks": m.n_chunks - result.chunks_total,
                 "fetched_chunks": result.chunks_fetched,
                 "fetched_bytes": result.bytes_fetched, "new_bytes_stored": 0}
        if getattr(result, "opaque", False):      # held for the holders of m.key
            stats["opaque"] = True
        with db:
            catalog.add_backup(db, m, stats, store.key)   # sealed, if this node seals
            # the `replica` entry is owed in the same commit (holder None: this node)
            store_intents.add(db, "replica", {"manifest": mid, "holder": None})
        return True


class Replication:
    """The daemon's network store commands (see the module docstring)."""

    def __init__(self, daemon):
        self.d = daemon
        self.transfers: dict[int, dict] = {}      # in progress, for `status`
        self._next = 0
        self._serve_store = None

    # -- serving ----------------------------------------------------------------------
    def start_serving(self) -> None:
        self._serve_store = self.d.open_store(readonly=True)
        scores = self.d.dht.scores
        self.server = ExchangeServer(StoreSource(self._serve_store, threaded=True),
                                     rng=self.d.rng, budget=self.d.serve_budget,
                                     rate=getattr(self.d, "upload_limit", None),
                                     banned=lambda pid: scores.banned(pid, trio.current_time()))
        self.d.net.set_handler(EXCHANGE, self.server.handle)
        self.fast_server = None
        if not getattr(self.d, "fast_channel", True):
            return                        # simnet: every exchange runs on its streams
        # the bulk path: the same exchange over node/net/fast_channel.py (libp2p offers it)
        try:
            host = host_of(str(getattr(self.d, "listen", "")))
        except Exception:
            host = "127.0.0.1"
        gate = self.d.gate
        self.fast_server = FastChannelServer(self.d.identity, self.server.handle, host=host,
                                             tallies=self.d.net.tallies,
                                             admit=gate.is_member if gate else None)
        if gate is not None:
            self.d.transport.on_cut.append(self.fast_server.cut)
        self.d.net.set_handler(OFFER_PROTOCOL, self.fast_server.offer_handler)
        if self.d.nursery is not None:
            self.d.nursery.start_soon(self._run_fast_server)

    async def _run_fast_server(self) -> None:
        try:
            await self.fast_server.run()
        except OSError as exc:            # no listener: peers fall back to libp2p streams
            log.warning("fast channel listener failed: %s", exc)

    def close(self) -> None:
        if self._serve_store is not None:
            self._serve_store.close()
            self._serve_store = None

    # -- announce ---------------------------------------------------------------------
    async def announce(self, mid: bytes, *, background: bool = False) -> int:
        """Provider records for the manifest and its chunks; how many keys.
        background: return once the keys are known; the node's nursery announces
        them (a fetch or restore is done when its data is stored, not when the
        DHT has heard of it)."""
        def keys():
            with self.d.open_store(readonly=True) as store:
                return announce_keys(store, mid)
        ks = await runtime.run_sync(keys)
        if background:
            self.d.nursery.start_soon(self._provide, ks)
        else:
            await self._provide(ks)
        return len(ks)

    async def _provide(self, ks: list) -> None:
        with trio.move_on_after(ANNOUNCE_TIMEOUT):
            await self.d.dht.provide_many(ks)

    async def announce_all(self) -> int:
        """Announce every backup and replica in the catalog; how many keys."""
        def keys():
            with self.d.open_store(readonly=True) as store:
                mids = {b.manifest_id for b in catalog.list_backups(store)}
                out: set[bytes] = set()
                for mid in mids:
                    try:
                        out.update(announce_keys(store, mid))
                    except UserError as exc:   # e.g. sealed with a data key not held here
                        log.warning("not announcing %s: %s", mid.hex()[:16], exc)
                return sorted(out)
        ks = await runtime.run_sync(keys)
        if ks:
            with trio.move_on_after(ANNOUNCE_TIMEOUT):
                await self.d.dht.provide_many(ks)
        return len(ks)

    def _audit_replica(self, store) -> None:
        """The `replica` entry record_replica owes (we now hold the whole backup)."""
        audit_intents.crash_point("replica-committed")
        audit_intents.flush(store, lambda msg: log.warning("audit: %s", msg))

    # -- fetch ------------------------------------------------------------------------
    async def fetch(self, ref: str, events, *, out: str | None = None,
                    force: bool = False, pace=None, on_progress=None) -> dict:
        """Fetch REF's missing chunks from the network; a JSON document.
        out: the image a restore will write next: it is written while the chunks
        arrive (node.service.restore_staged.stage), and the restore only completes it.
        pace: a node.replicas.pace.Pace the chunks are stored at (replication's bound);
        on_progress(DownloadProgress): told as the download goes (it may cancel it)."""

        def resolve():
            with self.d.open_store(readonly=True) as store:
                mid = resolve_ref(store, ref, self.d.data_dir)
                return mid, held_completely(store, mid)
        mid, complete = await runtime.run_sync(resolve)
        doc = {"manifest": mid.hex(), "already_held": complete, "chunks_fetched": 0,
               "bytes_fetched": 0, "bytes_by_peer": {}, "chunks_local": 0,
               "banned": [], "seconds": 0.0}
        if complete:
            return doc
        tid, self._next = self._next, self._next + 1
        transfer = self.transfers[tid] = {"manifest": mid.hex(), "phase": "start",
                                          "done_chunks": 0, "needed_chunks": 0}
        store = await runtime.run_sync(lambda: ChunkStore(self.d.data_dir))
        try:
            with contextlib.ExitStack() as bars:
                bar = {}

                def progress(p):
                    if on_progress is not None:
                        on_progress(p)
                    transfer.update(phase=p.phase, done_chunks=p.done_chunks,
                                    needed_chunks=p.needed_chunks,
                                    done_bytes=p.done_bytes, needed_bytes=p.needed_bytes,
                                    wire_bytes=p.wire_bytes)
                    if p.phase != "chunks" or not p.needed_bytes:
                        return
                    if "advance" not in bar:
                        bar["advance"] = bars.enter_context(
                            events.progress(p.needed_bytes, "fetch"))
                        bar["done"] = 0
                    step = min(p.done_bytes, p.needed_bytes) - bar["done"]
                    if step > 0:
                        bar["advance"](step)
                        bar["done"] += step

                providers, stats = await self.d.dht.find_providers(mid, MAX_PROVIDERS)
                if not providers:
                    raise UserError(f"{ref}: not found on the network (asked {stats.queries} "
                                    f"peer(s) of {len(self.d.dht.table)} known; none holds "
                                    f"manifest {mid.hex()[:16]})")
                staged = None
                if out is not None and (force or not os.path.lexists(out)) \
                        and os.path.isdir(os.path.dirname(os.path.abspath(out))):
                    try:
                        staged = await runtime.run_sync(stage, out, mid,
                                                               self.d.data_dir)
                    except OSError:
                        staged = None     # the restore itself will say what is wrong
                gate = self.d.gate
                fast = FastDialer(self.d.identity, self.d.net, self.d.net.tallies,
                                  admit=gate.is_member if gate else None) \
                    if getattr(self.d, "fast_channel", True) else None
                async with StoreSink(store, threaded=not runtime.simulated_run(),
                                     batch_bytes=fetch_commit_bytes(),
                                     commit_seconds=FETCH_COMMIT_SECONDS) as sink:
                    if pace is not None:
                        from hypersdk.node.replicas.pace import PacedSink
                        sink = PacedSink(sink, pace)
                    # a fetch (not a restore) of a backup keyed with a data key this
                    # node lacks keeps its sealed records for the key's holders
                    dl = Downloader(self.d.net, sink, peers=providers, rng=self.d.rng,
                                    progress=progress, scores=self.d.dht.scores,
                                    verify_in_thread=True, fast=fast, tee=staged,
                                    opaque_ok=out is None)
                    if fast is not None:
                        self.d.transport.on_cut.append(fast.cut)
                    try:
                        result = await dl.download(mid)
                    except BaseException as exc:
                        if staged is not None:
                            staged.discard()
                        if isinstance(exc, DownloadError):
                            raise UserError(f"fetch {ref}: {exc}") from None
                        raise
                    finally:
                        if fast is not None:
                            self.d.transport.on_cut.remove(fast.cut)
            if await runtime.run_sync(record_replica, store, mid, result):
                await runtime.run_sync(self._audit_replica, store)
        finally:
            self.transfers.pop(tid, None)
            await runtime.run_sync(store.close)
        keys = await self.announce(mid, background=True)
        doc.update(chunks_fetched=result.chunks_fetched, bytes_fetched=result.bytes_fetched,
                   chunks_local=result.chunks_local, duplicate_bytes=result.duplicate_bytes,
                   bad_chunks=result.bad_chunks,
                   bytes_by_peer={p.hex(): n for p, n in result.bytes_by_peer.items()},
                   rate_by_peer={p.hex(): round(r) for p, r in result.rate_by_peer.items()},
                   slow_peers=[p.hex() for p in result.slow_peers],
                   banned=[p.hex() for p in result.banned],
                   failed_peers=[p.hex() for p in result.failed_peers],
                   seconds=round(result.seconds, 3), announced_keys=keys,
                   opaque=result.opaque)
        if result.opaque:
            doc["data_key"] = result.manifest.key.hex()
        return doc


def fetch_text(doc: dict) -> str:
    if doc["already_held"]:
        return f"fetch {doc['manifest'][:16]}: every chunk is already held here"
    peers = ", ".join(f"{p[:12]} {n}" for p, n in sorted(doc["bytes_by_peer"].items()))
    lines = [f"fetched {doc['manifest'][:16]}: {doc['chunks_fetched']} chunks, "
             f"{doc['bytes_fetched']} bytes in {doc['seconds']:.2f} s "
             f"({doc['chunks_local']} already held)",
             f"bytes by peer  {peers or '-'}"]
    if doc["banned"]:
        lines.append(f"banned         {', '.join(p[:12] for p in doc['banned'])}")
    if doc.get("opaque"):
        lines.append(f"held sealed    for the holders of data key {doc['data_key'][:16]}; "
                     "this node cannot read it")
    return "\n".join(lines)


_TIMING = re.compile(r" in \d+\.\d\d s \([^()]*/s\)")    # of the restore op's text


def restore_text(text: str, doc: dict) -> str:
    """The restore op's text (node/cli/app.py _op_restore) with the whole restore's
    seconds and rate (doc["seconds"], fetch included) in place of the local part's,
    then what the fetch brought."""
    secs = doc["seconds"]
    timing = f" in {secs:.2f} s ({human(doc['bytes'] / secs if secs > 0 else 0)}/s)"
    text, n = _TIMING.subn(timing, text or "", count=1)
    if not n:
        text = f"{text}\nwhole restore  {human(doc['bytes'])}{timing}".lstrip("\n")
    f = doc["fetched"]
    if f["already_held"]:
        return text
    return (f"{text}\nfetched        {f['chunks_fetched']} chunks, {human(f['bytes_fetched'])} "
            f"from {len(f['bytes_by_peer'])} peer(s) in {f['seconds']:.2f} s "
            f"({f['chunks_local']} already held)")


def register(commands: dict, command_reply) -> None:
    """Add the network commands to the daemon's COMMANDS (wrapping the store ops)."""
    local_backup, local_restore = commands["backup"], commands["restore"]
    local_backup_vm = commands["backup vm"]

    async def backup(d, args, events):
        reply = await local_backup(d, args, events)
        if reply.code == 0 and isinstance(reply.doc, dict) and reply.doc.get("manifest"):
            d.nursery.start_soon(d.replication.announce, bytes.fromhex(reply.doc["manifest"]))
            d.replicas.wake()                 # place its copies on other sites now
        return reply

    async def backup_vm(d, args, events):
        reply = await local_backup_vm(d, args, events)
        for mid in set(manifests_in(reply.doc)):
            d.nursery.start_soon(d.replication.announce, bytes.fromhex(mid))
        d.replicas.wake()
        return reply

    async def fetch(d, args, events):
        doc = await d.replication.fetch(str(args["ref"]), events)
        return command_reply(doc, fetch_text(doc), 0)

    async def restore(d, args, events):
        t0 = trio.current_time()
        out = args.get("out")
        fetched = await d.replication.fetch(str(args["ref"]), events,
                                            out=str(out) if out else None,
                                            force=bool(args.get("force")))
        if not fetched["already_held"]:
            args = dict(args, ref=fetched["manifest"])
        try:
            reply = await local_restore(d, args, events)
        finally:
            if out:
                discard_staged(str(out))  # a stage the restore did not take
        if isinstance(reply.doc, dict):
            reply.doc["fetched"] = fetched
            if reply.code == 0 and "seconds" in reply.doc:
                # the local op timed only what it did after the fetch (which wrote
                # most of the image): the restore took the fetch and that
                reply.doc["local_seconds"] = reply.doc["seconds"]
                reply.doc["seconds"] = round(trio.current_time() - t0, 3)
                reply.text = restore_text(reply.text, reply.doc)
        return reply

    commands.update(backup=backup, fetch=fetch, restore=restore)
    commands["backup vm"] = backup_vm


def manifests_in(doc) -> list[str]:
    """The manifest ids (hex) anywhere in a reply document (a VM backup's disks)."""
    if isinstance(doc, dict):
        out = [doc["manifest"]] if isinstance(doc.get("manifest"), str) else []
        return out + [m for k, v in doc.items() if k != "manifest" for m in manifests_in(v)]
    if isinstance(doc, list):
        return [m for v in doc for m in manifests_in(v)]
    return []
