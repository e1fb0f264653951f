"""The node: the only part of hypersdk with real I/O, one subpackage per concept.

    cli/       parses arguments, prints results                     (top layer)
    daemon/    the node process and its control socket
    service/   the operations, returning results
    audit/     the signed audit log, its gossip, possession challenges
    exchange/  chunk exchange and the swarm   |  kademlia/  the DHT service
    store/     the chunk store                |  sources/   local images (vSphere next)
    net/       transports, identities, peers                        (bottom layer)
    errors.py, config.py, files.py (private modes, file locks)   shared by every layer

Each layer imports only the layers below it (pyproject.toml [tool.importlinter],
checked by tests/test_layout.py).
"""
