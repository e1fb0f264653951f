"""The DHT service: the pure Kademlia of hypersdk.dht driven over a Transport.

    service.py    DhtService: join, lookups, provide / find providers
    rpc.py        the request/response exchange of DHT messages on streams
    republish.py  keeping provider records alive

May import: hypersdk.dht, hypersdk.protocol, hypersdk.node.net.
"""
