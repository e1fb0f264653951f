"""The swarm Downloader on simnet (virtual time: MockClock with autojump).

Throughput figures are computed from simulated time, so they are deterministic.
"""
from __future__ import annotations

import random

import pytest
import trio

from hypersdk.dht.contact import Contact
from hypersdk.node.exchange.chunk_source import MemorySink, MemorySource, StoreSink, StoreSource
from hypersdk.node.exchange.server import ExchangeServer
from hypersdk.node.exchange.swarm import Downloader, DownloadError
from hypersdk.node.exchange.swarm_plan import Tunables
from hypersdk.node.net.reputation import PeerScores
from hypersdk.protocol.chunks import ZERO_ID, chunk_id
from hypersdk.protocol.exchange import PROTOCOL_ID
from hypersdk.protocol.manifest import decode_manifest, split_list
from hypersdk.simnet.network import NetworkModel
from hypersdk.simnet.transport import SimNetwork, seed_scheduler

MiB = 1 << 20
MBIT = 1e6 / 8                       # bytes/s per Mbit/s
LIMIT = 600.0                        # virtual seconds: any step beyond this is a hang


@pytest.fixture(scope="module")
def big_image():
    """400 random (incompressible) 1 MiB chunks: (chunks dict, manifests dict, mid)."""
    rng = random.Random(42)
    src = MemorySource()
    mid = src.add_image([rng.randbytes(MiB) for _ in range(400)], MiB, name="big")
    return src.chunks, src.manifests, mid


class Net:
    """One downloader node "d" and providers "p0".. on one simnet (10 ms RTT)."""

    def __init__(self, nursery, *, down=None, up=None, rng_seed=1):
        self.nursery = nursery
        self.model = NetworkModel(rng=random.Random(rng_seed))
        self.net = SimNetwork(self.model)
        self.up = up
        self.providers: dict[bytes, tuple] = {}      # id -> (transport, server, source)
        self.d = self._add("d")
        if down:
            self.model.set_bandwidth(self.d.addr, down=down)

    async def start(self):
        await self.nursery.start(self.net.run)
        return self

    def _add(self, name):
        addr = f"/ip4/10.0.{len(self.model.regions)}.1/tcp/4001"
        t = self.net.add_node(chunk_id(name.encode()), addr)
        self.model.set_region(addr, "na-east")
        return t

    def provider(self, source, *, up=None, stall="") -> Contact:
        t = self._add(f"p{len(self.providers)}")
        if up or self.up:
            self.model.set_bandwidth(t.addr, up=up or self.up)
        server = ExchangeServer(source, stall=stall)
        t.set_handler(PROTOCOL_ID, server.handle)
        self.providers[t.peer_id] = (t, server, source)
        return Contact(t.peer_id, t.addr)

    def kill(self, contact):
        self.net.remove_node(contact.addr)

    def downloader(self, sink, peers, **kw) -> Downloader:
        kw.setdefault("rng", random.Random(7))
        return Downloader(self.d, sink, peers=peers, **kw)


def image_ids(src: MemorySource, mid: bytes) -> list[bytes]:
    m = decode_manifest(src.manifests[mid])
    ids = []
    for li, l in enumerate(m.lists):
        ids += split_list(src.chunks[l] if l != ZERO_ID else ZERO_ID * m.list_len(li),
                          m.list_len(li))
    return ids


def small_image(seed=1, n=40, cs=64 << 10, repeat=False, zeros=True):
    rng = random.Random(seed)
    chunks = [rng.randbytes(cs) for _ in range(n)]
    if zeros:
        chunks[3] = bytes(cs)
    if repeat:
        chunks[10] = chunks[20] = chunks[30] = chunks[5]
    src = MemorySource()
    mid = src.add_image(chunks, cs)
    return src, mid, chunks


def assert_complete(sink: MemorySink, src: MemorySource, mid: bytes):
    assert sink.manifests[mid] == src.manifests[mid]
    for cid in image_ids(src, mid):
        if cid != ZERO_ID:
            assert chunk_id(sink.chunks[cid]) == cid


# ------------------------------------------------------------------ throughput

@pytest.mark.parametrize("providers, expect_mbit", [(10, 1000.0), (3, 300.0)])
async def test_throughput(nursery, autojump_clock, big_image, providers, expect_mbit):
    """Ten 100 Mbit/s uplinks exactly fill the 1 Gbit/s downlink, so any idle
    uplink or duplicate copy shows. target_latency=0.3 s (default 0.5) keeps at
    most ~3.6 chunks queued per peer: on this 10 ms RTT network that still keeps
    every uplink busy, and it shortens the tail where some peers still work
    through their queues while others have nothing left (over 10 scheduler seeds:
    919-924 Mbit/s with 0.3 s; 881-941 Mbit/s with the default 0.5 s, whose
    endgame copies, up to 20 MiB, compete for the saturated downlink)."""
    seed_scheduler(providers)                     # trio's task order: a fixed run
    chunks, manifests, mid = big_image
    net = await Net(nursery, down=1000 * MBIT, up=100 * MBIT).start()
    peers = [net.provider(MemorySource(chunks, manifests)) for _ in range(providers)]
    sink = MemorySink()
    res = await net.downloader(sink, peers, tunables=Tunables(target_latency=0.3),
                               rng=random.Random(providers)).download(mid)
    assert res.chunks_fetched == 401                  # 400 chunks + 1 hash-list piece
    mbit = res.bytes_fetched * 8 / res.seconds / 1e6
    mbit_chunks = (res.bytes_fetched - 400 * 32) * 8 / res.chunk_seconds / 1e6
    print(f"\n{providers} providers x 100 Mbit/s -> 1 Gbit/s downlink: "
          f"{mbit:.1f} Mbit/s overall ({res.seconds:.3f} s simulated), "
          f"{mbit_chunks:.1f} Mbit/s in the chunk phase; "
          f"duplicates {res.duplicate_bytes / MiB:.1f} MiB")
    assert mbit >= 0.9 * expect_mbit
    assert len(res.bytes_by_peer) == providers        # every provider contributed
    assert_complete(sink, MemorySource(chunks, manifests), mid)


# ------------------------------------------------------------------ behaviour

class BusySink(MemorySink):
    """A downloader that is busy DELAY virtual seconds per batch of chunks it stores
    (as a real one is while it verifies, writes and commits)."""
    DELAY = 0.3

    async def put_many(self, puts):
        await trio.sleep(self.DELAY)
        for cid, plain, wire in puts:
            await self.put(cid, plain, wire=wire)


@pytest.mark.parametrize("providers", [1, 4])
async def test_a_busy_downloader_measures_each_peer_at_its_uplink(
        nursery, autojump_clock, providers):
    """A peer's rate is measured from when its chunks arrive, not from when the busy
    downloader gets to them: measured that way (before), equal 50 Mbit/s peers came out
    at 28-70 Mbit/s here, and on 127.0.0.1 (bench_swarm) two of four equal seeds were
    taken for slow and held at one request each for most of the restore."""
    src, mid, _ = small_image(n=400)
    net = await Net(nursery, up=50 * MBIT).start()
    peers = [net.provider(MemorySource(src.chunks, src.manifests)) for _ in range(providers)]
    sink = BusySink()
    with trio.fail_after(LIMIT):
        res = await net.downloader(sink, peers).download(mid)
    assert_complete(sink, src, mid)
    mbit = sorted(r * 8 / 1e6 for r in res.rate_by_peer.values())
    assert len(mbit) == providers and res.slow_peers == []
    assert 45 <= mbit[0] and mbit[-1] <= 55, mbit



class Scores:
    def __init__(self):
        self.penalties = []

    def penalize(self, peer_id, reason, now):
        self.penalties.append((peer_id, reason))


class Finder:
    def __init__(self, contacts):
        self.contacts = contacts
        self.asked = []

    async def find_providers(self, key, count=1):
        self.asked.append((key, count))
        await trio.sleep(0.05)
        return list(self.contacts), None


async def test_endgame_copies_are_cancelled_at_a_slow_provider(
        nursery, autojump_clock, monkeypatch):
    """A slow provider (its server sends 1 MiB/s) whose chunks are also asked of a
    fast one: once the fast copy is in, the slow provider's copy is cancelled, and
    if it has not sent it yet it answers Missing instead. Fewer duplicate bytes
    than the same download without Cancel."""
    src, mid, _ = small_image(n=400)

    async def run():
        net = await Net(nursery, up=100 * MBIT).start()
        fast = net.provider(MemorySource(src.chunks, src.manifests))
        slow = net.provider(MemorySource(src.chunks, src.manifests))
        server = net.providers[slow.id][1]
        server.rate = 1 << 20
        sink = MemorySink()
        with trio.fail_after(LIMIT):
            res = await net.downloader(sink, [fast, slow]).download(mid)
        assert_complete(sink, src, mid)
        assert res.banned == [] and res.failed_peers == []
        return res, server.counters

    res, counters = await run()
    assert counters["cancels"] > 0 and counters["cancelled"] > 0
    assert counters["missing"] == 0          # every Missing it sent was a cancel

    async def no_cancel(self, redundant):
        pass
    monkeypatch.setattr(Downloader, "_cancel", no_cancel)
    res_without, counters = await run()
    assert counters["cancels"] == 0
    assert res.duplicate_bytes < res_without.duplicate_bytes


async def test_chunks_come_from_all_providers_found_through_the_finder(
        nursery, autojump_clock):
    src, mid, chunks = small_image(n=60)
    net = await Net(nursery, up=20 * MBIT).start()
    peers = [net.provider(MemorySource(src.chunks, src.manifests)) for _ in range(4)]
    finder = Finder(peers[1:] + [Contact(net.d.peer_id, net.d.addr)])   # ourselves: skipped
    sink = MemorySink()
    progress = []
    with trio.fail_after(LIMIT):
        res = await net.downloader(sink, peers[:1], finder=finder,
                                   progress=progress.append).download(mid)
    assert finder.asked == [(mid, 32)]
    assert set(res.bytes_by_peer) == {p.id for p in peers}
    assert res.chunks_fetched == 59 + 1 and res.chunks_local == 0
    assert progress[-1].phase == "chunks" and progress[-1].done_chunks == 59
    assert progress[-1].needed_bytes == 59 * (64 << 10)
    assert res.banned == [] and res.failed_peers == []
    assert_complete(sink, src, mid)


async def test_a_corrupt_provider_is_banned_and_every_chunk_verifies(nursery, autojump_clock):
    src, mid, chunks = small_image(n=80)
    net = await Net(nursery, up=20 * MBIT).start()
    good = [net.provider(MemorySource(src.chunks, src.manifests)) for _ in range(3)]
    bad = net.provider(MemorySource(src.chunks, src.manifests, corrupt=1.0,
                                    rng=random.Random(3)), up=200 * MBIT)  # fast: asked first
    scores = Scores()
    sink = MemorySink()
    with trio.fail_after(LIMIT):
        res = await net.downloader(sink, good + [bad], scores=scores).download(mid)
    assert res.banned == [bad.id]
    assert res.bad_chunks >= 3
    assert bad.id not in res.bytes_by_peer
    assert {p for p, _ in scores.penalties} == {bad.id}
    assert_complete(sink, src, mid)


async def test_a_provider_leaving_costs_only_its_in_flight_chunks(nursery, autojump_clock):
    src, mid, chunks = small_image(n=200)
    net = await Net(nursery, up=20 * MBIT).start()
    peers = [net.provider(MemorySource(src.chunks, src.manifests)) for _ in range(3)]
    gone = peers[0]

    def progress(p):
        if p.phase == "chunks" and p.done_chunks >= 60 and gone.addr in net.net.nodes:
            net.kill(gone)

    sink = MemorySink()
    with trio.fail_after(LIMIT):
        res = await net.downloader(sink, peers, progress=progress).download(mid)
    assert gone.id in res.failed_peers
    assert 0 < res.bytes_by_peer[gone.id] < 199 * (64 << 10) // 2
    assert res.chunks_fetched == 199 + 1            # nothing verified was fetched twice
    assert_complete(sink, src, mid)


async def test_local_chunks_are_not_fetched_and_repeats_are_fetched_once(
        nursery, autojump_clock):
    src, mid, chunks = small_image(n=40, repeat=True)
    net = await Net(nursery, up=20 * MBIT).start()
    peer = net.provider(MemorySource(src.chunks, src.manifests))
    distinct = [c for c in dict.fromkeys(image_ids(src, mid)) if c != ZERO_ID]
    assert len(distinct) == 40 - 1 - 3
    sink = MemorySink({c: src.chunks[c] for c in distinct[:10]})
    with trio.fail_after(LIMIT):
        res = await net.downloader(sink, [peer]).download(mid)
    assert res.chunks_repeated == 3 and res.chunks_distinct == 36
    assert res.chunks_local == 10
    assert res.chunks_fetched == 26 + 1                       # + the hash-list piece
    server = net.providers[peer.id][1]
    assert server.counters["chunks_sent"] == 27               # each distinct chunk once
    assert_complete(sink, src, mid)


async def test_resume_fetches_only_the_rest(nursery, autojump_clock):
    src, mid, chunks = small_image(n=100)
    net = await Net(nursery, up=20 * MBIT).start()
    peers = [net.provider(MemorySource(src.chunks, src.manifests)) for _ in range(2)]
    sink = MemorySink()
    with trio.CancelScope() as interrupted:
        def progress(p):
            if p.phase == "chunks" and p.done_chunks >= 50:
                interrupted.cancel()
        with trio.fail_after(LIMIT):
            await net.downloader(sink, peers, progress=progress).download(mid)
    assert interrupted.cancelled_caught
    have = len(sink.chunks)
    assert 50 < have < 100 and mid not in sink.manifests    # no manifest until complete
    with trio.fail_after(LIMIT):
        res = await net.downloader(sink, peers).download(mid)
    assert res.chunks_local == have                          # chunks + the list piece
    assert res.chunks_fetched == 100 - have
    assert_complete(sink, src, mid)


async def test_a_chunk_nobody_has_is_a_clear_error(nursery, autojump_clock):
    src, mid, chunks = small_image(n=30)
    lost = chunk_id(chunks[7])
    partial = {c: v for c, v in src.chunks.items() if c != lost}
    net = await Net(nursery, up=20 * MBIT).start()
    peers = [net.provider(MemorySource(partial, src.manifests)) for _ in range(3)]
    sink = MemorySink()
    with trio.fail_after(LIMIT):
        with pytest.raises(DownloadError) as err:
            await net.downloader(sink, peers).download(mid)
    assert err.value.missing == (lost,)
    assert lost.hex() in str(err.value)
    assert len(sink.chunks) == 28 + 1               # the rest arrived, and the list piece


async def test_a_provider_that_has_stale_have_answers_missing(nursery, autojump_clock):
    """Have says yes, Get says Missing (the chunk went away in between): another
    holder serves it; with no other holder it is a clear error."""
    src, mid, chunks = small_image(n=20)
    net = await Net(nursery, up=20 * MBIT).start()

    class Forgetful(MemorySource):
        async def get(self, cid):
            return None if cid == chunk_id(chunks[5]) else await super().get(cid)

    liar = net.provider(Forgetful(src.chunks, src.manifests), up=100 * MBIT)
    honest = net.provider(MemorySource(src.chunks, src.manifests))
    sink = MemorySink()
    with trio.fail_after(LIMIT):
        await net.downloader(sink, [liar, honest]).download(mid)
    assert_complete(sink, src, mid)
    with trio.fail_after(LIMIT):
        with pytest.raises(DownloadError) as err:
            await net.downloader(MemorySink(), [liar]).download(mid)
    assert err.value.missing == (chunk_id(chunks[5]),)


async def test_hung_provider_ends_in_an_error_not_a_hang(nursery, autojump_clock):
    src, mid, chunks = small_image(n=10)
    net = await Net(nursery).start()
    peer = net.provider(MemorySource(src.chunks, src.manifests))
    sink = MemorySink({c: src.chunks[c] for c in src.chunks})    # ... but the manifest
    net.model.set_fault(peer.addr, "hang")
    with trio.fail_after(LIMIT):
        with pytest.raises(DownloadError, match="not found"):
            await net.downloader(sink, [peer], request_timeout=5).download(mid)
    # the manifest is known, the chunks hang: the plan times the peer out, then fails
    net.model.clear_fault(peer.addr)
    sink = MemorySink(manifests=dict(src.manifests))
    net2 = await Net(nursery).start()
    peer2 = net2.provider(MemorySource(src.chunks, src.manifests))
    net2.model.set_fault(peer2.addr, "hang")
    with trio.fail_after(LIMIT):
        with pytest.raises(DownloadError) as err:
            await net2.downloader(sink, [peer2]).download(mid)
    assert err.value.missing


@pytest.mark.parametrize("mode", ["chunks", "all"])
async def test_a_staller_costs_little_and_is_scored_silent(nursery, autojump_clock, big_image,
                                                           mode):
    """Issue 17, attack 5: a provider that accepts requests and never answers
    ("chunks": chunk requests; "all": every request, manifest and Have too),
    asked first, next to three honest 100 Mbit/s providers: the download takes
    about its normal (virtual) time, the staller delivers nothing, and the
    node's reputation counts it silent."""
    chunks, manifests, mid = big_image

    async def run(with_staller: bool):
        net = await Net(nursery, up=100 * MBIT).start()
        peers = [net.provider(MemorySource(chunks, manifests)) for _ in range(3)]
        if with_staller:
            peers.insert(0, net.provider(MemorySource(chunks, manifests), stall=mode))
        scores = PeerScores()
        t0 = trio.current_time()
        with trio.fail_after(LIMIT):
            res = await net.downloader(MemorySink(), peers, scores=scores).download(mid)
        return trio.current_time() - t0, res, scores, peers[0]

    base, _, _, _ = await run(False)
    took, res, scores, staller = await run(True)
    print(f"\n{mode}: {took:.2f} s with the staller, {base:.2f} s without")
    assert took <= 1.1 * base + 0.5               # the bar is 1.3x; virtual time is exact
    assert res.bytes_by_peer.get(staller.id, 0) == 0
    assert scores.offences["silent"] >= 1 and scores.score(staller.id) < 0


async def test_unknown_manifest_is_a_clear_error(nursery, autojump_clock):
    src, mid, chunks = small_image(n=5)
    net = await Net(nursery).start()
    peer = net.provider(src)
    with trio.fail_after(LIMIT):
        with pytest.raises(DownloadError, match="not found"):
            await net.downloader(MemorySink(), [peer]).download(b"\x05" * 32)
        with pytest.raises(DownloadError, match="not found"):
            await net.downloader(MemorySink(), []).download(mid)


# ------------------------------------------------------------------ store-backed

async def test_store_source_to_store_sink_round_trip(nursery, autojump_clock, tmp_path):
    await store_round_trip(nursery, tmp_path, threaded=False)


async def test_store_round_trip_with_threads_on_the_real_clock(nursery, tmp_path):
    """threaded=True runs store work in threads: under autojump the virtual clock
    would jump while a thread works, so this one runs simnet on the real clock."""
    await store_round_trip(nursery, tmp_path, threaded=True)


async def store_round_trip(nursery, tmp_path, *, threaded):
    from conftest import mixed_image

    from hypersdk.node.service.backup import backup
    from hypersdk.node.store.catalog import iter_chunk_ids, load_manifest
    from hypersdk.node.store.store import ChunkStore
    from hypersdk.node.store.verify import verify_store
    cs = 64 << 10
    img = mixed_image(tmp_path / "disk.img", 20 * cs + 77, chunk=cs)
    data = bytearray(img.read_bytes())
    with ChunkStore(tmp_path / "a") as a, ChunkStore(tmp_path / "b") as b:
        backup(a, str(img), name="vm", chunk_size=cs)
        data[4 * cs + 10:4 * cs + 4106] = random.Random(9).randbytes(4096)   # a delta
        img.write_bytes(data)
        r2 = backup(a, str(img), name="vm", chunk_size=cs)
        assert a.stats()["delta_chunks"] >= 1
        net = await Net(nursery, up=None if threaded else 50 * MBIT).start()
        peer = net.provider(StoreSource(a, threaded=threaded))
        with trio.fail_after(LIMIT):
            async with StoreSink(b, threaded=threaded, batch_bytes=4 * cs) as sink:
                res = await net.downloader(sink, [peer]).download(r2.manifest_id)
        assert res.chunks_fetched > 0
        m = load_manifest(b, r2.manifest_id)
        out = bytearray()
        for i, cid in iter_chunk_ids(b, m):
            out += bytes(m.chunk_len(i)) if cid == ZERO_ID else b.read(cid)
        assert out == data
        assert verify_store(b).ok
        # a second download finds everything local and fetches nothing
        with trio.fail_after(LIMIT):
            async with StoreSink(b, threaded=threaded) as sink:
                again = await net.downloader(sink, [peer]).download(r2.manifest_id)
        assert again.chunks_fetched == 0


async def test_store_sink_keeps_committed_chunks_of_an_interrupted_download(
        nursery, autojump_clock, tmp_path):
    from hypersdk.node.store.store import ChunkStore
    src, mid, chunks = small_image(n=60)
    net = await Net(nursery, up=20 * MBIT).start()
    peer = net.provider(MemorySource(src.chunks, src.manifests))
    with ChunkStore(tmp_path / "b") as b:
        with trio.CancelScope() as interrupted:
            def progress(p):
                if p.phase == "chunks" and p.done_chunks >= 30:
                    interrupted.cancel()
            async with StoreSink(b, threaded=False, batch_bytes=8 * (64 << 10)) as sink:
                await net.downloader(sink, [peer], progress=progress).download(mid)
        kept = b.db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]
        assert 30 <= kept < 60
        with trio.fail_after(LIMIT):
            async with StoreSink(b, threaded=False) as sink:
                res = await net.downloader(sink, [peer]).download(mid)
        assert res.chunks_local == kept and res.chunks_fetched == 60 - kept
        for cid in image_ids(src, mid):
            if cid != ZERO_ID:
                assert b.read(cid) == src.chunks[cid]


async def test_no_progress_for_stall_timeout_fails_naming_the_missing_chunks(
        nursery, autojump_clock):
    src, mid, chunks = small_image(n=10, zeros=False)
    net = await Net(nursery).start()

    class Stuck(MemorySource):          # answers Have, never sends a chunk
        async def get(self, cid):
            await trio.sleep_forever()

    peer = net.provider(Stuck(src.chunks, src.manifests))
    sink = MemorySink({l: src.chunks[l] for l in decode_manifest(src.manifests[mid]).lists},
                      dict(src.manifests))               # manifest and list held: only chunks
    t0 = trio.current_time()
    with trio.fail_after(LIMIT):
        with pytest.raises(DownloadError, match="stalled") as err:
            await net.downloader(sink, [peer], stall_timeout=5).download(mid)
    assert sorted(err.value.missing) == sorted(chunk_id(c) for c in chunks)
    assert trio.current_time() - t0 < 5 + 1


async def test_download_over_libp2p(nursery):
    """The same Downloader on the real transport: two providers on 127.0.0.1."""
    from p2p_helpers import STEP_LIMIT, start_transport
    src, mid, chunks = small_image(n=32, cs=1 << 20, repeat=True)
    d = (await start_transport(nursery)).transport
    peers = []
    for _ in range(2):
        t = (await start_transport(nursery)).transport
        t.set_handler(PROTOCOL_ID, ExchangeServer(MemorySource(src.chunks, src.manifests)).handle)
        peers.append(Contact(t.peer_id, t.addr))
    sink = MemorySink()
    with trio.fail_after(STEP_LIMIT):
        res = await Downloader(d, sink, peers=peers, rng=random.Random(1)).download(mid)
    assert res.chunks_fetched == 32 - 1 - 3 + 1
    assert set(res.bytes_by_peer) == {p.id for p in peers}
    assert_complete(sink, src, mid)


# ------------------------------------------------------------------ the tee (image while fetching)

@pytest.mark.parametrize("threaded", [False, True])
@pytest.mark.parametrize("corrupt", [False, True])
async def test_the_tee_gets_each_new_chunk_after_its_check(nursery, tmp_path, request,
                                                           threaded, corrupt):
    """A restore writes the image while chunks arrive (node.service.restore_staged.StagedImage as
    the tee): zstd payloads (decoded into the verifier's scratch buffer) and raw ones,
    every position of a repeated chunk; a corrupt provider's copies are never written
    (restore() only completes the positions the tee did not write, so a wrong byte
    written there would survive into OUT). threaded: the real nodes' path (worker
    threads, real clock); else simnet's (synchronous, virtual time)."""
    from conftest import mixed_image, same_bytes

    from hypersdk.node.service.restore import restore
    from hypersdk.node.service.restore_staged import _STAGED, stage
    from hypersdk.node.store.store import ChunkStore
    if not threaded:
        request.getfixturevalue("autojump_clock")
    cs = 64 << 10
    img = mixed_image(tmp_path / "disk.img", 30 * cs + 333, seed=5, chunk=cs)
    data = img.read_bytes()
    chunks = [data[i:i + cs] for i in range(0, len(data), cs)]
    chunks[12] = chunks[20] = chunks[4]          # a repeated (compressible or random) chunk
    img.write_bytes(b"".join(chunks))
    src = MemorySource(compress=True)
    mid = src.add_image(chunks, cs)
    ids = image_ids(src, mid)
    net = await Net(nursery, up=None if threaded else 50 * MBIT).start()
    peers = [net.provider(MemorySource(src.chunks, src.manifests, compress=True))
             for _ in range(2)]
    if corrupt:
        peers.append(net.provider(MemorySource(src.chunks, src.manifests, compress=True,
                                               corrupt=1.0, rng=random.Random(3))))
    out = tmp_path / "out.img"
    with ChunkStore(tmp_path / "b") as b:
        staged = stage(str(out), mid)
        with trio.fail_after(LIMIT):
            async with StoreSink(b, threaded=threaded) as sink:
                res = await net.downloader(sink, peers, tee=staged,
                                           verify_in_thread=threaded).download(mid)
        assert res.chunks_fetched == len({c for c in ids if c != ZERO_ID}) + 1   # + the list
        nonzero = {i for i, c in enumerate(ids) if c != ZERO_ID}
        assert staged.written <= nonzero and {4, 12, 20} <= nonzero
        if not corrupt:
            assert staged.written == nonzero
        else:
            assert res.bad_chunks >= 1
        written = set(staged.written)
        from hypersdk.node.service.replication import record_replica
        record_replica(b, mid, res)              # the catalog row a fetch adds
        restore(b, mid.hex(), str(out))
    assert written and same_bytes(img, out) and not _STAGED


async def test_store_source_serves_cached_records_without_a_thread_and_falls_back(tmp_path):
    """StoreSource(threaded=True): have() keeps the locations it found, and get()
    reads a record whose pages are cached in the event loop; the answer is the
    same as the thread path's, and a stale location (here: pointing at another
    record) is never served: the header check sends it down the thread path."""
    from conftest import mixed_image

    from hypersdk.node.service.backup import backup
    from hypersdk.node.store.catalog import iter_chunk_ids, load_manifest
    from hypersdk.node.store.store import ChunkStore
    cs = 64 << 10
    img = mixed_image(tmp_path / "disk.img", 12 * cs, chunk=cs)
    with ChunkStore(tmp_path / "a") as a:
        r = backup(a, str(img), chunk_size=cs)
        ids = list(dict.fromkeys(c for _, c in iter_chunk_ids(
            a, load_manifest(a, r.manifest_id)) if c != ZERO_ID))
        assert len(ids) > 2
        for c in ids:
            a.read(c)                                # opens the pack, warms the cache
        threaded = StoreSource(a, threaded=True)
        plain = StoreSource(a, threaded=False)
        assert await threaded.have(ids) == [True] * len(ids)
        for c in ids:
            got, want = await threaded.get(c), await plain.get(c)
            assert (got[0], got[1], bytes(got[2])) == (want[0], want[1], bytes(want[2]))
        assert threaded.served_cached == len(ids)
        threaded._locs[ids[0]] = threaded._locs[ids[1]]       # stale: another record
        got = await threaded.get(ids[0])
        assert bytes(got[2]) == bytes((await plain.get(ids[0]))[2])
        assert threaded.served_cached == len(ids)
        assert await threaded.get(chunk_id(b"not held")) is None
