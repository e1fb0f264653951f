"""The operations: what a user asks of a node, done here and returned as results.

    ops.py           the store operations for the CLI and the daemon alike
                     (backup, restore, verify, backups, delete, gc, store stats)
    backup.py        an image into the store; restore.py (+ restore_target,
                     restore_partials, restore_staged, image_write) the store into
                     an image file or a device; verify_source.py  a backup against
                     its source
    replication.py   serving, announcing and fetching backups over the network
    net_verify.py    `verify --network`: a backup's signed entry and every holder

May import every layer below it (audit, exchange, kademlia, store, sources, net);
never the daemon or the CLI. Operations print nothing.
"""
