"""A peer as the DHT knows it: id, one dialable address, and its site."""
from __future__ import annotations

from dataclasses import dataclass, field

from .keys import ID_BYTES


@dataclass(frozen=True, slots=True)
class Contact:
    id: bytes            # 32 bytes, BLAKE3 of the peer's public key
    addr: str            # e.g. "/ip4/10.1.2.3/tcp/4001" (simnet uses the same form)
    site: str = ""       # operator-declared edge site (diversity limits)
    # the id as an integer (dht.keys.as_int), computed once: XOR distances to
    # contacts are the hot path of every lookup and of RoutingTable.closest
    n: int = field(init=False, repr=False, compare=False)
    # the /24 of an /ip4/ address ("" when not IPv4), computed once: the
    # routing table's diversity check reads it for every contact it compares
    ip_prefix24: str = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if not isinstance(self.id, bytes) or len(self.id) != ID_BYTES:
            raise ValueError("contact id must be 32 bytes")
        object.__setattr__(self, "n", int.from_bytes(self.id, "big"))
        object.__setattr__(self, "ip_prefix24", _prefix24(self.addr))


def _prefix24(addr: str) -> str:
    parts = addr.split("/")
    if len(parts) > 2 and parts[1] == "ip4":
        octets = parts[2].split(".")
        if len(octets) == 4:
            return ".".join(octets[:3])
    return ""
