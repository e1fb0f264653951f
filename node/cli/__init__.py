"""The `hypersdk` command line: parses arguments, prints results; does no work itself.

    app.py        the click group, its conventions (one-line errors, exit codes,
                  --json, progress bars) and the store commands, whose work is
                  node/service/ops.py's (run here, or by the running node)
    node_cmds.py  node init / run, join, peers, status, dht, fetch
    audit_cmds.py audit log / verify / certificate / check-certificate
    network_cmds.py network create / show, invite, members, revoke

May import every layer below it (daemon, service, ...); nothing imports it.
Importing this package registers every command on the group.
"""
from hypersdk.node.cli import audit_cmds, network_cmds, node_cmds  # noqa: F401  (register)
from hypersdk.node.cli.app import cli, main  # noqa: F401
