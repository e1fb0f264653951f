"""Replication on simnet: N nodes on S sites over D simulated days (virtual time).

    hypersdk simnet replication [--nodes 1000] [--sites 10] [--days 30] [--replicas 3]

What runs: the replication decisions of the node, unchanged: who holds a copy is
chosen by node/replicas/placement.py `choose` (site diversity, nearness to the
manifest id, free space), and a holder is declared lost by node/replicas/health.py
`judge` (unreachable longer than the grace after its last good check). Around them
this module models, in 10-minute steps of virtual time, what the daemon's I/O does:
offers (free space), pulls at the holder's --replicate-rate from whichever copies
are online (the author or a confirmed holder), confirmations at the author's next
pass, health checks every --holder-check. It does not run libp2p, stores or SQLite
(the real-process tests in tests/node/replicas do, and so does
simnet/replication_nodes.py, `simnet replication-nodes`: the whole daemon on
simnet, tens of nodes over days, where every step above is the node's own code): a
1,000-node month runs in seconds.

World: every node authors `backups` backups (sizes drawn from 1..max GiB) and
wants `replicas` copies on other sites. Churn: each day a fraction of the nodes
goes offline for a while (a duration drawn from 1 h..3 days), then returns with
everything it held; at `site_loss_day` every node of site 0 is lost for good. A
backup is lost when neither its author nor any holder of a whole copy survives.
Reported (JSON, PNG): backups lost, repair traffic per day (bytes pulled after the
initial placement), under-replicated backups over time (fewer confirmed copies on
nodes not lost for good than wanted) and backup-hours spent under-replicated, the
longest time a backup stayed under-replicated, and how long after the site loss
every backup was back at its count. Deterministic from the seed.

Repair is the author's; while an author is away longer than the grace, the live
holder nearest the manifest id does it (node/replicas/takeover.py), so the
backups of a lost site are repaired too. Churn longer than the grace costs a full
copy each time (the holder that comes back is counted again only while the backup
is short, else asked to release its copy).
"""
from __future__ import annotations

import heapq
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import blake3

from hypersdk.node.replicas.health import judge
from hypersdk.node.replicas.placement import Candidate, choose

GiB = 1 << 30
STEP = 600.0                                    # seconds of virtual time per step
DAY = 86400.0


@dataclass
class Config:
    nodes: int = 1000
    sites: int = 10
    days: int = 30
    replicas: int = 3
    backups: int = 1                            # per node
    max_gib: int = 50
    capacity_gib: int = 4096
    churn: float = 0.05                         # of the nodes, per day, go offline a while
    site_loss_day: float = 15.0
    replicate_rate: float = 50e6                # bytes/s a holder pulls at most
    health_interval: float = 3600.0
    grace: float = 4 * 3600.0
    seed: int = 1


@dataclass
class Backup:
    mid: bytes
    author: int
    size: int
    holders: dict = field(default_factory=dict)     # node -> "asked" | "held" | "lost"
    progress: dict = field(default_factory=dict)    # node -> bytes pulled so far
    checked: dict = field(default_factory=dict)     # node -> last good check (s)
    under_since: float | None = None


class World:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.ids = [blake3.blake3(f"node {cfg.seed} {i}".encode()).digest()
                    for i in range(cfg.nodes)]
        self.site = [f"site-{i % cfg.sites}" for i in range(cfg.nodes)]
        self.online = [True] * cfg.nodes
        self.dead = [False] * cfg.nodes
        self.offline_since = [0.0] * cfg.nodes
        self.used = [0] * cfg.nodes
        self.backups: list[Backup] = []
        for n in range(cfg.nodes):
            for k in range(cfg.backups):
                size = self.rng.randint(1, cfg.max_gib) * GiB
                mid = blake3.blake3(f"backup {cfg.seed} {n} {k}".encode()).digest()
                self.backups.append(Backup(mid, n, size))
                self.used[n] += size
        self.events: list = []                       # (time, seq, kind, node)
        self._seq = 0
        self.now = 0.0
        self.repair_bytes_by_day = [0] * cfg.days
        self.initial_bytes = 0
        self.under_series: list[tuple[float, int]] = []
        self.under_hours = 0.0
        self.longest_under = 0.0
        self.lost_holders = 0
        self.placements = 0
        self.readopted = 0
        self.released = 0
        self.coordinated = 0

    def _at(self, t: float, kind: str, node: int) -> None:
        self._seq += 1
        heapq.heappush(self.events, (t, self._seq, kind, node))

    def schedule_churn(self) -> None:
        cfg = self.cfg
        for day in range(cfg.days):
            for n in self.rng.sample(range(cfg.nodes), int(cfg.churn * cfg.nodes)):
                t = day * DAY + self.rng.random() * DAY
                self._at(t, "down", n)
                self._at(t + self.rng.uniform(3600, 3 * DAY), "up", n)
        for n in range(cfg.nodes):
            if self.site[n] == "site-0":
                self._at(cfg.site_loss_day * DAY, "lost", n)

    def _apply_events(self) -> None:
        while self.events and self.events[0][0] <= self.now:
            _, _, kind, n = heapq.heappop(self.events)
            if self.dead[n]:
                continue
            if kind == "down" and self.online[n]:
                self.online[n], self.offline_since[n] = False, self.now
            elif kind == "up":
                self.online[n] = True
            elif kind == "lost":
                self.online[n], self.dead[n] = False, True
                self.offline_since[n] = self.now

    def _sources(self, b: Backup) -> bool:
        return self.online[b.author] or any(self.online[h] for h, s in b.holders.items()
                                            if s == "held")

    def _pull(self, b: Backup) -> None:
        """Asked holders pull at their rate while some copy is online."""
        if not self._sources(b):
            return
        for h, s in b.holders.items():
            if s != "asked" or not self.online[h]:
                continue
            got = min(b.size - b.progress.get(h, 0), int(self.cfg.replicate_rate * STEP))
            b.progress[h] = b.progress.get(h, 0) + got
            day = min(int(self.now // DAY), self.cfg.days - 1)
            if self._initial:
                self.initial_bytes += got
            else:
                self.repair_bytes_by_day[day] += got

    def _author_pass(self, b: Backup, actor: int) -> None:
        """What the author's daemon does for one backup (node/replicas/service.py), or
        the coordinator's while the author is away (`actor`, a holder itself)."""
        cfg = self.cfg
        for h, s in list(b.holders.items()):
            if s == "asked" and self.online[h] and b.progress.get(h, 0) >= b.size:
                b.holders[h], b.checked[h] = "held", self.now       # confirmed
            elif s == "held":
                if self.online[h]:
                    if self.now - b.checked.get(h, 0) >= cfg.health_interval:
                        b.checked[h] = self.now                       # proved it
                    continue
                row = None                                            # unreachable
                why = judge(row, int(b.checked.get(h, 0) * 1e9), int(self.now * 1e9),
                            cfg.grace)
                if why is not None:
                    b.holders[h] = "lost"                     # it keeps the bytes
                    self.lost_holders += 1
            elif s == "asked" and self.dead[h]:
                b.holders[h] = "lost"
        live = [h for h, s in b.holders.items() if s in ("asked", "held")]
        for h, s in list(b.holders.items()):        # lost for being away, back now
            if s == "lost" and self.online[h] and b.progress.get(h, 0) >= b.size:
                if len(live) < cfg.replicas:
                    b.holders[h], b.checked[h] = "held", self.now       # counted again
                    live.append(h)
                    self.readopted += 1
                else:
                    b.holders[h] = "released"                         # asked to drop it
                    self.used[h] -= b.size
                    self.released += 1
        need = cfg.replicas - len(live)
        if need <= 0:
            return
        taken = {self.site[h] for h in live}
        cands = self._candidates(b, actor)
        for c in choose(b.mid, b.size, need, cands, author_site=self.site[b.author],
                        taken_sites=taken, excluded=set(self.ids[h] for h in b.holders)):
            h = self._index[c.node_id]
            b.holders[h] = "asked"
            self.used[h] += b.size
            self.placements += 1

    def _candidates(self, b: Backup, actor: int) -> list:
        """What the actor learns: online members with their sites and offers."""
        cap = self.cfg.capacity_gib * GiB
        return [Candidate(self.ids[n], self.site[n], cap - self.used[n])
                for n in range(self.cfg.nodes)
                if self.online[n] and n not in (b.author, actor)]

    def run(self, progress=None) -> dict:
        cfg = self.cfg
        self._index = {nid: i for i, nid in enumerate(self.ids)}
        self.schedule_churn()
        steps = int(cfg.days * DAY / STEP)
        lost_at_site_loss = None
        restored_after = None
        self._initial = True
        for step in range(steps):
            self.now = step * STEP
            self._apply_events()
            if self._initial and self.now >= DAY:
                self._initial = False                  # placement done: now it is repair
            under = 0
            for b in self.backups:
                if self.online[b.author]:
                    self._author_pass(b, b.author)
                elif self.now - self.offline_since[b.author] > cfg.grace:
                    # the author is away: the live holder nearest the manifest takes over
                    # (node/replicas/takeover.py)
                    live = [h for h, s in b.holders.items() if s == "held" and self.online[h]]
                    if live:
                        self.coordinated += 1
                        self._author_pass(b, min(live, key=lambda h: int.from_bytes(
                            self.ids[h], "big") ^ int.from_bytes(b.mid, "big")))
                self._pull(b)
                # copies that exist: confirmed, on a node not lost for good (a holder
                # offline for a while still has its copy; the author's view may lag)
                held = sum(1 for h, s in b.holders.items() if s == "held" and not self.dead[h])
                if held >= cfg.replicas or self._initial:
                    b.under_since = None
                    continue
                under += 1
                if b.under_since is None:
                    b.under_since = self.now
                self.longest_under = max(self.longest_under, self.now - b.under_since)
            if not self._initial:
                self.under_hours += under * STEP / 3600
            self.under_series.append((self.now / DAY, under))
            if self.now >= cfg.site_loss_day * DAY:
                if lost_at_site_loss is None:
                    lost_at_site_loss = self.now
                elif restored_after is None and under == self._orphans():
                    restored_after = self.now - lost_at_site_loss
            if progress and step % int(DAY / STEP) == 0:
                progress(f"day {int(self.now // DAY)}: {under} under-replicated")
        return self._report(restored_after)

    def _orphans(self) -> int:
        """Backups whose author is gone for good: nobody repairs them (module doc)."""
        return sum(1 for b in self.backups if self.dead[b.author]
                   and sum(1 for h, s in b.holders.items() if s == "held" and not self.dead[h])
                   < self.cfg.replicas)

    def _report(self, restored_after) -> dict:
        lost = [b for b in self.backups if self.dead[b.author]
                and not any(s == "held" and not self.dead[h] for h, s in b.holders.items())]
        site_bytes = sum(b.size for b in self.backups for h, s in b.holders.items()
                         if s in ("held", "lost") and self.dead[h] and not self.dead[b.author])
        return {"config": asdict(self.cfg), "backups": len(self.backups),
                "backups_lost": len(lost), "placements": self.placements,
                "holders_lost": self.lost_holders, "holders_readopted": self.readopted,
                "surplus_copies_released": self.released,
                "coordinated_backup_steps": self.coordinated,
                "initial_placement_bytes": self.initial_bytes,
                "repair_bytes_by_day": self.repair_bytes_by_day,
                "repair_bytes": sum(self.repair_bytes_by_day),
                "copies_lost_with_the_site_bytes": site_bytes,
                "under_replicated_backup_hours": round(self.under_hours, 1),
                "longest_under_replicated_h": round(self.longest_under / 3600, 2),
                "back_at_count_after_site_loss_h": (None if restored_after is None
                                                    else round(restored_after / 3600, 2)),
                "orphaned_under_replicated": self._orphans(),
                "under_replicated_series": self.under_series[:: int(3600 / STEP)]}


def run_replication(cfg: Config, progress=None) -> dict:
    t0 = time.perf_counter()
    r = World(cfg).run(progress)
    r["wall_seconds"] = round(time.perf_counter() - t0, 2)
    return r


def write(report: dict, out: Path) -> list[Path]:
    import json
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "replication.json"]
    files[0].write_text(json.dumps(report, indent=1) + "\n")
    series = report["under_replicated_series"]
    xs, ys = zip(*series) if series else ((), ())
    files.append(_plot(out / "repair_traffic_per_day.png", "bar",
                       range(len(report["repair_bytes_by_day"])),
                       [b / GiB for b in report["repair_bytes_by_day"]],
                       "repair traffic (GiB)", "bytes pulled to repair copies, per day"))
    files.append(_plot(out / "under_replicated.png", "plot", xs, ys,
                       "backups under-replicated",
                       "backups with fewer confirmed copies than wanted"))
    return files


def _plot(path: Path, kind: str, xs, ys, ylabel: str, title: str, xlabel: str = "day") -> Path:
    import matplotlib
    matplotlib.use("Agg")                   # files only, no display
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 3.5))
    getattr(ax, kind)(xs, ys)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def summary(r: dict) -> str:
    c = r["config"]
    return "\n".join([
        f"replication on simnet: {c['nodes']} nodes on {c['sites']} sites, {c['days']} days, "
        f"replicas {c['replicas']}, churn {c['churn']:.0%}/day, site-0 lost on day "
        f"{c['site_loss_day']:g}",
        f"backups           {r['backups']}; lost {r['backups_lost']}",
        f"placements        {r['placements']} ({r['holders_lost']} holders lost and replaced; "
        f"{r['holders_readopted']} came back and counted again, "
        f"{r['surplus_copies_released']} released as surplus)",
        f"repair traffic    {r['repair_bytes'] / GiB:,.0f} GiB in all, max "
        f"{max(r['repair_bytes_by_day']) / GiB:,.0f} GiB/day; copies lost with the site "
        f"{r['copies_lost_with_the_site_bytes'] / GiB:,.0f} GiB",
        f"under-replicated  {r['under_replicated_backup_hours']:,} backup-hours; longest "
        f"{r['longest_under_replicated_h']} h; back at count "
        f"{r['back_at_count_after_site_loss_h']} h after the site loss "
        f"({r['orphaned_under_replicated']} of the lost site's own backups still short)",
        f"wall              {r['wall_seconds']} s"])
