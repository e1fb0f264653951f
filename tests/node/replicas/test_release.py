"""Which copies a holder releases (node/replicas/release.py releasable): only its
author's delete counts (and, for a placed copy, only the member that placed it),
an ambiguous manifest is kept, and orphans go only when the node does not keep them."""
from __future__ import annotations

from conftest import mixed_image

from hypersdk.dht.keys import node_id
from hypersdk.node.audit.log import AuditLog
from hypersdk.node.net.identity import Identity
from hypersdk.node.replicas.release import releasable
from hypersdk.node.service.backup import backup
from hypersdk.protocol import audit

DAY = 86400 * 10**9
T0 = 1_800_000_000 * 10**9


def _entries(who: Identity, bodies, t0=T0):
    out, prev = [], None
    for seq, (kind, body) in enumerate(bodies):
        e = audit.make_entry(who, seq, prev, t0 + seq, kind, body)
        out.append(e)
        prev = e.id
    return out


def test_only_the_authors_delete_releases_and_orphans_follow_the_policy(tmp_path, store):
    mid = backup(store, str(mixed_image(tmp_path / "x.img", 3 << 16, chunk=1 << 16)),
                 name="theirs", chunk_size=1 << 16).manifest_id
    with store.db:                              # a copy held for another member
        store.db.execute("""UPDATE backups SET stats='{"replica": true}'""")
    author, other = Identity.generate(), Identity.generate()
    made = ("backup", {"manifest": mid, "name": "theirs", "size": 3 << 16, "chunks": 3,
                       "source": {}})
    gone = ("delete", {"manifest": mid, "name": "theirs", "version": 1})
    kw = dict(now_ns=T0 + DAY, orphan_after_s=30 * 86400, keep_orphans=False)
    with AuditLog(None, identity=Identity.generate()) as log:
        assert releasable(store, log, {}, **kw) == []            # nobody claims it yet
        log.add_foreign(_entries(author, [made]), now_ns=T0)
        log.add_foreign(_entries(other, [("restore", {"manifest": mid, "size": 1,
                                                      "chunks": 1}), gone]), now_ns=T0)
        assert releasable(store, log, {}, **kw) == []            # another member's delete
        log.add_foreign(_entries(author, [made, gone])[1:], now_ns=T0)
        placed_by_other = {mid: node_id(other.public_key)}
        assert releasable(store, log, placed_by_other, **kw) == []
        ((b, why),) = releasable(store, log, {mid: node_id(author.public_key)}, **kw)
        assert b.manifest_id == mid and "deleted" in why

    with AuditLog(None, identity=Identity.generate()) as log:    # the author falls silent
        log.add_foreign(_entries(author, [made]), now_ns=T0)
        assert releasable(store, log, {}, **kw) == []            # a day: not an orphan
        late = dict(kw, now_ns=T0 + 31 * DAY)
        ((b, why),) = releasable(store, log, {}, **late)
        assert "orphaned" in why and "31 days" in why
        assert releasable(store, log, {}, **dict(late, keep_orphans=True)) == []
        # a second author claiming the same manifest: ambiguous, kept
        log.add_foreign(_entries(other, [made]), now_ns=T0)
        assert releasable(store, log, {}, **late) == []


def test_health_checks_sign_an_unchanged_ok_once_a_day(tmp_path):
    """net_verify's _record with quiet_ok_s: a repeated "ok" is not signed again within
    the quiet time; a failure, a change, or an old "ok" is."""
    from types import SimpleNamespace

    from hypersdk.node.audit.possession import HolderResult
    from hypersdk.node.service.net_verify import AuditNet
    ident = Identity.generate()
    net = AuditNet(SimpleNamespace(data_dir=tmp_path, identity=ident))
    mid, h1, h2 = b"\1" * 32, b"\2" * 32, b"\3" * 32

    def res(holder, result):
        return HolderResult(holder, mid, result, asked=1, proven=1 if result == "ok" else 0)

    def verdicts():
        with AuditLog(tmp_path, identity=ident) as lg:
            return [(e.body["holder"], e.body["result"]) for e in lg.entries(lg.own_author)
                    if e.kind == "verify"]
    net._record(mid, [res(h1, "ok"), res(h2, "ok")], 86400)
    net._record(mid, [res(h1, "ok"), res(h2, "failed")], 86400)    # h1 unchanged: quiet
    net._record(mid, [res(h1, "ok"), res(h2, "ok")], 86400)        # h2 changed back
    net._record(mid, [res(h1, "ok")], 0)                           # quiet time over
    net._record(mid, [res(h1, "ok")], None)                        # verify --network: always
    assert verdicts() == [(h1, "ok"), (h2, "ok"), (h2, "failed"), (h2, "ok"), (h1, "ok"),
                          (h1, "ok")]
