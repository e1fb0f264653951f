"""Health of the copies of our backups, and what makes a holder lost (issue 20).

Every `health_interval` seconds per confirmed holder, the author checks each backup
of its own that has confirmed holders, with the same machinery as `verify
--network` (node/service/net_verify.py): it finds the holders, challenges each
on a sample of the backup's chunks (possession proofs, protocol/possession.py),
and signs a `verify` entry per holder (an "ok" that repeats the last one is signed
at most once a day: hourly checks would grow every log by an entry per holder per
hour). A confirmed holder is then

    kept       it proved possession (its last good check is now), or it is
               unreachable for less than the grace period;
    lost       its membership is revoked or expired (the network says it is no
               longer one of us), it failed the challenge (damaged, missing or
               wrong chunks, or too slow to be holding them), or it has been
               unreachable for longer than `grace` since its last good check.

A lost holder no longer counts: the next placement pass (node/replicas/service.py)
asks a member on another site, which pulls the copy from whichever holders remain
(the swarm skips and scores down the ones that fail). The lost holder is never
asked to pull it again; if it was lost for being unreachable and comes back
proving its copy, it counts again while the backup is short of copies, and is
asked to release it otherwise (no copy is kept uncounted).
"""
from __future__ import annotations

import logging

from hypersdk.dht.keys import node_id
from hypersdk.node import runtime
from hypersdk.node.errors import UserError
from hypersdk.node.replicas.state import ReplicaState
from hypersdk.protocol.errors import ProtocolError

log = logging.getLogger(__name__)

HEALTH_INTERVAL = 3600.0        # seconds between checks of one holder
GRACE = 4 * 3600.0              # unreachable this long after its last good check: lost
FAILED = ("failed", "damaged", "missing")
QUIET_OK_S = 86400.0            # an unchanged "ok" verdict is signed again once a day


def membership_problem(gate, holder: bytes) -> str | None:
    """Why `holder` is no longer a member we trust, or None (in no network, or
    a holder whose certificate we never learnt: nothing to judge by)."""
    if gate is None or gate.network is None:
        return None
    for r in gate.revocations:
        if node_id(r.node) == holder:
            return "its membership was revoked"
    for key, _cert in list(gate.certs.items()):
        if node_id(key) == holder:
            return None if gate.author_ok(key) else "its membership expired"
    return None


def judge(row: dict | None, checked_ns: int, now_ns: int, grace_s: float) -> str | None:
    """Why a holder is lost after a check whose row (net_verify's, None: not in the
    result) says what it answered; None: it is kept."""
    result = row["result"] if row else "unreachable"
    if result == "ok":
        return None
    if result in FAILED:
        return f"failed a possession challenge ({result}: {row.get('reason', '')})".strip()
    if now_ns - checked_ns > grace_s * 1e9:
        return f"unreachable for more than {grace_s:.0f} s since its last good check"
    return None


async def check(replicas, *, interval_s: float, grace_s: float, clock=runtime.now_ns) -> int:
    """Check the holders of each backup we keep copies of, every interval_s (holders
    that count, and ones lost for being unreachable, which may be back); how many
    were lost."""
    d = replicas.d
    if d.audit is None or replicas._site() is None:
        return 0
    lost = 0
    backups = await replicas.managed()
    for mid, (name, _size, _site, ours) in backups.items():
        rows_now = await replicas._db(ReplicaState.holders, mid)
        held = [h for h in rows_now if h.state == "held"]
        away = [h for h in rows_now if h.state == "lost" and h.reason.startswith("unreachable")]
        now = clock()
        # a backup we coordinate for an away author: look at once to learn its holders
        first = not ours and not rows_now and mid not in replicas.looked
        if not first and not ((held or away) and
                              now - replicas.looked.get(mid, 0) >= interval_s * 1e9):
            continue
        replicas.looked[mid] = now
        try:
            doc, _, _ = await d.audit.verify(mid.hex(), replicas.quiet, quiet_ok_s=QUIET_OK_S)
        except (UserError, ProtocolError, OSError) as exc:
            log.info("replication health: %s: %s", mid.hex()[:16], exc)
            continue
        rows = {bytes.fromhex(r["node_id"]): r for r in doc.get("holders", [])}
        now = clock()
        await _adopt(replicas, mid, name, 0 if ours else 1, rows, now)
        for h in held:
            # we cannot blame a holder for the time we were down ourselves
            since = max(h.checked_ns, replicas.started_ns)
            why = membership_problem(d.gate, h.holder) or judge(rows.get(h.holder), since, now,
                                                               grace_s)
            if why is None:
                if rows.get(h.holder, {}).get("result") == "ok":
                    await replicas._db(ReplicaState.checked, mid, h.holder, now)
                continue
            lost += 1
            log.warning("replication: %s lost its copy of %s: %s", h.holder.hex()[:16],
                        mid.hex()[:16], why)
            await replicas._db(ReplicaState.set_holder, mid, h.holder, h.site, h.addr,
                               "lost", why)
    return lost


async def _adopt(replicas, mid: bytes, name: str, mine: int, rows: dict, now_ns: int) -> None:
    """Holders that just proved a copy we do not count: one we gave up for lost
    (unreachable) that came back, or one another node placed (a coordinator while
    we were away, or the author while we coordinated). Counted while the backup has
    fewer copies than it wants (no pull needed); asked to release it otherwise (no
    copy is kept uncounted; a holder honours that from its placer or the author).
    mine: 1 when we hold a copy ourselves (we coordinate), else 0."""
    from hypersdk.node.replicas.policy import Policy
    gate = replicas.d.gate
    own = replicas.d.identity.node_id
    table = {h.holder: h for h in await replicas._db(ReplicaState.holders, mid)}
    back = []
    for hid, row in rows.items():
        h = table.get(hid)
        if (row.get("result") != "ok" or row.get("claim") == "author" or hid == own
                or membership_problem(gate, hid) is not None):
            continue
        if h is None or (h.state == "lost" and h.reason.startswith("unreachable")):
            back.append((hid, h, row))
    if not back:
        return
    want = Policy.load(replicas.d.data_dir, replicas.default_replicas).rule(name).replicas
    # what surely counts now: copies being pulled, and held ones that just proved
    # theirs (a held holder that did not answer may be the one that is gone)
    live = mine + sum(1 for h in table.values() if h.state == "asked" or (
        h.state == "held" and (rows.get(h.holder) or {}).get("result") == "ok"))
    sites = {node_id(k): c.site for k, c in list(gate.certs.items())} if gate else {}
    for hid, h, row in back:
        site = h.site if h is not None else sites.get(hid, "")
        addr = h.addr if h is not None else (row.get("addr") or "")
        if live < want:
            live += 1
            await replicas._db(ReplicaState.set_holder, mid, hid, site, addr, "held",
                               "proved its copy")
            await replicas._db(ReplicaState.checked, mid, hid, now_ns)
            replicas.counters["readopted"] += 1
        elif await replicas.ask_release(mid, hid, addr):
            await replicas._db(ReplicaState.set_holder, mid, hid, site, addr, "released",
                               "a surplus copy, asked to release it")
            replicas.counters["surplus_released"] += 1
