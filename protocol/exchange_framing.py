"""Frames of chunk-exchange messages, and a sans-I/O frame decoder.

A frame is a 4-byte big-endian document length n, the document (n bytes, one
canonical msgpack map {"v": VERSION, "t": <tag>, <field>: <value>...}, field
names as in protocol.exchange), and, for Data only, a body: the chunk payload,
raw bytes outside the document. The Data document carries the body length
instead of the body:

    Data(rid, id, codec, raw_len, payload)  ->
        len(doc) | {"codec", "id", "raw_len", "rid", "size": len(payload), "t": "data", "v": 1}
                 | payload (size bytes)

So every document obeys the DHT's limit (framing.MAX_FRAME = 64 KiB, checked on
the 4-byte prefix before any of it is buffered), and the one large thing on the
wire, a chunk (at most exchange.MAX_PAYLOAD = zstd_bound(8 MiB) bytes), is
never parsed, re-encoded or copied more than once:
  - sending: encode_data_header(rid, id, codec, raw_len, size) builds the
    prefix + document alone; the sender writes the stored bytes after it
    (send_all(header); send_all(payload)), with no copy of the payload;
  - receiving: the body's length is validated from the document (codec,
    raw_len, size rules of exchange.check_data_header) before one body byte is
    buffered; the received pieces are kept as they came (memoryviews, no copy)
    and joined once into the payload bytes when the last one arrives (a body
    that came as one whole bytes object is used as is). Buffering
    is linear, never quadratic, in the frame size.
ManifestData.data=None is nil on the wire (the field is always present).

Every decoding failure is a RemoteProtocolError and nothing else; an oversized
length prefix is framing.OversizedFrame.
"""
from __future__ import annotations

from collections import deque
from dataclasses import fields

from . import codec
from .errors import LocalProtocolError, RemoteProtocolError
from .exchange import MESSAGE_TYPES, REQUEST_TYPES, Data, _chunk, _u64, check_data_header
from .framing import HEADER, MAX_FRAME, OversizedFrame, encode_document, open_document

VERSION = 1
_DATA_FIELDS = ("rid", "id", "codec", "raw_len", "size")
_FIELDS = {tag: tuple(f.name for f in fields(cls)) for tag, cls in MESSAGE_TYPES.items()}
_FIELDS["data"] = _DATA_FIELDS
_KEYS = {tag: frozenset(names) for tag, names in _FIELDS.items()}
_REQUEST_TAGS = frozenset(cls.TAG for cls in REQUEST_TYPES)

__all__ = ["VERSION", "HEADER", "MAX_FRAME", "OversizedFrame", "encode_payload",
           "encode_message", "encode_data_header", "decode_payload", "decode_frame",
           "ExchangeDecoder"]


# -- encoding ---------------------------------------------------------------------------

def encode_data_header(rid: int, cid: bytes, codec_: int, raw_len: int, size: int) -> bytes:
    """Length prefix + document of a Data frame whose `size`-byte payload follows.
    LocalProtocolError when the values break a Data rule (e.g. codec 2)."""
    _u64("rid", rid)
    _chunk("chunk id", cid)
    check_data_header(codec_, raw_len, size)
    doc = codec.encode({"codec": codec_, "id": cid, "raw_len": raw_len, "rid": rid,
                        "size": size, "t": "data", "v": VERSION})
    return len(doc).to_bytes(HEADER, "big") + doc


def encode_payload(msg) -> bytes:
    """The canonical document of `msg` (a Data's document, without its payload)."""
    tag = getattr(type(msg), "TAG", None)
    if MESSAGE_TYPES.get(tag) is not type(msg):
        raise LocalProtocolError(f"{type(msg).__name__} is not an exchange message")
    if tag == "data":
        return encode_data_header(msg.rid, msg.id, msg.codec, msg.raw_len,
                                  len(msg.payload))[HEADER:]
    return encode_document(msg, MESSAGE_TYPES, VERSION, MAX_FRAME)


def encode_message(msg) -> bytes:
    """One whole frame (for Data this copies the payload once; a server sending
    stored bytes should write encode_data_header(...) and the payload instead)."""
    if type(msg) is Data:
        return encode_data_header(msg.rid, msg.id, msg.codec, msg.raw_len,
                                  len(msg.payload)) + msg.payload
    payload = encode_payload(msg)
    return len(payload).to_bytes(HEADER, "big") + payload


# -- decoding ---------------------------------------------------------------------------

def decode_payload(doc_bytes, *, requests_only: bool = False):
    """Parse one document. Returns a message, or for a Data document the tuple
    (rid, id, codec, raw_len, size) of its validated header (the body follows)."""
    tag, doc = open_document(doc_bytes, MESSAGE_TYPES, VERSION)
    if requests_only and tag not in _REQUEST_TAGS:
        raise RemoteProtocolError(f"{tag} is not a request")
    if doc.keys() != _KEYS[tag]:
        raise RemoteProtocolError(f"{tag} fields {sorted(doc)} are not {sorted(_KEYS[tag])}")
    try:
        if tag == "data":
            header = tuple(doc[n] for n in _DATA_FIELDS)
            rid, cid, codec_, raw_len, size = header
            _u64("rid", rid)
            _chunk("chunk id", cid)
            check_data_header(codec_, raw_len, size)
            return header
        if tag in ("get", "cancel") and type(doc["ids"]) is not list:
            raise LocalProtocolError("ids must be a list")
        return MESSAGE_TYPES[tag](**doc)
    except LocalProtocolError as exc:
        raise RemoteProtocolError(f"invalid {tag} message: {exc}") from None


def decode_frame(frame, *, requests_only: bool = False):
    """The one message that is exactly `frame` (RemoteProtocolError otherwise)."""
    dec = ExchangeDecoder(requests_only=requests_only)
    data = bytes(frame)
    while data:
        n = min(len(data), dec.room)
        if n == 0:
            raise RemoteProtocolError("more than one frame")
        dec.receive_data(data[:n])
        data = data[n:]
    dec.receive_data(b"")
    msg = dec.next_message()
    if msg is None or dec.next_message() is not None:
        raise RemoteProtocolError("not exactly one frame")
    return msg


class ExchangeDecoder:
    """Turns a byte stream into exchange messages (the h11 pattern, no I/O).

        while True:
            msg = dec.next_message()                 # None: need more bytes
            if msg is None:
                data = await stream.receive_some(min(dec.room, 1 << 18))
                dec.receive_data(data)               # b"" marks end of stream
                ...

    receive_data parses eagerly (an oversized prefix, a bad document or a bad
    Data header raises at once); complete messages wait for next_message.
    `room` is how many bytes receive_data accepts now: 0 while messages wait to
    be taken, else at most one document (HEADER + MAX_FRAME) plus what remains
    of the current Data body, so the decoder never holds more than one frame
    plus what the caller fed since it last drained it.
    requests_only=True (a server's decoder) refuses responses, so a Data body
    is never buffered there. After a RemoteProtocolError the decoder stays
    failed: drop the peer.
    """

    def __init__(self, *, requests_only: bool = False):
        self._requests_only = requests_only
        self._in: deque[memoryview] = deque()     # unparsed input pieces
        self._in_len = 0
        self._data_header: tuple | None = None    # Data whose body is arriving
        self._body: list = []
        self._body_need = 0
        self._ready: deque = deque()
        self._eof = False
        self._error: str | None = None

    @property
    def room(self) -> int:
        if self._ready or self._error is not None or self._eof:
            return 0
        return self._body_need + HEADER + MAX_FRAME - self._in_len

    def receive_data(self, data) -> None:
        self._raise_if_failed()
        if self._eof and data:
            raise LocalProtocolError("data received after end of stream")
        if len(data) > self.room:
            raise LocalProtocolError(f"{len(data)} bytes exceed the decoder's room {self.room}")
        if not data:
            self._eof = True
            return
        if type(data) is not bytes:               # the caller may reuse its buffer
            data = bytes(data)
        self._in.append(memoryview(data))
        self._in_len += len(data)
        self._parse()

    def next_message(self):
        """The next complete message, or None if more bytes are needed."""
        self._raise_if_failed()
        if self._ready:
            return self._ready.popleft()
        if self._eof and (self._in_len or self._data_header is not None):
            self._fail("stream ended inside a frame")
        return None

    # -- internals

    def _take(self, n: int) -> list:
        """The first n input bytes as a list of memoryviews (no copy)."""
        out = []
        self._in_len -= n
        while n:
            piece = self._in[0]
            if len(piece) <= n:
                out.append(self._in.popleft())
                n -= len(piece)
            else:
                out.append(piece[:n])
                self._in[0] = piece[n:]
                n = 0
        return out

    def _peek_prefix(self) -> int:
        """The next 4-byte length prefix, left in the input (needs _in_len >= HEADER)."""
        raw, need = b"", HEADER
        for piece in self._in:
            raw += piece[:need]
            need = HEADER - len(raw)
            if not need:
                break
        return int.from_bytes(raw, "big")

    def _parse(self) -> None:
        while True:
            if self._data_header is not None:
                take = min(self._body_need, self._in_len)
                if take:
                    self._body += self._take(take)
                    self._body_need -= take
                if self._body_need:
                    return
                rid, cid, codec_, raw_len, _ = self._data_header
                body = self._body
                if len(body) == 1 and type(body[0].obj) is bytes \
                        and len(body[0]) == len(body[0].obj):
                    payload = body[0].obj         # the body came as one whole piece: no copy
                else:
                    payload = b"".join(body)
                self._data_header, self._body = None, []
                self._ready.append(Data(rid, cid, codec_, raw_len, payload))
                continue
            if self._in_len < HEADER:
                return
            n = self._peek_prefix()
            if n > MAX_FRAME:
                self._fail(f"frame length {n} exceeds {MAX_FRAME}", OversizedFrame)
            if self._in_len < HEADER + n:
                return
            self._take(HEADER)
            doc = b"".join(self._take(n))
            try:
                msg = decode_payload(doc, requests_only=self._requests_only)
            except RemoteProtocolError as exc:
                self._fail(str(exc))
            if type(msg) is tuple:
                self._data_header, self._body_need = msg, msg[4]
            else:
                self._ready.append(msg)

    def _fail(self, reason: str, error: type = RemoteProtocolError):
        self._error = reason
        self._in.clear()
        self._in_len = 0
        self._body = []
        self._body_need = 0
        self._data_header = None
        raise error(reason)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RemoteProtocolError(f"decoder failed earlier: {self._error}")
