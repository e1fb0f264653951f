"""Audit log verification speed (issue 5 targets: >= 8,000 received entries/s per
core; full verification of a 100,000-entry log <= 15 s).

    .venv/bin/python bench/bench_audit.py [--entries 100000] [--received 20000]

1. received entries: decode_entry + LogView.append (signature, seq, prev) of
   signed entries as bytes, one thread; compared with the bare Ed25519 verify
   rate of `cryptography` on the same machine (the floor of any design);
   and the same entries through the node's gossip receive path,
   AuditLog.add_foreign in pushes of 64 (also the SQLite insert).
2. full log: AuditLog.verify() of a stored N-entry log in DATA/audit.sqlite
   (read every row, decode, check stored id, signature, links).
Prints one line per figure (--json for a document). No asserts: a benchmark.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hypersdk.node.audit.log import AuditLog  # noqa: E402
from hypersdk.node.net.identity import Identity  # noqa: E402
from hypersdk.protocol import audit  # noqa: E402

T0 = 1_700_000_000 * 10**9
KINDS = ("backup", "replica", "verify", "restore", "witness")


def make_log(ident: Identity, n: int) -> list[audit.Entry]:
    peer = Identity.generate()
    out, prev = [], None
    for s in range(n):
        k = KINDS[s % len(KINDS)]
        m = s.to_bytes(32, "big")
        body = {"backup": {"manifest": m, "name": f"vm-{s % 97}", "size": s << 20,
                           "chunks": s, "source": {"kind": "file", "path": f"/srv/vm{s}.img"}},
                "replica": {"manifest": m, "holder": peer.node_id},
                "verify": {"manifest": m, "holder": peer.node_id, "result": "ok",
                           "summary": {"chunks_checked": s, "challenges": 16}},
                "restore": {"manifest": m, "size": s, "chunks": s},
                "witness": {"heads": [[peer.public_key, s, m]] * 4}}[k]
        e = audit.make_entry(ident, s, prev, T0 + s, k, body)
        out.append(e)
        prev = e.id
    return out


def bench_ed25519(raws: list[audit.Entry]) -> float:
    key = audit._public_key(raws[0].author)
    msgs = [(e.sig, audit.SIG_DOMAIN + e.payload) for e in raws]
    t = time.perf_counter()
    for sig, msg in msgs:
        key.verify(sig, msg)
    return len(msgs) / (time.perf_counter() - t)


def bench_received(entries: list[audit.Entry]) -> float:
    raws = [e.raw for e in entries]
    author = entries[0].author
    t = time.perf_counter()
    view = audit.LogView(author, lookup=lambda s: None)
    for r in raws:
        view.append(audit.decode_entry(r, verify=False), now=T0 + 10**12)
    dt = time.perf_counter() - t
    assert view.next_seq == len(raws)
    return len(raws) / dt


def bench_stored(entries: list[audit.Entry], ident: Identity) -> float:
    """The node's gossip receive path: AuditLog.add_foreign in pushes of 64
    entries (decode, signature, seq, prev, witness index, SQLite insert)."""
    raws = [e.raw for e in entries]
    with tempfile.TemporaryDirectory() as d:
        with AuditLog(d, identity=Identity.generate()) as log:
            t = time.perf_counter()
            for i in range(0, len(raws), 64):
                res = log.add_foreign(raws[i:i + 64], now_ns=T0 + 10**12)
                assert res.added == len(raws[i:i + 64]), res.rejected
            return len(raws) / (time.perf_counter() - t)


def bench_full_log(entries: list[audit.Entry], ident: Identity) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as d:
        with AuditLog(d, identity=ident) as log:
            log.db.execute("BEGIN")
            for e in entries:
                log._insert(e)
            log.db.execute("COMMIT")
        with AuditLog(d, identity=ident) as log:          # fresh connection, cold cache
            t = time.perf_counter()
            rep = log.verify(ident.public_key)
            dt = time.perf_counter() - t
        assert rep.ok and rep.entries == len(entries), rep.problems
        return dt, os.path.getsize(os.path.join(d, "audit.sqlite"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--entries", type=int, default=100_000)
    ap.add_argument("--received", type=int, default=20_000)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    ident = Identity.generate()
    t = time.perf_counter()
    entries = make_log(ident, max(a.entries, a.received))
    sign_rate = len(entries) / (time.perf_counter() - t)
    sample = entries[:a.received]
    doc = {"ed25519_verify_per_s": round(bench_ed25519(sample)),
           "received_entries_per_s": round(bench_received(sample)),
           "received_and_stored_per_s": round(bench_stored(sample, ident)),
           "sign_and_encode_per_s": round(sign_rate),
           "entry_bytes_avg": round(sum(len(e.raw) for e in sample) / len(sample))}
    dt, size = bench_full_log(entries[:a.entries], ident)
    doc.update({"full_log_entries": a.entries, "full_log_verify_s": round(dt, 2),
                "full_log_entries_per_s": round(a.entries / dt), "db_bytes": size})
    if a.json:
        print(json.dumps(doc, indent=1))
        return
    print(f"ed25519 verify (cryptography)   {doc['ed25519_verify_per_s']:>8} /s")
    print(f"received entries verified       {doc['received_entries_per_s']:>8} /s per core "
          f"({doc['received_entries_per_s'] / doc['ed25519_verify_per_s']:.0%} of bare Ed25519; "
          f"target >= 8000)")
    print(f"received + stored (add_foreign) {doc['received_and_stored_per_s']:>8} /s per core "
          f"(pushes of 64, as gossip receives them)")
    print(f"entries signed + encoded        {doc['sign_and_encode_per_s']:>8} /s")
    print(f"full verify of {a.entries}-entry log {dt:8.2f} s "
          f"({doc['full_log_entries_per_s']}/s, target <= 15 s; db {size / 1e6:.1f} MB, "
          f"{doc['entry_bytes_avg']} B/entry)")


if __name__ == "__main__":
    main()
