"""Kademlia DHT as pure state machines (built by the DHT issue). No I/O here."""
