"""The network below every protocol: the Transport interface and its libp2p
implementation, the bulk (fast) channel, node identities and saved peers.

    transport.py      the interface (open_stream, set_handler, Stream)
    p2p_transport.py  py-libp2p: TCP, Noise, Yamux, Ed25519 peer ids; our own listener
    fast_channel.py   the authenticated bulk channel for chunk transfers
    identity.py       Ed25519 node keys; peers.py  DATA/peers.json
    membership.py     this node's network: its key, certificate, invitations, revocations

May import: hypersdk.protocol, hypersdk.dht (ids), hypersdk.node.errors / config.
"""
