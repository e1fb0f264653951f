"""CLI commands for network membership: network create / show, invite, members, revoke.

They work on the data dir directly (node/net/membership.py keeps the state
under a lock, so a running node and these commands can share it). Joining
with a token (`join TOKEN`) and the enforcement of membership on every
connection come with the node side of issue 16.
"""
from __future__ import annotations

import time
from pathlib import Path

import click

from hypersdk.node.cli.app import cli, emit, json_option
from hypersdk.node.config import default_data_dir, parse_duration
from hypersdk.node.errors import UsageError, UserError


def _data_dir(ctx) -> Path:
    return Path(ctx.obj["data_dir"] or default_data_dir())


def _identity(ctx):
    from hypersdk.node.audit.log import own_identity
    return own_identity(_data_dir(ctx))


def _when(ns: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(ns / 1e9))


@cli.group()
def network():
    """This node's network: create one, or show the one it is in."""


@network.command("create")
@click.option("--name", default="", help="a name for people (not secret, not unique)")
@click.option("--site", default="site-1", show_default=True, help="this node's site")
@click.option("--key-out", metavar="FILE", default=None,
              help="write the network key to FILE for offline custody instead of keeping "
                   "it on this node (then this node cannot invite or revoke)")
@click.option("--cert-lifetime", default="90d", show_default=True,
              help="how long member certificates are valid (they renew after two thirds; "
                   "at least 30s, at most 3650d)")
@json_option
@click.pass_context
def network_create(ctx, name, site, key_out, cert_lifetime, as_json):
    """Create a network: its Ed25519 key and this node's certificate (admin, member)."""
    from hypersdk.node.net import datakey, membership
    lifetime = parse_duration(cert_lifetime)
    if not 30 * 10**9 <= lifetime <= 3650 * 86400 * 10**9:
        raise UsageError("--cert-lifetime must be between 30s and 3650d")
    net = membership.create(_data_dir(ctx), _identity(ctx), name=name, site=site,
                            now=time.time_ns(), key_out=key_out, cert_lifetime=lifetime)
    dk = datakey.load(_data_dir(ctx)) or datakey.create(_data_dir(ctx))
    where = f"in {key_out} (keep it offline and safe)" if key_out else \
        f"in {_data_dir(ctx) / 'network' / 'network.key'}"
    emit(as_json, dict(net.to_json(), data_key_fingerprint=dk.fingerprint.hex()),
         f"network {net.id.hex()}{' (' + name + ')' if name else ''}\n"
         f"network key   {where}\n"
         f"data key      {datakey.path(_data_dir(ctx))} (fingerprint "
         f"{dk.fingerprint.hex()[:16]})\n"
         f"this node     admin, member at site {site}; certificate until "
         f"{_when(net.cert.expires)} UTC\n"
         "WARNING: whoever holds the network key admits and revokes members; losing it "
         "means no new members can be admitted. Back it up.\n"
         "WARNING: backups are encrypted with the data key: without it no backup can be "
         "read, by anyone. Export it now and keep the copy offline: "
         "`hypersdk key export FILE`.")


@network.command("show")
@json_option
@click.pass_context
def network_show(ctx, as_json):
    """The network this node is in, and its certificate."""
    from hypersdk.node.net import membership
    net = membership.load(_data_dir(ctx))
    if net is None:
        emit(as_json, {"network": None}, "this node is in no network (it works alone)")
        return
    c = net.cert
    emit(as_json, net.to_json(),
         f"network {net.id.hex()}{' (' + net.name + ')' if net.name else ''}\n"
         f"this node     {', '.join(c.roles)} at site {c.site}, certificate serial {c.serial} "
         f"until {_when(c.expires)} UTC\n"
         f"network key   {'held here' if net.has_key else 'not held here'}")


@cli.command()
@click.option("--site", required=True, help="the site the new member will be at")
@click.option("--role", "roles", multiple=True, type=click.Choice(["member", "admin"]),
              default=("member",), show_default=True, help="repeat for several roles")
@click.option("--no-data-key", "no_data_key", is_flag=True,
              help="do not share this tenant's data key with the new member: it stores and "
                   "serves replicas but cannot read them (a storage-only site)")
@click.option("--expires", default="1h", show_default=True,
              help="how long the token can be used (30m, 1h, 7d; at most 30d)")
@click.option("--addr", "addrs", multiple=True, metavar="MULTIADDR",
              help="where the new member reaches this node (default: the running node's "
                   "addresses, DATA/node.addrs)")
@json_option
@click.pass_context
def invite(ctx, site, roles, no_data_key, expires, addrs, as_json):
    """Print a one-time invitation token (needs the network key on this node)."""
    from hypersdk.node.net import membership
    data = _data_dir(ctx)
    if not addrs and (data / "node.addrs").exists():
        addrs = tuple((data / "node.addrs").read_text().split())
    t = membership.invite(data, site=site, roles=roles, expires_in=parse_duration(expires),
                          addrs=addrs, now=time.time_ns(), share_key=not no_data_key)
    text = t.encode()
    emit(as_json, {"token": text, "site": t.site, "roles": list(t.roles),
                   "expires_ns": t.expires, "addrs": list(t.addrs)},
         f"{text}\n(one use, for site {t.site} as {', '.join(t.roles)}, until "
         f"{_when(t.expires)} UTC; it is a secret: send it privately)")


@cli.command()
@json_option
@click.pass_context
def members(ctx, as_json):
    """The members this node knows: node, site, roles, expiry, status."""
    from hypersdk.node.net import membership
    rows = membership.members(_data_dir(ctx), now=time.time_ns())
    lines = [f"{'NODE KEY':<18} {'SITE':<16} {'ROLES':<14} {'EXPIRES (UTC)':<17} "
             f"{'LAST SEEN (UTC)':<17} STATUS"]
    for r in rows:
        seen = _when(r["last_seen_ns"]) if r["last_seen_ns"] else "-"
        lines.append(f"{r['node'][:16]:<18} {r['site']:<16} {','.join(r['roles']):<14} "
                     f"{_when(r['expires_ns']):<17} {seen:<17} {r['status']}"
                     + ("  (this node)" if r["this_node"] else ""))
    emit(as_json, rows, "\n".join(lines))


@cli.command()
@click.argument("node")
@click.option("--reason", default="", help="recorded in the revocation")
@json_option
@click.pass_context
def revoke(ctx, node, reason, as_json):
    """Revoke every certificate of NODE (its 64-hex node key, or a unique prefix)."""
    from hypersdk.node.net import membership
    data = _data_dir(ctx)
    key = node.lower()
    if not (4 <= len(key) <= 64 and all(c in "0123456789abcdef" for c in key)):
        raise UsageError(f"NODE must be a node key in hex (or a prefix of 4+ digits), "
                         f"not {node!r}")
    hits = {r["node"] for r in membership.members(data, now=time.time_ns())
            if r["node"].startswith(key)}
    if len(hits) != 1:
        raise UserError(f"{len(hits) or 'no'} member(s) match {node!r}" +
                        (": give more digits" if hits else " (see `hypersdk members`)"))
    r = membership.revoke(data, bytes.fromhex(hits.pop()), now=time.time_ns(), reason=reason)
    emit(as_json, r.to_json(), f"revoked node {r.node.hex()[:16]} (certificates up to serial "
                               f"{r.serial})")


@cli.group()
def key():
    """The data key backups are encrypted with: show, export, import."""


@key.command("show")
@json_option
@click.pass_context
def key_show(ctx, as_json):
    """This node's data key fingerprint (never the key)."""
    from hypersdk.node.net import datakey
    k = datakey.load(_data_dir(ctx))
    emit(as_json, {"data_key_fingerprint": k.fingerprint.hex() if k else None},
         f"data key fingerprint {k.fingerprint.hex()}" if k else
         "this node has no data key (it stores what it is given but cannot read it)")


@key.command("export")
@click.argument("file", type=click.Path(dir_okay=False))
@json_option
@click.pass_context
def key_export(ctx, file, as_json):
    """Write the data key to FILE (new, mode 0600) for offline custody."""
    from hypersdk.node.net import datakey
    k = datakey.export(_data_dir(ctx), file)
    emit(as_json, {"file": str(file), "data_key_fingerprint": k.fingerprint.hex()},
         f"data key {k.fingerprint.hex()[:16]} written to {file}: keep it offline; whoever "
         "holds it can read every backup of this tenant")


@key.command("import")
@click.argument("file", type=click.Path(dir_okay=False))
@json_option
@click.pass_context
def key_import(ctx, file, as_json):
    """Install the data key exported in FILE (e.g. on a rebuilt node)."""
    from hypersdk.node.net import datakey
    k = datakey.import_(_data_dir(ctx), file)
    emit(as_json, {"data_key_fingerprint": k.fingerprint.hex()},
         f"data key {k.fingerprint.hex()[:16]} installed")
