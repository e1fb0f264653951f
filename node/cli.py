"""The `hypersdk` command line.

Every command takes --json for machine output, shows a progress bar on a
TTY for long work, and reports a user-fixable problem as one line on stderr
with a non-zero exit (HYPERSDK_DEBUG=1 shows the traceback instead).
"""
from __future__ import annotations

import datetime
import json
import os
import sqlite3
import sys
from contextlib import contextmanager

import click

from protocol.chunks import DEFAULT_CHUNK, valid_chunk_size
from protocol.errors import IntegrityError, ProtocolError

from .config import DEFAULT_ZSTD_LEVEL, default_data_dir, human, parse_size
from .errors import UsageError, UserError


class Main(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except Exception as exc:              # one clear line, non-zero exit
            if os.environ.get("HYPERSDK_DEBUG"):
                raise
            code, msg = _describe(exc)
            click.echo(f"hypersdk: error: {msg}", err=True)
            ctx.exit(code)


def _describe(exc: BaseException) -> tuple[int, str]:
    if isinstance(exc, UserError):
        return exc.exit_code, str(exc)
    if isinstance(exc, IntegrityError):
        return 3, f"{exc} (run `hypersdk verify` for the full damage report)"
    if isinstance(exc, ProtocolError):
        return 3, f"malformed data: {exc}"
    if isinstance(exc, sqlite3.OperationalError) and "full" in str(exc):
        return 1, "no space left in the data dir"
    if isinstance(exc, sqlite3.DatabaseError):
        return 1, f"store index: {exc}"
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        return 1, f"{where}{exc.strerror or exc}"
    if isinstance(exc, KeyboardInterrupt):
        return 130, "interrupted"
    return 1, f"{type(exc).__name__}: {exc}"


def json_option(f):
    return click.option("--json", "as_json", is_flag=True, help="machine-readable output")(f)


def emit(as_json: bool, doc, text: str):
    click.echo(json.dumps(doc, indent=1, sort_keys=True) if as_json else text)


@contextmanager
def progress_bar(total: int, label: str, as_json: bool):
    """Yield an advance(n) callable; draws a bar on a TTY stderr only."""
    if as_json or not sys.stderr.isatty() or total <= 0:
        yield None
        return
    with click.progressbar(length=total, label=label, file=sys.stderr,
                           show_eta=True, show_percent=True) as bar:
        yield bar.update


def on_wait(msg: str):
    click.echo(f"hypersdk: {msg}", err=True)


@click.group(cls=Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="data directory (default $HYPERSDK_DATA_DIR or $XDG_DATA_HOME/hypersdk)")
@click.pass_context
def cli(ctx, data_dir):
    """HyperSDK node: content-addressed backup of VM disk images."""
    ctx.obj = {"data_dir": data_dir}


def open_store(ctx, *, readonly: bool = False):
    from .store import ChunkStore
    path = ctx.obj["data_dir"] or default_data_dir()
    try:
        return ChunkStore(path, readonly=readonly)
    except OSError as exc:
        raise UserError(f"cannot open data dir {path}: {exc.strerror or exc}") from None


# -- store commands ---------------------------------------------------------------------
# Each store command is a click command (arguments -> a plain dict) plus an op
# `fn(store, args, ui) -> (json doc, text, exit code)`. run_op sends the op to
# the node's control socket when a node runs on the data dir (the node runs
# the same fn in a worker thread on its data dir and streams progress back,
# node/daemon.py), and runs it here otherwise, so the output is the same.

class StoreOp:
    def __init__(self, fn, readonly: bool):
        self.fn, self.readonly = fn, readonly


STORE_OPS: dict[str, StoreOp] = {}


def store_op(name: str, *, readonly: bool = False):
    def register(fn):
        STORE_OPS[name] = StoreOp(fn, readonly)
        return fn
    return register


class LocalUi:
    """Progress and lock-wait messages of an op run in this process."""

    def __init__(self, as_json: bool):
        self.as_json = as_json

    def progress(self, total: int, label: str):
        return progress_bar(total, label, self.as_json)

    def on_wait(self, msg: str):
        on_wait(msg)


def run_op(ctx, name: str, as_json: bool, /, **args):
    """Run store op `name` through the running node, or here when none runs."""
    from pathlib import Path
    from .control import run_store_op
    root = Path(ctx.obj["data_dir"] or default_data_dir())
    outcome = run_store_op(root, name, args, as_json)
    if outcome is None:                                  # no node on this data dir
        op = STORE_OPS[name]
        with open_store(ctx, readonly=op.readonly) as store:
            outcome = op.fn(store, args, LocalUi(as_json))
    doc, text, code = outcome
    emit(as_json, doc, text)
    if code:
        ctx.exit(code)


@cli.command()
@click.argument("path")
@click.option("--name", help="backup name (default: the file name)")
@click.option("--chunk-size", default=str(DEFAULT_CHUNK), show_default=True,
              help="power of two from 64K to 8M")
@click.option("--zstd-level", default=DEFAULT_ZSTD_LEVEL, show_default=True, type=click.IntRange(1, 19),
              help="zstd compression level for new chunks")
@json_option
@click.pass_context
def backup(ctx, path, name, chunk_size, zstd_level, as_json):
    """Back up the disk image PATH; print the manifest id and what was stored."""
    cs = parse_size(chunk_size)
    if not valid_chunk_size(cs):
        raise UsageError(f"--chunk-size {chunk_size}: must be a power of two from 64K to 8M")
    run_op(ctx, "backup", as_json, path=os.path.abspath(path), name=name, chunk_size=cs,
           zstd_level=zstd_level)


@store_op("backup")
def _op_backup(store, a, ui):
    from .backup import backup as run_backup
    path = a["path"]
    total = os.path.getsize(path) if os.path.isfile(path) else 0
    with ui.progress(total, "backup") as advance:
        r = run_backup(store, path, name=a["name"], chunk_size=a["chunk_size"],
                       level=a["zstd_level"], progress=advance, on_wait=ui.on_wait)
    from . import audit_log, catalog
    audit_log.record_after_op(store.root, "backup", {
        "manifest": r.manifest_id, "name": r.name, "size": r.size, "chunks": r.chunks,
        "source": catalog.load_manifest(store, r.manifest_id).source}, ui.on_wait)
    rate = r.size / r.seconds if r.seconds else 0
    return (r.to_json(),
            f"backup {r.name}@{r.version}\n"
            f"manifest      {r.manifest_id.hex()}\n"
            f"bytes read    {human(r.size)} ({r.size} bytes) in {r.seconds:.2f} s, {human(rate)}/s\n"
            f"chunks        {r.chunks} ({r.zero_chunks} zero, {r.new_chunks} new)\n"
            f"new stored    {human(r.new_bytes_stored)} ({human(r.new_bytes_raw)} before compression)",
            0)


@cli.command()
@click.argument("ref")
@click.argument("out")
@click.option("--force", is_flag=True, help="overwrite OUT if it exists")
@json_option
@click.pass_context
def restore(ctx, ref, out, force, as_json):
    """Restore backup REF (manifest id or prefix, NAME, NAME@N) to the sparse file OUT."""
    run_op(ctx, "restore", as_json, ref=ref, out=os.path.abspath(out), force=force)


@store_op("restore", readonly=True)
def _op_restore(store, a, ui):
    from . import catalog
    from .restore import restore as run_restore
    size = catalog.resolve(store, a["ref"]).size
    with ui.progress(size, "restore") as advance:
        r = run_restore(store, a["ref"], a["out"], force=a["force"], progress=advance,
                        on_wait=ui.on_wait)
    from . import audit_log
    audit_log.record_after_op(store.root, "restore", {
        "manifest": r.manifest_id, "size": r.size, "chunks": r.chunks}, ui.on_wait)
    rate = r.size / r.seconds if r.seconds else 0
    return (r.to_json(),
            f"restored {r.manifest_id.hex()[:16]} to {r.out}: {human(r.size)} in {r.seconds:.2f} s "
            f"({human(rate)}/s), {r.chunks} chunks verified, {r.zero_chunks} zero chunks left as holes",
            0)


@cli.command()
@click.argument("ref", required=False)
@click.option("--network", is_flag=True,
              help="Verify REF on the network: its signed backup entry, its manifest, and "
                   "every replica holder by possession challenges (needs the running node).")
@json_option
@click.pass_context
def verify(ctx, ref, network, as_json):
    """Re-read and re-hash chunks of backup REF, or of the whole store."""
    if network and not ref:
        raise UserError("verify --network needs a REF (a backup name, NAME@N or manifest id)")
    run_op(ctx, "verify", as_json, ref=ref, network=network)


@store_op("verify", readonly=True)
def _op_verify(store, a, ui):
    from .verify import verify_backup, verify_store
    if a.get("network"):
        raise UserError("verify --network needs the running node on this data dir "
                        "(start it with `hypersdk node run`)")
    ref = a["ref"]
    if ref:
        from . import catalog
        b = catalog.resolve(store, ref)
        from protocol.manifest import list_count
        chunks = b.stats.get("chunks", 0)
        n = chunks - b.stats.get("zero_chunks", 0) + list_count(chunks)
        with ui.progress(n, "verify") as advance:
            report = verify_backup(store, ref, progress=advance)
        from . import audit_log
        audit_log.record_after_op(store.root, "verify", {
            "manifest": b.manifest_id, "holder": None,  # = this node
            "result": "ok" if report.ok else "damaged",
            "summary": {"chunks_checked": report.chunks_checked,
                        "bytes_checked": report.bytes_checked,
                        "damaged": len(report.damaged)}}, ui.on_wait)
    else:
        n = store.db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]
        with ui.progress(n, "verify") as advance:
            report = verify_store(store, progress=advance)
    lines = [f"checked {report.chunks_checked} chunks ({human(report.bytes_checked)}), "
             f"{report.backups_checked} backups"]
    for d in report.damaged.values():
        lines.append(f"DAMAGED chunk {d.cid.hex()}: {d.reason}")
    for b, cids in report.affected.values():
        lines.append(f"AFFECTED backup {b.ref} (manifest {b.manifest_id.hex()[:16]}): "
                     f"{len(cids)} bad chunk(s)")
    lines.append("OK: store is consistent" if report.ok and not ref else
                 f"OK: backup {ref} is intact" if report.ok else
                 f"FAILED: {len(report.damaged)} damaged chunk(s), "
                 f"{len(report.affected)} backup(s) affected")
    return report.to_json(), "\n".join(lines), 0 if report.ok else 3


@cli.command("backups")
@json_option
@click.pass_context
def list_backups(ctx, as_json):
    """List backups: NAME@VERSION, manifest id, size, creation time."""
    run_op(ctx, "backups", as_json)


@store_op("backups", readonly=True)
def _op_backups(store, a, ui):
    from . import catalog
    rows = catalog.list_backups(store)
    lines = [f"{'REF':<28} {'MANIFEST':<16} {'SIZE':>10} {'NEW STORED':>10}  CREATED (UTC)"]
    for b in rows:
        when = datetime.datetime.fromtimestamp(b.created / 1e9, datetime.timezone.utc)
        lines.append(f"{b.ref:<28} {b.manifest_id.hex()[:16]:<16} {human(b.size):>10} "
                     f"{human(b.stats.get('new_bytes_stored', 0)):>10}  "
                     f"{when:%Y-%m-%d %H:%M:%S}")
    return [b.to_json() for b in rows], "\n".join(lines) if rows else "no backups yet", 0


@cli.command()
@click.argument("ref")
@json_option
@click.pass_context
def delete(ctx, ref, as_json):
    """Delete backup REF (its chunks are reclaimed by `hypersdk gc`)."""
    run_op(ctx, "delete", as_json, ref=ref)


@store_op("delete")
def _op_delete(store, a, ui):
    from . import catalog
    with store.write_lock(ui.on_wait):
        b = catalog.resolve(store, a["ref"])
        catalog.delete_backup(store, b)
    from . import audit_log
    audit_log.record_after_op(store.root, "delete", {
        "manifest": b.manifest_id, "name": b.name, "version": b.version}, ui.on_wait)
    return ({"deleted": b.to_json()},
            f"deleted {b.ref} (manifest {b.manifest_id.hex()[:16]}); run `hypersdk gc` to reclaim space",
            0)


@cli.command()
@json_option
@click.pass_context
def gc(ctx, as_json):
    """Reclaim chunks no backup references."""
    run_op(ctx, "gc", as_json)


@store_op("gc")
def _op_gc(store, a, ui):
    from .gc import gc as run_gc
    r = run_gc(store, on_wait=ui.on_wait)
    return (r, f"deleted {r['chunks_deleted']} unreferenced chunks "
               f"({human(r['bytes_released'])}); packs removed {r['packs_removed']}, "
               f"rewritten {r['packs_rewritten']}; disk {human(r['disk_bytes_before'])} -> "
               f"{human(r['disk_bytes_after'])}", 0)


@cli.group()
def store():
    """Inspect the local chunk store."""


@store.command()
@json_option
@click.pass_context
def stats(ctx, as_json):
    """Unique chunks, stored bytes, dedup and compression ratios."""
    run_op(ctx, "store stats", as_json)


@store_op("store stats", readonly=True)
def _op_stats(st, a, ui):
    s = st.stats()
    s["data_dir"] = str(st.root)
    ratio = lambda v: f"{v:.2f}x" if v else "-"
    return (s,
            f"data dir           {s['data_dir']}\n"
            f"backups            {s['backups']}\n"
            f"logical bytes      {human(s['logical_bytes'])} (sum of image sizes)\n"
            f"unique chunks      {s['unique_chunks']} ({s['delta_chunks']} stored as deltas "
            f"against an earlier version)\n"
            f"unique raw bytes   {human(s['unique_raw_bytes'])}\n"
            f"stored bytes       {human(s['stored_bytes'])} (packs on disk {human(s['pack_bytes_on_disk'])})\n"
            f"dedup ratio        {ratio(s['dedup_ratio'])} (logical / unique raw; zero chunks count as dedup)\n"
            f"compression ratio  {ratio(s['compression_ratio'])} (unique raw / stored)\n"
            f"total reduction    {ratio(s['reduction_ratio'])} (logical / stored)",
            0)


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
    from simnet import report, runner
    from simnet.scenario import load
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
    from simnet.gossip_run import GossipConfig, run_gossip, summary
    r = run_gossip(GossipConfig(nodes=nodes, latency=latency, seed=seed, entries=entries,
                                fanout=fanout, sync_interval=sync_interval))
    emit(as_json, r, summary(r))
    if r["spread"]["missing_deliveries"] or r["heal"]["converged_after_s"] is None:
        raise SystemExit(3)


from . import cli_node  # noqa: E402,F401  (registers node, join, peers, status, dht)
from . import cli_audit  # noqa: E402,F401  (registers audit log/verify/certificate)


def main():
    cli(prog_name="hypersdk")
