"""A node's long-term Ed25519 identity, and its key file.

The node id every other part of the system uses is BLAKE3 of the raw 32-byte
Ed25519 public key (dht.keys.node_id): a node cannot choose where it sits in
the keyspace. The same key is the libp2p identity of the node's P2PTransport,
so the Noise handshake authenticates exactly the key the node id is made of.

Key file format: exactly the raw 32-byte Ed25519 private key (the RFC 8032
seed), nothing else. Chosen over PKCS#8 because it has one valid length, no
parser to get wrong, and a corrupted file is detected by its size alone.
The file is written atomically (temp file in the same directory, fsync,
rename, fsync of the directory) with mode 0600; `load` refuses a file that
group or others can read or write, a file of the wrong size, or anything
that is not a regular file, with an IdentityError naming the path.
"""
from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from hypersdk.dht.keys import node_id as _node_id
from hypersdk.node.errors import UserError
from hypersdk.node.files import NotPrivate, read_private, write_atomic

KEY_BYTES = 32


class IdentityError(UserError):
    """The identity key file is missing, unreadable, malformed or too open."""


class Identity:
    """An Ed25519 key pair. Immutable; cheap to copy around."""

    __slots__ = ("_key", "_public", "_node_id")

    def __init__(self, private_key: Ed25519PrivateKey):
        self._key = private_key
        self._public = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self._node_id = _node_id(self._public)

    # -- construction -------------------------------------------------------
    @classmethod
    def generate(cls) -> "Identity":
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> "Identity":
        if len(raw) != KEY_BYTES:
            raise ValueError(f"an Ed25519 private key is {KEY_BYTES} bytes, not {len(raw)}")
        return cls(Ed25519PrivateKey.from_private_bytes(bytes(raw)))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Identity":
        path = Path(path)
        try:
            raw, size = read_private(path, KEY_BYTES, "identity key file", follow=False)
        except NotPrivate as exc:
            raise IdentityError(str(exc)) from None
        if len(raw) != KEY_BYTES or size != KEY_BYTES:
            raise IdentityError(f"identity key file {path} is {size} bytes, expected a raw "
                                f"{KEY_BYTES}-byte Ed25519 private key")
        return cls.from_private_bytes(raw)

    @classmethod
    def load_or_generate(cls, path: str | os.PathLike) -> "Identity":
        """Load the identity at path, creating (and saving) a new one if absent."""
        if not os.path.lexists(path):
            ident = cls.generate()
            ident.save(path)
            return ident
        return cls.load(path)

    def save(self, path: str | os.PathLike) -> None:
        """Write the key file atomically with mode 0600 (replacing any old one)."""
        write_atomic(path, self.private_bytes())

    # -- the key ------------------------------------------------------------
    def private_bytes(self) -> bytes:
        return self._key.private_bytes(serialization.Encoding.Raw,
                                       serialization.PrivateFormat.Raw,
                                       serialization.NoEncryption())

    @property
    def public_key(self) -> bytes:
        """The raw 32-byte Ed25519 public key."""
        return self._public

    @property
    def node_id(self) -> bytes:
        """BLAKE3 of the raw public key: this node's place in the keyspace."""
        return self._node_id

    def sign(self, data: bytes) -> bytes:
        """64-byte Ed25519 signature of data."""
        return self._key.sign(bytes(data))

    # -- libp2p -------------------------------------------------------------
    def libp2p_key_pair(self):
        """This identity as a libp2p KeyPair (imports libp2p lazily)."""
        from libp2p.crypto.ed25519 import Ed25519PrivateKey as P2PKey
        from libp2p.crypto.keys import KeyPair
        priv = P2PKey.from_bytes(self.private_bytes())
        return KeyPair(priv, priv.get_public_key())

    @property
    def libp2p_peer_id(self):
        """The libp2p peer ID (libp2p.peer.id.ID; str() gives "12D3KooW...")."""
        from libp2p.crypto.ed25519 import Ed25519PublicKey
        from libp2p.peer.id import ID
        return ID.from_pubkey(Ed25519PublicKey.from_bytes(self._public))

    def __repr__(self) -> str:
        return f"Identity(node_id={self._node_id.hex()[:16]}…)"
