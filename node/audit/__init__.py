"""The audit log: signed, hash-chained entries of what this node did, other
nodes' logs, gossip, and possession challenges.

    log.py        AuditLog: DATA/audit.sqlite, own appends, foreign logs, forks, witnesses
    intents.py    turning the entries committed operations owe into entries, exactly once
    gossip.py     pushing and anti-entropy of logs between nodes
    possession.py answering and making possession challenges

May import: hypersdk.protocol, hypersdk.dht, hypersdk.node.store, hypersdk.node.exchange,
hypersdk.node.kademlia, hypersdk.node.net.
"""
