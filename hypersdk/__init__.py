"""HyperSDK node: a peer-to-peer backup fabric for VM disks.

The installed distribution has this one top-level package; its subpackages live
in the repository's top-level folders (pyproject.toml maps them):
    hypersdk.protocol   protocol/   wire formats and signed records: pure, no I/O
    hypersdk.dht        dht/        Kademlia: pure state machines, no I/O, no clock
    hypersdk.node       node/       the node: the only place with real I/O
    hypersdk.simnet     simnet/     in-memory network and virtual time
"""
