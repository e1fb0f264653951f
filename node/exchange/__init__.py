"""The chunk exchange: serving chunks, fetching them, and the swarm downloader.

    server.py       ExchangeServer: answers Have/Get from a chunk source
    client.py       one session with one peer
    chunk_source.py the store as a source (StoreSource) and a sink (StoreSink)
    swarm.py        Downloader: every missing chunk from every peer that has it
    swarm_plan.py   which peer gets which chunk (pure: no I/O)

May import: hypersdk.protocol, hypersdk.node.store, hypersdk.node.net.
"""
