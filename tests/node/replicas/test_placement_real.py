"""Replication that places itself, between real `hypersdk node run` processes on
127.0.0.1 (issue 20): no `fetch` is ever typed.

Sites come from member certificates. A (site hq) backs up with replicas 2: one copy
lands on site b and one on site c, never on D (hq, the author's own site); A's log
signs a `replica` entry per confirmed holder; with A stopped, D restores the image
from the copies alone. A member whose quota cannot take a copy refuses it with the
reason. A backup made while no other site exists waits in the durable queue
(`status`), across a restart, and is placed once members on other sites appear.
Every wait is a bounded poll.
"""
from __future__ import annotations

import pytest
from conftest import Cli, realistic_image, same_bytes
from test_node_cli import nodes, poll  # noqa: F401  (fixture)

FAST = {"HYPERSDK_AUDIT_SYNC": "1"}
RUN = ("--replicas", "2", "--replicate-interval", "0.3")


def _network(tmp_path, nodes, *extra):
    a = nodes(Cli(tmp_path / "a"), *RUN, *extra, env=FAST)
    a.cli("network", "create", "--name", "acme", "--site", "hq")

    def member(name, site, *flags):
        tok = a.cli.json("invite", "--site", site)["token"]
        n = nodes(Cli(tmp_path / name), *RUN, *flags, env=FAST)
        n.cli.json("join", tok)
        return n
    return a, member


def _replication(n) -> dict:
    return n.cli.json("status")["replication"]


def _holders(a, mid: str) -> set[str]:
    return {e["body"]["holder"] for e in a.cli.json("audit", "log")
            if e["kind"] == "replica" and e["body"]["manifest"] == mid}


def test_a_backup_reaches_two_other_sites_by_itself(tmp_path, nodes):
    img = realistic_image(tmp_path / "disk.img", "64M", seed=7)
    a, member = _network(tmp_path, nodes)
    b1, b2, c, d = (member("b1", "b"), member("b2", "b"), member("c", "c"),
                    member("d", "hq"))
    ids = {n: n.cli.json("status")["node_id"] for n in (a, b1, b2, c, d)}
    site = {ids[b1]: "b", ids[b2]: "b", ids[c]: "c", ids[d]: "hq"}

    mid = a.cli.json("backup", img, "--name", "vm1")["manifest"]
    poll(lambda: len(_holders(a, mid)) == 2, 120, "two confirmed holders", interval=0.3)
    held = _holders(a, mid)
    assert {site[h] for h in held} == {"b", "c"}          # distinct sites, not hq
    rep = _replication(a)
    assert rep["queue"] == [] and rep["confirmed"] == 2, rep
    holders = [n for n in (b1, b2, c) if ids[n] in held]
    for n in holders:                                      # listed, like a fetched replica
        rows = n.cli.json("backups")
        assert [(r["manifest"], r.get("replica")) for r in rows] == [(mid, True)]
    assert d.cli.json("backups") == []                     # the author's site: no copy

    # D sees the network's backups from the gossiped logs: the name (D holds the
    # data key), the author, two copies; A's own holders check shows them healthy
    def seen_at_d():
        rows = d.cli.json("backups", "--network")
        return len(rows) == 1 and rows[0]["copies"] == 2 and rows[0]
    row = poll(seen_at_d, 60, "the backup and its copies at D", interval=0.3)
    assert (row["ref"], row["manifest"], row["author"]) == ("vm1@1", mid, ids[a])
    assert set(row["holders"]) == held and row["health"] == "ok", row
    assert "vm1@1" in d.cli("backups", "--network").stdout

    a.stop()
    out = tmp_path / "d.img"
    r = d.cli.json("restore", "vm1@1", out)                # by name, from any member
    assert same_bytes(img, out)
    assert set(r["fetched"]["bytes_by_peer"]) <= held and r["fetched"]["bad_chunks"] == 0


@pytest.mark.slow
def test_quota_refusals_and_an_offline_queue_that_survives_a_restart(tmp_path, nodes):
    """Two backups made while A is alone wait in its queue, across a restart. Then
    site b's only member, whose quota fits one copy and not two, takes the first and
    refuses the second with the reason (its offer was read before it promised the
    first); site c's member takes both."""
    imgs = [realistic_image(tmp_path / f"disk{i}.img", "64M", seed=8 + i) for i in (0, 1)]
    a, member = _network(tmp_path, nodes)
    mids = [a.cli.json("backup", img, "--name", f"vm2{'ab'[i]}")["manifest"]
            for i, img in enumerate(imgs)]
    rows = {r["manifest"]: r for r in a.cli.json("backups")}
    need = [rows[m]["size"] - rows[m]["zero_chunks"] * rows[m]["chunk_size"] for m in mids]

    def queued():
        q = _replication(a)["queue"]
        return [x["manifest"] for x in q if x["held"] == 0] == mids and q
    q = poll(queued, 60, "both backups in A's queue", interval=0.3)
    assert all(x["under_replicated"] and x["want"] == 2 for x in q)
    assert any("no member on another site" in w for w in q[0]["waiting"]), q

    a.stop()                       # the queue is derived from the durable catalog
    a = nodes(a.cli, *RUN, env=FAST)
    poll(queued, 60, "both backups in A's queue after a restart", interval=0.3)

    tight = member("tight", "b", "--quota", str(need[0] + need[1] - 1))
    roomy = member("roomy", "c")
    ids = {n: n.cli.json("status")["node_id"] for n in (tight, roomy)}

    def placed():
        h = [_holders(a, m) for m in mids]
        return sorted(map(sorted, h)) == sorted([sorted([ids[tight], ids[roomy]]),
                                                 [ids[roomy]]]) and h
    held = poll(placed, 120, "one backup on sites b and c, the other on c", interval=0.3)
    short = mids[held.index({ids[roomy]})]
    (q,) = _replication(a)["queue"]
    assert q["manifest"] == short and q["held"] == 1 and q["under_replicated"], q
    # tight refused it with the reason (asked in the pass that placed the other), or
    # its offer already showed it could not take it (it learnt of the two in turn)
    why = [r for r in q["refusals"] + q["waiting"] if ids[tight][:16] in r]
    assert why and all("over quota" in r or "can take" in r for r in why), q
    assert [r["manifest"] for r in tight.cli.json("backups")] == [
        m for m in mids if m != short]


HEALTH = ("--holder-check", "0.5", "--holder-grace", "3")


def _three_sites_placed(tmp_path, nodes, seed: int, name: str):
    """A (hq) and one member on each of sites b, c, d, checking holders every 0.5 s
    with a 3 s grace; A's backup NAME of a 64 MB image placed on two of them:
    (a, members by site, node ids by site, manifest)."""
    img = realistic_image(tmp_path / "disk.img", "64M", seed=seed)
    a, member = _network(tmp_path, nodes, *HEALTH)
    ms = {s: member(s, s, *HEALTH) for s in "bcd"}
    ids = {s: n.cli.json("status")["node_id"] for s, n in ms.items()}
    mid = a.cli.json("backup", img, "--name", name)["manifest"]
    poll(lambda: len(_holders(a, mid)) == 2, 120, "two confirmed holders", interval=0.3)
    return a, ms, ids, mid


def _flip_packs(data_dir) -> int:
    """Damage every stored chunk record of a node: a byte flipped every 4 KiB of each
    pack file past its header (the records are sealed: none opens any more)."""
    n = 0
    for p in sorted((data_dir / "packs").glob("pack-*.dat")):
        with open(p, "r+b") as f:
            data = bytearray(f.read())
            for at in range(64, len(data), 4096):
                data[at] ^= 0x5A
                n += 1
            f.seek(0)
            f.write(data)
    return n


@pytest.mark.slow
def test_a_lost_site_and_a_corrupt_holder_are_replaced(tmp_path, nodes):
    """Sites b, c, d, e hold copies; A keeps 2. The site of one holder goes away: once
    its grace is over A places the copy on another site, which pulls it from the swarm.
    Then a holder whose chunks rot fails its possession challenge and is replaced too.
    With A stopped, R (A's own site, never a holder) restores from the copies."""
    img = realistic_image(tmp_path / "disk.img", "64M", seed=9)
    health = ("--holder-check", "0.5", "--holder-grace", "3")
    a, member = _network(tmp_path, nodes, *health)
    ms = {s: member(s, s, *health) for s in "bcde"}
    r = member("r", "hq")
    ids = {n: n.cli.json("status")["node_id"] for n in (*ms.values(), r)}
    by_id = {ids[n]: n for n in ms.values()}
    mid = a.cli.json("backup", img, "--name", "vm3")["manifest"]
    poll(lambda: len(_holders(a, mid)) == 2, 120, "two confirmed holders", interval=0.3)
    first = sorted(_holders(a, mid))

    gone = by_id[first[0]]
    gone.kill()                                            # its site is lost

    def replaced(n_lost):
        rep = _replication(a)
        live = _live_holders(a, mid)
        return rep.get("lost", 0) >= n_lost and len(live) == 2 and rep["queue"] == [] and live
    live = poll(lambda: replaced(1), 180, "a replacement for the lost site", interval=0.5)
    assert first[0] not in live and first[1] in live
    third = (set(live) - {first[1]}).pop()
    assert by_id[third].cli.json("backups")[0]["manifest"] == mid

    assert _flip_packs(by_id[first[1]].cli.data_dir) > 0    # the survivor's chunks rot
    live = poll(lambda: replaced(2), 180, "a replacement for the corrupt holder",
                interval=0.5)
    assert first[1] not in live and third in live
    assert _replication(a)["lost"] >= 2

    a.stop()
    out = tmp_path / "r.img"
    got = r.cli.json("restore", mid, out)
    assert same_bytes(img, out)
    assert set(got["fetched"]["bytes_by_peer"]) <= set(live) | {first[1]}


def _live_holders(a, mid: str) -> list[str]:
    """The holders A counts now: its replica entries less the ones it lost."""
    rep = _replication(a)
    return sorted(h for h, state in rep.get("holders", {}).get(mid, {}).items()
                  if state == "held")


@pytest.mark.slow
def test_forget_at_the_author_releases_the_copies_everywhere(tmp_path, nodes):
    """A keeps two versions of vm4 on sites b and c; `forget --keep-last 1` at A
    signs a delete entry for the older one, gossip carries it to the holders, and
    each releases its copy (its own signed delete entry, chunks collected) while
    keeping the newer one. A delete entry signed by another member does not count."""
    imgs = [realistic_image(tmp_path / f"v{i}.img", "64M", seed=20 + i) for i in (1, 2)]
    a, member = _network(tmp_path, nodes)
    b, c = member("b", "b"), member("c", "c")
    mids = [a.cli.json("backup", img, "--name", "vm4")["manifest"] for img in imgs]
    poll(lambda: all(len(_holders(a, m)) == 2 for m in mids), 120, "both versions placed",
         interval=0.3)

    def held(n):
        return sorted(r["manifest"] for r in n.cli.json("backups"))
    assert held(b) == held(c) == sorted(mids)
    before = b.cli.json("store", "stats")["stored_bytes"]

    doc = a.cli.json("forget", "vm4", "--keep-last", "1")
    assert [x["manifest"] for x in doc["remove"]] == [mids[0]]
    for n in (b, c):
        poll(lambda n=n: held(n) == [mids[1]], 60, "the older copy released", interval=0.3)
    assert b.cli.json("store", "stats")["stored_bytes"] < before     # collected
    dels = [e for e in b.cli.json("audit", "log") if e["kind"] == "delete"]
    assert [e["body"]["manifest"] for e in dels] == [mids[0]]        # its own entry
    assert _replication(b)["released"] == 1
    # the newer copy stays, and A still counts both holders for it
    assert _replication(a)["queue"] == [] and len(_holders(a, mids[1])) == 2


def test_a_carbon_limit_holds_replication_and_the_repair_rate_is_bounded(tmp_path, nodes):
    """B pulls copies only while the carbon signal it reads is at most its limit, and
    then at most --replicate-rate bytes per second (with one second of burst)."""
    img = realistic_image(tmp_path / "disk.img", "64M", seed=30)
    signal = tmp_path / "carbon.json"
    signal.write_text('{"intensity": 300}')
    rate = 4 << 20
    a, member = _network(tmp_path, nodes, "--upload-limit", "64M")
    b = member("b", "b", "--carbon-signal", str(signal), "--carbon-max", "100",
               "--replicate-rate", str(rate))
    assert a.cli.json("status")["serving"]["upload_limit"] == 64 << 20
    mid = a.cli.json("backup", img, "--name", "vm5")["manifest"]

    def held_back():
        r = _replication(b)
        return r["accepted"] == 1 and not r["window_open"] and r
    r = poll(held_back, 60, "B accepting the copy but holding it back", interval=0.3)
    assert "carbon intensity 300 is above the limit 100" in r["window"]
    assert b.cli.json("backups") == [] and r.get("fetched", 0) == 0

    signal.write_text('{"intensity": 60}')                # the grid got greener
    poll(lambda: _holders(a, mid), 120, "the copy at B", interval=0.3)
    r = _replication(b)
    assert r["window_open"] and r["fetched"] == 1 and r["replicate_rate"] == rate
    assert r["fetched_bytes"] > 4 * rate                   # enough to measure the bound
    assert r["fetched_bytes"] <= rate * (r["fetch_seconds"] + 1) * 1.02, r


@pytest.mark.slow
def test_six_nodes_on_three_sites_lose_a_site_and_keep_two_copies(tmp_path, nodes):
    """The issue's scenario: two nodes at each of hq, b and c; a1 (hq) and b1 (b) each
    back up with replicas 2, and each backup reaches the two other sites by itself.
    Site c's nodes die: once their grace is over, every backup is back at 2 copies
    away from its author's site, on the live sites (both nodes of the one other site
    left), and restores byte-identical from them with its author stopped."""
    imgs = [realistic_image(tmp_path / f"d{i}.img", "64M", seed=40 + i) for i in (0, 1)]
    health = ("--holder-check", "0.5", "--holder-grace", "3")
    a1, member = _network(tmp_path, nodes, *health)
    a2 = member("a2", "hq", *health)
    b1, b2 = member("b1", "b", *health), member("b2", "b", *health)
    c1, c2 = member("c1", "c", *health), member("c2", "c", *health)
    ns = (a1, a2, b1, b2, c1, c2)
    ids = {n: n.cli.json("status")["node_id"] for n in ns}
    site = {ids[n]: s for n, s in zip(ns, ("hq", "hq", "b", "b", "c", "c"))}
    m_a = a1.cli.json("backup", imgs[0], "--name", "hq-db")["manifest"]
    m_b = b1.cli.json("backup", imgs[1], "--name", "b-web")["manifest"]
    poll(lambda: len(_holders(a1, m_a)) == 2 and len(_holders(b1, m_b)) == 2, 120,
         "both backups at two other sites", interval=0.3)
    assert sorted(site[h] for h in _holders(a1, m_a)) == ["b", "c"]
    assert sorted(site[h] for h in _holders(b1, m_b)) == ["c", "hq"]

    for n in (c1, c2):
        n.kill()                                        # site c is lost
    live = {ids[n] for n in (a1, a2, b1, b2)}

    def back_to_two(author, mid):
        h = _live_holders(author, mid)
        return len(h) == 2 and set(h) <= live and h
    got_a = poll(lambda: back_to_two(a1, m_a), 180, "hq-db back at 2 copies", interval=0.5)
    got_b = poll(lambda: back_to_two(b1, m_b), 180, "b-web back at 2 copies", interval=0.5)
    assert sorted(got_a) == sorted([ids[b1], ids[b2]])  # the one other live site, both nodes
    assert sorted(got_b) == sorted([ids[a1], ids[a2]])
    for author in (a1, b1):
        rep = _replication(author)
        assert rep["queue"] == [] and rep["lost"] >= 1, rep

    a1.stop()                                           # each restores without its author
    b1.stop()
    for who, mid, img in ((a2, m_a, imgs[0]), (b2, m_b, imgs[1])):
        out = tmp_path / f"{mid[:8]}.img"
        r = who.cli.json("restore", mid, out)
        assert same_bytes(img, out) and r["fetched"]["bad_chunks"] == 0


@pytest.mark.slow
def test_a_holder_that_comes_back_after_being_replaced_releases_its_copy(tmp_path, nodes):
    """B is unreachable past the grace: A replaces its copy on D. B comes back and
    proves its copy: A has its two copies already, so it asks B to release, and B
    drops it (its own signed delete entry): no copy is kept uncounted."""
    a, ms, ids, mid = _three_sites_placed(tmp_path, nodes, 50, "vm6")
    first = set(_live_holders(a, mid))
    away = next(s for s in "bcd" if ids[s] in first)
    ms[away].stop()
    poll(lambda: len(_live_holders(a, mid)) == 2 and ids[away] not in _live_holders(a, mid),
         180, "the copy replaced", interval=0.5)
    back = nodes(ms[away].cli, *RUN, *HEALTH, env=FAST)
    poll(lambda: _replication(a).get("surplus_released", 0) >= 1, 180,
         "the returned holder asked to release", interval=0.5)
    poll(lambda: back.cli.json("backups") == [], 60, "its copy dropped", interval=0.3)
    assert [e["body"]["manifest"] for e in back.cli.json("audit", "log")
            if e["kind"] == "delete"] == [mid]
    states = _replication(a)["holders"][mid]
    assert states[ids[away]] == "released" and sorted(
        h for h, s in states.items() if s == "held") == sorted(_live_holders(a, mid))


@pytest.mark.slow
def test_holders_repair_a_backup_while_its_author_is_away(tmp_path, nodes):
    """A's copies are on two of sites b, c, d. A goes offline, then one of its holders
    dies too. Past the grace the surviving holder (the live holder nearest the
    manifest) takes over: it places a copy on the third site and signs the replica
    entry. When A comes back it counts the new holder, whose copy it never asked for."""
    a, ms, ids, mid = _three_sites_placed(tmp_path, nodes, 60, "vm7")
    first = sorted(s for s in "bcd" if ids[s] in _holders(a, mid))
    spare = next(s for s in "bcd" if s not in first)
    a.stop()                                              # the author is away
    ms[first[1]].kill()                                   # and one of its holders dies
    keeper = ms[first[0]]

    def repaired():
        return ms[spare].cli.json("backups") and _replication(keeper)["coordinating"]
    poll(repaired, 180, "the surviving holder placing a new copy", interval=0.5)
    assert [c["manifest"] for c in _replication(keeper)["coordinating"]] == [mid]
    signed = [e["body"] for e in keeper.cli.json("audit", "log") if e["kind"] == "replica"]
    assert {"manifest": mid, "holder": ids[spare]} in signed

    a = nodes(a.cli, *RUN, *HEALTH, env=FAST)             # A is back: it counts the new copy
    poll(lambda: sorted(_live_holders(a, mid)) == sorted([ids[first[0]], ids[spare]]), 120,
         "A counting the holder placed in its absence", interval=0.5)
    assert _replication(a)["queue"] == []
    poll(lambda: _replication(keeper)["coordinating"] == [], 60, "the keeper standing down",
         interval=0.5)


@pytest.mark.slow
def test_a_revoked_holder_is_replaced(tmp_path, nodes):
    """A revokes one of its holders (`hypersdk revoke`): at its next check A counts
    that copy lost, because of the revocation, and places it on the third site."""
    a, ms, ids, mid = _three_sites_placed(tmp_path, nodes, 70, "vm8")
    first = sorted(s for s in "bcd" if ids[s] in _holders(a, mid))
    spare = next(s for s in "bcd" if s not in first)
    (key,) = [r["node"] for r in a.cli.json("members") if r["site"] == first[0]]
    a.cli("revoke", key)
    poll(lambda: sorted(_live_holders(a, mid)) == sorted([ids[first[1]], ids[spare]]), 120,
         "the revoked holder replaced", interval=0.5)
    states = _replication(a)
    assert states["holders"][mid][ids[first[0]]] == "lost"
    assert _replication(a)["queue"] == []
    # the reason is kept: status shows it while a backup waits, the state table always
    from hypersdk.node.replicas.state import ReplicaState
    with ReplicaState(a.cli.data_dir) as st:
        (h,) = [h for h in st.holders(bytes.fromhex(mid)) if h.holder.hex() == ids[first[0]]]
    assert "revoked" in h.reason, h
