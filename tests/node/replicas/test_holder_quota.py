"""The holder's side of a replication request (node/replicas/service.py), on a real
Daemon's store and state, not started (no network needed to judge a request):
copies are accepted within the quota, counting the copies already promised, and
refused beyond it with a reason that says so; state answers follow the queue."""
from __future__ import annotations

import os

from conftest import mixed_image

from hypersdk.node.config import human
from hypersdk.node.daemon.daemon import Daemon
from hypersdk.node.net.identity import Identity
from hypersdk.node.replicas.state import ReplicaState
from hypersdk.node.service.backup import backup

MiB = 1 << 20


async def test_quota_counts_promises_and_refusals_say_why(tmp_path):
    d = Daemon(tmp_path / "h", Identity.generate(), quota=100 * MiB)
    with d.open_store() as store:                   # something of its own: ~some MiB
        backup(store, str(mixed_image(tmp_path / "own.img", 8 * MiB)), name="own",
               chunk_size=1 << 20)
        used = store.stats()["stored_bytes"]
    r = d.replicas
    o = await r.offer()
    assert o.quota == 100 * MiB and o.used == used and o.free == 100 * MiB - used
    author = os.urandom(32)
    x, y, z = (os.urandom(32) for _ in range(3))
    assert await r._accept(x, 60 * MiB, author) == ("queued", "")
    assert (await r.offer()).free == 40 * MiB - used           # the promise counts
    state, why = await r._accept(y, 60 * MiB, author)
    assert state == "refused" and "over quota" in why and human(60 * MiB) in why, why
    assert await r._accept(x, 60 * MiB, author) == ("queued", "")   # asked again: same
    assert await r._status(x) == ("queued", "")
    assert await r._status(y) == ("unknown", "")
    assert await r._accept(z, 40 * MiB - used, author) == ("queued", "")   # exactly fits
    assert r.counters["accepted"] == 2 and r.counters["refused_quota"] == 1
    r.close()
    with ReplicaState(d.data_dir) as st:                       # durable: a restart sees it
        assert [(i.manifest, i.state) for i in st.incoming()] == [(x, "queued"),
                                                                  (z, "queued")]


async def test_one_member_cannot_fill_the_queue(tmp_path, monkeypatch):
    """A member asking for many copies (real or bogus manifests) gets at most
    MAX_QUEUED_PER_AUTHOR of them queued at once; others still get theirs."""
    from hypersdk.node.replicas import holder as service
    monkeypatch.setattr(service, "MAX_QUEUED_PER_AUTHOR", 3)
    monkeypatch.setattr(service, "MAX_QUEUED", 5)
    d = Daemon(tmp_path / "h", Identity.generate(), quota=1 << 40)
    r = d.replicas
    a, b, c = (os.urandom(32) for _ in range(3))
    got = [await r._accept(os.urandom(32), 10, a) for _ in range(4)]
    assert [g[0] for g in got] == ["queued"] * 3 + ["refused"]
    assert "queue full" in got[3][1]
    assert (await r._accept(os.urandom(32), 10, b))[0] == "queued"
    assert (await r._accept(os.urandom(32), 10, b))[0] == "queued"
    state, why = await r._accept(os.urandom(32), 10, c)          # 5 in all: full
    assert state == "refused" and "5 in all" in why
    r.close()


async def test_a_copy_larger_than_its_author_said_is_cut_off_and_not_retried(tmp_path):
    """The holder admits a copy on the size its author states; the download stops as
    soon as it knows the copy needs more (a lying or broken author cannot fill the
    quota), the copy is failed with the reason and never retried. The network fetch
    is stood in for by one that reports progress and then waits for bytes forever."""
    import trio

    from hypersdk.node.exchange.swarm import DownloadProgress
    d = Daemon(tmp_path / "h", Identity.generate(), quota=1 << 30)
    r = d.replicas
    mid, author = os.urandom(32), os.urandom(32)
    assert await r._accept(mid, 10 * MiB, author) == ("queued", "")
    calls = []

    class Network:
        async def fetch(self, ref, events, *, pace=None, on_progress=None):
            calls.append(ref)
            on_progress(DownloadProgress("lists", 0, 1, 0, 1 << 40, {}, (), 0))
            on_progress(DownloadProgress("chunks", 0, 99, 0, 11 * MiB, {}, (), 0))
            await trio.sleep_forever()          # cancelled by the size check
    d.replication = Network()
    with trio.fail_after(5):
        await r.fetch_due()
    (item,) = await r._db(ReplicaState.incoming, mid)
    assert item.state == "failed" and "more than the" in item.reason and human(11 * MiB) in item.reason
    with trio.fail_after(5):
        await r.fetch_due()                     # failed: not due again
    assert calls == [mid.hex()] and r.counters["fetch_failures"] == 1
    r.close()


async def test_a_copy_fetched_then_deleted_here_is_queued_again_when_asked(tmp_path):
    """Our queue says "held" but the catalog row is gone (the operator deleted it):
    status says "unknown", and a new request queues it again (it used to answer
    "queued" and leave the row "held", never fetched)."""
    d = Daemon(tmp_path / "h", Identity.generate(), quota=1 << 30)
    r = d.replicas
    mid, author = os.urandom(32), os.urandom(32)
    assert await r._accept(mid, MiB, author) == ("queued", "")
    await r._db(ReplicaState.set_incoming, mid, "held")
    assert await r._status(mid) == ("unknown", "")
    assert await r._accept(mid, MiB, author) == ("queued", "")
    assert [i.state for i in await r._db(ReplicaState.incoming, mid)] == ["queued"]
    r.close()
