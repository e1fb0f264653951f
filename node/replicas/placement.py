"""Choosing the holders of a backup's copies (pure: no I/O, no clock).

Rules, in order (issue 20; IPFS Cluster's allocators and Tahoe's "servers of
happiness" for the idea, our own rules):
  1. never the author's own site, never a site that already holds (or is being
     asked for) a copy: r copies on r distinct other sites, so losing any one site
     loses at most one copy;
  2. only candidates whose offer says they can take the backup (free >= size);
  3. one node per site: the one nearest the manifest id in the DHT key space (XOR),
     so different authors spread their backups over a site's nodes, and a lookup
     for the manifest finds its holders;
  4. sites in the order of that nearest node's distance.
Fewer eligible sites than wanted: as many as there are (the backup then counts
as under-replicated until more sites appear).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    node_id: bytes
    site: str
    free: int                      # bytes it says it can take (its offer)


def distance(a: bytes, b: bytes) -> int:
    return int.from_bytes(a, "big") ^ int.from_bytes(b, "big")


def choose(manifest: bytes, size: int, need: int, candidates, *, author_site: str,
           taken_sites=(), excluded=()) -> list[Candidate]:
    """At most `need` candidates to ask, by the rules above. taken_sites: sites that
    hold or are asked for a copy already; excluded: node ids not to ask (refused,
    failed, or replaced recently)."""
    if need <= 0:
        return []
    blocked = {author_site, *taken_sites}
    excluded = set(excluded)
    best: dict[str, Candidate] = {}
    for c in candidates:
        if c.site in blocked or c.node_id in excluded or c.free < size:
            continue
        have = best.get(c.site)
        if have is None or distance(c.node_id, manifest) < distance(have.node_id, manifest):
            best[c.site] = c
    ranked = sorted(best.values(), key=lambda c: distance(c.node_id, manifest))
    return ranked[:need]
