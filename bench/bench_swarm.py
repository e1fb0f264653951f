#!/usr/bin/env python3
"""Swarm restore and raw chunk transfer between real `hypersdk node run` processes on
127.0.0.1, side by side with libtorrent in the same run. Measures, does not assert.

    .venv/bin/python bench/bench_swarm.py swarm      # 4 seeds -> 1, 2 GiB v1 image
    .venv/bin/python bench/bench_swarm.py raw        # 1 seed -> 1, incompressible chunks
    .venv/bin/python bench/bench_swarm.py both
    .venv/bin/python bench/bench_swarm.py swarm --network   # all nodes members, sealed
    .venv/bin/python bench/bench_swarm.py prepare [--network]   # build the seed cache only
    options: --seeds 4 --raw-mib 512 --no-anchor --keep --fragment --runs N
             --hypersdk EXE --rebuild

swarm: 4 seed data dirs holding a backup of $BENCH_DATA/disk-v1.img (cached under
$BENCH_DATA/repos/swarm-seedN, rebuilt when the image's mtime changes: one backup into
seed0, then copies of its data dir with a fresh `node init` identity each). The seeds
run `hypersdk node run` (seed0 is the bootstrap of the others; each starts with only
its own audit log, see start_swarm), each provides the
manifest id (`hypersdk dht provide`), then a fresh leecher node starts and
`hypersdk restore MANIFEST OUT --json` runs against it; the wall time is from that
command's start to its exit (it includes the fetch from the swarm and writing the
2 GiB image). OUT's sha256 is compared with the image's; the leecher's peak RSS is
the node process's VmHWM (/proc/PID/status, read just before it is stopped).
Then the anchor: `swarm_libtorrent.py swarm --seeds N --runs 1 --profile hp`.

raw: seed0 holds a backup of an image of --raw-mib MiB of random (incompressible)
data, 1 MiB chunks; a fresh node runs `hypersdk fetch` (no image written). MB/s is
chunk bytes / the fetch's wall time. The anchor is the libtorrent 1-seed swarm of
the 2 GiB image (pieces of 1 MiB; the loopback copy ceiling of
`swarm_libtorrent.py plain` is printed too).

--network (issue 16: membership and encryption at rest): the same swarm restore,
but every node is a member of one network and holds its data key. seed0's data
dir gets `hypersdk network create` (which makes the data key) BEFORE its backup,
so the backup is sealed with keyed chunk ids when the store seals; the other seeds
(copies of seed0's data dir without DATA/network/, a fresh `node init` identity
each) and each run's leecher get their own member certificate, enrolled offline
with seed0's network key (membership.invite + redeem_invitation + enroll, the
data key installed as a join that shares it would), so no node carries seed0's
member.cert. Every libp2p connection then runs the membership proof after Noise
(node/net/gate.py). The seed cache is $BENCH_DATA/repos/swarm-net-seedN, built by
the same rules as the plain one. The result records how much of seed0's store
and of the leecher's is sealed (chunks with the SEALED flag, manifests with a
key): a warning if nothing is (a store that does not seal yet, or a cache built
before it did: --rebuild).

--hypersdk EXE runs another build's `hypersdk` (another checkout's venv; its
Python, from EXE's #! line, runs the offline enrollment and --profile). Its seed
caches are its own (repos/swarm-<8 hex of EXE's path>-seedN), so two builds never
share a store made by either. bench/ab_swarm.py alternates two builds run by run.

Every swarm run fails loudly (exit status 1, the restored image kept) when the
restored image is not byte-identical to the source.

libtorrent: the anchor runs under a Python that can `import libtorrent`: this
script tries $LT_PYTHON, /usr/bin/python3, then this venv's python, and if none has
it runs `python -m pip install libtorrent` into this venv once (pip libtorrent 2.1.1;
also /work/shared/bench/setup_anchors.sh). MB = 10**6 bytes.

Memory state: both sides' times depend on the machine's memory state (libtorrent
2.3-2.8 s with the free memory in large blocks, 4.2-6.2 s with it fragmented, 3.1-4.2
s after a test-suite run; bench/memory_state.py, BENCHMARKS.md). Each result records
free_in_2MiB_blocks_pct, read just before that side starts. --fragment runs everything
while bench/memory_state.py holds the free memory fragmented, so that state can be
measured side by side on demand.

Profiling (bench-only): HYPERSDK_PROFILE=DIR in the environment of the nodes makes
bench/_prof_node.py run them under cProfile (see --profile).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from memory_state import Fragmented, free_memory_state

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "bench"
DATA = Path(os.environ.get("BENCH_DATA", "/tmp/bench-data"))
IMG = DATA / "disk-v1.img"
PY = Path(sys.executable)
DEFAULT_HYPERSDK = PY.parent / "hypersdk"
HYPERSDK = DEFAULT_HYPERSDK          # --hypersdk
NODE_PY = PY                         # the Python of HYPERSDK's build
MiB = 1 << 20


def use_build(exe: Path):
    """Run the nodes and commands with `exe` (a venv's bin/hypersdk), and that
    build's Python (its #! line; else the python next to it) for what runs in-process."""
    global HYPERSDK, NODE_PY
    exe = Path(exe).absolute()
    if not os.access(exe, os.X_OK):
        raise SystemExit(f"--hypersdk {exe}: not an executable")
    HYPERSDK, NODE_PY = exe, exe.parent / "python"
    with open(exe, "rb") as f:
        first = f.readline(4096)
    if first.startswith(b"#!"):
        interp = first[2:].decode(errors="replace").split()
        if interp and Path(interp[0]).name.startswith("python") and Path(interp[0]).exists():
            NODE_PY = Path(interp[0])


def build_tag(base: str) -> str:
    """The seed-cache tag of this build: `base` for this venv's hypersdk, else
    base-<8 hex of the executable's path>."""
    if HYPERSDK.resolve() == DEFAULT_HYPERSDK.resolve():
        return base
    return f"{base}-{hashlib.sha256(str(HYPERSDK.resolve()).encode()).hexdigest()[:8]}"


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def env_for(data_dir: Path, **extra) -> dict:
    env = dict(os.environ, HYPERSDK_DATA_DIR=str(data_dir))
    env.pop("HYPERSDK_DEBUG", None)
    env.update(extra)
    return env


def hs(data_dir: Path, *args, timeout=900, check=True) -> subprocess.CompletedProcess:
    p = subprocess.run([str(HYPERSDK), *map(str, args)], capture_output=True, text=True,
                       env=env_for(data_dir), timeout=timeout)
    if check and p.returncode != 0:
        raise SystemExit(f"hypersdk {args} failed ({p.returncode}): {p.stderr}")
    return p


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(8 * MiB)
            if not b:
                return h.hexdigest()
            h.update(b)


def loadavg() -> str:
    return " ".join(open("/proc/loadavg").read().split()[:3])


class NodeProc:
    def __init__(self, data_dir: Path, bootstrap: str | None = None, profile: bool = False):
        self.data_dir = data_dir
        for f in ("node.addrs",):
            (data_dir / f).unlink(missing_ok=True)
        argv = [str(HYPERSDK), "node", "run", "--listen", "/ip4/127.0.0.1/tcp/0"]
        if profile:
            argv = [str(NODE_PY), str(REPO / "bench" / "_prof_node.py"), *argv[1:]]
        if bootstrap:
            argv += ["--bootstrap", bootstrap]
        self.proc = subprocess.Popen(argv, env=env_for(data_dir), stdout=subprocess.DEVNULL,
                                     stderr=open(data_dir / "bench-node.log", "w"))
        deadline = time.monotonic() + 60
        af = data_dir / "node.addrs"
        while not (af.exists() and af.read_text().strip()):
            if self.proc.poll() is not None:
                raise SystemExit(f"node {data_dir} exited: "
                                 f"{(data_dir / 'bench-node.log').read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise SystemExit(f"node {data_dir} not ready")
            time.sleep(0.05)
        self.addr = af.read_text().split()[0]

    def cpu_s(self) -> float:
        """User + system CPU seconds of the node process (all its threads) so far."""
        f = open(f"/proc/{self.proc.pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")

    def hwm_mib(self) -> float:
        for line in open(f"/proc/{self.proc.pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def fresh_node_dir(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    hs(path, "node", "init")
    return path


def build_seeds(img: Path, n: int, tag: str, network: bool = False,
                rebuild: bool = False) -> tuple[list[Path], str]:
    """n seed data dirs holding a backup of img (cached by the image's mtime and the
    hypersdk executable). network: seed0 creates a network (and its data key) before
    the backup; the copies are enrolled as members of it (enroll_members)."""
    base = DATA / "repos"
    base.mkdir(parents=True, exist_ok=True)
    stamp = f"{img}:{img.stat().st_mtime_ns}:{img.stat().st_size}:{HYPERSDK.resolve()}"
    dirs = [base / f"{tag}-seed{i}" for i in range(n)]
    meta = base / f"{tag}-seeds.json"
    ok = not rebuild and meta.exists() and json.loads(meta.read_text()).get("stamp") == stamp
    if ok:
        doc = json.loads(meta.read_text())
        if (doc["n"] >= n and all(d.exists() for d in dirs)
                and doc.get("network", False) == network
                and all((d / "network" / "member.cert").exists() == network for d in dirs)):
            return dirs, doc["manifest"]
    log(f"building {n} seed dirs for {img}{' (network)' if network else ''} "
        f"with {HYPERSDK} ...")
    meta.unlink(missing_ok=True)
    d0 = fresh_node_dir(dirs[0])
    if network:
        hs(d0, "network", "create", "--name", "bench", "--site", "site-1", "--json")
    t = time.perf_counter()
    doc = json.loads(hs(d0, "backup", img, "--chunk-size", str(MiB), "--json").stdout)
    log(f"  backup into seed0: {time.perf_counter() - t:.1f} s")
    mid = doc["manifest"]
    for d in dirs[1:]:
        shutil.rmtree(d, ignore_errors=True)
        # no DATA/network/: a copy is not seed0 (its certificate, the network key);
        # it is enrolled below as a member of its own
        shutil.copytree(d0, d, symlinks=True,
                        ignore=shutil.ignore_patterns("node.key", "node.addrs", "*.sock",
                                                      "peers.json", "bench-node.log",
                                                      "network"))
        hs(d, "node", "init")                       # a new identity per copy
    if network:
        enroll_members(d0, dirs[1:])
    meta.write_text(json.dumps({"stamp": stamp, "n": n, "manifest": mid,
                                "network": network}))
    return dirs, mid


# Offline enrollment, run by the build's own Python: for each member dir, an
# invitation from the admin dir (the network key holder), its redemption for the
# member's node key, and enroll() with the answer a join would bring (the data key
# shared); then the data key installed, as node/service/enroll.py does after a join.
ENROLL = r"""
import sys, time
from hypersdk.node.audit.log import own_identity
from hypersdk.node.net import datakey, membership
from hypersdk.protocol import membership as ms
admin, members = sys.argv[1], sys.argv[2:]
net = membership.load(admin)
dk = datakey.load(admin)
assert net is not None and dk is not None, "the admin dir has no network or no data key"
for d in members:
    ident = own_identity(d)
    now = time.time_ns()
    tok = membership.invite(admin, site="site-1", roles=["member"], expires_in=600 * 10**9,
                            addrs=["/ip4/127.0.0.1/tcp/1"], now=now, share_key=True)
    cert, share = membership.redeem_invitation(admin, tok.secret, ident.public_key, now=now)
    assert share
    membership.enroll(d, tok, ms.JoinAnswer(cert.raw, net.public, (), net.name, dk.secret),
                      ident, now=now)
    datakey.install(d, dk.secret)
    got = membership.load(d)
    assert got.id == net.id and got.cert.node == ident.public_key and not got.has_key
    print(d, got.cert.serial, datakey.load(d).fingerprint.hex()[:16])
"""


def enroll_members(admin: Path, members: list[Path]):
    """Members of admin's network with their own certificates and the data key."""
    p = subprocess.run([str(NODE_PY), "-c", ENROLL, str(admin), *map(str, members)],
                       capture_output=True, text=True, timeout=120)
    if p.returncode != 0:
        raise SystemExit(f"offline enrollment into {admin}'s network failed: {p.stderr}")
    for line in p.stdout.splitlines():
        log(f"  enrolled {line}")


def sealed_state(data_dir: Path) -> dict:
    """How much of data_dir's store is sealed: chunk records with the SEALED flag
    (node/store/packfile.py), manifests with a key fingerprint (catalog.py)."""
    import sqlite3
    if not (data_dir / "index.sqlite").exists():
        return {"chunks": 0, "chunks_sealed": 0, "manifests": 0, "manifests_sealed": 0}
    db = sqlite3.connect(f"file:{data_dir / 'index.sqlite'}?mode=ro", uri=True)
    try:
        n, sealed = db.execute("SELECT count(*), coalesce(sum((codec & 64) != 0), 0) "
                               "FROM chunks").fetchone()
        try:
            m, mk = db.execute("SELECT count(*), count(key) FROM manifests").fetchone()
        except sqlite3.OperationalError:       # a store from before manifests.key
            m, mk = db.execute("SELECT count(*), 0 FROM manifests").fetchone()
    finally:
        db.close()
    return {"chunks": n, "chunks_sealed": sealed, "manifests": m, "manifests_sealed": mk}


def start_swarm(dirs: list[Path], mid: str, profile=False) -> list[NodeProc]:
    """Start the seeds, each with its own audit log only. The seed dirs are reused
    across runs, and each run's leecher gossips its replica and restore entries to
    them: after 30 runs a fresh leecher had 30 logs to pull (one libp2p stream per
    author) during its restore, which made that restore 0.1-0.2 s slower and the
    benchmark drift with its history. Removing audit.sqlite makes each seed
    re-create its log at start (reconcile(): one backup entry), so every run sees
    the 5-log network the benchmark describes. (DATA/network/seen.json, the members
    a node has checked, goes too for the same reason.)"""
    for d in dirs:
        for f in d.glob("audit.sqlite*"):
            f.unlink()
        (d / "network" / "seen.json").unlink(missing_ok=True)
    seeds = [NodeProc(dirs[0], profile=profile)]
    for d in dirs[1:]:
        seeds.append(NodeProc(d, seeds[0].addr, profile=profile))
    for s in seeds:
        hs(s.data_dir, "dht", "provide", mid, timeout=120)
    return seeds


def wait_providers(node_dir: Path, mid: str, want: int, limit=60.0):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        p = hs(node_dir, "dht", "find", mid, "--count", str(want), "--json", check=False)
        if p.returncode == 0 and len(json.loads(p.stdout)["providers"]) >= want:
            return
        time.sleep(0.2)
    raise SystemExit(f"leecher did not find {want} providers")


def read_into_cache(*paths: Path):
    """Read files into the page cache, as swarm_libtorrent.py does with the image
    its seeds serve before each run: both sides' seeds serve from memory."""
    for path in paths:
        with open(path, "rb") as f:
            while f.read(8 * MiB):
                pass


def seed_packs(dirs: list[Path]) -> list[Path]:
    return sorted(p for d in dirs for p in (d / "packs").glob("pack-*.dat"))


# -- libtorrent anchor ------------------------------------------------------------------

def lt_python() -> str:
    cands = [os.environ.get("LT_PYTHON"), "/usr/bin/python3", str(PY)]
    for c in cands:
        if c and subprocess.run([c, "-c", "import libtorrent"],
                                capture_output=True).returncode == 0:
            return c
    log("no python with libtorrent: pip install libtorrent into this venv")
    subprocess.run([str(PY), "-m", "pip", "install", "-q", "libtorrent"], check=True)
    return str(PY)


def run_libtorrent(seeds: int) -> dict:
    py = lt_python()
    mem = free_memory_state()
    p = subprocess.run([py, str(SHARED / "swarm_libtorrent.py"), "swarm", "--seeds",
                        str(seeds), "--runs", "1", "--profile", "hp"],
                       capture_output=True, text=True, timeout=1800)
    if p.returncode != 0:
        raise SystemExit(f"swarm_libtorrent.py failed: {p.stderr[-3000:]}")
    run = None
    for line in p.stderr.splitlines():
        line = line.strip()
        if line.startswith("{") and '"wall_s"' in line:
            run = json.loads(line)
    if run is None:
        raise SystemExit(f"no result from swarm_libtorrent.py: {p.stderr[-2000:]}")
    run["free_in_2MiB_blocks_pct"] = mem["free_in_2MiB_blocks_pct"]
    return run


# -- the two measurements ---------------------------------------------------------------

def run_restore(seeds_n: int, profile: bool, keep: bool, network: bool = False,
                rebuild: bool = False) -> dict:
    tag = build_tag("swarm-net" if network else "swarm")
    dirs, mid = build_seeds(IMG, seeds_n, tag, network, rebuild)
    leech_dir = fresh_node_dir(DATA / "repos" / f"{tag}-leech")
    if network:
        enroll_members(dirs[0], [leech_dir])
    seeds = start_swarm(dirs, mid, profile)
    leech = None
    out = DATA / "restore" / "bench-swarm-out.img"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    try:
        leech = NodeProc(leech_dir, seeds[0].addr, profile=profile)
        wait_providers(leech_dir, mid, seeds_n)
        read_into_cache(IMG, *seed_packs(dirs))
        os.sync()
        run = timed(leech, seeds, leech_dir, "restore", mid, out)
        # what each seed's serve budget did (builds with node/exchange/budget.py)
        run["serving"] = [json.loads(hs(d, "status", "--json").stdout).get("serving")
                          for d in dirs]
        log(f"seeds' serving: {run['serving']}")
        if network:     # the leecher is in the network, and admitted its peers as members
            gate = json.loads(hs(leech_dir, "status", "--json").stdout).get("membership", {})
            run["membership"] = {k: gate.get(k) for k in ("mode", "network", "admitted",
                                                          "counters")}
    finally:
        for n in [leech, *seeds]:
            if n is not None:
                n.stop()
    same = sha256(out) == sha256(IMG)
    if not same:
        raise SystemExit(f"RESTORE NOT IDENTICAL: {out} differs from {IMG} "
                         f"(kept, and the leecher's data dir {leech_dir})")
    if network and not (run["membership"]["network"] and run["membership"]["admitted"]):
        raise SystemExit(f"--network but the leecher's membership is {run['membership']}")
    sealing = {"seed0": sealed_state(dirs[0]), "leecher": sealed_state(leech_dir)}
    if network and not sealing["seed0"]["chunks_sealed"]:
        log(f"WARNING: --network but seed0's store has no sealed chunk ({dirs[0]}): this "
            "build does not seal yet, or the seed cache predates it (--rebuild)")
    if not keep:
        out.unlink(missing_ok=True)
        shutil.rmtree(leech_dir, ignore_errors=True)
    f = run.pop("doc").get("fetched", {})
    return {"wall_s": round(run["wall"], 2), "network": network, "hypersdk": str(HYPERSDK),
            "sealed": sealing, "membership": run.get("membership"),
            "MB_per_s": round(IMG.stat().st_size / run["wall"] / 1e6, 1),
            "image_bytes": IMG.stat().st_size,
            "identical": same, "leecher_rss_MiB": run["leecher_rss_MiB"],
            "fetch_s": f.get("seconds"), "bytes_fetched": f.get("bytes_fetched"),
            "chunks_fetched": f.get("chunks_fetched"), "bytes_by_peer": f.get("bytes_by_peer"),
            "duplicate_bytes": f.get("duplicate_bytes"), "load_before": run["load_before"],
            "free_in_2MiB_blocks_pct": run["free_in_2MiB_blocks_pct"],
            "leecher_cpu_s": run["leecher_cpu_s"], "seeds_cpu_s": run["seeds_cpu_s"],
            "seeds_serving": run["serving"]}


def timed(leech, seeds, leech_dir, *command) -> dict:
    """Run `hypersdk COMMAND --json` on the leecher; wall time, its JSON document,
    load average before, leecher peak RSS and the CPU seconds of every node."""
    load, mem = loadavg(), free_memory_state()
    c0 = [n.cpu_s() for n in (leech, *seeds)]
    t = time.perf_counter()
    p = hs(leech_dir, *command, "--json", timeout=1800)
    wall = time.perf_counter() - t
    c1 = [n.cpu_s() for n in (leech, *seeds)]
    return {"wall": wall, "doc": json.loads(p.stdout), "load_before": load,
            "free_in_2MiB_blocks_pct": mem["free_in_2MiB_blocks_pct"],
            "leecher_rss_MiB": round(leech.hwm_mib(), 1),
            "leecher_cpu_s": round(c1[0] - c0[0], 2),
            "seeds_cpu_s": round(sum(c1[1:]) - sum(c0[1:]), 2)}


def run_raw(mib: int, profile: bool, keep: bool) -> dict:
    img = DATA / f"random-{mib}M.img"
    if not img.exists() or img.stat().st_size != mib * MiB:
        with open(img, "wb") as f:
            for _ in range(mib):
                f.write(os.urandom(MiB))
    dirs, mid = build_seeds(img, 1, build_tag(f"raw{mib}"))
    seeds = start_swarm(dirs, mid, profile)
    leech_dir = fresh_node_dir(DATA / "repos" / "raw-leech")
    leech = None
    try:
        leech = NodeProc(leech_dir, seeds[0].addr, profile=profile)
        wait_providers(leech_dir, mid, 1)
        read_into_cache(*seed_packs(dirs))
        run = timed(leech, seeds, leech_dir, "fetch", mid)
    finally:
        for n in [leech, *seeds]:
            if n is not None:
                n.stop()
    if not keep:
        shutil.rmtree(leech_dir, ignore_errors=True)
    doc, wall = run.pop("doc"), run["wall"]
    return {"wall_s": round(wall, 2), "MB_per_s": round(mib * MiB / wall / 1e6, 1),
            "fetch_s": doc["seconds"], "bytes_fetched": doc["bytes_fetched"],
            "fetch_MB_per_s": round(doc["bytes_fetched"] / max(doc["seconds"], 1e-9) / 1e6, 1),
            "leecher_rss_MiB": run["leecher_rss_MiB"], "load_before": run["load_before"],
            "free_in_2MiB_blocks_pct": run["free_in_2MiB_blocks_pct"],
            "leecher_cpu_s": run["leecher_cpu_s"], "seeds_cpu_s": run["seeds_cpu_s"],
            "seeds_serving": run["serving"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mode", choices=["swarm", "raw", "both", "prepare"], nargs="?",
                    default="both", help="prepare: build (or check) the swarm seed cache "
                                         "of this build and mode, and stop")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--raw-mib", type=int, default=512)
    ap.add_argument("--no-anchor", action="store_true", help="skip libtorrent")
    ap.add_argument("--keep", action="store_true", help="keep the restored image")
    ap.add_argument("--fragment", action="store_true",
                    help="hold the free memory fragmented during the whole run "
                         "(bench/memory_state.py)")
    ap.add_argument("--profile", action="store_true",
                    help="run nodes under cProfile (bench/_prof_node.py; "
                         "stats in each data dir's node.prof)")
    ap.add_argument("--runs", type=int, default=1,
                    help="repeat the whole measurement (each run side by side)")
    ap.add_argument("--network", action="store_true",
                    help="swarm: every node a member of one network, sharing its data key "
                         "(seed cache repos/swarm-net-seedN)")
    ap.add_argument("--hypersdk", type=Path, default=DEFAULT_HYPERSDK, metavar="EXE",
                    help="the hypersdk executable to run (another checkout's venv; "
                         "default: this venv's)")
    ap.add_argument("--rebuild", action="store_true",
                    help="rebuild the swarm seed cache even if it is current")
    a = ap.parse_args()
    if a.runs < 1:
        raise SystemExit("--runs must be >= 1")
    use_build(a.hypersdk)
    if a.mode == "prepare":
        dirs, mid = build_seeds(IMG, a.seeds, build_tag("swarm-net" if a.network else "swarm"),
                                a.network, a.rebuild)
        print(json.dumps({"seeds": [str(d) for d in dirs], "manifest": mid,
                          "network": a.network, "hypersdk": str(HYPERSDK)}))
        return
    res: dict = {"nproc": os.cpu_count(), "runs": []}
    with Fragmented() if a.fragment else contextlib.nullcontext() as frag:
        if frag is not None:
            res["fragmented"] = frag.info
            log("memory fragmented:", json.dumps(frag.info))
        for i in range(a.runs):
            run = measure(a)
            res["runs"].append(run)
            if a.runs > 1:
                print(f"\nrun {i + 1} of {a.runs}")
            print("\n".join(table(a, run, res)), flush=True)
    if a.runs > 1:
        print("\n" + summary(res["runs"]))
    outdir = Path(os.environ.get("BENCH_OUT", DATA / "results"))
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / "bench_swarm.json").write_text(json.dumps(res, indent=1))


def measure(a) -> dict:
    res: dict = {"load_start": loadavg()}
    if a.mode in ("swarm", "both"):
        res["hypersdk_swarm"] = r = run_restore(a.seeds, a.profile, a.keep, a.network,
                                                a.rebuild)
        a.rebuild = False                           # once, not every run
        log("hypersdk swarm:", json.dumps(r))
        if not a.no_anchor:
            res["lt_swarm"] = r = run_libtorrent(a.seeds)
            log("libtorrent swarm:", json.dumps({k: v for k, v in r.items()
                                                 if k not in ("seeders",)}))
    if a.mode in ("raw", "both"):
        res["hypersdk_raw"] = r = run_raw(a.raw_mib, a.profile, a.keep)
        log("hypersdk raw:", json.dumps(r))
        if not a.no_anchor:
            res["lt_raw"] = r = run_libtorrent(1)
            r["image_bytes"] = IMG.stat().st_size      # libtorrent's raw run: the swarm image
            log("libtorrent 1 seed:", json.dumps({k: v for k, v in r.items()
                                                 if k not in ("seeders",)}))
    res["load_end"] = loadavg()
    return res


def size_label(nbytes: int) -> str:
    """The image size for a table label: 2147483648 -> '2 GiB', 1.5 GiB -> '1.5 GiB'."""
    if nbytes >= 1 << 30:
        return f"{nbytes / (1 << 30):.3g} GiB"
    return f"{nbytes / MiB:.3g} MiB"


def table(a, res: dict, whole: dict) -> list[str]:
    rows = ["| measurement | hypersdk | libtorrent | ratio (hypersdk / libtorrent) |",
            "|---|---|---|---|"]
    if "hypersdk_swarm" in res:
        h, lt = res["hypersdk_swarm"], res.get("lt_swarm")
        net = ""
        if h.get("network"):
            sealed = h["sealed"]["seed0"]
            net = (f", network, sealed {sealed['chunks_sealed']}/{sealed['chunks']} chunks"
                   if sealed["chunks_sealed"] else ", network, NOT sealed")
        rows.append(f"| restore {size_label(h['image_bytes'])}, {a.seeds} seeds -> 1{net}, "
                    f"wall | "
                    f"{h['wall_s']:.2f} s "
                    f"(identical={h['identical']}) | "
                    + (f"{lt['wall_s']:.2f} s (ok={lt['ok'] and lt['verified_identical']}) | "
                       f"{h['wall_s'] / lt['wall_s']:.2f}x |" if lt else "- | - |"))
        if lt and lt.get("sync_after_s") is not None:
            # hypersdk's wall includes making the image (and the fetched chunks) durable;
            # libtorrent's stops with the data in the page cache, its os.sync is timed after
            durable = lt["wall_s"] + lt["sync_after_s"]
            rows.append(f"| same, until the image is on disk (libtorrent: + its sync "
                        f"{lt['sync_after_s']:.2f} s) | {h['wall_s']:.2f} s | {durable:.2f} s | "
                        f"{h['wall_s'] / durable:.2f}x |")
        rows.append(f"| leecher peak RSS | {h['leecher_rss_MiB']:.0f} MiB | "
                    + (f"{lt['maxrss_MiB']:.0f} MiB | {h['leecher_rss_MiB'] / lt['maxrss_MiB']:.2f}x |"
                       if lt else "- | - |"))
    if "hypersdk_raw" in res:
        h, lt = res["hypersdk_raw"], res.get("lt_raw")
        rows.append(f"| raw {a.raw_mib} MiB incompressible, 1 seed -> 1 | "
                    f"{h['MB_per_s']:.0f} MB/s ({h['wall_s']:.2f} s) | "
                    + (f"{lt['MB_per_s']:.0f} MB/s ({size_label(lt['image_bytes'])}, "
                       f"{lt['wall_s']:.2f} s) | "
                       f"{h['MB_per_s'] / lt['MB_per_s']:.2f}x |" if lt else "- | - |"))
    rows.append(f"\nload average: start {res['load_start']}, end {res['load_end']}, "
                f"{whole['nproc']} cores")
    mem = [f"{k} {res[k]['free_in_2MiB_blocks_pct']}%" for k in
           ("hypersdk_swarm", "lt_swarm", "hypersdk_raw", "lt_raw") if k in res]
    rows.append("free memory in >= 2 MiB blocks before each side: " + ", ".join(mem)
                + (" (held fragmented: --fragment)" if "fragmented" in whole else ""))
    return rows


def summary(runs: list[dict]) -> str:
    """The ratios of every run against the issue's targets, one line each."""
    out = []
    pairs = [(r["hypersdk_swarm"]["wall_s"], r["lt_swarm"]["wall_s"]) for r in runs
             if "hypersdk_swarm" in r and "lt_swarm" in r]
    if pairs:
        ratios = [h / lt for h, lt in pairs]
        out.append(f"restore ratios (target <= 0.5x): "
                   f"{' '.join(f'{x:.2f}' for x in ratios)}; "
                   f"met in {sum(x <= 0.5 for x in ratios)} of {len(ratios)}; "
                   f"median {statistics.median(ratios):.2f}x")
    raws = [r["hypersdk_raw"]["MB_per_s"] / r["lt_raw"]["MB_per_s"] for r in runs
            if "hypersdk_raw" in r and "lt_raw" in r]
    if raws:
        out.append(f"raw ratios (target >= 1x): {' '.join(f'{x:.2f}' for x in raws)}; "
                   f"met in {sum(x >= 1 for x in raws)} of {len(raws)}")
    walls = [r["hypersdk_swarm"]["wall_s"] for r in runs if "hypersdk_swarm" in r]
    if walls:
        out.append(f"hypersdk restore: {' '.join(f'{x:.2f}' for x in walls)} s; "
                   f"median {statistics.median(walls):.2f} s")
    return "\n".join(out)


if __name__ == "__main__":
    main()
