#!/usr/bin/env python3
"""hypersdk backup/restore benchmark against the anchor tools, in one run.

What one invocation does (all in the same page-cache state, one after the other):

 1. makes sure $BENCH_DATA/disk-v1.img and disk-v2.img exist (2 GiB each).  If
    another process is generating them (mk2.log present without a final
    "done N" line) it waits for it with a bounded poll instead of starting a
    second generation; if they are missing it runs ../shared/bench/make_image.py.
 2. runs the anchors:  ../shared/bench/backup_tools.py --runs N --tools ...
    and reads its JSON ($BENCH_OUT/backup.json, default $BENCH_DATA/results).
 3. runs hypersdk exactly the way backup_tools.py runs the anchors: per run a
    fresh data dir; before each step `cat` both images to /dev/null, `sync`,
    hard-link the image to one fixed source path (so v1 and v2 share a name);
    the step is timed under `/usr/bin/time -v` (wall = perf_counter around it,
    max RSS from time -v); a separately timed `sync` follows (not included);
    `du -sb` of the data dir after each step.  Steps: backup v1, backup v2
    (incremental), restore v1 to a new file (sha256 must equal disk-v1.img's,
    otherwise the script fails loudly).  With --data-key both (the default) every
    run does this twice, alternating which goes first: "hypersdk" in a data dir
    without a data key, and "hypersdk+key" in one with a data key (encryption at
    rest: keyed ids, every record and manifest sealed; node/store/store.py).
 4. computes the target checks (ratios against restic from the same run,
    medians over the runs), prints a markdown table, writes
    $BENCH_OUT/bench_backup.json and .md, and with --write-md PATH (re)writes
    the marked section of PATH (e.g. BENCHMARKS.md).

Usage (from the repository root):
    .venv/bin/python bench/bench_backup.py --runs 2 --write-md BENCHMARKS.md
    .venv/bin/python bench/bench_backup.py --runs 1 --skip-anchors     # quick
MB = 10**6 bytes.  No network.  Every external step has a timeout.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SHARED = os.path.normpath(os.path.join(REPO, "..", "shared", "bench"))
DATA = os.environ.get("BENCH_DATA", "/tmp/bench-data")
RESDIR = os.environ.get("BENCH_OUT", os.path.join(DATA, "results"))
V1, V2 = os.path.join(DATA, "disk-v1.img"), os.path.join(DATA, "disk-v2.img")
SRCDIR = os.path.join(DATA, "cur-hypersdk")
SRC = os.path.join(SRCDIR, "disk.img")          # fixed source path for v1 and v2
REPOS = os.path.join(DATA, "repos")
RESTORE_DIR = os.path.join(DATA, "restore")
LOGDIR = os.path.join(RESDIR, "logs")
MB = 1e6

TARGETS = {   # key: (description, threshold text)
    "v1_ingest": "v1 ingest throughput >= 3x restic",
    "v2_wall": "v2 wall time <= 0.5x restic",
    "v2_added": "v2 bytes added <= restic",
    "v1_store": "store size after v1 <= 1.1x restic repository",
    "restore": "restore of v1 >= 600 MB/s and byte-identical",
    "rss": "peak RSS during backup and restore <= 200 MB",
    "v1_ingest_key": "v1 ingest with a data key (encryption at rest) >= 3x restic",
    "key_cost": "v1 ingest with a data key / without (same run)",
}
MD_BEGIN = "<!-- bench_backup.py:begin -->"
MD_END = "<!-- bench_backup.py:end -->"


def log(*a):
    print("[bench]", *a, file=sys.stderr, flush=True)


class BenchError(SystemExit):
    def __init__(self, msg):
        super().__init__("bench_backup.py: FAILED: " + msg)


# -- bounded subprocesses -------------------------------------------------------
def run_bounded(cmd, timeout, *, env=None, cwd=None, stdout=None, stderr=None, shell=False):
    """Run cmd in its own process group; kill the whole group on timeout."""
    p = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=stdout, stderr=stderr, shell=shell,
                         start_new_session=True)
    try:
        return p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        raise BenchError("timed out after %ds: %s" % (timeout, cmd))
    except BaseException:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()
        raise


def out_of(cmd, timeout=60):
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True,
                              timeout=timeout).stdout.strip()
    except subprocess.TimeoutExpired:
        return ""


def du(path):
    return int(out_of("du -sb '%s'" % path, 300).split()[0])


def flush():
    t = time.perf_counter()
    os.sync()
    return round(time.perf_counter() - t, 2)


def warm(extra=()):
    """`cat` both images (and optionally more files) to /dev/null, like backup_tools.py."""
    for f in (V1, V2) + tuple(extra):
        run_bounded("cat '%s' > /dev/null" % f, 600, shell=True)


def point_src(img):
    os.makedirs(SRCDIR, exist_ok=True)
    if os.path.lexists(SRC):
        os.unlink(SRC)
    os.link(img, SRC)


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(4 << 20)
        view = memoryview(buf)
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
    return h.hexdigest()


def cpu_busy_s():
    """System-wide non-idle CPU seconds so far (from /proc/stat)."""
    f = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    busy = f[0] + f[1] + f[2] + f[5] + f[6] + (f[7] if len(f) > 7 else 0)
    return busy / os.sysconf("SC_CLK_TCK")


def wait_quiet(limit_s):
    """Bounded wait until other processes leave the machine idle (< 0.15 CPU-s per 2 s).

    Done once before the anchors and once before hypersdk (the same for both), never per
    step, so neither side gets a quieter machine by construction. Returns seconds waited
    or None if the machine never went quiet."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit_s:
        b = cpu_busy_s()
        time.sleep(2)
        if cpu_busy_s() - b < 0.15:
            return round(time.monotonic() - t0)
    log("WARNING: machine still busy after %ds; measuring anyway" % limit_s)
    return None


def timed(cmd, name, env, timeout):
    """Run cmd (argv) under /usr/bin/time -v: wall, user, sys, CPU%, max RSS, rc, stdout.

    stdout is kept apart from stderr (hypersdk prints its --json document there).
    """
    os.makedirs(LOGDIR, exist_ok=True)
    tf, of, ef = (os.path.join(LOGDIR, name + s) for s in (".time", ".out", ".log"))
    load0, busy0 = open("/proc/loadavg").read().split()[:3], cpu_busy_s()
    t0 = time.perf_counter()
    with open(of, "w") as o, open(ef, "w") as e:
        rc = run_bounded(["/usr/bin/time", "-v", "-o", tf] + cmd, timeout, env=env,
                         stdout=o, stderr=e)
    wall = time.perf_counter() - t0
    busy = cpu_busy_s() - busy0
    txt = open(tf).read()
    g = lambda pat: re.search(pat, txt).group(1)
    rss_kb = int(g(r"Maximum resident set size \(kbytes\): (\d+)"))
    user, sys_ = float(g(r"User time \(seconds\): ([\d.]+)")), float(g(r"System time \(seconds\): ([\d.]+)"))
    return dict(wall_s=round(wall, 2), user_s=user, sys_s=sys_,
                cpu_pct=g(r"Percent of CPU this job got: (\S+)"),
                maxrss_MiB=round(rss_kb / 1024, 1), maxrss_MB=round(rss_kb * 1024 / MB, 1),
                major_faults=int(g(r"Major \(requiring I/O\) page faults: (\d+)")),
                vol_ctx=int(g(r"Voluntary context switches: (\d+)")),
                invol_ctx=int(g(r"Involuntary context switches: (\d+)")),
                rc=rc, stdout=open(of).read(), stderr_tail=open(ef).read()[-2000:],
                loadavg_before=load0, loadavg_after=open("/proc/loadavg").read().split()[:3],
                # CPU seconds used by other processes on the machine during the step
                other_cpu_s=round(max(0.0, busy - user - sys_), 2))


# -- images -----------------------------------------------------------------------
def generators_running():
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmd = open("/proc/%s/cmdline" % pid, "rb").read().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "make_image.py" in cmd and (" v1 " in cmd or " v2 " in cmd):
            found.append((int(pid), cmd.strip()))
    return found


def last_line(path):
    try:
        lines = [l.strip() for l in open(path, errors="replace").read().splitlines() if l.strip()]
    except FileNotFoundError:
        return None
    return lines[-1] if lines else ""


def ensure_images(wait_s):
    """Return a list of warnings about the images (empty if all is well)."""
    warnings = []
    mk2 = os.path.join(DATA, "mk2.log")
    deadline = time.monotonic() + wait_s
    # another process is generating: wait for mk2.log's final "done N" / its exit
    while True:
        ll = last_line(mk2)
        gens = generators_running()
        pending_log = ll is not None and not re.fullmatch(r"done -?\d+", ll)
        if not pending_log and not gens:
            break
        if time.monotonic() > deadline:
            raise BenchError("images still being generated after %ds (mk2.log last line %r, "
                             "generators %s); not starting a second generation" % (wait_s, ll, gens))
        log("waiting for image generation (mk2.log: %r, running: %d) ..." % (ll, len(gens)))
        time.sleep(10)
    ll = last_line(mk2)
    if ll is not None and ll != "done 0":
        msg = ("%s ends with %r (the generator reported failure); using the images as "
               "they are on disk" % (mk2, ll))
        tail = " | ".join(open(mk2, errors="replace").read().strip().splitlines()[-3:])
        warnings.append(msg + " -- log tail: " + tail)
        log("WARNING:", msg)
    py = shutil.which("python3") or sys.executable
    mk = os.path.join(SHARED, "make_image.py")
    os.makedirs(DATA, exist_ok=True)
    if not os.path.exists(V1):
        log("generating disk-v1.img (2 GiB) ...")
        with open(os.path.join(DATA, "mk1.bench.log"), "w") as lf:
            rc = run_bounded([py, mk, "v1", "disk-v1.img", "--size", "2G", "--seed", "1"],
                             3600, cwd=DATA, stdout=lf, stderr=subprocess.STDOUT)
        if rc:
            raise BenchError("make_image.py v1 exited %d (see %s/mk1.bench.log)" % (rc, DATA))
    if not os.path.exists(V2):
        log("generating disk-v2.img ...")
        with open(os.path.join(DATA, "mk2.bench.log"), "w") as lf:
            rc = run_bounded([py, mk, "v2", "disk-v1.img", "disk-v2.img", "--seed", "2"],
                             3600, cwd=DATA, stdout=lf, stderr=subprocess.STDOUT)
        if rc:
            raise BenchError("make_image.py v2 exited %d (see %s/mk2.bench.log)" % (rc, DATA))
    s1, s2 = os.path.getsize(V1), os.path.getsize(V2)
    if s1 != s2 or s1 == 0:
        raise BenchError("image sizes differ or are zero: %d vs %d" % (s1, s2))
    return warnings


# -- anchors ----------------------------------------------------------------------
def run_anchors(runs, tools, timeout):
    os.makedirs(LOGDIR, exist_ok=True)
    env = dict(os.environ, BENCH_DATA=DATA, BENCH_OUT=RESDIR)
    out = os.path.join(LOGDIR, "anchors.out")
    err = os.path.join(LOGDIR, "anchors.log")
    path = os.path.join(RESDIR, "backup.json")
    if os.path.exists(path):
        os.unlink(path)                 # never mistake an old file for this run's
    cmd = [shutil.which("python3") or sys.executable, os.path.join(SHARED, "backup_tools.py"),
           "--runs", str(runs), "--tools", tools]
    log("anchors:", " ".join(cmd))
    with open(out, "w") as o, open(err, "w") as e:
        rc = run_bounded(cmd, timeout, env=env, stdout=o, stderr=e)
    if rc:
        raise BenchError("backup_tools.py exited %d (see %s)" % (rc, err))
    return load_anchors(path)


def load_anchors(path):
    doc = json.load(open(path))
    doc["path"] = path
    doc["mtime"] = datetime.datetime.fromtimestamp(
        os.path.getmtime(path), datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return doc


# -- hypersdk -----------------------------------------------------------------------
def hypersdk_bin():
    cand = os.path.join(os.path.dirname(sys.executable), "hypersdk")
    if os.path.exists(cand):
        return cand
    cand = os.path.join(REPO, ".venv", "bin", "hypersdk")
    if os.path.exists(cand):
        return cand
    found = shutil.which("hypersdk")
    if not found:
        raise BenchError("hypersdk executable not found (install the project into .venv)")
    return found


def store_stats(hs, env):
    try:
        r = subprocess.run([hs, "store", "stats", "--json"], env=env, capture_output=True,
                           text=True, timeout=300)
        return json.loads(r.stdout) if r.returncode == 0 else {"error": r.stderr.strip()}
    except (subprocess.TimeoutExpired, ValueError) as exc:
        return {"error": str(exc)}


def run_hypersdk(run, v1_sha, timeout, keep, hs=None, tool="hypersdk", keyed=False):
    """One run of the three steps with the hypersdk executable hs (default: this
    checkout's); tool labels it ("hypersdk-baseline" for --baseline). keyed: the
    data dir gets a data key first (this checkout's node/net/datakey.py)."""
    hs = hs or hypersdk_bin()
    repo = os.path.join(REPOS, "%s-run%d" % (tool, run))
    shutil.rmtree(repo, ignore_errors=True)
    os.makedirs(repo)
    if keyed:
        sys.path.insert(0, REPO)
        from hypersdk.node.net import datakey
        datakey.create(repo)
    env = dict(os.environ, HYPERSDK_DATA_DIR=repo, LC_ALL="C.UTF-8")
    env.pop("HYPERSDK_DEBUG", None)
    size_img = os.path.getsize(V1)
    res = {"tool": tool, "run": run, "empty_repo_bytes": du(repo)}
    for tag, img in (("v1", V1), ("v2", V2)):
        warm()
        point_src(img)
        flush()
        before = du(repo)
        r = timed([hs, "backup", SRC, "--name", "disk", "--json"],
                  "%s-run%d-%s" % (tool, run, tag), env, timeout)
        r["flush_s"] = flush()
        if r["rc"]:
            raise BenchError("hypersdk backup %s exited %d: %s" % (tag, r["rc"], r["stderr_tail"]))
        r["report"] = json.loads(r.pop("stdout"))
        after = du(repo)
        r["repo_bytes"] = after
        r["added_bytes"] = after - before
        r["MB_per_s"] = round(size_img / r["wall_s"] / MB, 1)
        r["store_stats"] = store_stats(hs, env)
        res[tag] = r
        log("%s run %d %s: %.2f s, %.0f MB/s, CPU %s, RSS %.0f MB, +%.1f MB" % (
            tool, run, tag, r["wall_s"], r["MB_per_s"], r["cpu_pct"], r["maxrss_MB"],
            r["added_bytes"] / MB))
    # restore v1 to a new file
    os.makedirs(RESTORE_DIR, exist_ok=True)
    out = os.path.join(RESTORE_DIR, "disk-v1.restored.img")
    if os.path.lexists(out):
        os.unlink(out)
    packs = os.path.join(repo, "packs")
    warm(extra=tuple(os.path.join(packs, p) for p in sorted(os.listdir(packs))))
    flush()
    ref = res["v1"]["report"]["manifest"]
    r = timed([hs, "restore", ref, out, "--json"], "%s-run%d-restore" % (tool, run), env,
              timeout)
    r["flush_s"] = flush()
    if r["rc"]:
        raise BenchError("hypersdk restore exited %d: %s" % (r["rc"], r["stderr_tail"]))
    r["report"] = json.loads(r.pop("stdout"))
    r["MB_per_s"] = round(size_img / r["wall_s"] / MB, 1)
    r["out_size"] = os.path.getsize(out)
    r["out_allocated_bytes"] = os.stat(out).st_blocks * 512
    r["sha256"] = sha256_file(out)
    r["identical"] = r["sha256"] == v1_sha and r["out_size"] == size_img
    res["restore"] = r
    log("%s run %d restore: %.2f s, %.0f MB/s, CPU %s, RSS %.0f MB, identical=%s" % (
        tool, run, r["wall_s"], r["MB_per_s"], r["cpu_pct"], r["maxrss_MB"], r["identical"]))
    if not r["identical"]:
        raise BenchError("restored image %s differs from disk-v1.img: sha256 %s != %s "
                         "(size %d vs %d); kept for inspection" % (
                             out, r["sha256"], v1_sha, r["out_size"], size_img))
    os.unlink(out)
    res["dedup_ratio_total"] = round(2 * size_img / res["v2"]["repo_bytes"], 3)
    res["v1_ratio"] = round(size_img / res["v1"]["repo_bytes"], 3)
    if not keep:
        shutil.rmtree(repo, ignore_errors=True)
    return res


# -- checks and reporting -------------------------------------------------------------
def med(xs):
    return statistics.median(xs) if xs else None


def checks(hs_runs, restic_runs):
    """Target checks on medians over the runs; restic figures from the same invocation."""
    def m(runs, step, key):
        return med([r[step][key] for r in runs])
    out = []

    def add(key, ok, value, ref, ratio, limit, detail=""):
        out.append(dict(target=key, text=TARGETS[key], ok=ok, value=value, restic=ref,
                        ratio=ratio, limit=limit, detail=detail))

    have_r = bool(restic_runs)
    if not hs_runs:
        return out
    hv1 = m(hs_runs, "v1", "MB_per_s")
    if have_r:
        rv1 = m(restic_runs, "v1", "MB_per_s")
        add("v1_ingest", hv1 >= 3 * rv1, "%.0f MB/s" % hv1, "%.0f MB/s" % rv1,
            round(hv1 / rv1, 2), ">= 3.00x")
        hv2, rv2 = m(hs_runs, "v2", "wall_s"), m(restic_runs, "v2", "wall_s")
        add("v2_wall", hv2 <= 0.5 * rv2, "%.2f s" % hv2, "%.2f s" % rv2,
            round(hv2 / rv2, 2), "<= 0.50x")
        ha, ra = m(hs_runs, "v2", "added_bytes"), m(restic_runs, "v2", "added_bytes")
        add("v2_added", ha <= ra, "%.1f MB" % (ha / MB), "%.1f MB" % (ra / MB),
            round(ha / ra, 2), "<= 1.00x")
        hs1, rs1 = m(hs_runs, "v1", "repo_bytes"), m(restic_runs, "v1", "repo_bytes")
        add("v1_store", hs1 <= 1.1 * rs1, "%.1f MB" % (hs1 / MB), "%.1f MB" % (rs1 / MB),
            round(hs1 / rs1, 3), "<= 1.10x")
    else:
        for k in ("v1_ingest", "v2_wall", "v2_added", "v1_store"):
            add(k, None, "-", "-", None, "-", "no restic figures")
    rr = m(hs_runs, "restore", "MB_per_s")
    ident = all(r["restore"]["identical"] for r in hs_runs)
    add("restore", rr >= 600 and ident, "%.0f MB/s, identical=%s" % (rr, ident), "-", None,
        ">= 600 MB/s")
    peak = max(r[s]["maxrss_MB"] for r in hs_runs for s in ("v1", "v2", "restore"))
    where = max(((r[s]["maxrss_MB"], "run %d %s" % (r["run"], s))
                 for r in hs_runs for s in ("v1", "v2", "restore")))[1]
    add("rss", peak <= 200, "%.0f MB" % peak, "-", None, "<= 200 MB", "max at " + where)
    return out


def key_checks(key_runs, hs_runs, restic_runs):
    """Ingest with a data key against restic (restic encrypts too) and against
    hypersdk without a key, from the same invocation (medians)."""
    if not key_runs:
        return []
    m = lambda runs, step, key: med([r[step][key] for r in runs])
    out = []
    k = m(key_runs, "v1", "MB_per_s")
    if restic_runs:
        r = m(restic_runs, "v1", "MB_per_s")
        out.append(dict(target="v1_ingest_key", text=TARGETS["v1_ingest_key"], ok=k >= 3 * r,
                        value="%.0f MB/s" % k, restic="%.0f MB/s" % r, ratio=round(k / r, 2),
                        limit=">= 3.00x", detail=""))
    else:
        out.append(dict(target="v1_ingest_key", text=TARGETS["v1_ingest_key"], ok=None,
                        value="%.0f MB/s" % k, restic="-", ratio=None, limit=">= 3.00x",
                        detail="no restic figures"))
    if hs_runs:
        h = m(hs_runs, "v1", "MB_per_s")
        out.append(dict(target="key_cost", text=TARGETS["key_cost"], ok=None,
                        value="%.0f MB/s" % k, restic="without a key %.0f MB/s" % h,
                        ratio=round(k / h, 3), limit="-", detail="measured, not a target"))
    return out


def baseline_checks(hs_runs, base_runs):
    """This checkout against --baseline from the same invocation (medians): ingest
    must stay within 5% (a change must not cost backup speed unnoticed)."""
    if not base_runs:
        return []
    m = lambda runs, step, key: med([r[step][key] for r in runs])
    out = []
    for step in ("v1", "v2"):
        h, b = m(hs_runs, step, "MB_per_s"), m(base_runs, step, "MB_per_s")
        out.append(dict(target="%s_vs_baseline" % step,
                        text="%s ingest >= 0.95x the baseline build's" % step,
                        ok=h >= 0.95 * b, value="%.0f MB/s" % h,
                        restic="baseline %.0f MB/s" % b, ratio=round(h / b, 3),
                        limit=">= 0.95x", detail=""))
    return out


def fmt_table(hs_runs, anchor_runs):
    rows = ["| tool | run | v1 wall s | v1 MB/s | v1 CPU% | v1 max RSS MB | store after v1 MB |"
            " v2 wall s | v2 CPU% | v2 max RSS MB | v2 added MB | store after v2 MB |"
            " restore v1 wall s | restore MB/s | restore CPU% | restore max RSS MB |",
            "|" + "---|" * 16]
    for r in list(anchor_runs) + list(hs_runs):
        v1, v2, rs = r["v1"], r["v2"], r.get("restore")
        rss = lambda s: s.get("maxrss_MB", s["maxrss_MiB"] * 1.048576)
        rows.append("| %s | %d | %.1f | %.0f | %s | %.0f | %.1f | %.1f | %s | %.0f | %.1f | %.1f | %s |" % (
            r["tool"], r["run"], v1["wall_s"], v1["MB_per_s"], v1["cpu_pct"], rss(v1),
            v1["repo_bytes"] / MB, v2["wall_s"], v2["cpu_pct"], rss(v2),
            v2["added_bytes"] / MB, v2["repo_bytes"] / MB,
            ("%.2f | %.0f | %s | %.0f" % (rs["wall_s"], rs["MB_per_s"], rs["cpu_pct"], rss(rs)))
            if rs else "- | - | - | -"))
    return "\n".join(rows)


def fmt_checks(cks, anchors_note):
    rows = ["| target | hypersdk (median) | restic (median) | ratio | limit | result |",
            "|---|---|---|---|---|---|"]
    for c in cks:
        res = "n/a" if c["ok"] is None else ("PASS" if c["ok"] else "**FAIL**")
        rows.append("| %s | %s | %s | %s | %s | %s%s |" % (
            c["text"], c["value"], c["restic"],
            "-" if c["ratio"] is None else "%.2fx" % c["ratio"], c["limit"], res,
            (" (%s)" % c["detail"]) if c["detail"] else ""))
    if anchors_note:
        rows.append("\n" + anchors_note)
    return "\n".join(rows)


def machine():
    cpu = "?"
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = out_of("awk '/MemTotal/ {printf \"%.1f GiB\", $2/1048576}' /proc/meminfo")
    return {"nproc": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)), "cpu": cpu,
            "mem": mem, "kernel": platform.release(),
            "fs": out_of("df -T '%s' | awk 'NR==2 {print $2\" on \"$1}'" % DATA)}


def versions(anchors):
    v = dict(anchors.get("versions", {})) if anchors else {}
    try:
        from importlib.metadata import version
        v["hypersdk"] = version("hypersdk")
        v["blake3 (py)"] = version("blake3")
        v["zstandard (py)"] = version("zstandard")
    except Exception:
        pass
    v["python"] = platform.python_version()
    v["hypersdk source"] = source_fingerprint()
    return v


def source_fingerprint():
    """git revision + hash of node/ and protocol/ (others may edit them during a run)."""
    rev = out_of("git -C '%s' rev-parse --short HEAD" % REPO)
    dirty = out_of("git -C '%s' status --porcelain -- node protocol" % REPO)
    h = hashlib.sha256()
    for d in ("node", "protocol"):
        for dirpath, dirnames, files in sorted(os.walk(os.path.join(REPO, d))):
            dirnames.sort()
            for fn in sorted(files):
                if fn.endswith(".py"):
                    path = os.path.join(dirpath, fn)
                    h.update(os.path.relpath(path, REPO).encode() + open(path, "rb").read())
    return "git %s%s, node+protocol sha256 %s" % (
        rev, " + uncommitted changes" if dirty else "", h.hexdigest()[:12])


def write_md(path, section):
    body = "%s\n%s\n%s\n" % (MD_BEGIN, section.strip(), MD_END)
    if os.path.exists(path):
        txt = open(path).read()
        if MD_BEGIN in txt and MD_END in txt:
            a, rest = txt.split(MD_BEGIN, 1)
            _, b = rest.split(MD_END, 1)
            txt = a + body.rstrip("\n") + b
        else:
            txt = txt.rstrip("\n") + "\n\n" + body
    else:
        txt = ("# Benchmarks\n\nFigures in this file come only from runs of the commands "
               "shown with them. MB = 10^6 bytes.\n\n" + body)
    with open(path + ".tmp", "w") as f:
        f.write(txt)
    os.replace(path + ".tmp", path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--tools", default="restic,borg,casync", help="anchors for backup_tools.py")
    ap.add_argument("--skip-anchors", action="store_true",
                    help="do not run the anchors; reuse an existing backup.json if present")
    ap.add_argument("--write-md", metavar="PATH", help="(re)write the bench section of PATH")
    ap.add_argument("--keep-repos", action="store_true")
    ap.add_argument("--wait-images", type=int, default=1800,
                    help="max seconds to wait for a running image generation")
    ap.add_argument("--quiet-wait", type=int, default=120,
                    help="max seconds to wait for an idle machine before each phase")
    ap.add_argument("--step-timeout", type=int, default=900, help="per hypersdk step")
    ap.add_argument("--baseline", metavar="HYPERSDK", default=None,
                    help="also run this hypersdk executable (e.g. a worktree of the previous "
                         "commit: git worktree add /tmp/base HEAD~1 && python3 -m venv "
                         "/tmp/base/.venv && /tmp/base/.venv/bin/pip install -e /tmp/base), "
                         "interleaved run by run, and check ingest against it")
    ap.add_argument("--anchor-timeout", type=int, default=0,
                    help="for backup_tools.py (default 600 s per tool per run)")
    ap.add_argument("--data-key", choices=("off", "on", "both"), default="both",
                    help="run hypersdk without a data key (off), with one (on: encryption "
                         "at rest), or both, alternating within each run (default)")
    a = ap.parse_args()
    if a.runs < 1:
        ap.error("--runs must be >= 1")
    if "restic" not in a.tools.split(",") and not a.skip_anchors:
        log("note: restic is not among --tools; the ratio targets will be n/a")
    cmdline = " ".join(["python", os.path.relpath(os.path.abspath(sys.argv[0]), REPO)] + sys.argv[1:])
    started = datetime.datetime.now(datetime.timezone.utc)
    os.makedirs(RESDIR, exist_ok=True)

    warnings = ensure_images(a.wait_images)
    size_img = os.path.getsize(V1)
    log("sha256 of the images ...")
    img_sha = {"v1": sha256_file(V1), "v2": sha256_file(V2)}

    anchors, anchors_note, quiet = None, "", {}
    if a.skip_anchors:
        p = os.path.join(RESDIR, "backup.json")
        if os.path.exists(p):
            anchors = load_anchors(p)
            anchors_note = ("Anchors NOT run in this invocation (--skip-anchors): restic figures "
                            "are from %s written %s, so the ratios are not same-run." % (
                                p, anchors["mtime"]))
        else:
            anchors_note = "Anchors not run (--skip-anchors) and no earlier backup.json."
    else:
        quiet["anchors"] = wait_quiet(a.quiet_wait)
        ntools = len(a.tools.split(","))
        t0, b0 = time.perf_counter(), cpu_busy_s()
        anchors = run_anchors(a.runs, a.tools, a.anchor_timeout or 600 * ntools * a.runs)
        own = sum(r[s]["user_s"] + r[s]["sys_s"] for r in anchors["results"] for s in ("v1", "v2"))
        anchors["phase"] = {"wall_s": round(time.perf_counter() - t0, 1),
                            "busy_cpu_s": round(cpu_busy_s() - b0, 1),
                            "tools_user_sys_s": round(own, 1)}
    anchor_runs = anchors["results"] if anchors else []
    restic_runs = [r for r in anchor_runs if r["tool"] == "restic"]

    quiet["hypersdk"] = wait_quiet(a.quiet_wait)
    src_before = source_fingerprint()
    hs_runs, base_runs, key_runs = [], [], []
    for run in range(1, a.runs + 1):
        # alternate which goes first, so neither always has the page cache and the
        # disk in the state the other leaves
        order = {"off": ["current"], "on": ["keyed"], "both": ["current", "keyed"]}[a.data_key]
        order += ["baseline"] if a.baseline else []
        if run % 2 == 0:
            order.reverse()
        for which in order:
            if which == "current":
                hs_runs.append(run_hypersdk(run, img_sha["v1"], a.step_timeout, a.keep_repos))
            elif which == "keyed":
                key_runs.append(run_hypersdk(run, img_sha["v1"], a.step_timeout, a.keep_repos,
                                             tool="hypersdk+key", keyed=True))
            else:
                base_runs.append(run_hypersdk(run, img_sha["v1"], a.step_timeout,
                                              a.keep_repos, hs=a.baseline,
                                              tool="hypersdk-baseline"))
    src_after = source_fingerprint()
    if src_after != src_before:
        warnings.append("hypersdk source changed while hypersdk was being measured: %s -> %s"
                        % (src_before, src_after))
        log("WARNING:", warnings[-1])
    if os.path.lexists(SRC):
        os.unlink(SRC)

    cks = (checks(hs_runs or key_runs, restic_runs) + key_checks(key_runs, hs_runs, restic_runs)
           + baseline_checks(hs_runs, base_runs))
    table = fmt_table(hs_runs + key_runs + base_runs, anchor_runs)
    ctable = fmt_checks(cks, anchors_note)
    mach, vers = machine(), versions(anchors)
    vers["hypersdk source"] = src_before
    finished = datetime.datetime.now(datetime.timezone.utc)
    doc = {"command": cmdline, "started": started.isoformat(timespec="seconds"),
           "finished": finished.isoformat(timespec="seconds"), "machine": mach,
           "versions": vers, "image_bytes": size_img, "image_sha256": img_sha,
           "warnings": warnings, "anchors_file": anchors and anchors["path"],
           "anchors_same_run": not a.skip_anchors, "quiet_wait_s": quiet,
           "anchors_phase": anchors.get("phase") if anchors else None,
           "anchor_notes": anchors.get("notes") if anchors else None,
           "anchors": anchor_runs, "hypersdk": hs_runs, "hypersdk_key": key_runs,
           "baseline": a.baseline,
           "hypersdk_baseline": base_runs, "checks": cks}
    json.dump(doc, open(os.path.join(RESDIR, "bench_backup.json"), "w"), indent=1)

    other = ", ".join("%s run %d %s %.1f s" % (r["tool"], r["run"], s, r[s]["other_cpu_s"])
                      for r in hs_runs + key_runs for s in ("v1", "v2", "restore"))
    load = "Before each phase the script waited for an idle machine (%s). " % ", ".join(
        "%s: %s" % (k, "waited %d s" % v if v is not None else "never idle within the limit")
        for k, v in quiet.items())
    load += ("Concurrent load (CPU seconds used by other processes, including kernel writeback "
             "threads, during each hypersdk step): %s." % other)
    if doc["anchors_phase"]:
        ph = doc["anchors_phase"]
        load += (" Anchor phase: %.0f s wall, %.0f CPU-s busy machine-wide, of which the tools' "
                 "own user+sys %.0f s (the rest is `cat`/`du`/`sync` and other processes)." % (
                     ph["wall_s"], ph["busy_cpu_s"], ph["tools_user_sys_s"]))
    notes = "".join("- %s: %s\n" % (k, v) for k, v in (doc["anchor_notes"] or {}).items())
    section = """## Backup / restore: hypersdk vs restic, borg, casync

Command (repository root): `%s`
Date: %s to %s.
Machine: %d CPUs (%s), %s RAM, Linux %s, data on %s.
Versions: %s.
Images: %s/disk-v1.img and disk-v2.img, %d bytes each (make_image.py v1 --size 2G --seed 1;
v2 --seed 2), sha256 v1 %s..., v2 %s....
%s
Method: for each tool and run a fresh repository / data dir; before each step both images are
`cat` to /dev/null (page cache warm) and `sync`ed, the image is hard-linked to one fixed path
(v1 and v2 share a name); the step runs under `/usr/bin/time -v` (wall = elapsed around it,
max RSS from time -v); a separately timed `sync` follows and is not included; sizes are
`du -sb` of the repository / data dir. Anchors are run by `../shared/bench/backup_tools.py`
in the same invocation, before hypersdk. hypersdk restore: `hypersdk restore <v1 manifest>
OUT` into a new file with the store's packs warm; MB/s = image bytes / wall; the output's
sha256 is compared with disk-v1.img's. hypersdk+key: the same steps in a data dir that
holds a data key (encryption at rest: keyed chunk ids, every record and manifest sealed with
AES-256-GCM), alternating with hypersdk run by run. MB = 10^6 bytes; targets are checked on
the medians of the runs.

%s

%s

Anchor settings:
%s
### Targets

%s
""" % (cmdline, started.strftime("%Y-%m-%d %H:%M"), finished.strftime("%H:%M UTC"),
       mach["nproc"], mach["cpu"], mach["mem"], mach["kernel"], mach["fs"],
       "; ".join("%s: %s" % kv for kv in vers.items()), DATA, size_img,
       img_sha["v1"][:16], img_sha["v2"][:16],
       "".join("\n**Warning:** %s\n" % w for w in warnings),
       table, load, notes or "(none run)\n", ctable)
    with open(os.path.join(RESDIR, "bench_backup.md"), "w") as f:
        f.write(section)
    print(table)
    print()
    print(ctable)
    if warnings:
        print("\nWARNINGS:\n" + "\n".join(warnings))
    if a.write_md:
        write_md(a.write_md, section)
        log("wrote section to", a.write_md)
    log("results:", os.path.join(RESDIR, "bench_backup.json"))


if __name__ == "__main__":
    main()
