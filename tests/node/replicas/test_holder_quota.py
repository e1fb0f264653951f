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
