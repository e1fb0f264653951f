"""A lean authenticated bulk channel beside libp2p: one TCP connection per session,
both ends proven by their node identity keys, AES-256-GCM records of up to 4 MiB.

Why. py-libp2p's stream path (Noise frames of at most 64 KiB, yamux frames, a
window update and a lock per read, all in Python) costs ~8 syscalls and dozens of
Python calls per 64 KiB: a profile of a 4-seed restore showed the leecher's event
loop busy in yamux/Noise read/write and window-update sends, topping out at
~75-190 MB/s. Here a 1 MiB chunk is one record: one encrypt (OpenSSL AES-GCM, GB/s),
one send_all, and on the reader a length prefix plus a few recv_into calls into a
preallocated buffer and one decrypt. The exchange protocol (protocol/exchange.py,
framing unchanged) runs over it exactly as over a libp2p stream; libp2p stays the
control plane (DHT, the offer below, and the fallback when the channel fails).

Rendezvous (OFFER_PROTOCOL, a libp2p protocol, so the offer is authenticated by
Noise): the client sends b"\\x01"; the server answers
b"\\x01" | TCP port (2 bytes BE) | token (16 random bytes). The token is single-use,
expires after `token_ttl` seconds and is bound to the node id that asked for it.
The client dials the host of the peer's libp2p multiaddr at that port.

Handshake (bounded by HANDSHAKE_TIMEOUT, sizes fixed):
    C -> S  MAGIC | token | c_eph (X25519 pub, 32) | c_id (Ed25519 pub, 32)
    S -> C  s_eph (32) | s_id (32) | Ed25519 sig by s_id over b"server" + th
    C -> S  Ed25519 sig by c_id over b"client" + th
th = SHA-256(MAGIC | token | c_eph | s_eph | c_id | s_id). The client requires
node_id(s_id) == the node id it meant to reach; the server requires
node_id(c_id) == the node id the token was issued to; each verifies the other's
signature over the transcript (which binds both ephemeral keys: no MITM, no
replay across sessions). Keys: HKDF-SHA256(X25519(c_eph, s_eph), salt=th) ->
32 bytes client->server, 32 bytes server->client.

Records: length L (4 bytes BE, 16 < L <= MAX_RECORD + 16, checked before the
record is waited for; the reader reads ahead into a fixed RECV_BUFFER) | AES-GCM(key, nonce = record
counter (12 bytes BE), plaintext, aad =
the length prefix). An empty plaintext is the end of stream (so truncation by a
third party is detected: a TCP close without it is a TransportError). Any
failure to authenticate a record closes the channel with FastChannelError (a
TransportError): tampered bytes are never delivered.

Memory: records are sealed into one send buffer per stream (reused, no fresh
buffer per chunk) and read into one receive buffer; the first stream of a
process calls tune_malloc() so that the ~1 MiB buffers the bulk path allocates
and frees per chunk are reused instead of page-faulted in again each time.

Stream semantics as node/net/transport.py's: send_all, receive_some(max) (b"" at the
end of stream), aclose(); plus send_parts(parts), which packs several buffers into
one record per part, in one send (a Data header, then its payload whole).
"""
from __future__ import annotations

import hashlib
import logging
import mmap
import os
import secrets
import struct
import weakref

import trio
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from hypersdk.dht.keys import node_id as _node_id
from hypersdk.node.net.transport import TransportError

log = logging.getLogger(__name__)

OFFER_PROTOCOL = "/hypersdk/fastchan/1"
MAGIC = b"HSDKFC1\x00"
TOKEN_LEN = 16
MAX_RECORD = 4 << 20                  # plaintext bytes per record
TAG_LEN = 16
RECV_BUFFER = MAX_RECORD + TAG_LEN + 4 + (1 << 20)   # > one whole record (reads ahead)
HANDSHAKE_TIMEOUT = 10.0
OFFER_REQUEST = b"\x01"
OFFER_LEN = 1 + 2 + TOKEN_LEN
_HELLO_LEN = len(MAGIC) + TOKEN_LEN + 32 + 32
_REPLY_LEN = 32 + 32 + 64
_LEN = struct.Struct(">I")
ENV_DISABLE = "HYPERSDK_NO_FAST_CHANNEL"


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MALLOC_MMAP_THRESHOLD = 32 << 20      # > any record or chunk payload (4 MiB, 8 MiB)
MALLOC_TRIM_THRESHOLD = 128 << 20
_malloc_tuned: bool | None = None


def tune_malloc() -> bool:
    """Keep the buffers of bulk traffic in the process (glibc; once per process).

    Every chunk record allocates ~1 MiB buffers (a decrypted record, a pack read)
    that die a few ms later. With glibc's defaults (a dynamic mmap threshold, and
    a trim threshold of twice that) freed ones are handed back to the kernel
    (munmap, or madvise / brk trim of the arena top), so each new one faults its
    pages in again: ~170,000 page faults per 2 GiB swarm restore on the leecher,
    paid partly inside AES-GCM calls that hold the GIL. Fixed thresholds above
    the largest buffer keep that memory for reuse instead; peak RSS stays the
    peak of live buffers (bounded by the windows), it just is not given back in
    between. Returns whether it was applied (False off glibc)."""
    global _malloc_tuned
    if _malloc_tuned is None:
        _malloc_tuned = False
        try:
            import ctypes
            mallopt = ctypes.CDLL(None).mallopt
            mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            _malloc_tuned = (mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD) == 1
                             and mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD) == 1)
        except (OSError, AttributeError):
            pass
    return _malloc_tuned


class FastChannelError(TransportError):
    """The channel failed: handshake refused, identity mismatch, a bad record."""


def _raw(pub) -> bytes:
    return pub.public_bytes(Encoding.Raw, PublicFormat.Raw)


def _transcript(token, c_eph, s_eph, c_id, s_id) -> bytes:
    return hashlib.sha256(MAGIC + token + c_eph + s_eph + c_id + s_id).digest()


def _keys(shared: bytes, th: bytes) -> tuple[bytes, bytes]:
    okm = HKDF(hashes.SHA256(), 64, salt=th, info=b"hypersdk fastchan 1 keys").derive(shared)
    return okm[:32], okm[32:]


def _verify(pub: bytes, sig: bytes, data: bytes, who: str) -> None:
    try:
        Ed25519PublicKey.from_public_bytes(pub).verify(sig, data)
    except (InvalidSignature, ValueError):
        raise FastChannelError(f"fast channel: {who}'s handshake signature is invalid") from None


def _io_error(exc) -> FastChannelError:
    return FastChannelError(f"fast channel: {type(exc).__name__}: {exc}")


class FastStream:
    """An authenticated, encrypted stream over one TCP connection (module docstring)."""

    def __init__(self, stream: trio.SocketStream, send_key: bytes, recv_key: bytes,
                 peer_id: bytes):
        tune_malloc()
        self._stream = stream
        self._sock = stream.socket
        self._enc = AESGCM(send_key)
        self._dec = AESGCM(recv_key)
        self._send_n = 0
        self._recv_n = 0
        self.peer_id = peer_id
        self.tally = None          # an object with bytes_in/bytes_out (node `peers`), or None
        self._rbuf = mmap.mmap(-1, RECV_BUFFER)  # received, not yet decrypted: [_rpos, _rend)
        self._rview = memoryview(self._rbuf)
        self._rpos = self._rend = 0
        self._sbuf = bytearray()       # records are sealed into it (reused: see _seal_many)
        self._pending = b""
        self._off = 0
        self._eof = False
        self._closed = False
        self._sent_eof = False
        self._send_lock = trio.Lock()

    # -- sending ---------------------------------------------------------------------------
    def _seal(self, plain) -> bytes:
        return bytes(self._seal_many((plain,)))

    def _seal_many(self, plains) -> memoryview:
        """Records of each plaintext, encrypted straight into the stream's send
        buffer (no copy of a plaintext other than its encryption). The buffer is
        reused by the next call, so the caller (holding _send_lock) sends the view
        before sealing again: a fresh 1 MiB buffer per chunk cost a page fault per
        4 KiB written into it."""
        total = sum(4 + len(p) + TAG_LEN for p in plains)
        if len(self._sbuf) < total:
            self._sbuf = bytearray(total)
        view = memoryview(self._sbuf)[:total]
        o = 0
        for p in plains:
            n = len(p) + TAG_LEN
            prefix = _LEN.pack(n)
            view[o:o + 4] = prefix
            nonce = self._send_n.to_bytes(12, "big")
            self._send_n += 1
            self._enc.encrypt_into(nonce, p, prefix, view[o + 4:o + 4 + n])
            o += 4 + n
        if self.tally is not None:
            self.tally.bytes_out += total
        return view

    async def _send_records(self, plains) -> None:
        if self._closed or self._sent_eof:
            raise trio.ClosedResourceError("fast stream is closed")
        async with self._send_lock:
            try:
                for p in plains:
                    await self._stream.send_all(self._seal_many((p,)))
            except (trio.BrokenResourceError, OSError) as exc:
                raise _io_error(exc) from None

    async def send_all(self, data) -> None:
        if not data:
            if self._closed or self._sent_eof:
                raise trio.ClosedResourceError("fast stream is closed")
            return
        view = memoryview(data)
        await self._send_records([view[i:i + MAX_RECORD]
                                  for i in range(0, len(view), MAX_RECORD)])

    async def send_parts(self, parts) -> None:
        """Send the concatenation of `parts`: one record per part (each at most
        MAX_RECORD bytes; larger ones are split), all in one send. The reader gets
        each part as one piece (a chunk payload arrives whole: no copy to join it)."""
        if self._closed or self._sent_eof:
            raise trio.ClosedResourceError("fast stream is closed")
        plains = []
        for p in parts:
            v = memoryview(p)
            plains.extend(v[i:i + MAX_RECORD] for i in range(0, len(v), MAX_RECORD))
        plains = [p for p in plains if len(p)]
        if not plains:
            return
        async with self._send_lock:
            try:
                await self._stream.send_all(self._seal_many(plains))
            except (trio.BrokenResourceError, OSError) as exc:
                raise _io_error(exc) from None

    # -- receiving -------------------------------------------------------------------------
    async def _need(self, n: int) -> None:
        """Make the n bytes after the read position available in the receive buffer
        (contiguous), reading as much as the socket has each time: a 1 MiB chunk's
        two records usually take one or two recv calls, not a call per length prefix
        and per body. n <= the buffer's size (the caller checked a record's length)."""
        have = self._rend - self._rpos
        if have >= n:
            return
        buf = self._rview
        if self._rpos + n > len(buf):             # no room behind: move the tail to the front
            buf[:have] = buf[self._rpos:self._rend]
            self._rpos, self._rend = 0, have
        while self._rend - self._rpos < n:
            try:
                k = await self._sock.recv_into(buf[self._rend:], len(buf) - self._rend)
            except OSError as exc:
                raise _io_error(exc) from None
            if k == 0:
                raise FastChannelError("fast channel: connection closed without an "
                                       "end-of-stream record (truncated)")
            self._rend += k

    async def _next_record(self) -> None:
        await self._need(4)
        o = self._rpos
        prefix = bytes(self._rview[o:o + 4])
        n, = _LEN.unpack(prefix)
        if not TAG_LEN <= n <= MAX_RECORD + TAG_LEN:
            raise FastChannelError(f"fast channel: record length {n} out of bounds")
        await self._need(4 + n)
        o = self._rpos
        body = self._rview[o + 4:o + 4 + n]
        self._rpos = o + 4 + n
        if self._rpos == self._rend:
            self._rpos = self._rend = 0
        nonce = self._recv_n.to_bytes(12, "big")
        self._recv_n += 1
        if self.tally is not None:
            self.tally.bytes_in += 4 + n
        try:
            plain = self._dec.decrypt(nonce, body, prefix)
        except InvalidTag:
            raise FastChannelError("fast channel: a record failed authentication") from None
        finally:
            body.release()
        if not plain:
            self._eof = True
        self._pending, self._off = plain, 0

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._closed:
            raise trio.ClosedResourceError("fast stream is closed")
        while self._off >= len(self._pending):
            if self._eof:
                await trio.lowlevel.checkpoint()
                return b""
            try:
                await self._next_record()
            except FastChannelError:
                await self._abort()
                raise
        p, off = self._pending, self._off
        if max_bytes is None or max_bytes >= len(p) - off:
            self._pending, self._off = b"", 0
            return p if off == 0 else p[off:]
        self._off = off + max_bytes
        return p[off:off + max_bytes]

    # -- closing ---------------------------------------------------------------------------
    async def _abort(self) -> None:
        self._closed = True
        with trio.CancelScope(shield=True):
            try:
                await self._stream.aclose()
            except Exception:
                pass

    async def aclose(self) -> None:
        if self._closed:
            return
        try:
            if not self._sent_eof:
                self._sent_eof = True
                with trio.move_on_after(2) as cs:
                    cs.shield = True
                    async with self._send_lock:
                        await self._stream.send_all(self._seal(b""))
        except Exception:
            pass
        finally:
            await self._abort()

    async def reset(self) -> None:
        await self._abort()

    def cut(self) -> None:
        """Close the connection now, from outside (membership cut the peer off): tasks
        blocked on it get an error at once, the peer sees the connection drop."""
        self._closed = True
        try:
            trio.lowlevel.notify_closing(self._sock)
            self._sock.close()
        except Exception as exc:
            log.debug("cutting a fast channel: %r", exc)


async def _read_exact(stream: trio.SocketStream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        d = await stream.receive_some(n - len(buf))
        if not d:
            raise FastChannelError("fast channel: handshake cut short")
        buf += d
    return bytes(buf)


# -- the client ------------------------------------------------------------------------------

def host_of(addr: str) -> str:
    """The IP of a multiaddr string (/ip4/H/... or /ip6/H/...)."""
    parts = addr.split("/")
    for proto in ("ip4", "ip6"):
        if proto in parts:
            i = parts.index(proto)
            if i + 1 < len(parts):
                return parts[i + 1]
    raise FastChannelError(f"fast channel: no IP address in {addr!r}")


async def client_handshake(stream: trio.SocketStream, identity, expected_node_id: bytes,
                           token: bytes) -> FastStream:
    c_eph = X25519PrivateKey.generate()
    c_eph_pub = _raw(c_eph.public_key())
    c_id = identity.public_key
    await stream.send_all(MAGIC + token + c_eph_pub + c_id)
    reply = await _read_exact(stream, _REPLY_LEN)
    s_eph_pub, s_id, sig_s = reply[:32], reply[32:64], reply[64:]
    if _node_id(s_id) != expected_node_id:
        raise FastChannelError("fast channel: the server's key is not the expected node's "
                               f"(wanted {expected_node_id.hex()[:12]})")
    th = _transcript(token, c_eph_pub, s_eph_pub, c_id, s_id)
    _verify(s_id, sig_s, b"server" + th, "server")
    await stream.send_all(identity.sign(b"client" + th))
    try:
        shared = c_eph.exchange(X25519PublicKey.from_public_bytes(s_eph_pub))
    except ValueError as exc:
        raise FastChannelError(f"fast channel: bad key agreement: {exc}") from None
    c2s, s2c = _keys(shared, th)
    return FastStream(stream, c2s, s2c, expected_node_id)


async def request_offer(transport, peer_id: bytes, addr: str) -> tuple[int, bytes]:
    """Ask a peer (over libp2p) for a fast channel: (port, token)."""
    s = await transport.open_stream(peer_id, addr, OFFER_PROTOCOL)
    try:
        await s.send_all(OFFER_REQUEST)
        buf = b""
        while len(buf) < OFFER_LEN:
            d = await s.receive_some(OFFER_LEN - len(buf))
            if not d:
                break
            buf += d
    finally:
        with trio.CancelScope(shield=True):
            try:
                await s.aclose()
            except Exception:
                pass
    if len(buf) != OFFER_LEN or buf[0] != 1:
        raise FastChannelError("fast channel: malformed offer")
    port = int.from_bytes(buf[1:3], "big")
    if port == 0:
        raise FastChannelError("fast channel: peer offers no port")
    return port, buf[3:]


class FastDialer:
    """Opens FastStreams to peers: offer over libp2p, then TCP + handshake."""

    def __init__(self, identity, transport, tallies=None, admit=None):
        """tallies: node id -> Tally (node/daemon/daemon.py CountingTransport.tallies).
        admit(node_id) -> bool: is it a member now (node/net/gate.py); None: anyone."""
        self.identity = identity
        self.transport = transport
        self.tallies = tallies
        self.admit = admit
        self._live: dict[bytes, weakref.WeakSet] = {}

    def cut(self, peer_id: bytes) -> int:
        """Close every channel we opened to this peer (it was cut off)."""
        chans = self._live.pop(peer_id, ())
        for fs in list(chans):
            fs.cut()
        return len(chans)

    async def open(self, peer_id: bytes, addr: str) -> FastStream:
        if os.environ.get(ENV_DISABLE):
            raise FastChannelError("fast channel disabled")
        if self.admit is not None and not self.admit(peer_id):
            raise FastChannelError(f"fast channel: node {peer_id.hex()[:12]} is not a member")
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                port, token = await request_offer(self.transport, peer_id, addr)
                stream = await trio.open_tcp_stream(host_of(addr), port)
                try:
                    fs = await client_handshake(stream, self.identity, peer_id, token)
                    if self.tallies is not None:
                        fs.tally = self.tallies[peer_id]
                    self._live.setdefault(peer_id, weakref.WeakSet()).add(fs)
                    return fs
                except BaseException:
                    with trio.CancelScope(shield=True):
                        await stream.aclose()
                    raise
        except trio.TooSlowError:
            raise FastChannelError("fast channel: handshake timed out") from None
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise _io_error(exc) from None


# -- the server ------------------------------------------------------------------------------

class FastChannelServer:
    """Listens for fast channels; each authenticated one is given to `handler(stream,
    peer_id)` (e.g. ExchangeServer.handle). Register offer_handler on the libp2p
    transport under OFFER_PROTOCOL."""

    def __init__(self, identity, handler, *, host: str = "127.0.0.1",
                 token_ttl: float = 30.0, max_tokens: int = 4096, max_conns: int = 256,
                 tallies=None, admit=None):
        self.identity = identity
        self.admit = admit              # node id -> bool: a member now (None: anyone)
        self._live: dict[bytes, set] = {}
        self.tallies = tallies          # node id -> Tally, or None
        self.handler = handler
        self.host = host
        self.token_ttl = token_ttl
        self.max_tokens = max_tokens
        self._tokens: dict[bytes, tuple[bytes, float]] = {}
        self._conns = trio.Semaphore(max_conns)
        self.port = 0
        self.counters = {"offers": 0, "accepted": 0, "refused": 0}

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host=self.host)
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as n:
            task_status.started(self.port)
            await trio.serve_listeners(self._conn, listeners, handler_nursery=n)

    def issue(self, peer_id: bytes) -> bytes:
        now = trio.current_time()
        if len(self._tokens) >= self.max_tokens:
            for t, (_, exp) in list(self._tokens.items()):
                if exp < now:
                    del self._tokens[t]
            while len(self._tokens) >= self.max_tokens:
                del self._tokens[next(iter(self._tokens))]
        token = secrets.token_bytes(TOKEN_LEN)
        self._tokens[token] = (peer_id, now + self.token_ttl)
        return token

    async def offer_handler(self, stream, peer_id: bytes) -> None:
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                req = await stream.receive_some(1)
                if req != OFFER_REQUEST or not self.port:
                    return
                self.counters["offers"] += 1
                token = self.issue(peer_id)
                await stream.send_all(b"\x01" + self.port.to_bytes(2, "big") + token)
        except (TransportError, trio.TooSlowError, trio.BrokenResourceError,
                trio.ClosedResourceError):
            pass
        finally:
            with trio.CancelScope(shield=True):
                try:
                    await stream.aclose()
                except Exception:
                    pass

    async def server_handshake(self, stream: trio.SocketStream) -> FastStream:
        hello = await _read_exact(stream, _HELLO_LEN)
        if hello[:len(MAGIC)] != MAGIC:
            raise FastChannelError("fast channel: bad magic")
        o = len(MAGIC)
        token, c_eph_pub, c_id = hello[o:o + 16], hello[o + 16:o + 48], hello[o + 48:]
        entry = self._tokens.pop(token, None)
        if entry is None or entry[1] < trio.current_time():
            raise FastChannelError("fast channel: unknown or expired token")
        want = entry[0]
        if _node_id(c_id) != want:
            raise FastChannelError("fast channel: the client's key is not the node the "
                                   "token was issued to")
        if self.admit is not None and not self.admit(want):
            raise FastChannelError("fast channel: the client is no longer a member")
        s_eph = X25519PrivateKey.generate()
        s_eph_pub = _raw(s_eph.public_key())
        s_id = self.identity.public_key
        th = _transcript(token, c_eph_pub, s_eph_pub, c_id, s_id)
        await stream.send_all(s_eph_pub + s_id + self.identity.sign(b"server" + th))
        sig_c = await _read_exact(stream, 64)
        _verify(c_id, sig_c, b"client" + th, "client")
        try:
            shared = s_eph.exchange(X25519PublicKey.from_public_bytes(c_eph_pub))
        except ValueError as exc:
            raise FastChannelError(f"fast channel: bad key agreement: {exc}") from None
        c2s, s2c = _keys(shared, th)
        return FastStream(stream, s2c, c2s, want)

    async def _conn(self, stream: trio.SocketStream) -> None:
        """One TCP connection: handshake, then the handler; nothing escapes."""
        if self._conns.value == 0:
            self.counters["refused"] += 1
            await stream.aclose()
            return
        async with self._conns:
            try:
                with trio.fail_after(HANDSHAKE_TIMEOUT):
                    fs = await self.server_handshake(stream)
            except (FastChannelError, trio.TooSlowError, trio.BrokenResourceError,
                    trio.ClosedResourceError, OSError) as exc:
                self.counters["refused"] += 1
                log.debug("fast channel refused: %s", exc)
                with trio.CancelScope(shield=True):
                    await stream.aclose()
                return
            except Exception:
                self.counters["refused"] += 1
                log.exception("fast channel handshake failed")
                with trio.CancelScope(shield=True):
                    await stream.aclose()
                return
            self.counters["accepted"] += 1
            if self.tallies is not None:
                fs.tally = self.tallies[fs.peer_id]
            live = self._live.setdefault(fs.peer_id, set())
            live.add(fs)
            try:
                await self.handler(fs, fs.peer_id)
            except TransportError as exc:
                log.debug("fast channel of %s ended: %r", fs.peer_id.hex()[:12], exc)
            except Exception:
                log.exception("fast channel handler failed")
            finally:
                live.discard(fs)
                if not live and self._live.get(fs.peer_id) is live:
                    del self._live[fs.peer_id]
                await fs.aclose()

    def cut(self, peer_id: bytes) -> int:
        """Close every channel of this peer (membership cut it off)."""
        chans = list(self._live.get(peer_id, ()))
        for fs in chans:
            fs.cut()
        return len(chans)


__all__ = ["FastStream", "FastDialer", "FastChannelServer", "FastChannelError",
           "OFFER_PROTOCOL", "MAX_RECORD", "host_of", "client_handshake", "request_offer"]
