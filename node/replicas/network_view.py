"""`hypersdk backups --network`: the network's backups as the gossiped audit logs
held here tell them, with their copies and health (issue 20, visibility).

From the signed entries only (no request to anybody):
    backup    a backup: author, manifest, name (sealed names opened with our data
              key, else shown sealed), size, chunk count, time; its version is its
              position among the author's backup entries of that name (what the
              author's catalog calls NAME@N: versions are numbered in creation
              order and keep their number)
    replica   who holds a copy: the holder's own entry (it fetched it) or the
              author's (it confirmed the holder); the author is not counted
    verify    the latest verdict on each holder, by any verifier
    delete    by the author: the backup is gone (listed only with --all);
              by a holder: that holder dropped its copy
Health: "ok" when no copy's latest check failed, "failing" when one failed
(damaged, missing, failed), "unreachable" when one did not answer, "no copy" with
no holder but the author, "deleted".
"""
from __future__ import annotations

from hypersdk.dht.keys import node_id
from hypersdk.protocol import audit

MAX_ROWS = 10_000


def network_backups(log, key=None, *, include_deleted: bool = False) -> list[dict]:
    rows: dict[bytes, dict] = {}
    versions: dict[tuple, int] = {}
    for (raw,) in log.db.execute("SELECT raw FROM entries WHERE kind='backup' "
                                 "ORDER BY author, seq LIMIT ?", (MAX_ROWS,)):
        e = audit.decode_entry(bytes(raw), verify=False)
        opened = audit.open_body(e.body, key)
        name = opened["name"] if opened else None
        n = versions[(e.author, name)] = versions.get((e.author, name), 0) + 1
        mid = e.body["manifest"]
        if mid in rows:
            rows[mid]["claimed_by"].append(node_id(e.author).hex())
            continue
        rows[mid] = {"manifest": mid.hex(), "author": node_id(e.author).hex(),
                     "name": name, "ref": f"{name}@{n}" if name else None,
                     "size": e.body["size"], "chunks": e.body["chunks"], "time_ns": e.time,
                     "claimed_by": [node_id(e.author).hex()], "holders": {},
                     "deleted": False, "_author": e.author}
    for (raw,) in log.db.execute("SELECT raw FROM entries WHERE kind IN ('replica', "
                                 "'delete', 'verify') ORDER BY time, author, seq"):
        e = audit.decode_entry(bytes(raw), verify=False)
        row = rows.get(e.body["manifest"])
        if row is None:
            continue
        who = node_id(e.author).hex()
        if e.kind == "replica":
            holder = e.body["holder"].hex()
            if holder != row["author"]:
                row["holders"].setdefault(holder, "unchecked")
        elif e.kind == "delete":
            if e.author == row["_author"]:
                row["deleted"] = True
            else:
                row["holders"].pop(who, None)
        elif e.body["holder"].hex() in row["holders"]:
            row["holders"][e.body["holder"].hex()] = e.body["result"]
    out = []
    for row in rows.values():
        del row["_author"]
        h = row["holders"]
        row["copies"] = len(h)
        row["health"] = ("deleted" if row["deleted"] else "no copy" if not h else
                         "failing" if any(v in ("failed", "damaged", "missing")
                                          for v in h.values()) else
                         "unreachable" if "unreachable" in h.values() else "ok")
        row["conflict"] = len(set(row["claimed_by"])) > 1
        if include_deleted or not row["deleted"]:
            out.append(row)
    return sorted(out, key=lambda r: (r["name"] is None, r["name"] or "", r["time_ns"]))


def text(rows: list[dict]) -> str:
    if not rows:
        return "no backups in the audit logs held here"
    from hypersdk.node.config import human
    lines = [f"{'REF':<28} {'MANIFEST':<16} {'AUTHOR':<16} {'SIZE':>10} COPIES  HEALTH"]
    for r in rows:
        ref = r["ref"] or "(name sealed)"
        lines.append(f"{ref:<28} {r['manifest'][:16]} {r['author'][:16]} "
                     f"{human(r['size']):>10} {r['copies']:>6}  {r['health']}"
                     + ("  CONFLICT: claimed by several authors" if r["conflict"] else ""))
    return "\n".join(lines)
