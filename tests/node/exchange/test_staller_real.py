"""A provider that accepts chunk requests and never answers (issue 17, attack 5),
between real `hypersdk node run` processes on 127.0.0.1.

S fetches three backups honestly and then serves as a staller (the test-only
switch HYPERSDK_TEST_STALL_SERVE=chunks in node/exchange/server.py: manifests and
Have answered, chunk requests accepted and never answered). The honest seeds A
and B serve at most 12 MiB/s each (HYPERSDK_TEST_SERVE_RATE), so a restore lasts
longer than the 2 s a silent peer is given, however fast the machine is. C
restores two backups: each complete and byte-identical, S delivered nothing,
and C's reputation counted S silent each time, the second of which banned it.
C's third restore does not contact S at all (banned peers are dropped from the
providers), C still bans S after a restart (the reputation is persisted), and
S, banned, is refused by C's exchange server. (The staller's cost in time:
bench/bench_staller.py, BENCHMARKS.md.)
"""
from __future__ import annotations

import pytest
from conftest import Cli, random_image, same_bytes
from test_node_cli import nodes, poll, status  # noqa: F401  (fixture)
from test_swarm_nodes import CS, _backup, _providers

CAP = {"HYPERSDK_TEST_SERVE_RATE": "12M"}


@pytest.mark.slow                             # ~35 s: three capped restores, five nodes
def test_a_staller_is_noticed_banned_remembered_and_refused(tmp_path, nodes):
    imgs = [random_image(tmp_path / f"img{i}", 40 << 20, seed=50 + i) for i in range(3)]
    a = nodes(Cli(tmp_path / "a"), env=CAP)
    b = nodes(Cli(tmp_path / "b"), "--bootstrap", a.addr, env=CAP)
    s = nodes(Cli(tmp_path / "s"), "--bootstrap", a.addr,
              env={"HYPERSDK_TEST_STALL_SERVE": "chunks"})
    c = nodes(Cli(tmp_path / "c"), "--bootstrap", a.addr)
    mids = [_backup(a, img) for img in imgs]
    for mid in mids:
        _providers(s, mid, 1)
        b.cli.json("fetch", mid)
        s.cli.json("fetch", mid)              # honest when it fetches, a staller when it serves
    sid = status(s.cli)["node_id"]
    for mid in mids:
        _providers(c, mid, 3)

    for i in (0, 1):                          # silent each time: -25, then -50 and a ban
        doc = c.cli.json("restore", mids[i], tmp_path / f"out{i}")
        assert same_bytes(imgs[i], tmp_path / f"out{i}")
        assert doc["fetched"]["bytes_by_peer"].get(sid, 0) == 0   # it delivered nothing
        rep = status(c.cli)["reputation"]
        assert rep["offences"].get("silent", 0) >= i + 1, rep
    assert sid in rep["banned"], rep

    doc = c.cli.json("restore", mids[2], tmp_path / "out2")
    assert same_bytes(imgs[2], tmp_path / "out2")
    assert sid in doc["fetched"]["banned"] and sid not in doc["fetched"]["bytes_by_peer"]
    assert status(c.cli)["reputation"]["offences"]["silent"] == rep["offences"]["silent"]

    assert c.stop() == 0
    c = nodes(c.cli, "--bootstrap", a.addr)
    assert sid in status(c.cli)["reputation"]["banned"]   # persisted across the restart

    # C's own backup, held by C alone: the banned staller is refused by C's exchange
    img = random_image(tmp_path / "img-c", 4 << 20, seed=60)
    mid = c.cli.json("backup", img, "--chunk-size", str(CS))["manifest"]
    _providers(s, mid, 1)
    p = s.cli("fetch", mid, ok=False)
    assert p.returncode != 0 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert status(c.cli)["serving"]["refused_banned"] >= 1
