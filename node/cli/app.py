"""The `hypersdk` command line: the group, its conventions, and the store commands.

Every command takes --json for machine output, shows a progress bar on a
TTY for long work, and reports a user-fixable problem as one line on stderr
with a non-zero exit (HYPERSDK_DEBUG=1 shows the traceback instead).
"""
from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager

import click

from hypersdk.node.config import DEFAULT_ZSTD_LEVEL, default_data_dir, human, parse_size
from hypersdk.node.errors import UsageError, UserError, describe
from hypersdk.node.service.ops import NEEDS_NODE, STORE_OPS
from hypersdk.protocol.chunks import DEFAULT_CHUNK, valid_chunk_size


class Main(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except Exception as exc:              # one clear line, non-zero exit
            if os.environ.get("HYPERSDK_DEBUG"):
                raise
            code, msg = describe(exc)
            fail(code, msg)
            ctx.exit(code)


# Exit codes (README "Usage"): 0 ok, 1 an error, 2 a usage error, 3 damaged or
# differing data, 4 a certificate without the witness --require-witness asks
# for, 130 interrupted (Ctrl-C).
EXIT_INTERRUPTED = 130
_json_requested = [False]                     # set when a command parses --json


def fail(code: int, msg: str) -> None:
    """Report an error: one line on stderr and, under --json, a JSON document
    {"error": msg, "exit": code} on stdout (scripts read stdout)."""
    msg = " ".join(str(msg).split())          # one line, whatever the message held
    if _json_requested[0]:
        click.echo(json.dumps({"error": msg, "exit": code}, sort_keys=True))
    click.echo(f"hypersdk: error: {msg}" if code != EXIT_INTERRUPTED else f"hypersdk: {msg}",
               err=True)


def json_option(f):
    def seen(ctx, param, value):
        _json_requested[0] = _json_requested[0] or value
        return value
    return click.option("--json", "as_json", is_flag=True, callback=seen, is_eager=True,
                        help="machine-readable output (errors too: {\"error\", \"exit\"})")(f)


def emit(as_json: bool, doc, text: str):
    click.echo(json.dumps(doc, indent=1, sort_keys=True) if as_json else text)


@contextmanager
def progress_bar(total: int, label: str, as_json: bool):
    """Yield an advance(n) callable; draws a bar on a TTY stderr only, with the
    percentage, the ETA, done/total and the average speed since the bar started
    ("fetch [####    ]  50%  00:00:03  1.2/2.4 GB  310.5 MB/s"). Totals are
    bytes (MB = 10^6), except the `verify` bars' (node/service/ops.py _op_verify), which
    count chunks."""
    import time
    if as_json or not sys.stderr.isatty() or total <= 0:
        yield None
        return
    t0 = time.monotonic()
    shown = []                            # the bar, once it exists
    if label == "verify":
        def amount(done: float) -> str:
            return f"{done:.0f}/{total} chunks"

        def speed(rate: float) -> str:
            return f"{rate:.0f} chunks/s"
    else:
        scale, unit = next(((f, u) for f, u in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"),
                                                 (1e3, "kB")) if total >= f), (1, "B"))

        def amount(done: float) -> str:
            return f"{done / scale:.1f}/{total / scale:.1f} {unit}"

        def speed(rate: float) -> str:
            return f"{human(rate)}/s"

    def info(_item):
        if not shown:
            return None
        done = min(shown[0].pos, total)
        elapsed = time.monotonic() - t0
        rate = speed(done / elapsed) if elapsed > 0 and done else "-"
        return f"{amount(done)}  {rate}"

    with click.progressbar(length=total, label=label, file=sys.stderr, show_eta=True,
                           show_percent=True, item_show_func=info) as bar:
        shown.append(bar)
        yield bar.update


def on_wait(msg: str):
    click.echo(f"hypersdk: {msg}", err=True)


@click.group(cls=Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hypersdk", prog_name="hypersdk",
                      message="%(prog)s %(version)s")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="data directory (default $HYPERSDK_DATA_DIR or $XDG_DATA_HOME/hypersdk)")
@click.pass_context
def cli(ctx, data_dir):
    """HyperSDK node: content-addressed backup of VM disk images."""
    ctx.obj = {"data_dir": data_dir}


def open_store(ctx, *, readonly: bool = False):
    from hypersdk.node.store.store import ChunkStore
    path = ctx.obj["data_dir"] or default_data_dir()
    try:
        return ChunkStore(path, readonly=readonly)
    except OSError as exc:
        raise UserError(f"cannot open data dir {path}: {exc.strerror or exc}") from None


# -- store commands ---------------------------------------------------------------------
# Each store command is a click command (arguments -> a plain dict) plus an op of
# node/service/ops.py, `fn(store, args, ui) -> (json doc, text, exit code)`. run_op
# sends the op to the node's control socket when a node runs on the data dir (the
# node runs the same fn in a worker thread on its data dir and streams progress
# back, node/daemon/daemon.py), and runs it here otherwise, so the output is the same.


class LocalUi:
    """Progress and lock-wait messages of an op run in this process."""

    def __init__(self, as_json: bool):
        self.as_json = as_json

    def progress(self, total: int, label: str):
        return progress_bar(total, label, self.as_json)

    def on_wait(self, msg: str):
        on_wait(msg)


def run_store_op(data_dir, name: str, args: dict, as_json: bool):
    """(doc, text, exit) of store op `name` run by the node on data_dir, or
    None when no node runs there. Draws the progress bar here, as a local run would."""
    from contextlib import ExitStack

    from hypersdk.node.daemon.control import call, connect
    s = connect(data_dir)
    if s is None:
        return None
    want = not as_json and sys.stderr.isatty()
    with ExitStack() as bars:
        advance = [None]

        def on_event(ev):
            t = ev.get("t")
            if t == "bar":
                advance[0] = bars.enter_context(
                    progress_bar(int(ev["total"]), str(ev["label"]), as_json))
            elif t == "adv" and advance[0] is not None:
                advance[0](int(ev["n"]))
            elif t == "end":
                bars.close()
                advance[0] = None
            elif t == "wait":
                on_wait(str(ev["msg"]))

        final = call(data_dir, name, args, progress=want, on_event=on_event, timeout=None,
                     sock=s)
    text = final.get("text")
    return (json.loads(final["doc"]), text.decode() if isinstance(text, bytes) else "",
            int(final.get("exit", 0)))


def run_op(ctx, name: str, as_json: bool, /, **args):
    """Run store op `name` through the running node, or here when none runs."""
    from pathlib import Path
    root = Path(ctx.obj["data_dir"] or default_data_dir())
    outcome = run_store_op(root, name, args, as_json)
    if outcome is None:                                  # no node on this data dir
        op = STORE_OPS[name]
        if op.readonly and not (root / "index.sqlite").exists():   # reading creates nothing
            if name == "backups":
                outcome = [], "no backups yet", 0
            elif args.get("network"):
                raise UserError(NEEDS_NODE)
            else:
                raise UserError(f"no store in {root}: nothing has been backed up there "
                                "(give --data-dir or set HYPERSDK_DATA_DIR?)")
        else:
            fresh = not root.exists()
            try:
                with open_store(ctx, readonly=op.readonly) as store:
                    from hypersdk.node.audit.intents import flush
                    flush(store, LocalUi(as_json).on_wait)   # entries a killed op still owes
                    outcome = op.fn(store, args, LocalUi(as_json))
            except BaseException:
                if fresh:
                    _remove_if_empty(root)
                raise
    doc, text, code = outcome
    emit(as_json, doc, text)
    if code:
        ctx.exit(code)


def _remove_if_empty(root) -> None:
    """A data dir this command created for an op that failed before it stored
    anything: remove it, so a failed first backup leaves nothing behind."""
    import shutil
    import sqlite3 as sql
    try:
        db = sql.connect(f"file:{root / 'index.sqlite'}?mode=ro", uri=True)
        try:
            held = db.execute("SELECT (SELECT COUNT(*) FROM chunks) + "
                              "(SELECT COUNT(*) FROM backups)").fetchone()[0]
        finally:
            db.close()
    except sql.Error:
        held = 0
    if not held and not any((root / "packs").glob("pack-*")):
        shutil.rmtree(root, ignore_errors=True)


@cli.command()
@click.argument("path", nargs=-1, required=True)
@click.option("--name", help="backup name (default: the file name, or the VM's name)")
@click.option("--chunk-size", default=str(DEFAULT_CHUNK), show_default=True,
              help="power of two from 64K to 8M")
@click.option("--zstd-level", default=DEFAULT_ZSTD_LEVEL, show_default=True, type=click.IntRange(1, 19),
              help="zstd compression level for new chunks")
@click.option("--quiesce", is_flag=True,
              help="vSphere: ask the guest tools to flush the guest's disks for the snapshot")
@click.option("--insecure", is_flag=True,
              help="vSphere: do not verify the server's TLS certificate")
@click.option("--ca-file", type=click.Path(dir_okay=False), default=None,
              help="vSphere: verify the server's certificate against this CA only")
@click.option("--credentials", type=click.Path(dir_okay=False), default=None,
              help="vSphere: a file (mode 0600) whose first line is the password "
                   "(default: $HYPERSDK_VSPHERE_PASSWORD)")
@click.option("--parallel", type=click.IntRange(1, 16), default=None, metavar="N",
              help="vSphere: disks read at once (default 2; each reads up to 64 MiB ahead)")
@click.option("--parallel-vms", type=click.IntRange(1, 16), default=None, metavar="N",
              help="vSphere, several URLs: VMs backed up at once (default 2)")
@json_option
@click.pass_context
def backup(ctx, path, name, chunk_size, zstd_level, quiesce, insecure, ca_file, credentials,
           parallel, parallel_vms, as_json):
    """Back up the disk image PATH, or the VM(s) at vsphere://USER@HOST[:PORT]/DATACENTER/vm/PATH
    (every disk, from a snapshot, reading only what changed since its last backup; several
    URLs: several VMs, each under its name); print the manifest id(s) and what was stored."""
    from hypersdk.node.service.backup import check_name
    paths = path
    if len(paths) > 1 or parallel_vms:
        from hypersdk.node.sources.vsphere import url as vurl
        if not all(vurl.is_vsphere(p) for p in paths):
            raise UsageError("several sources (or --parallel-vms) are for vsphere:// URLs only")
        if name is not None and len(paths) > 1:
            raise UsageError("--name names one VM's backups: give one URL with it")
    path = paths[0]
    cs = parse_size(chunk_size)
    if not valid_chunk_size(cs):
        raise UsageError(f"--chunk-size {chunk_size}: must be a power of two from 64K to 8M")
    if name is not None:
        check_name(name)
    from hypersdk.node.sources.vsphere import url as vurl
    if vurl.is_vsphere(path):
        if insecure and ca_file:
            raise UsageError("--insecure and --ca-file exclude each other")
        for p in paths:
            vurl.parse(p)                 # a bad URL fails here, before any data dir exists
        password = vurl.password(credentials)
        run_op(ctx, "backup vm", as_json, url=" ".join(paths), password=password, name=name,
               quiesce=quiesce, insecure=insecure,
               ca_file=os.path.abspath(ca_file) if ca_file else None, chunk_size=cs,
               zstd_level=zstd_level, parallel=parallel or 2, parallel_vms=parallel_vms or 2)
        return
    if quiesce or insecure or ca_file or credentials or parallel:
        raise UsageError("--quiesce, --insecure, --ca-file, --credentials and --parallel are "
                         "for vsphere:// sources")
    from hypersdk.node.sources.local import ImageSource
    ImageSource.open(path).close()        # a bad PATH fails here, before any data dir exists
    run_op(ctx, "backup", as_json, path=os.path.abspath(path), name=name, chunk_size=cs,
           zstd_level=zstd_level)


@cli.command()
@click.argument("ref")
@click.argument("out")
@click.option("--force", is_flag=True, help="replace OUT if it is an existing regular file")
@click.option("--to-device", is_flag=True,
              help="OUT is a block device: write the image into it, overwriting the "
                   "device (required to confirm; --force does not)")
@click.option("--follow-symlink", is_flag=True,
              help="if OUT is a symbolic link, write to what it points to (refused otherwise)")
@click.option("--into", is_flag=True,
              help="vSphere: write the disks into the existing (powered-off) VM OUT")
@click.option("--datastore", default=None, help="vSphere: the datastore of a new VM's disks")
@click.option("--insecure", is_flag=True,
              help="vSphere: do not verify the server's TLS certificate")
@click.option("--ca-file", type=click.Path(dir_okay=False), default=None,
              help="vSphere: verify the server's certificate against this CA only")
@click.option("--credentials", type=click.Path(dir_okay=False), default=None,
              help="vSphere: a file (mode 0600) whose first line is the password")
@json_option
@click.pass_context
def restore(ctx, ref, out, force, to_device, follow_symlink, into, datastore, insecure,
            ca_file, credentials, as_json):
    """Restore backup REF (manifest id or prefix, NAME, NAME@N) to the sparse file OUT
    (or, with --to-device, into the block device OUT). A VM backup NAME@N restores into
    a directory OUT (one image per disk and vm.json), or into vSphere: OUT =
    vsphere://USER@HOST[:PORT]/DATACENTER/vm/PATH creates the VM PATH (--into: writes
    into the existing one), uploads the disks and reads them back to verify them."""
    from hypersdk.node.sources.vsphere import url as vurl
    if vurl.is_vsphere(out):
        if insecure and ca_file:
            raise UsageError("--insecure and --ca-file exclude each other")
        if to_device or follow_symlink or force:
            raise UsageError("--force, --to-device and --follow-symlink are for files")
        vurl.parse(out)
        run_op(ctx, "restore vm", as_json, ref=ref, url=out, password=vurl.password(credentials),
               into=into, datastore=datastore, insecure=insecure,
               ca_file=os.path.abspath(ca_file) if ca_file else None)
        return
    if into or datastore or insecure or ca_file or credentials:
        raise UsageError("--into, --datastore, --insecure, --ca-file and --credentials are "
                         "for vsphere:// targets")
    mask = os.umask(0o077)                 # this process's umask (a node runs the op in its
    os.umask(mask)                         # own process): 0666 & ~umask when no mode is known
    run_op(ctx, "restore", as_json, ref=ref, out=os.path.abspath(out), force=force,
           to_device=to_device, follow_symlink=follow_symlink, umask=mask)


@cli.command()
@click.argument("ref", required=False)
@click.option("--network", is_flag=True,
              help="Verify REF on the network: its signed backup entry, its manifest, and "
                   "every replica holder by possession challenges (needs the running node).")
@click.option("--against", metavar="PATH", default=None,
              help="Compare backup REF with the image at PATH chunk by chunk (exit 3 if "
                   "they differ).")
@click.option("--min-holders", type=click.IntRange(1, 64), default=None, metavar="N",
              help="With --network: how many holders must prove possession (default 1).")
@click.option("--detect-loss", type=click.FloatRange(0.5, 99.0), default=None, metavar="PCT",
              help="With --network: the goal the sample size follows: catch a holder that "
                   "lost PCT percent of the chunks (default 1, at least 0.5) ...")
@click.option("--confidence", type=click.FloatRange(1.0, 99.9999), default=None,
              metavar="PCT", help="... with PCT percent confidence (default 99).")
@json_option
@click.pass_context
def verify(ctx, ref, network, against, min_holders, detect_loss, confidence, as_json):
    """Re-read and re-hash chunks of backup REF, or of the whole store.

    With --against PATH, compare backup REF with its source image chunk by chunk
    instead: the one check that finds a backup recorded with the wrong bytes."""
    if network and not ref:
        raise UsageError("verify --network needs a REF (a backup name, NAME@N or manifest id)")
    if against is not None:
        if not ref or network:
            raise UsageError("verify --against PATH needs a REF and no --network")
        against = os.path.abspath(against)
    for flag, value in (("--min-holders", min_holders), ("--detect-loss", detect_loss),
                        ("--confidence", confidence)):
        if value is not None and not network:
            raise UsageError(f"verify {flag} needs --network")
    ppm = (lambda pct: None if pct is None else round(pct * 1e4))    # percent -> ppm
    run_op(ctx, "verify", as_json, ref=ref, network=network, against=against,
           min_holders=min_holders, loss_ppm=ppm(detect_loss), confidence_ppm=ppm(confidence))


@cli.command("backups")
@click.option("--network", is_flag=True,
              help="the network's backups, from the audit logs gossiped here: author, "
                   "copies on other nodes and their health")
@click.option("--all", "show_all", is_flag=True, help="with --network: deleted ones too")
@json_option
@click.pass_context
def list_backups(ctx, network, show_all, as_json):
    """List backups: NAME@VERSION, manifest id, size, creation time."""
    if show_all and not network:
        raise UsageError("--all goes with --network")
    if not network:
        run_op(ctx, "backups", as_json)
        return
    from pathlib import Path

    from hypersdk.node.audit.log import AuditLog
    from hypersdk.node.net import datakey
    from hypersdk.node.replicas import network_view
    root = Path(ctx.obj["data_dir"] or default_data_dir())
    if not (root / "audit.sqlite").exists():
        raise UserError(f"no audit log in {root}: this node has seen no backup yet")
    with AuditLog(root) as log:
        rows = network_view.network_backups(log, datakey.load(root),
                                            include_deleted=show_all)
    emit(as_json, rows, network_view.text(rows))


@cli.command()
@click.argument("ref")
@json_option
@click.pass_context
def delete(ctx, ref, as_json):
    """Delete backup REF; a VM backup NAME@N (or NAME, its latest) with all its disk
    backups. A disk backup alone is refused while its VM backup exists. The chunks
    are reclaimed by `hypersdk gc`."""
    run_op(ctx, "delete", as_json, ref=ref)


def _period(what: str) -> str:
    return f"keep the newest version of each of the last N {what} that have one"


@cli.command()
@click.argument("name", required=False)
@click.option("--all", "all_names", is_flag=True,
              help="apply the policy to every backup name, each on its own")
@click.option("--keep-last", type=int, default=None, metavar="N", help="keep the N newest versions")
@click.option("--keep-hourly", type=int, default=None, metavar="N", help=_period("hours"))
@click.option("--keep-daily", type=int, default=None, metavar="N", help=_period("days"))
@click.option("--keep-weekly", type=int, default=None, metavar="N",
              help=_period("ISO weeks (Monday to Sunday)"))
@click.option("--keep-monthly", type=int, default=None, metavar="N", help=_period("months"))
@click.option("--keep-yearly", type=int, default=None, metavar="N", help=_period("years"))
@click.option("--dry-run", is_flag=True, help="only list what would be kept and removed")
@json_option
@click.pass_context
def forget(ctx, name, all_names, keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly,
           keep_yearly, dry_run, as_json):
    """Remove the versions of backup NAME (an image's or a VM's) that a retention policy
    does not keep, restic-style: a version kept by any --keep-* rule stays, so does the
    newest (and the oldest while a rule has room left); days, weeks, months and years are
    calendar ones in the local time zone. The chunks are reclaimed by `hypersdk gc`."""
    from hypersdk.node.service.retention import Policy
    if bool(name) == all_names:
        raise UsageError("forget needs one backup NAME, or --all for every name")
    keep = dict(keep_last=keep_last, keep_hourly=keep_hourly, keep_daily=keep_daily,
                keep_weekly=keep_weekly, keep_monthly=keep_monthly, keep_yearly=keep_yearly)
    Policy.from_args(keep)             # a bad policy fails here, before any data dir exists
    run_op(ctx, "forget", as_json, name=name, all=all_names, dry_run=dry_run,
           **{k: v or 0 for k, v in keep.items()})


@cli.command()
@json_option
@click.pass_context
def gc(ctx, as_json):
    """Reclaim chunks no backup references."""
    run_op(ctx, "gc", as_json)


@cli.group()
def store():
    """Inspect the local chunk store."""


@store.command()
@json_option
@click.pass_context
def stats(ctx, as_json):
    """Unique chunks, stored bytes, dedup and compression ratios."""
    run_op(ctx, "store stats", as_json)


@cli.group()
def simnet():
    """Simulate many DHT nodes in one process (in-memory network, virtual time)."""


@simnet.command("run")
@click.argument("scenario", type=click.Path(dir_okay=False))
@click.option("--nodes", type=int, default=None, help="override [network] nodes")
@click.option("--seed", type=int, default=None, help="override the scenario's seed")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="report directory (default: simnet-NAME)")
@json_option
def simnet_run(scenario, nodes, seed, out, as_json):
    """Run SCENARIO.toml; write report.json and PNG plots to OUT, print a summary."""
    from pathlib import Path

    from hypersdk.simnet import report, runner
    from hypersdk.simnet.scenario import load
    sc = load(scenario).with_overrides(nodes=nodes, seed=seed)
    out_dir = Path(out or f"simnet-{sc.name}")
    r = runner.run(sc, progress=None if as_json else lambda m: on_wait(f"simnet: {m}"))
    doc = report.build(sc.to_json(), r.metrics, r.wall_seconds, r.peak_rss_bytes)
    files = report.write(doc, out_dir)
    emit(as_json, {"summary": doc["summary"], "run": doc["run"], "files": list(map(str, files))},
         report.table(doc) + f"\nreport            {files[0]} (+ {len(files) - 1} plots)")


@simnet.command("gossip")
@click.option("--nodes", type=click.IntRange(2, 100_000), default=1000, show_default=True)
@click.option("--latency", type=click.FloatRange(0.0, 10.0), default=0.05, show_default=True,
              help="one-way link delay, seconds")
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--entries", type=click.IntRange(1, 10_000), default=20, show_default=True)
@click.option("--fanout", type=click.IntRange(0, 64), default=3, show_default=True)
@click.option("--sync-interval", type=click.FloatRange(0.1, 3600.0), default=5.0,
              show_default=True, help="anti-entropy period, seconds")
@json_option
def simnet_gossip(nodes, latency, seed, entries, fanout, sync_interval, as_json):
    """Audit-log gossip on NODES simulated nodes: spread times, bandwidth, partition heal."""
    from hypersdk.simnet.gossip_run import GossipConfig, run_gossip, summary
    r = run_gossip(GossipConfig(nodes=nodes, latency=latency, seed=seed, entries=entries,
                                fanout=fanout, sync_interval=sync_interval))
    emit(as_json, r, summary(r))
    if r["spread"]["missing_deliveries"] or r["heal"]["converged_after_s"] is None:
        raise SystemExit(3)


@simnet.command("replication")
@click.option("--nodes", type=click.IntRange(4, 20_000), default=1000, show_default=True)
@click.option("--sites", type=click.IntRange(2, 1000), default=10, show_default=True)
@click.option("--days", type=click.IntRange(2, 365), default=30, show_default=True)
@click.option("--replicas", type=click.IntRange(1, 16), default=3, show_default=True)
@click.option("--churn", type=click.FloatRange(0, 1), default=0.05, show_default=True,
              help="share of the nodes that go offline for a while each day")
@click.option("--site-loss-day", type=click.FloatRange(0), default=None,
              help="the day every node of site 0 is lost for good [default: half-way]")
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--out", type=click.Path(file_okay=False), default="simnet-replication",
              show_default=True, help="report directory (JSON and PNG plots)")
@json_option
def simnet_replication(nodes, sites, days, replicas, churn, site_loss_day, seed, out, as_json):
    """Replication over simulated days: churn, a whole site lost, repair (the node's
    placement and health decisions on virtual time)."""
    from pathlib import Path

    from hypersdk.simnet.replication_run import Config, run_replication, summary, write
    r = run_replication(Config(nodes=nodes, sites=sites, days=days, replicas=replicas,
                               churn=churn, seed=seed,
                               site_loss_day=days / 2 if site_loss_day is None else site_loss_day),
                        progress=None if as_json else lambda m: on_wait(f"simnet: {m}"))
    files = write(r, Path(out))
    emit(as_json, r, summary(r) + f"\nreport            {files[0]} (+ {len(files) - 1} plots)")
    if r["backups_lost"]:
        raise SystemExit(3)


@simnet.command("replication-nodes")
@click.option("--nodes", type=click.IntRange(4, 500), default=40, show_default=True)
@click.option("--sites", type=click.IntRange(3, 100), default=8, show_default=True)
@click.option("--hours", type=click.FloatRange(1, 24 * 30), default=36, show_default=True)
@click.option("--replicas", type=click.IntRange(1, 16), default=2, show_default=True)
@click.option("--churn", type=click.FloatRange(0, 24), default=0.5, show_default=True,
              help="nodes that stop for a while, per node and day")
@click.option("--site-loss-hour", type=click.FloatRange(0), default=8, show_default=True,
              help="the hour every node of site 0 is lost for good")
@click.option("--grace-hours", type=click.FloatRange(0.1), default=4, show_default=True,
              help="node run --holder-grace")
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--out", type=click.Path(file_okay=False), default="simnet-replication-nodes",
              show_default=True, help="report directory (JSON and PNG plots)")
@json_option
def simnet_replication_nodes(nodes, sites, hours, replicas, churn, site_loss_hour,
                             grace_hours, seed, out, as_json):
    """Replication with whole nodes: the daemon's own services (placement, health
    checks, repair, takeover, gossip, the DHT, swarm pulls) on virtual time, a site
    lost, the lost site's backups restored byte for byte at the end."""
    from pathlib import Path

    from hypersdk.simnet.replication_nodes import Config, run_nodes, summary, write
    r = run_nodes(Config(nodes=nodes, sites=sites, hours=hours, replicas=replicas, churn=churn,
                         site_loss_h=site_loss_hour, grace_h=grace_hours, seed=seed),
                  progress=None if as_json else lambda s: on_wait(
                      f"simnet: hour {s['hour']:g}: {s['up']} nodes up, "
                      f"{s['under_replicated']} backups short"))
    files = write(r, Path(out))
    emit(as_json, r, summary(r) + f"\n  report: {files[0]} (+ {len(files) - 1} plots)")
    if r["backups_lost"] or r["restore_failed"]:
        raise SystemExit(3)


def main():
    """The console script: click's parsing without its standalone error printing,
    so every error is one line (or a JSON document) with the README's exit code."""
    try:
        rv = cli.main(prog_name="hypersdk", standalone_mode=False)
    except click.exceptions.UsageError as exc:
        hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx else ""
        fail(2, exc.format_message() + hint)
        rv = 2
    except click.ClickException as exc:
        fail(exc.exit_code, exc.format_message())
        rv = exc.exit_code
    except (click.exceptions.Abort, KeyboardInterrupt, EOFError):
        fail(EXIT_INTERRUPTED, "interrupted")
        rv = EXIT_INTERRUPTED
    sys.exit(rv if isinstance(rv, int) else 0)
