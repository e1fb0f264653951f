"""CLI commands for the node daemon: node init/run, join, peers, status, dht provide/find.

Registered on the `cli` group of node/cli/app.py (node/cli/__init__.py imports this module).
Everything but `node init` and `node run` talks to the running node through
its control socket (node/daemon/control.py) and fails with one line when none runs.

Output formats (text; --json prints the node's document instead):

    node init   peer id   12D3KooW...        {"peer_id", "node_id", "key_file", "data_dir",
                node id   <64 hex>            "existing": the key was there already}
                key file  DATA/node.key
    node run    peer_id 12D3KooW...           (--json: one line {"peer_id", "node_id",
                node_id <64 hex>               "addrs", "control", "pid"})
                listen /ip4/.../tcp/N/p2p/12D3KooW...   (one line per address)
                control DATA/control.sock
                ready
    join        joined <peer id> (node <16 hex>); routing table <n> peers; saved in peers.json
    peers       PEER ID / NODE / RTT / IN / OUT / ADDRESS table, or "no peers"
    status      key/value lines
    dht provide provided <key>: stored on <n> peers
    dht find    one line per provider: "<peer id> <addr>", then hops/queries/latency
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from hypersdk.dht.providers import MAX_RECORDS
from hypersdk.node.cli.app import cli, emit, json_option
from hypersdk.node.config import default_data_dir, human, parse_size
from hypersdk.node.errors import UsageError, UserError


def _data_dir(ctx) -> Path:
    return Path(ctx.obj["data_dir"] or default_data_dir())


def _ask(ctx, cmd: str, args: dict | None = None, timeout: float | None = 120.0):
    from hypersdk.node.daemon.control import call_json
    return call_json(_data_dir(ctx), cmd, args, timeout=timeout)


@cli.group()
def node():
    """Create this node's identity and run the node."""


@node.command()
@json_option
@click.pass_context
def init(ctx, as_json):
    """Create the data dir and the node's Ed25519 identity (DATA/node.key, mode 0600).

    Idempotent: if the data dir has an identity already (made by an earlier
    init, or by a `backup`, which signs its audit entry with it), print that
    one (--json: "existing": true). A key file that cannot be read, or is not
    a valid key, is an error: it is never replaced."""
    from hypersdk.node.audit.log import own_identity
    from hypersdk.node.daemon.daemon import KEY_FILE
    from hypersdk.node.net.identity import Identity
    data = _data_dir(ctx)
    key = data / KEY_FILE
    existing = os.path.lexists(key)
    # own_identity creates the key without ever replacing one (link(2), as a
    # concurrent `backup` may be creating it too) and loads it otherwise
    ident = Identity.load(key) if existing else own_identity(data)
    doc = {"peer_id": str(ident.libp2p_peer_id), "node_id": ident.node_id.hex(),
           "key_file": str(key), "data_dir": str(data), "existing": existing}
    emit(as_json, doc, f"peer id   {doc['peer_id']}\nnode id   {doc['node_id']}\n"
                       f"key file  {key}")


@node.command()
@click.option("--listen", default=None, metavar="MULTIADDR",
              help="address to listen on (default /ip4/0.0.0.0/tcp/4001)")
@click.option("--bootstrap", multiple=True, metavar="MULTIADDR",
              help="a peer to join through (repeatable; saved peers are used too)")
@click.option("--announce", multiple=True, metavar="MULTIADDR",
              help="address peers should dial (repeatable; default: the listen address, "
                   "0.0.0.0 replaced by the primary IPv4 address)")
@click.option("--dht-k", type=click.IntRange(2, 64), default=None, hidden=True,
              help="DHT bucket size / replication (default 20; tests use small networks)")
@click.option("--serve-memory", default="256M", metavar="SIZE", show_default=True,
              help="most chunk bytes held at once for the peers this node serves "
                   "(1/16 of it per peer); beyond it, peers wait")
@click.option("--provider-records", type=click.IntRange(1024, 1 << 24), default=MAX_RECORDS,
              show_default=True, metavar="N",
              help="most DHT provider records kept for other peers (about 250 bytes "
                   "each); a full store is shared fairly among the peers announcing")
@click.option("--replicas", type=click.IntRange(0, 16), default=None, metavar="N",
              help="copies of this node's backups to keep on other sites (distinct ones, "
                   "not this node's), unless `hypersdk policy` says otherwise for a name "
                   "[default: the policy file's default, else 2]")
@click.option("--quota", default=None, metavar="SIZE",
              help="the most bytes this node's store may hold: copies other members ask "
                   "it to keep are refused beyond it, with the reason [default: the disk]")
@click.option("--replicate-interval", type=click.FloatRange(0.05, 86400), default=None,
              hidden=True, help="seconds between replication passes (default 30; tests)")
@click.option("--holder-check", type=click.FloatRange(0.05, 86400 * 7), default=None,
              metavar="SECONDS", help="how often each holder of a copy of this node's "
              "backups proves it still holds it [default: 3600]")
@click.option("--holder-grace", type=click.FloatRange(0.05, 86400 * 30), default=None,
              metavar="SECONDS", help="a holder unreachable this long after its last good "
              "check is replaced by one on another site [default: 14400]")
@click.option("--orphans-after", default=None, metavar="DURATION",
              help="release copies held for a member whose log has been silent this long "
                   "(e.g. 90d) [default: 180d]")
@click.option("--upload-limit", default=None, metavar="RATE",
              help="the most bytes per second this node sends to peers (restores and "
                   "replication alike), e.g. 50M [default: no limit]")
@click.option("--replicate-rate", default=None, metavar="RATE",
              help="the most bytes per second this node pulls for replication and repair, "
                   "e.g. 20M [default: no limit]")
@click.option("--replicate-window", multiple=True, metavar="HH:MM-HH:MM",
              help="replicate only inside this window of local time (repeatable; "
                   "22:00-06:00 runs over midnight) [default: any time]")
@click.option("--carbon-signal", default=None, metavar="FILE|URL",
              help="a file or http(s) URL giving the grid's carbon intensity (a number, or "
                   "JSON); with --carbon-max, replicate only while it is at most that")
@click.option("--carbon-max", type=click.FloatRange(0), default=None, metavar="N",
              help="the highest carbon intensity (gCO2e/kWh) replication runs at")
@click.option("--keep-orphans", is_flag=True,
              help="never release copies of a silent member (its site may be gone: they "
                   "may be the last copies); copies are still released when their author "
                   "deletes them")
@json_option
@click.pass_context
def run(ctx, listen, bootstrap, announce, dht_k, serve_memory, provider_records, replicas,
        quota, replicate_interval, holder_check, holder_grace, orphans_after, upload_limit,
        replicate_rate, replicate_window, carbon_signal, carbon_max, keep_orphans, as_json):
    """Run the node in the foreground until SIGINT/SIGTERM."""
    import signal

    import trio

    from hypersdk.node.daemon.daemon import DEFAULT_LISTEN, KEY_FILE, Daemon, tune_malloc
    tune_malloc()                   # before any thread starts
    from hypersdk.node.net.identity import Identity
    data = _data_dir(ctx)
    key = data / KEY_FILE
    if not os.path.lexists(key):
        raise UserError(f"no identity in {data}: run `hypersdk node init` first")
    ident = Identity.load(key)
    _check_addrs(listen, bootstrap, announce)
    serve_bytes = parse_size(serve_memory)
    if serve_bytes < 16 << 20:
        raise UsageError(f"--serve-memory {serve_memory}: at least 16M (a few chunks in flight)")
    quota_bytes = parse_size(quota) if quota is not None else None
    from hypersdk.node.config import parse_duration
    orphan_s = parse_duration(orphans_after) / 1e9 if orphans_after is not None else None

    def rate_of(text, flag):
        if text is None:
            return None
        n = parse_size(text)
        if n < 64 << 10:
            raise UsageError(f"{flag} {text}: at least 64K (bytes per second)")
        return float(n)
    rate_of(upload_limit, "--upload-limit")
    rate_of(replicate_rate, "--replicate-rate")
    from hypersdk.node.replicas.windows import Windows, parse_span
    if (carbon_signal is None) != (carbon_max is None):
        raise UsageError("--carbon-signal and --carbon-max go together")
    windows = Windows([parse_span(w) for w in replicate_window], carbon_signal, carbon_max)
    from hypersdk.node.replicas.policy import Policy
    Policy.load(data, replicas)             # a malformed policy file: say so now

    async def main():
        # the receiver first: a SIGTERM during startup still stops us cleanly
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                d = Daemon(data, ident, listen=listen or DEFAULT_LISTEN, bootstrap=bootstrap,
                           announce=announce, k=dht_k, serve_memory=serve_bytes,
                           provider_records=provider_records, replicas=replicas,
                           quota=quota_bytes, replicate_interval=replicate_interval,
                           health_interval=holder_check, holder_grace=holder_grace,
                           orphans_after=orphan_s, keep_orphans=keep_orphans,
                           upload_limit=rate_of(upload_limit, "--upload-limit"),
                           replicate_rate=rate_of(replicate_rate, "--replicate-rate"),
                           windows=windows)
                await nursery.start(d.run)
                from hypersdk.node.daemon.control import socket_path
                doc = {"peer_id": str(ident.libp2p_peer_id), "node_id": ident.node_id.hex(),
                       "addrs": d.addrs, "control": str(socket_path(d.data_dir)),
                       "pid": os.getpid()}
                if as_json:
                    click.echo(json.dumps(doc, sort_keys=True))
                else:
                    click.echo(f"peer_id {doc['peer_id']}\nnode_id {doc['node_id']}")
                    for a in d.addrs:
                        click.echo(f"listen {a}")
                    click.echo(f"control {doc['control']}\nready")
                sys.stdout.flush()
                async for signum in signals:
                    click.echo(f"hypersdk: {signal.Signals(signum).name}: stopping", err=True)
                    break
                nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    except BaseExceptionGroup as eg:        # a startup error inside the nurseries
        raise _sole(eg) from None


def _check_addrs(listen, bootstrap, announce) -> None:
    """A malformed multiaddr is a usage error, before anything starts."""
    import multiaddr

    from hypersdk.node.net.p2p_transport import parse_peer_addr
    from hypersdk.node.net.transport import TransportError
    for opt, values in (("--listen", [listen] if listen else []), ("--announce", announce)):
        for a in values:
            try:
                multiaddr.Multiaddr(a)
            except Exception as exc:
                raise UsageError(f"{opt} {a!r} is not a multiaddr: {exc}") from None
    for a in bootstrap:
        if "/p2p/" not in a:
            raise UsageError(f"--bootstrap {a!r} lacks /p2p/<peer id> (use an address that "
                             "`hypersdk node run` or `hypersdk status` prints)")
        try:
            parse_peer_addr(a)
        except TransportError as exc:
            raise UsageError(f"--bootstrap: {exc}") from None


def _sole(eg: BaseExceptionGroup) -> BaseException:
    """The one exception a group (of groups) holds, or the group itself."""
    while isinstance(eg, BaseExceptionGroup) and len(eg.exceptions) == 1:
        eg = eg.exceptions[0]
    return eg


@cli.command()
@click.argument("addr", metavar="MULTIADDR|TOKEN")
@json_option
@click.pass_context
def join(ctx, addr, as_json):
    """Connect the running node to the peer at MULTIADDR (/ip4/../tcp/../p2p/12D3KooW...)
    and join the DHT through it; the peer is saved so a restart rejoins.

    With an invitation TOKEN (hsdk1..., from `hypersdk invite`): join that network,
    getting this node's member certificate from the inviter."""
    if addr.strip().startswith("hsdk1."):
        r = _ask(ctx, "join network", {"token": addr.strip()}, timeout=120.0)
        c = r["certificate"]
        fp = r["data_key_fingerprint"][:16]
        key = (f"data key {fp} received" if r["data_key_shared"] else
               "the inviter shares no data key: this node stores the tenant's replicas "
               f"without reading them; its own backups use a new data key {fp}")
        emit(as_json, r, f"joined network {r['network']}"
                         f"{' (' + r['name'] + ')' if r['name'] else ''} as "
                         f"{', '.join(c['roles'])} at site {c['site']}; inviter {r['inviter']} "
                         f"saved as a peer\n{key}\nWARNING: without the data key no backup "
                         "can be read: export a copy (`hypersdk key export FILE`)")
        return
    r = _ask(ctx, "join", {"addr": addr})
    emit(as_json, r, f"joined {r['peer_id']} (node {r['node_id'][:16]}); routing table "
                     f"{r['routing_table']} peers; saved in {r['saved']}")


@cli.command()
@json_option
@click.pass_context
def peers(ctx, as_json):
    """Peers in the node's routing table: RTT (a DHT ping now) and bytes exchanged."""
    rows = _ask(ctx, "peers")
    lines = [f"{'PEER ID':<52} {'NODE':<16} {'RTT':>9} {'IN':>9} {'OUT':>9}  ADDRESS"]
    for p in rows:
        rtt = "-" if p["rtt_ms"] is None else f"{p['rtt_ms']:.1f} ms"
        lines.append(f"{p['peer_id']:<52} {p['node_id'][:16]:<16} {rtt:>9} "
                     f"{human(p['bytes_in']):>9} {human(p['bytes_out']):>9}  {p['addr']}")
    emit(as_json, rows, "\n".join(lines) if rows else "no peers")


def _membership_line(m: dict) -> str:
    if m["mode"] == "open":
        return ("membership     none: this node is in no network and works alone; any node "
                "that knows its address can connect")
    refused = m["counters"].get("refused", 0)
    cut = sum(v for k, v in m["counters"].items() if k.startswith("cut off:"))
    return (f"membership     members only: network {m['network'][:16]}"
            f"{' (' + m['name'] + ')' if m['name'] else ''}, site {m['site']}, "
            f"{m['admitted']} members connected, {refused} refused, {cut} cut off, "
            f"{m['revocations']} revocations")


@cli.command()
@json_option
@click.pass_context
def status(ctx, as_json):
    """The running node: identity, addresses, DHT, store, transfers."""
    s = _ask(ctx, "status")
    lines = [f"peer id        {s['peer_id']}", f"node id        {s['node_id']}"]
    lines += [f"listen         {a}" for a in s["addrs"]]
    b = s["bootstrap"]
    lines += [f"data dir       {s['data_dir']}",
              f"routing table  {s['dht']['routing_table']} peers "
              f"(providing {s['dht']['providing']} keys)",
              f"bootstrap      {b['state']} ({b['attempts']} attempts)",
              _membership_line(s["membership"]),
              f"store          {s['store']['chunks']} chunks, "
              f"{human(s['store']['stored_bytes'])} stored, {s['store']['backups']} backups",
              f"transfers      {len(s['transfers']) or 'none'}",
              "served         " + (", ".join(f"{k} {v}" for k, v in sorted(s["served"].items()))
                                    or "nothing yet")]
    emit(as_json, s, "\n".join(lines))


@cli.group()
def dht():
    """DHT debugging through the running node."""


@dht.command()
@click.argument("key", metavar="KEYHEX")
@json_option
@click.pass_context
def provide(ctx, key, as_json):
    """Announce that this node provides KEYHEX (64 hex digits)."""
    r = _ask(ctx, "dht provide", {"key": key})
    emit(as_json, r, f"provided {r['key']}: stored on {r['stored']} peers")


@dht.command()
@click.argument("key", metavar="KEYHEX")
@click.option("--count", default=1, show_default=True, help="stop after this many providers")
@json_option
@click.pass_context
def find(ctx, key, count, as_json):
    """Find providers of KEYHEX; print them with the lookup's hops, queries and latency."""
    r = _ask(ctx, "dht find", {"key": key, "count": count})
    lines = [f"{p['peer_id']} {p['addr']}" for p in r["providers"]] or ["no providers found"]
    lines.append(f"hops {r['hops']}, queries {r['queries']}, failures {r['failures']}, "
                 f"latency {r['latency'] * 1000:.1f} ms")
    emit(as_json, r, "\n".join(lines))


@cli.command()
@click.argument("ref")
@json_option
@click.pass_context
def fetch(ctx, ref, as_json):
    """Copy backup REF (NAME, NAME@N, manifest id) from the network into the store.

    Only the chunks not held here are fetched, each from every peer that has
    it at once; the backup is then listed, served and announced like a local
    one. Needs a running node (`hypersdk node run`)."""
    from hypersdk.node.cli.app import run_store_op
    outcome = run_store_op(_data_dir(ctx), "fetch", {"ref": ref}, as_json)
    if outcome is None:
        raise UserError(f"no node is running on data dir {_data_dir(ctx)}: fetch needs the "
                        "network (start one with `hypersdk node run`)")
    doc, text, code = outcome
    emit(as_json, doc, text)
    if code:
        ctx.exit(code)


@cli.group("policy")
def policy_group():
    """Replication policy: how many copies of this node's backups live on other sites."""


@policy_group.command("set")
@click.argument("name", required=False)
@click.option("--default", "is_default", is_flag=True,
              help="set the default for every name without a rule of its own")
@click.option("--replicas", type=click.IntRange(0, 16), required=True, metavar="N",
              help="copies wanted on distinct sites other than this node's (0: none)")
@click.option("--min", "minimum", type=click.IntRange(0, 16), default=None, metavar="M",
              help="below M copies the backup is reported under-replicated (default: N)")
@json_option
@click.pass_context
def policy_set(ctx, name, is_default, replicas, minimum, as_json):
    """Set NAME's replication rule (or, with --default, everyone's), in DATA/policy.json;
    a running node applies it at its next pass. A VM set's NAME covers its disks."""
    from hypersdk.node.replicas.policy import set_rule
    if bool(name) == is_default:
        raise UsageError("give a backup NAME or --default (not both)")
    pol = set_rule(_data_dir(ctx), name, replicas, minimum)
    r = pol.default if is_default else pol.rule(name)
    emit(as_json, pol.to_json(), f"{'default' if is_default else name}: {r.replicas} "
                                 f"replica(s) on other sites, under-replicated below {r.min}")


@policy_group.command("show")
@json_option
@click.pass_context
def policy_show(ctx, as_json):
    """Show the replication policy (DATA/policy.json; the default applies to any other
    name; `node run --replicas N` overrides the default)."""
    from hypersdk.node.replicas.policy import Policy
    pol = Policy.load(_data_dir(ctx))
    lines = [f"default  {pol.default.replicas} replica(s), min {pol.default.min}"]
    lines += [f"{n}  {r.replicas} replica(s), min {r.min}" for n, r in sorted(pol.names.items())]
    emit(as_json, pol.to_json(), "\n".join(lines))
