"""The decoders bench/fuzz.py fuzzes: for each, a function of one input that feeds
the bytes to the decoder exactly as the node does with bytes from a peer (or a
file, or the control socket), and valid examples to seed the corpus.

A target may raise only the decoder's typed errors, ALLOWED: ProtocolError (its
RemoteProtocolError for bad bytes) and IntegrityError (a chunk or sealed record
that does not verify, a broken audit chain). Anything else (IndexError,
KeyError, TypeError, ValueError, RecursionError, MemoryError, ...) escaping a
decoder is a bug the fuzzer reports as a crash.

Imported by bench/fuzz.py inside atheris.instrument_imports(), so the decoders'
modules are imported here first (their coverage guides the fuzzer).
"""
from __future__ import annotations

import io
import struct
import zlib

from hypersdk.node.sources import vmdk
from hypersdk.protocol import audit, audit_gossip, codec, exchange, exchange_framing, framing, sealing
from hypersdk.protocol import dht_messages as dm
from hypersdk.protocol import manifest as mf
from hypersdk.protocol import membership as ms
from hypersdk.protocol import possession as po
from hypersdk.protocol.errors import IntegrityError, ProtocolError

ALLOWED = (ProtocolError, IntegrityError)
_K = bytes(range(32))


def _stream(dec, data: bytes) -> None:
    """Feed data to a FrameDecoder-like decoder in up to three pieces cut where
    the first two bytes say (each piece in slices of at most dec.room, as a
    reader does), then the end of the stream; drain every message."""
    cut1 = data[0] if data else 0
    cut2 = cut1 + (data[1] if len(data) > 1 else 0)
    for piece in (data[:cut1], data[cut1:cut2], data[cut2:]):
        while piece:
            take, piece = piece[:dec.room], piece[dec.room:]
            dec.receive_data(take)
            _drain(dec, len(data))
    dec.receive_data(b"")
    _drain(dec, len(data))


def _drain(dec, bound: int) -> None:
    for _ in range(bound + 1):                    # bounded: at most one message per byte
        if dec.next_message() is None:
            return


# -- targets --------------------------------------------------------------------------------

def t_codec(data: bytes) -> None:
    codec.decode(data)


def t_dht(data: bytes) -> None:
    _stream(framing.FrameDecoder(), data)


def t_exchange(data: bytes) -> None:
    requests_only = bool(data[:1]) and data[0] & 1
    dec = exchange_framing.ExchangeDecoder(requests_only=bool(requests_only))
    msgs = []
    try:
        _stream(_Collect(dec, msgs), data[1:])
    finally:
        for m in msgs[:8]:                        # what the client does with an answer
            if isinstance(m, exchange.Data):
                exchange.open_data(m)
            elif isinstance(m, exchange.ManifestData):
                exchange.open_manifest(m)


def t_audit_entry(data: bytes) -> None:
    audit.decode_entry(data, verify=True)


def t_audit_gossip(data: bytes) -> None:
    _stream(audit_gossip.frame_decoder(), data)


def t_possession(data: bytes) -> None:
    _stream(po.PossessionDecoder(), data)


def t_control(data: bytes) -> None:
    from hypersdk.node.daemon import control
    from hypersdk.node.daemon.daemon import ARGS
    n = control.frame_length(data[:control.HEADER], control.MAX_REQUEST)
    doc = codec.decode(data[control.HEADER:control.HEADER + n], max_size=control.MAX_REQUEST)
    cmd, args, _ = control.check_request(doc)
    schema = ARGS.get(cmd)
    if schema is not None:
        control.check_args(cmd, schema, args)


def t_certificate(data: bytes) -> None:
    audit.check_certificate(data)


def t_membership(data: bytes) -> None:
    which, rest = (data[0] % 8 if data else 0), data[1:]
    if which == 0:
        ms.decode_certificate(rest)
    elif which == 1:
        ms.decode_revocation(rest)
    elif which == 2:
        ms.decode_token(rest.decode("utf-8", "replace"))
    elif which == 3:
        ms.decode_join_request(rest)
    elif which == 4:
        ms.decode_join_answer(rest)
    elif which == 5:
        ms.decode_proof(rest)
    elif which == 6:
        ms.decode_renew_request(rest)
    else:
        ms.decode_renew_answer(rest)


def t_manifest(data: bytes) -> None:
    m = mf.decode_manifest(data)
    if m.labels is not None:              # version 3: its sealed labels, under the seeds' key
        try:
            mf.open_labels(m, sealing.DataKey.generate(_K))
        except ProtocolError:
            pass


def t_sealed(data: bytes) -> None:
    key = sealing.DataKey.generate(_K)
    kind = data[0] % 5 if data else 1
    sealing.open_record(key, kind, _K, data[1:])


def t_vmdk(data: bytes) -> None:
    try:
        r = vmdk.StreamOptimizedReader(io.BytesIO(data))
        for _ in r.grains():
            pass
    except vmdk.VmdkError:
        pass            # the reader's one typed error (a ValueError: caught here, not in ALLOWED)


class _Collect:
    """A decoder wrapper that keeps what it decoded (t_exchange opens them)."""

    def __init__(self, dec, out):
        self._dec, self._out = dec, out

    @property
    def room(self):
        return self._dec.room

    def receive_data(self, data):
        self._dec.receive_data(data)

    def next_message(self):
        m = self._dec.next_message()
        if m is not None:
            self._out.append(m)
        return m


# -- seeds ----------------------------------------------------------------------------------

def _identity(i: int):
    from hypersdk.node.net.identity import Identity
    return Identity.from_private_bytes(bytes([i]) * 32)


def _seeds_dht() -> list[bytes]:
    p = dm.PeerInfo(_K, "/ip4/10.0.0.1/tcp/4001", "site-a")
    rec = dm.SignedRecord.sign(_ed(1), _K, b"value", 3)
    msgs = [dm.Ping(1, p), dm.Pong(2), dm.FindNode(3, _K, p), dm.Nodes(4, (p, p)),
            dm.GetProviders(5, _K, p), dm.Providers(6, (p,), (p,)),
            dm.AddProvider(7, _K, p, p), dm.AddProviders(8, (bytes(32), _K), p, p),
            dm.PutRecord(9, rec, p), dm.Ack(10, True), dm.GetRecord(11, _K, None),
            dm.RecordFound(12, rec, (p,))]
    return [framing.encode_message(m) for m in msgs]


def _ed(i: int):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    return Ed25519PrivateKey.from_private_bytes(bytes([i]) * 32)


def _seeds_exchange() -> list[bytes]:
    from hypersdk.protocol.chunks import chunk_id
    chunk = b"chunk data " * 50
    other = b"\x01" * 32
    msgs = [lambda: exchange.GetManifest(1, _K), lambda: exchange.ManifestData(2, _K, None),
            lambda: exchange.Have(3, _K, 0, 16),
            lambda: exchange.HaveBits(4, _K, 0, 16, b"\xff\x01"),
            lambda: exchange.Get(5, (_K, other)), lambda: exchange.Cancel((_K,)),
            lambda: exchange.Data(6, chunk_id(chunk), 0, len(chunk), chunk),
            lambda: exchange.Missing(7, _K)]
    return _encoded(msgs, lambda m: b"\x00" + exchange_framing.encode_message(m))


def _encoded(makers, encode) -> list[bytes]:
    """The encodings of the messages the makers build (a maker the message's own
    checks refuse is skipped: seeds only need to be mostly valid)."""
    out = []
    for make in makers:
        try:
            out.append(encode(make()))
        except ProtocolError:
            continue
    return out


def _entries(n: int = 3):
    """A backup entry of manifest _K, then verify entries: one author's chain."""
    ident = _identity(2)
    backup = {"manifest": _K, "name": "vm", "size": 1 << 30, "chunks": 1024,
              "source": {"path": "/srv/vm.img"}}
    verify = {"manifest": _K, "holder": bytes(32), "result": "ok", "summary": {"k": 1}}
    out, prev = [], None
    for seq in range(n):
        kind, body = ("backup", backup) if seq == 0 else ("verify", verify)
        e = audit.make_entry(ident, seq, prev, 1_790_000_000 * 10**9 + seq, kind, body)
        out.append(e)
        prev = e.id
    return out


def _seeds_audit_gossip() -> list[bytes]:
    es = _entries()
    a = es[0].author
    msgs = [audit_gossip.Push(1, tuple(e.raw for e in es)), audit_gossip.Ack(2, ((a, 3),)),
            audit_gossip.Sync(3, bytes(32), (bytes(32),) * audit_gossip.BUCKETS),
            audit_gossip.Heads(4, (bytes(32),) * audit_gossip.BUCKETS, ((a, 0, es[0].id),),
                               False),
            audit_gossip.GetRange(5, a, 0, 64), audit_gossip.Entries(6, (es[0].raw,)),
            audit_gossip.ForkProof(7, es[0].raw, es[1].raw),
            audit_gossip.Hello(8, "/ip4/10.0.0.1/tcp/4001")]
    return [audit_gossip.encode_message(m) for m in msgs]


def _seeds_possession() -> list[bytes]:
    other = b"\x01" * 32
    msgs = [lambda: po.Challenge(1, _K, other, (_K, other)),
            lambda: po.Proof(2, _K, (other, None)), lambda: po.Refused(3, "busy"),
            lambda: po.Challenge(4, _K, other, (_K,), True)]
    return _encoded(msgs, po.encode_message)


def _seeds_control() -> list[bytes]:
    from hypersdk.node.daemon import control
    return [control.frame({"v": 1, "cmd": "status", "args": {}, "progress": False}),
            control.frame({"v": 1, "cmd": "dht find", "args": {"key": "00" * 32, "count": 3}}),
            control.frame({"v": 1, "cmd": "restore", "args": {"ref": "vm@1", "out": "/tmp/x"},
                           "progress": True})]


def _seeds_certificate() -> list[bytes]:
    es = _entries(3)
    return [audit.build_certificate(_K, es, []), audit.build_certificate(_K, es[:1], [])]


def _seeds_membership() -> list[bytes]:
    net = _identity(3)
    node = _identity(4).public_key
    cert = ms.issue_certificate(net, node, site="s", roles=["member"], serial=1,
                                not_before=0, expires=10**10)
    rev = ms.issue_revocation(net, node, serial=1, time=5, reason="lost")
    tok = ms.Token(net.public_key, bytes(32), "s", ("member",), 10**10,
                   ("/ip4/10.0.0.1/tcp/4001/p2p/x",))
    return [b"\x00" + cert.raw, b"\x01" + rev.raw, b"\x02" + tok.encode().encode(),
            b"\x03" + ms.join_request(bytes(32), node)[4:],
            b"\x04" + ms.join_answer(cert.raw, net.public_key, (rev.raw,), "net")[4:],
            b"\x05" + ms.proof(ms.network_id(net.public_key), cert.raw),
            b"\x06" + ms.renew_request(cert.raw)[4:], b"\x07" + ms.renew_answer(cert.raw)[4:]]


def _seeds_manifest() -> list[bytes]:
    from hypersdk.node.exchange.chunk_source import MemorySource
    src = MemorySource()
    cs = 64 << 10
    mid = src.add_image([b"a" * cs, bytes(cs), b"b" * cs], cs)
    keyed = MemorySource(key=sealing.DataKey.generate(_K))       # version 3, labels sealed
    kid = keyed.add_image([b"a" * cs, bytes(cs), b"b" * cs], cs)
    return [src.manifests[mid], keyed.manifests[kid]]


def _seeds_sealed() -> list[bytes]:
    key = sealing.DataKey.generate(_K)
    return [bytes([1]) + bytes(sealing.seal(key, 1, _K, 0, 5, b"hello"))]


def _seeds_vmdk() -> list[bytes]:
    """Small streams (grains of 8 sectors, 8 entries per grain table) in VMware's
    layout (footer, EOS; one with GT and GD markers) and in qemu-img's (tables
    in the header area, no metadata markers)."""
    def header(gd_offset=vmdk.GD_AT_END, desc=0, overhead=1):
        return struct.pack("<4sIIQQQQIQQQB4sH433x", b"KDMV", 3, 0x30001, 64, 8, 1, desc, 8, 0,
                           gd_offset, overhead, 0, b"\n \r\n", 1)

    def meta(kind, n, body=b""):
        return struct.pack("<QII496x", n, 0, kind) + body.ljust(n * 512, b"\0")

    def grain(lba, data):
        comp = zlib.compress(data.ljust(4096, b"\0"))
        return (struct.pack("<QI", lba, len(comp)) + comp).ljust(-(-(12 + len(comp)) // 512) * 512,
                                                                b"\0")

    end = meta(vmdk.FOOTER, 1, header(gd_offset=5)) + meta(vmdk.EOS, 0)
    gt = struct.pack("<8I", 2, 0, 0, 0, 0, 0, 0, 0)
    return [header() + grain(0, b"first grain") + meta(vmdk.PROGRESS, 0) + grain(56, b"last") + end,
            header() + meta(vmdk.GT, 1, gt) + meta(vmdk.GD, 1, struct.pack("<I", 2)) + end,
            header(gd_offset=2, desc=1, overhead=4) + b"# Disk DescriptorFile\n".ljust(512, b"\0")
            + struct.pack("<I", 3).ljust(512, b"\0") + struct.pack("<8I", 4, 0, 0, 0, 0, 0, 0, 0)
            .ljust(512, b"\0") + grain(0, b"qemu-img") + meta(vmdk.EOS, 0)]


# name -> (target, seeds(), what it covers)
TARGETS = {
    "codec": (t_codec, lambda: [codec.encode({"a": [1, b"x", None, True, "t"]})],
              "protocol/codec.py: the canonical msgpack documents every protocol uses"),
    "dht": (t_dht, _seeds_dht, "protocol/framing.py + dht_messages.py: DHT frames"),
    "exchange": (t_exchange, _seeds_exchange,
                 "protocol/exchange_framing.py: chunk exchange frames, then open_data"),
    "audit-entry": (t_audit_entry, lambda: [e.raw for e in _entries()],
                    "protocol/audit.py decode_entry: signed audit entries"),
    "audit-gossip": (t_audit_gossip, _seeds_audit_gossip,
                     "protocol/audit_gossip.py: gossip frames"),
    "possession": (t_possession, _seeds_possession, "protocol/possession.py: challenge frames"),
    "control": (t_control, _seeds_control,
                "node/daemon/control.py: a control-socket request as the daemon reads it"),
    "certificate": (t_certificate, _seeds_certificate,
                    "protocol/audit.py check_certificate: offline backup certificates"),
    "membership": (t_membership, _seeds_membership,
                   "protocol/membership.py: member certificates, revocations, tokens, "
                   "join/proof/renew messages"),
    "manifest": (t_manifest, _seeds_manifest, "protocol/manifest.py decode_manifest"),
    "sealed": (t_sealed, _seeds_sealed, "protocol/sealing.py open_record: sealed records"),
    "vmdk": (t_vmdk, _seeds_vmdk,
             "node/sources/vmdk.py: a streamOptimized VMDK as a vCenter export serves it"),
}
