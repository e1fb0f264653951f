"""CLI commands for the signed audit log: audit log / verify / certificate / check-certificate.

Registered on the `cli` group of node/cli/app.py (node/cli/__init__.py imports this module). They
read DATA/audit.sqlite directly (SQLite lets the CLI read while the node
appends), so they work with or without a running node.

    audit log [AUTHOR]         one line per entry: SEQ TIME(UTC) KIND ID SUMMARY
                               (--json: a list of entries, protocol.audit.Entry.to_json)
    audit verify [AUTHOR]      checks every signature, stored id and link of one log
                               (--all: every log held); prints "OK ..." per log, or
                               one "BROKEN author seq N: reason" line per problem, exit 3
    audit certificate REF      writes the certificate (binary, protocol/audit.py) to
                               stdout or -o FILE; refuses to write binary to a terminal
    audit check-certificate F  verifies F offline: exit 0 when valid (with a WARNING
                               line when no other node has witnessed the chain yet;
                               --require-witness makes that exit 4), exit 3 with the
                               reason when F is truncated, altered or does not prove it;
                               it prints the time it is valid as of (--fresh-within
                               DURATION: exit 4 when older; a NOTE line, not an
                               error, when older than the cosigning interval of
                               protocol/audit.py) and counts distinct witnesses
                               (--min-witnesses N: exit 4 below N)
    audit certificate carries the newest cosign of each distinct witness, newest first
    audit certificate refuses an author with a proven fork (exit 1, one line)

AUTHOR is a hex prefix of a node id (or of a public key); default: this node.
"""
from __future__ import annotations

import datetime
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from hypersdk.node.cli.app import cli, emit, json_option
from hypersdk.node.config import default_data_dir, parse_duration
from hypersdk.node.errors import UsageError, UserError
from hypersdk.protocol.errors import AuditChainBroken, ForkDetected, RemoteProtocolError

if TYPE_CHECKING:                 # imported where used: it loads cryptography (~10 ms of
    from hypersdk.protocol import audit  # every CLI command's start otherwise)


def _data_dir(ctx) -> Path:
    return Path(ctx.obj["data_dir"] or default_data_dir())


def _open(ctx):
    from hypersdk.node.audit.log import DB_NAME, AuditLog
    data = _data_dir(ctx)
    if (data / "index.sqlite").exists():          # entries a killed op still owes first
        from hypersdk.node.audit.intents import flush
        from hypersdk.node.store.store import ChunkStore
        with ChunkStore(data, readonly=True) as store:
            flush(store, lambda msg: click.echo(f"hypersdk: {msg}", err=True))
    if not (data / DB_NAME).exists():
        raise UserError(f"no audit log in {data} yet (it starts with the first backup)")
    return AuditLog(data)


def _author(log, author: str | None) -> bytes:
    return log.find_author(author) if author else log.own_author


def _when(ns: int) -> str:
    t = datetime.datetime.fromtimestamp(ns / 1e9, datetime.timezone.utc)
    return f"{t:%Y-%m-%d %H:%M:%S}"


def _span(seconds: int) -> str:
    """3600 -> '1 h', 4800 -> '1 h 20 min', 600 -> '10 min'."""
    h, m = divmod(seconds // 60, 60)
    return " ".join(([f"{h} h"] if h else []) + ([f"{m} min"] if m or not h else []))


def _summary(e: audit.Entry, key=None) -> str:
    """One line for an entry; key (this node's data key) opens sealed names."""
    from hypersdk.protocol import audit
    b = e.body
    m = b.get("manifest", b"").hex()[:16]
    if e.kind in ("backup", "delete"):
        opened = audit.open_body(b, key)
        name = opened["name"] if opened else "(name sealed)"
        if e.kind == "backup":
            return f"{name} manifest {m} size {b['size']} chunks {b['chunks']}"
        return f"{name}@{b['version']} manifest {m}"
    if e.kind == "restore":
        return f"manifest {m} size {b['size']} chunks {b['chunks']}"
    if e.kind == "replica":
        return f"manifest {m} held by {b['holder'].hex()[:16]}"
    if e.kind == "verify":
        s = " ".join(f"{k}={v}" for k, v in sorted(b["summary"].items()))
        return f"manifest {m} at {b['holder'].hex()[:16]}: {b['result']} {s}".rstrip()
    return " ".join(f"{a.hex()[:16]}@{s}" for a, s, _ in audit.witness_heads(e))


@cli.group("audit")
def audit_group():
    """The node's signed, hash-chained audit log."""


@audit_group.command("log")
@click.argument("author", required=False)
@click.option("--limit", type=click.IntRange(1), default=None, help="show the last N entries")
@json_option
@click.pass_context
def audit_log_cmd(ctx, author, limit, as_json):
    """Show the entries of AUTHOR's log (default: this node's)."""
    with _open(ctx) as log:
        a = _author(log, author)
        head = log.head(a)
        start = max(0, head.seq - limit + 1) if head and limit else 0
        entries = list(log.entries(a, start, verify=False)) if head else []
        from hypersdk.dht.keys import node_id
        lines = [f"log of node {node_id(a).hex()[:16]} (key {a.hex()[:16]}): "
                 f"{head.seq + 1 if head else 0} entries"]
        from hypersdk.node.net import datakey
        key = datakey.load(_data_dir(ctx))
        lines += [f"{e.seq:>6} {_when(e.time)} {e.kind:<8} {e.id.hex()[:16]} "
                  f"{_summary(e, key)}" for e in entries]
        emit(as_json, [_entry_json(e, key) for e in entries], "\n".join(lines))


def _entry_json(e: audit.Entry, key) -> dict:
    """An entry's JSON; a sealed backup or delete body opened by `key` also shows
    its labels in "opened" (the signed body keeps them sealed)."""
    from hypersdk.protocol import audit
    doc = e.to_json()
    if "labels" in e.body:
        opened = audit.open_body(e.body, key)
        doc["opened"] = None if opened is None else {
            k: v for k, v in opened.items() if k in ("name", "source")}
    return doc


@audit_group.command("verify")
@click.argument("author", required=False)
@click.option("--all", "all_", is_flag=True, help="verify every log held (own and others')")
@json_option
@click.pass_context
def audit_verify_cmd(ctx, author, all_, as_json):
    """Check every signature and link of AUTHOR's log (default: this node's)."""
    if all_ and author:
        raise UsageError("give AUTHOR or --all, not both")
    with _open(ctx) as log:
        authors = [a for a, _, _ in log.authors()] if all_ else [_author(log, author)]
        reports = [log.verify(a) for a in authors]
    lines = []
    from hypersdk.dht.keys import node_id
    for r in reports:
        who = node_id(r.author).hex()[:16]
        if r.ok:
            head = f"head seq {r.head.seq} {r.head.id.hex()[:16]}" if r.head else "empty"
            lines.append(f"OK log of {who}: {r.entries} entries, every signature and link "
                         f"valid ({head})")
        for p in r.problems:
            lines.append(f"BROKEN log of {who} at seq {p.seq}: {p.reason}"
                         + (f" (entry {p.entry_id.hex()[:16]})" if p.entry_id else ""))
    emit(as_json, [r.to_json() for r in reports], "\n".join(lines))
    if not all(r.ok for r in reports):
        ctx.exit(3)


@audit_group.command("certificate")
@click.argument("ref")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="write to FILE (default: stdout)")
@json_option
@click.pass_context
def audit_certificate_cmd(ctx, ref, output, as_json):
    """Export a self-contained certificate of backup REF (name, NAME@N, manifest id).

    With --json (which needs -o FILE: a certificate is binary) a JSON summary of
    the certificate written is printed instead of the one-line note."""
    from hypersdk.protocol import audit
    out = None
    if as_json and output is None:
        raise UsageError("--json needs -o FILE (a certificate is binary; the JSON "
                         "document describes it)")
    if output is None:
        out = click.get_binary_stream("stdout")
        if out.isatty():
            raise UsageError("a certificate is binary: redirect stdout to a file or use -o FILE")
    with _open(ctx) as log:
        entry = _backup_entry(ctx, log, ref)
        forks = log.forks(entry.author)
        if forks:           # a certificate would vouch for a log its author rewrote
            from hypersdk.dht.keys import node_id as node_id_of
            raise UserError(f"the author of {ref} ({node_id_of(entry.author).hex()[:16]}) "
                            f"signed two different entries at seq {forks[0].seq} (a proven "
                            "fork, `audit verify` shows it): no certificate is exported for "
                            "its log")
        chain = list(log.entries(entry.author, entry.seq))
        if not chain or chain[0].id != entry.id:
            raise UserError("the backup entry changed while being read")
        # the newest cosign of each distinct witness that attests this chain (a
        # contradicting one belongs in a fork report, not in a certificate), newest
        # first: the freshest certificate, vouched for by as many nodes as fit
        good = log.newest_cosigns(entry.author, {e.seq: e.id for e in chain})
        # in a network: pin its key, with the member certificates of the author and
        # the witnesses (ours from DATA/network, the others' as gossip brought them)
        from hypersdk.node.net import membership
        net = membership.load(_data_dir(ctx))
        members, revs = [], []
        if net is not None:
            keys = sorted({entry.author} | {w.author for w in good})
            members = [net.cert.raw] if net.cert.node in keys else []
            members += log.member_certs([k for k in keys if k != net.cert.node])
            # the revocations this node knows of the author and the witnesses travel
            # with the certificate: an offline checker learns them nowhere else
            revs = [r.raw for r in membership.revocations(_data_dir(ctx)) if r.node in keys]
        data = audit.build_certificate(entry.body["manifest"], chain, good,
                                       network=net.public if net else None, members=members,
                                       revocations=revs)
    if output is None:
        out.write(data)
        out.flush()
    else:
        Path(output).write_bytes(data)
    rep = audit.check_certificate(data)
    if as_json:
        emit(True, dict(rep.to_json(), file=str(output), bytes=len(data),
                        chain_entries=len(chain)), "")
        return
    note = (f"witnessed up to seq {rep.witnessed_seq} by {len(rep.witnesses)} node(s)"
            if rep.witnessed else "no witness yet")
    click.echo(f"hypersdk: certificate of manifest {rep.manifest.hex()[:16]}: backup entry seq "
               f"{rep.backup.seq}, {len(chain)} chain entries to head, {note}", err=True)


def _backup_entry(ctx, log, ref: str) -> audit.Entry:
    """The backup entry for REF: a backup in the store, or a manifest id (prefix)
    of a backup entry in any held log (a deleted backup still has its entry)."""
    manifest = None
    from hypersdk.node.store.store import ChunkStore
    data = _data_dir(ctx)
    if (data / "index.sqlite").exists():
        from hypersdk.node.store import catalog
        try:
            with ChunkStore(data, readonly=True) as store:
                manifest = catalog.resolve(store, ref).manifest_id
        except UserError:
            manifest = None
    if manifest is None:
        p = ref.lower()
        if not (4 <= len(p) <= 64 and all(c in "0123456789abcdef" for c in p)):
            raise UserError(f"no backup {ref!r} in the store")
        rows = log.db.execute("SELECT DISTINCT manifest FROM entries WHERE kind='backup' AND "
                              "hex(manifest) LIKE ?", (p.upper() + "%",)).fetchall()
        if not rows:
            raise UserError(f"no backup entry for {ref!r} in the audit log")
        if len(rows) > 1:
            raise UserError(f"manifest prefix {ref!r} is ambiguous ({len(rows)} backups)")
        manifest = bytes(rows[0][0])
    entries = log.find_backup_entries(manifest)
    if not entries:
        raise UserError(f"backup {ref} (manifest {manifest.hex()[:16]}) has no audit entry "
                        "(it was made before this node kept an audit log)")
    own = [e for e in entries if e.author == log.own_author] if (
        data / "node.key").exists() else []
    return (own or entries)[-1]


@audit_group.command("check-certificate")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--require-witness", is_flag=True,
              help="fail (exit 4) when no other node has witnessed the chain")
@click.option("--min-witnesses", type=click.IntRange(1, 64), default=None, metavar="N",
              help="fail (exit 4) unless N distinct other nodes witnessed the chain "
                   "(a witness entry repeated counts once)")
@click.option("--network-key", default=None, metavar="KEY",
              help="the network the backup must belong to: its public key (64 hex "
                   "digits, or a file such as DATA/network/network.pub); the certificate "
                   "must pin it, and only its members' witnesses count")
@click.option("--fresh-within", default=None, metavar="DURATION",
              help="fail (exit 4) when the certificate vouches for nothing newer than "
                   "DURATION ago (30m, 1h, 7d): a later delete or failed verify of the "
                   "backup could be missing from an old certificate")
@json_option
@click.pass_context
def audit_check_certificate_cmd(ctx, file, require_witness, min_witnesses, network_key,
                                fresh_within, as_json):
    """Verify certificate FILE offline (no network, no store)."""
    from hypersdk.protocol import audit
    fresh_ns = parse_duration(fresh_within) if fresh_within is not None else None
    try:
        data = Path(file).read_bytes()
    except OSError as exc:
        raise UserError(f"{file}: {exc.strerror}") from None
    expect = _network_key(network_key) if network_key is not None else None
    try:
        rep = audit.check_certificate(data, network_key=expect)
    except (RemoteProtocolError, AuditChainBroken, ForkDetected) as exc:
        doc = {"ok": False, "reason": str(exc)}
        if as_json:
            emit(True, doc, "")
        click.echo(f"hypersdk: error: INVALID certificate {file}: {exc}", err=True)
        ctx.exit(3)
    from hypersdk.dht.keys import node_id
    from hypersdk.node.net import datakey
    try:                 # the name is sealed (protocol/labels.py): readable with the key
        opened = audit.open_body(rep.backup.body, datakey.load(_data_dir(ctx)))
    except UserError:
        opened = None
    name = opened["name"] if opened else "(name sealed)"
    lines = [f"VALID certificate: node {node_id(rep.author).hex()[:16]} "
             f"(key {rep.author.hex()[:16]}) backed up {name} manifest "
             f"{rep.manifest.hex()}",
             f"backup entry seq {rep.backup.seq} at {_when(rep.backup.time)} UTC; "
             f"{rep.head.seq - rep.backup.seq + 1} entries, every signature and link valid, "
             f"to head seq {rep.head.seq} {rep.head.id.hex()[:16]}",
             f"valid as of {_when(rep.as_of)} UTC (head dated {_when(rep.head.time)} UTC): "
             "entries after that, e.g. a delete, are not in this certificate"]
    if rep.network is not None:
        from hypersdk.protocol import membership as ms
        lines.append(f"network {ms.network_id(rep.network).hex()} (pinned in the file"
                     + (", as given)" if expect else ": compare it with `hypersdk network "
                        "show` of a member, or pass --network-key)")
                     + ("; the author is a member" if rep.author in rep.members else
                        "; WARNING: no member certificate of the author in the file"))
        if rep.author in rep.revoked:
            r = rep.revoked[rep.author]
            lines.append(f"WARNING: the author's membership was revoked at {_when(r.time)} UTC"
                         + (f" ({r.reason})" if r.reason else "") + ": its signatures, this "
                         "backup entry's included, may have been made with a stolen key")
        unvetted = [k for k in rep.witness_keys if k not in rep.members]
        if unvetted:
            lines.append(f"{len(unvetted)} witness(es) not counted: no valid member "
                         "certificate of this network, or revoked: " + ", ".join(
                             node_id(k).hex()[:16] + (" (revoked)" if k in rep.revoked else "")
                             for k in unvetted))
    if rep.witnessed:
        keys = rep.member_witness_keys
        lines.append(f"witnessed up to seq {rep.witnessed_seq} by {len(keys)} distinct "
                     + ("member node(s): " if rep.network else "node(s) (no network: "
                        "anyone could have signed): ")
                     + ", ".join(node_id(k).hex()[:16] for k in keys))
    else:
        lines.append("WARNING: no witness yet: no other node has attested this log, so only "
                     "its author vouches that it was not rewritten")
    now = time.time_ns()
    stale = rep.stale(now)
    if stale:
        lines.append(f"NOTE: valid as of {_when(rep.as_of)} UTC, older than the cosigning "
                     f"interval ({_span(audit.COSIGN_INTERVAL_S)}): entries the author signed "
                     "since (a delete, a failed verify) may be missing; ask a member for a "
                     "fresh certificate or use --fresh-within")
    # a cosign dated ahead of our clock (beyond the skew entries are allowed) would
    # make any certificate look fresh: say so, and --fresh-within does not accept it
    future = rep.as_of > now + audit.DEFAULT_MAX_SKEW_NS
    if future:
        lines.append(f"WARNING: valid as of {_when(rep.as_of)} UTC, which is in the future "
                     "(a clock ahead, or a witness dating its cosign ahead): freshness "
                     "cannot be judged")
    emit(as_json, dict(rep.to_json(), ok=True, age_s=rep.age_ns(now) // 10**9,
                       cosign_interval_s=audit.COSIGN_INTERVAL_S,
                       older_than_cosign_interval=stale, dated_in_the_future=future),
         "\n".join(lines))
    if require_witness and not rep.witnessed:
        ctx.exit(4)
    if fresh_ns is not None and (rep.as_of < now - fresh_ns or future):
        if not as_json:
            click.echo(f"hypersdk: error: the certificate is valid as of {_when(rep.as_of)} "
                       f"UTC, " + ("in the future: not judged fresh" if future else
                                   f"older than {fresh_within}"), err=True)
        ctx.exit(4)
    if min_witnesses is not None and len(rep.member_witness_keys) < min_witnesses:
        if not as_json:
            click.echo(f"hypersdk: error: {len(rep.member_witness_keys)} distinct "
                       f"witness(es), {min_witnesses} required", err=True)
        ctx.exit(4)


def _network_key(text: str) -> bytes:
    """--network-key: 64 hex digits, or a file holding the 32-byte key (network.pub)."""
    t = text.strip().lower()
    if len(t) == 64 and all(c in "0123456789abcdef" for c in t):
        return bytes.fromhex(t)
    try:
        raw = Path(text).read_bytes()
    except OSError as exc:
        raise UsageError(f"--network-key {text}: not 64 hex digits, and cannot read it as a "
                         f"file ({exc.strerror})") from None
    if len(raw) != 32:
        raise UsageError(f"--network-key {text}: a key file holds 32 bytes, this one {len(raw)}")
    return raw
