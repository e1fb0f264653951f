"""Choosing the holders of a backup's copies (pure: no I/O, no clock).

Rules, in order (issue 20; IPFS Cluster's allocators and Tahoe's "servers of
happiness" for the idea, our own rules):
  1. never the author's own site; a site that already holds (or is being asked
     for) a copy only when no other site is left: r copies on r distinct other
     sites when there are r, so losing any one site loses at most one copy;
  2. only candidates whose offer says they can take the backup (free >= size);
  3. one node per site: the one nearest the manifest id in the DHT key space (XOR),
     so different authors spread their backups over a site's nodes, and a lookup
     for the manifest finds its holders;
  4. sites in the order of that nearest node's distance.
Fewer eligible sites than wanted (a site was lost, or the network has few): the
remaining copies go to more nodes of the other sites, nearest first, never the
author's site and never a node that holds or was asked already; so losing one
site of three still leaves two copies away from the author. Fewer eligible nodes
than wanted: as many as there are (the backup then counts as under-replicated).
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
    unique = {}                          # one entry per node (the first offer)
    for c in candidates:
        unique.setdefault(c.node_id, c)
    eligible = sorted((c for c in unique.values() if c.site != author_site
                       and c.node_id not in excluded and c.free >= size),
                      key=lambda c: distance(c.node_id, manifest))
    best: dict[str, Candidate] = {}
    for c in eligible:                   # nearest first: the first seen per site wins
        if c.site not in blocked:
            best.setdefault(c.site, c)
    ranked = list(best.values())         # one per new site, nearest first
    if len(ranked) < need:               # then more nodes of the other sites
        chosen = {c.node_id for c in ranked}
        ranked += [c for c in eligible if c.node_id not in chosen]
    return ranked[:need]
