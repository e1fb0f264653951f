"""Sealed records on the wire (protocol/exchange.py CODEC_SEALED): a Data payload that
is a whole sealed record (protocol/sealing.py) of the chunk, opened and checked by a
holder of the data key; everything else about it is a typed error with evidence."""
import pytest
import zstandard

from hypersdk.protocol import codec
from hypersdk.protocol.errors import ChunkHashMismatch, LocalProtocolError, RemoteProtocolError
from hypersdk.protocol.exchange import (
    CODEC_RAW,
    CODEC_SEALED,
    CODEC_ZSTD,
    MAX_SEALED_PAYLOAD,
    Data,
    SealedDataError,
    SealedDataKeyMissing,
    check_opaque,
    open_data,
    open_data_into,
    open_piece_unchecked,
    zstd_bound,
)
from hypersdk.protocol.exchange_framing import HEADER, decode_frame, encode_message
from hypersdk.protocol.sealing import (
    KIND_CHUNK,
    KIND_HASHLIST,
    KIND_MANIFEST,
    RECORD_OVERHEAD,
    DataKey,
    keyed_id,
    seal,
)

K = DataKey.generate(bytes(range(3, 35)))
OTHER = DataKey.generate(bytes(range(5, 37)))
PLAIN = (b"hypersdk sealed wire " * 200)[:3000]
RAND = bytes((i * 7919 + 13) % 251 for i in range(700))


def payload_of(plain: bytes, inner: int) -> bytes:
    return plain if inner == CODEC_RAW else zstandard.ZstdCompressor(level=3).compress(plain)


def sealed_msg(plain=PLAIN, inner=CODEC_ZSTD, *, key=K, kind=KIND_CHUNK, cid=None,
               sealed_as=None, raw_len=None) -> Data:
    cid = cid or keyed_id(K, plain)
    payload = payload_of(plain, inner)
    n = len(plain) if raw_len is None else raw_len
    record = seal(key, kind, sealed_as or cid, inner, n, payload)
    return Data(1, cid, CODEC_SEALED, len(plain), bytes(record))


def both(msg, key=K):
    """open_data and open_data_into of msg: the same plaintext, or the same error type."""
    a = open_data(msg, key)
    b = open_data_into(msg, bytearray(msg.raw_len + 1), key)
    assert bytes(b) == a
    return a


def rejects(msg, err, key=K):
    with pytest.raises(err) as e1:
        open_data(msg, key)
    with pytest.raises(err) as e2:
        open_data_into(msg, bytearray(msg.raw_len + 1), key)
    for e in (e1, e2):
        assert isinstance(e.value, RemoteProtocolError) or isinstance(e.value, ChunkHashMismatch)
        assert getattr(e.value, "cid", None) == msg.id or getattr(e.value, "expected", None) == msg.id
    return e1.value


@pytest.mark.parametrize("inner", [CODEC_RAW, CODEC_ZSTD])
@pytest.mark.parametrize("kind", [KIND_CHUNK, KIND_HASHLIST])
@pytest.mark.parametrize("plain", [PLAIN, RAND, b"x"])
def test_sealed_data_round_trips(inner, kind, plain):
    msg = sealed_msg(plain, inner, kind=kind)
    assert both(msg) == plain
    assert decode_frame(encode_message(msg)) == msg          # and over the frame codec


def test_open_data_into_puts_the_plaintext_in_the_callers_buffer():
    for inner in (CODEC_RAW, CODEC_ZSTD):
        buf = bytearray(len(PLAIN) + 1)
        view = open_data_into(sealed_msg(PLAIN, inner), buf, K)
        assert view.obj is buf and bytes(view) == PLAIN


@pytest.mark.parametrize("inner", [CODEC_RAW, CODEC_ZSTD])
def test_every_single_byte_flip_and_every_truncation_is_rejected(inner):
    plain = RAND[:200]
    good = sealed_msg(plain, inner)
    for i in range(len(good.payload)):
        bad = bytearray(good.payload)
        bad[i] ^= 0x01
        rejects(Data(1, good.id, CODEC_SEALED, good.raw_len, bytes(bad)), SealedDataError)
    for n in range(RECORD_OVERHEAD + 1, len(good.payload)):
        rejects(Data(1, good.id, CODEC_SEALED, good.raw_len, good.payload[:n]), SealedDataError)
    with pytest.raises(LocalProtocolError):                 # not even a record: refused
        Data(1, good.id, CODEC_SEALED, good.raw_len, good.payload[:RECORD_OVERHEAD])


def test_a_record_of_another_id_kind_or_key_does_not_open():
    other = keyed_id(K, b"another chunk")
    e = rejects(sealed_msg(sealed_as=other), SealedDataError)
    assert "authenticate" in e.reason
    e = rejects(sealed_msg(kind=KIND_MANIFEST), SealedDataError)
    assert "manifest" in e.reason
    rejects(sealed_msg(key=OTHER), SealedDataError)          # sealed under another key
    rejects(sealed_msg(), SealedDataError, key=OTHER)        # opened under another key


def test_a_record_whose_plaintext_is_not_the_id_is_a_hash_mismatch():
    liar = keyed_id(K, b"what was asked")                      # sealed by a key holder, wrong data
    e = rejects(sealed_msg(PLAIN, cid=liar), ChunkHashMismatch)
    assert e.expected == liar and e.actual == keyed_id(K, PLAIN)


def test_header_lies_are_refused_before_decryption():
    rejects(sealed_msg(raw_len=len(PLAIN) - 1), SealedDataError)     # header raw_len != msg's
    delta = seal(K, KIND_CHUNK, keyed_id(K, PLAIN), 2, len(PLAIN), b"\0" * 32 + payload_of(
        PLAIN, CODEC_ZSTD))
    e = rejects(Data(1, keyed_id(K, PLAIN), CODEC_SEALED, len(PLAIN), bytes(delta)),
                SealedDataError)
    assert "neither raw nor zstd" in e.reason


def test_without_a_key_it_is_a_typed_error_not_a_crash():
    msg = sealed_msg()
    for call in (lambda: open_data(msg), lambda: open_data_into(msg, bytearray(len(PLAIN) + 1))):
        with pytest.raises(SealedDataKeyMissing) as e:
            call()
        assert isinstance(e.value, RemoteProtocolError) and e.value.cid == msg.id


def test_sealed_size_bounds_on_the_wire():
    n = 1000
    ok_max = zstd_bound(n) + RECORD_OVERHEAD
    Data(1, b"d" * 32, CODEC_SEALED, n, bytes(ok_max))
    Data(1, b"d" * 32, CODEC_SEALED, n, bytes(RECORD_OVERHEAD + 1))
    for size in (0, RECORD_OVERHEAD, ok_max + 1):
        with pytest.raises(LocalProtocolError):
            Data(1, b"d" * 32, CODEC_SEALED, n, bytes(size))
        doc = codec.encode({"codec": CODEC_SEALED, "id": b"d" * 32, "raw_len": n, "rid": 1,
                            "size": size, "t": "data", "v": 1})
        with pytest.raises(RemoteProtocolError):
            decode_frame(len(doc).to_bytes(HEADER, "big") + doc + bytes(size))
    from hypersdk.protocol.chunks import MAX_CHUNK
    assert zstd_bound(MAX_CHUNK) + RECORD_OVERHEAD == MAX_SEALED_PAYLOAD


@pytest.mark.parametrize("inner", [CODEC_RAW, CODEC_ZSTD])
def test_what_a_holder_without_the_key_checks(inner):
    """check_opaque: a sealed chunk record whose header agrees with the message, and
    nothing else is accepted (a plaintext chunk, a hash list or a manifest record, a
    header that lies); its content is not checked (nobody without the key can)."""
    cid = keyed_id(K, PLAIN)
    rec = bytes(seal(K, KIND_CHUNK, cid, inner, len(PLAIN), payload_of(PLAIN, inner)))
    check_opaque(Data(1, cid, CODEC_SEALED, len(PLAIN), rec))
    bad = bytearray(rec)
    bad[-1] ^= 1
    check_opaque(Data(1, cid, CODEC_SEALED, len(PLAIN), bytes(bad)))     # unknowable here
    for msg in (Data(1, cid, CODEC_RAW, len(PLAIN), PLAIN),
                Data(1, cid, CODEC_ZSTD, len(PLAIN), payload_of(PLAIN, CODEC_ZSTD)),
                Data(1, cid, CODEC_SEALED, len(PLAIN), bytes(seal(
                    K, KIND_HASHLIST, cid, inner, len(PLAIN), payload_of(PLAIN, inner)))),
                Data(1, cid, CODEC_SEALED, len(PLAIN) - 1, rec)):       # raw_len lies
        with pytest.raises(SealedDataError):
            check_opaque(msg)
    with pytest.raises(SealedDataError):
        check_opaque(Data(1, cid, CODEC_SEALED, len(PLAIN), bytes(seal(
            K, KIND_MANIFEST, cid, inner, len(PLAIN), payload_of(PLAIN, inner)))))


def test_a_piece_for_a_holder_without_the_key_is_decoded_not_checked():
    piece = bytes(range(256)) * 4
    pid = keyed_id(K, piece)
    assert open_piece_unchecked(Data(1, pid, CODEC_RAW, len(piece), piece)) == piece
    z = payload_of(piece, CODEC_ZSTD)
    assert open_piece_unchecked(Data(1, pid, CODEC_ZSTD, len(piece), z)) == piece
    with pytest.raises(RemoteProtocolError):                    # bounded like open_data
        open_piece_unchecked(Data(1, pid, CODEC_ZSTD, len(piece) - 1, z))
    with pytest.raises(SealedDataKeyMissing):                   # sealed: unreadable here
        open_piece_unchecked(Data(1, pid, CODEC_SEALED, len(piece), bytes(
            seal(K, KIND_HASHLIST, pid, 0, len(piece), piece))))
