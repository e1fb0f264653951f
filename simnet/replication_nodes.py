"""Replication on simnet with whole nodes: the daemon's own code on virtual time.

    hypersdk simnet replication --nodes 40 --sites 8 --hours 36   (the default mode)

Every node is a SimNode (simnet/node_host.py): the production Daemon services (the
DHT, chunk exchange, audit gossip, possession challenges, replication with its
placement, health checks, repair and takeover, certificate renewal) on a real data
dir, over SimNetwork (latency and per-node bandwidth from simnet/network.py), in one
trio.run under MockClock(autojump_threshold=0). Nothing of replication is modelled
here: this module only builds the network, makes the backups, takes nodes down and
up, and looks at the stores to see the truth.

Scenario:
1. Node 0 creates a network; every other node is enrolled with a certificate
   naming its site (node i on site i % sites), then all start and join.
2. Every node backs up its own image (random bytes, `image_kib`) with the daemon's
   `backup` command; replication places the copies by itself.
3. Churn: at random times (a Poisson process of `churn` x nodes per day), a node
   stops and comes back after a time drawn from 1 h to `max_down_h` hours, on the
   same data dir (its durable queue and holder table survive the restart).
4. At `site_loss_h` every node of site 0 stops for good.
5. At the end every backup whose author was lost is restored byte for byte on a
   surviving node that held no copy (the daemon's `restore`: a swarm fetch).

Measured every `sample_min` minutes, from the stores themselves (the truth, not
the nodes' own reports): for each backup, the nodes up that hold it whole (a
catalog row), and among them the sites other than its author's. Reported:
backups lost (no copy on any node that is not lost for good), under-replicated
backup-hours (fewer than `replicas` copies on distinct other sites among nodes not
lost for good, sampled), the longest such stretch, how long after the site loss
every backup was back at its count, and repair traffic (the bytes holders pulled
after the initial placement) per hour.
"""
from __future__ import annotations

import random
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import trio
import trio.testing

from hypersdk.node import runtime
from hypersdk.node.net import membership
from hypersdk.node.net.identity import Identity
from hypersdk.protocol import membership as ms
from hypersdk.simnet.network import NetworkModel
from hypersdk.simnet.node_host import SimNode, World
from hypersdk.simnet.transport import SimNetwork, seed_scheduler

T0_NS = 1_790_000_000 * 10**9          # the simulated epoch (Sept 2026)
HOUR = 3600.0


@dataclass
class Config:
    nodes: int = 40
    sites: int = 8
    hours: float = 36.0
    replicas: int = 2
    image_kib: int = 512
    chunk_kib: int = 64
    churn: float = 0.5                  # of the nodes per day stop for a while
    max_down_h: float = 8.0
    site_loss_h: float = 8.0
    grace_h: float = 4.0                # node run --holder-grace
    health_min: float = 60.0            # node run --holder-check
    replicate_interval: float = 300.0   # seconds between replication passes
    rate: float = 20e6                  # bytes/s each node's up- and downlink
    latency: float = 0.02               # one-way, s
    sample_min: float = 10.0
    seed: int = 1


def _addr(i: int, ident: Identity) -> str:
    return f"/ip4/10.{i // 250}.{i % 250}.1/tcp/4001/p2p/{ident.libp2p_peer_id}"


def enroll_all(root: Path, idents: list, sites: int) -> None:
    """Node i's data dir is root/n<i>, with its key in node.key as `hypersdk node run`
    keeps it. Node 0 creates the network; every other node is enrolled (an invitation
    redeemed at node 0, the answer kept by the joiner: node/net/membership.py)."""
    for i, ident in enumerate(idents):       # DATA/node.key: what every store op signs with
        (root / f"n{i}").mkdir(parents=True, exist_ok=True)
        ident.save(root / f"n{i}" / "node.key")
    admin = root / "n0"
    membership.create(admin, idents[0], name="sim", site="site0", now=T0_NS)
    net = membership.load(admin)
    for i in range(1, len(idents)):
        token = membership.invite(admin, site=f"site{i % sites}", roles=["member"],
                                  expires_in=3600 * 10**9, addrs=["/ip4/10.0.0.1/tcp/4001"],
                                  now=T0_NS)
        cert = membership.redeem(admin, token.secret, idents[i].public_key, now=T0_NS)
        membership.enroll(root / f"n{i}", token,
                          ms.JoinAnswer(cert.raw, net.public, (), net.name), idents[i],
                          now=T0_NS)


class Sim:
    def __init__(self, cfg: Config, root: Path, progress=None):
        self.cfg, self.root, self.progress = cfg, root, progress
        self.rng = random.Random(cfg.seed)
        self.idents = [Identity.from_private_bytes(self.rng.randbytes(32))
                       for _ in range(cfg.nodes)]
        self.addrs = [_addr(i, x) for i, x in enumerate(self.idents)]
        self.site = [f"site{i % cfg.sites}" for i in range(cfg.nodes)]
        self.nodes: dict[int, SimNode] = {}
        self.lost: set[int] = set()             # stopped for good (the lost site)
        self.images: dict[int, Path] = {}
        self.backups: dict[bytes, int] = {}     # manifest -> author
        self.samples: list[dict] = []
        self.under_since: dict[bytes, float] = {}
        self.longest_under = 0.0
        self.under_hours = 0.0
        self.restart_counts = 0
        self.fetched_before_loss = 0
        self.fetched: dict[int, int] = {}       # node -> fetched_bytes counter, all its runs
        self.lost_copies = 0                    # copies for others the lost site held

    # -- nodes -----------------------------------------------------------------
    def _make(self, i: int) -> SimNode:
        c = self.cfg
        boot = [self.addrs[j] for j in range(min(3, c.nodes)) if j != i]
        return SimNode(self.world, self.root / f"n{i}", self.idents[i], self.addrs[i],
                       bootstrap=boot, rng=random.Random(self.rng.getrandbits(64)),
                       k=8, replicas=c.replicas, replicate_interval=c.replicate_interval,
                       health_interval=c.health_min * 60, holder_grace=c.grace_h * HOUR,
                       audit_timing=dict(sync_interval=300.0, witness_interval=HOUR,
                                         own_poll=60.0))

    async def start(self, i: int) -> None:
        node = self._make(i)
        await self.nursery.start(node.run)
        self.nodes[i] = node

    def stop(self, i: int) -> None:
        node = self.nodes.pop(i, None)
        if node is not None:
            self.fetched[i] = self.fetched.get(i, 0) + node.replicas.counters["fetched_bytes"]
            node.stop()

    def fetched_total(self) -> int:
        return sum(self.fetched.values()) + sum(
            n.replicas.counters["fetched_bytes"] for n in self.nodes.values())

    # -- the truth ---------------------------------------------------------------
    def held(self) -> dict[int, set]:
        """node -> manifests it holds whole (its catalog), for every node not lost
        for good (a node down for churn keeps its store)."""
        return self.held_by(i for i in range(self.cfg.nodes) if i not in self.lost)

    def held_by(self, nodes) -> dict[int, set]:
        from hypersdk.node.store import catalog
        from hypersdk.node.store.store import ChunkStore
        out = {}
        for i in nodes:
            with ChunkStore(self.root / f"n{i}", readonly=True) as store:
                out[i] = {b.manifest_id for b in catalog.list_backups(store)}
        return out

    def sample(self, t: float) -> dict:
        held = self.held()
        under, copies = 0, []
        dt = self.cfg.sample_min * 60
        for mid, author in self.backups.items():
            sites = {self.site[i] for i, ms_ in held.items() if mid in ms_ and i != author}
            sites.discard(self.site[author])
            copies.append(len(sites))
            if len(sites) < self.cfg.replicas:
                under += 1
                self.under_hours += dt / HOUR
                since = self.under_since.setdefault(mid, t)
                self.longest_under = max(self.longest_under, t - since + dt)
            else:
                self.under_since.pop(mid, None)
        lost = sum(1 for mid in self.backups if not any(mid in s for s in held.values()))
        row = {"hour": round(t / HOUR, 3), "up": len(self.nodes), "under_replicated": under,
               "lost": lost, "min_copies": min(copies, default=0),
               "repair_bytes": self.fetched_total() - self.fetched_before_loss}
        self.samples.append(row)
        return row

    # -- the run -----------------------------------------------------------------
    async def _churn(self) -> None:
        c = self.cfg
        per_s = c.churn * c.nodes / 86400.0
        if per_s <= 0:
            return
        while True:
            await trio.sleep(self.rng.expovariate(per_s))
            live = sorted(i for i in self.nodes if i not in self.lost)
            if not live:
                continue
            i = self.rng.choice(live)
            down = self.rng.uniform(HOUR, c.max_down_h * HOUR)
            self.stop(i)
            self.nursery.start_soon(self._back, i, down)

    async def _back(self, i: int, down: float) -> None:
        await trio.sleep(down)
        if i not in self.lost and i not in self.nodes:
            await self.start(i)
            self.restart_counts += 1

    async def boot(self, nursery) -> None:
        """Start every node (one a second), let the joins settle."""
        self.world = World(SimNetwork(self._model(), fast_rpc=True))
        self.nursery = nursery
        await nursery.start(self.world.net.run)
        for i in range(self.cfg.nodes):
            await self.start(i)
            await trio.sleep(1.0)
        await trio.sleep(120.0)

    async def backup(self, i: int) -> bytes:
        """Node i backs up its image (the daemon's `backup` command); the manifest id."""
        self.images[i] = self._image(i)
        doc = await self.command(i, "backup", path=str(self.images[i]), name=f"vm{i}",
                                  chunk_size=self.cfg.chunk_kib << 10, zstd_level=3)
        mid = bytes.fromhex(doc["manifest"])
        self.backups[mid] = i
        return mid

    async def main(self) -> dict:
        c = self.cfg
        async with trio.open_nursery() as nursery:
            await self.boot(nursery)
            for i in range(c.nodes):
                await self.backup(i)
            t_start = trio.current_time()
            nursery.start_soon(self._churn)
            loss_at, back_at = t_start + c.site_loss_h * HOUR, None
            end = t_start + c.hours * HOUR
            while trio.current_time() < end:
                await trio.sleep(c.sample_min * 60)
                now = trio.current_time()
                if not self.lost and now >= loss_at:
                    self.fetched_before_loss = self.fetched_total()
                    self.lost = {i for i in range(c.nodes) if self.site[i] == "site0"}
                    held = self.held_by(self.lost)
                    self.lost_copies = sum(1 for i in self.lost for mid in held[i]
                                           if self.backups.get(mid, i) != i)
                    for i in sorted(self.lost):
                        self.stop(i)
                    loss_at = now
                row = self.sample(now - t_start)
                if self.lost and back_at is None and row["under_replicated"] == 0:
                    back_at = now - loss_at
                if self.progress:
                    self.progress(row)
            # the end: every node down for churn comes back; then the restores
            for i in range(c.nodes):
                if i not in self.lost and i not in self.nodes:
                    await self.start(i)
            await trio.sleep(c.replicate_interval * 2)
            restores = await self._restores()
            nursery.cancel_scope.cancel()
        return self._report(back_at, restores)

    def _model(self) -> NetworkModel:
        c = self.cfg
        model = NetworkModel({("r", "r"): 2 * c.latency},
                             rng=random.Random(self.rng.getrandbits(64)),
                             uplink=c.rate, downlink=c.rate)
        for a in self.addrs:
            model.set_region(a, "r")
        return model

    def _image(self, i: int) -> Path:
        path = self.root / f"image{i}.raw"
        path.write_bytes(random.Random(f"{self.cfg.seed}/{i}").randbytes(self.cfg.image_kib << 10))
        return path

    async def command(self, i: int, cmd: str, **args) -> dict:
        from hypersdk.node.daemon.daemon import COMMANDS
        node = self.nodes[i]
        reply = await COMMANDS[cmd](node, args, node.replicas.quiet)
        if not hasattr(reply, "code"):
            return reply
        if reply.code != 0:
            raise RuntimeError(f"{cmd} on node {i}: {reply.text}")
        return reply.doc

    async def _restores(self) -> dict:
        """Every backup of the lost site, restored on a surviving node without a copy."""
        held = self.held()
        ok = failed = 0
        errors = []
        for mid, author in sorted(self.backups.items(), key=lambda kv: kv[1]):
            if author not in self.lost:
                continue
            where = next((i for i in sorted(self.nodes) if mid not in held.get(i, ())), None)
            if where is None:
                continue
            out = self.root / f"restored-{author}.raw"
            try:
                await self.command(where, "restore", ref=mid.hex(), out=str(out), force=False,
                                    to_device=False, follow_symlink=False, umask=None)
                same = out.read_bytes() == self.images[author].read_bytes()
            except Exception as exc:                  # reported, not raised
                same = False
                errors.append(f"{mid.hex()[:16]}: {exc}")
            ok += same
            failed += not same
        return {"restored_identical": ok, "restore_failed": failed, "errors": errors[:10]}

    def _report(self, back_at, restores) -> dict:
        held = self.held()
        lost = sum(1 for mid in self.backups if not any(mid in s for s in held.values()))
        hourly = {}
        for s in self.samples:
            hourly[int(s["hour"])] = s["repair_bytes"]
        per_hour, prev = [], 0
        for h in sorted(hourly):
            per_hour.append(hourly[h] - prev)
            prev = hourly[h]
        return {"config": asdict(self.cfg), "backups": len(self.backups),
                "backups_lost": lost, "under_replicated_backup_hours": round(self.under_hours, 2),
                "longest_under_replicated_hours": round(self.longest_under / HOUR, 2),
                "back_at_count_after_site_loss_hours":
                    None if back_at is None else round(back_at / HOUR, 2),
                "repair_bytes": self.fetched_total() - self.fetched_before_loss,
                "lost_copies": self.lost_copies,
                "lost_bytes": self.lost_copies * (self.cfg.image_kib << 10),
                "restarts": self.restart_counts, **restores,
                "repair_bytes_per_hour": per_hour, "samples": self.samples}


def simulate(cfg: Config, root: Path, body, progress=None):
    """trio.run `await body(sim)` for a Sim of cfg (its nodes enrolled, data dirs
    under root) on virtual time; what body returns."""
    import logging
    logging.getLogger("hypersdk").setLevel(logging.ERROR)
    seed_scheduler(cfg.seed)
    clock = trio.testing.MockClock(autojump_threshold=0)
    sim = Sim(cfg, root, progress)
    enroll_all(root, sim.idents, cfg.sites)

    async def main():
        with runtime.simulated(clock, T0_NS):
            return await body(sim)
    return trio.run(main, clock=clock)


def run_nodes(cfg: Config, progress=None, root: Path | None = None) -> dict:
    """Run the scenario; the report (see the module docstring)."""
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="hsdk-simnodes-", dir=root) as tmp:
        report = simulate(cfg, Path(tmp), Sim.main, progress)
    report["wall_seconds"] = round(time.monotonic() - t0, 1)
    return report


def write(report: dict, out: Path) -> list[Path]:
    """The report as JSON and two plots (PNG): repair traffic per hour and backups
    under-replicated over time."""
    import json

    from hypersdk.simnet.replication_run import _plot
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "replication-nodes.json"]
    files[0].write_text(json.dumps(report, indent=1) + "\n")
    per_hour = report["repair_bytes_per_hour"]
    files.append(_plot(out / "repair_traffic_per_hour.png", "bar", range(len(per_hour)),
                       [b / (1 << 20) for b in per_hour], "repair traffic (MiB)",
                       "bytes pulled to repair copies, per hour", xlabel="hour"))
    xs = [s["hour"] for s in report["samples"]]
    files.append(_plot(out / "under_replicated.png", "plot", xs,
                       [s["under_replicated"] for s in report["samples"]],
                       "backups under-replicated",
                       "backups short of copies on other sites (from the stores)",
                       xlabel="hour"))
    return files


def summary(r: dict) -> str:
    c = r["config"]
    back = r["back_at_count_after_site_loss_hours"]
    return "\n".join([
        f"simnet replication, whole nodes: {c['nodes']} nodes on {c['sites']} sites, "
        f"{c['hours']:g} h, replicas {c['replicas']}, churn {c['churn']:g}/day, "
        f"site0 lost at {c['site_loss_h']:g} h",
        f"  backups lost: {r['backups_lost']} of {r['backups']}",
        f"  under-replicated: {r['under_replicated_backup_hours']} backup-hours, "
        f"longest {r['longest_under_replicated_hours']} h",
        "  back at count after the site loss: "
        + ("never within the run" if back is None else f"{back} h"),
        f"  repair traffic: {r['repair_bytes']:,} bytes "
        f"({r['repair_bytes'] / max(1, r['lost_bytes']):.2f}x the {r['lost_copies']} copies "
        "the lost site held for others)",
        f"  restored byte-identical: {r['restored_identical']}, failed: {r['restore_failed']}",
        f"  ({r['wall_seconds']} s of wall time, {r['restarts']} restarts)"])

