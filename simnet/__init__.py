"""In-memory network with virtual time (built by the DHT/simnet issue)."""
