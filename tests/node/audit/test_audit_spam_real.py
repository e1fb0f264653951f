"""Audit gossip spam (issue 17, attack 6) against a real `hypersdk node run`.

The measured attack: one peer pushed 2,000 valid entries of 2,000 throwaway
author keys (each entry about 15 KiB) in 10.5 s and the victim's audit database
grew 35 MiB. The victim here runs in no network, so nothing vets authors: the
new-author limit (node/audit/limits.py) lets in at most its burst from that
peer, counts the rest in `status` audit.limited, and the database grows by a
bounded amount. (In a network, non-members' entries are dropped whatever their
number: tests/node/audit/test_audit_gossip_members.py.)
"""
from __future__ import annotations

import trio
from conftest import Cli
from test_audit_limits import T0, _push_all, body
from test_node_cli import nodes, status  # noqa: F401  (fixture)

from hypersdk.node.audit import limits as L
from hypersdk.node.kademlia.rpc import FrameReader
from hypersdk.node.net.gate import Gate
from hypersdk.node.net.identity import Identity
from hypersdk.node.net.p2p_transport import P2PTransport
from hypersdk.protocol import audit
from hypersdk.protocol import audit_gossip as msg

AUTHORS = 2000
MiB = 1 << 20


def db_bytes(data_dir) -> int:
    return sum(p.stat().st_size for p in data_dir.glob("audit.sqlite*"))


def big_entry(i: int) -> bytes:
    b = body(i)
    b["summary"] = {f"k{j}": "x" * 1000 for j in range(14)}       # ~15 KiB
    return audit.make_entry(Identity.generate(), 0, None, T0, "verify", b).raw


def test_throwaway_authors_cannot_grow_the_audit_database_unbounded(tmp_path, nodes):
    v = nodes(Cli(tmp_path / "v"))
    vid = bytes.fromhex(status(v.cli)["node_id"])
    before = db_bytes(v.cli.data_dir)
    raws = [big_entry(i) for i in range(AUTHORS)]
    acks = []

    async def attack():
        ident = Identity.generate()
        t = P2PTransport(ident, gate=Gate(tmp_path / "x", ident))
        async with trio.open_nursery() as n:
            await n.start(t.run)
            with trio.fail_after(120):
                for i, batch in enumerate(_push_all(raws)):
                    s = await t.open_stream(vid, v.addr, msg.PROTOCOL_ID)
                    await s.send_all(msg.encode_message(msg.Push(i + 1, batch)))
                    acks.append(await FrameReader(s, msg.frame_decoder()).message())
                    await s.aclose()
            n.cancel_scope.cancel()

    trio.run(attack)
    assert len(acks) == len(_push_all(raws)) and all(isinstance(a, msg.Ack) for a in acks)
    doc = status(v.cli)["audit"]
    limited = doc["limited"]["new_authors"] + doc["limited"]["peer_bytes"] \
        + doc["limited"]["peer_entries"]
    stored = doc["entries_added"]
    grew = db_bytes(v.cli.data_dir) - before
    print(f"\nstored {stored} of {AUTHORS}; limited {doc['limited']}; db grew {grew / MiB:.1f} MiB")
    assert stored + limited >= AUTHORS - 1 and doc["limited"]["new_authors"] > 0
    assert stored <= L.NEW_AUTHOR_BURST + 120 * L.NEW_AUTHOR_RATE
    assert grew < 12 * MiB                                   # was 35 MiB (WAL included)
