"""Chunk exchange messages and framing: round trips, bounds, hostile bytes, verification."""
import os

import msgpack
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hypersdk.protocol import codec
from hypersdk.protocol.chunks import MAX_CHUNK, ZERO_ID, chunk_id
from hypersdk.protocol.errors import ChunkHashMismatch, LocalProtocolError, RemoteProtocolError
from hypersdk.protocol.exchange import (
    CODEC_RAW,
    CODEC_ZSTD,
    MAX_GET_IDS,
    MAX_HAVE,
    MAX_MANIFEST,
    MAX_PAYLOAD,
    MAX_U64,
    MESSAGE_TYPES,
    Cancel,
    Data,
    Get,
    GetManifest,
    Have,
    HaveBits,
    ManifestData,
    Missing,
    answers,
    data_from_plain,
    open_data,
    open_manifest,
    pack_bits,
    zstd_bound,
)
from hypersdk.protocol.exchange_framing import (
    HEADER,
    MAX_FRAME,
    ExchangeDecoder,
    OversizedFrame,
    decode_frame,
    decode_payload,
    encode_data_header,
    encode_message,
    encode_payload,
)
from hypersdk.protocol.manifest import LIST_ENTRIES, Manifest

ids = st.binary(min_size=32, max_size=32).filter(lambda b: b != ZERO_ID)
rids = st.one_of(st.integers(0, MAX_U64), st.sampled_from([0, 1, 127, 128, 2**32, MAX_U64]))


@st.composite
def have_bits(draw):
    flags = draw(st.lists(st.booleans(), min_size=1, max_size=300))
    return HaveBits.from_flags(draw(rids), draw(ids), draw(st.integers(0, MAX_U64)), flags)


@st.composite
def datas(draw):
    plain = draw(st.binary(min_size=1, max_size=3000)
                 | st.integers(1, 5000).map(lambda n: bytes(n - 1) + b"\x01"))
    return data_from_plain(draw(rids), chunk_id(plain), plain)


STRATEGIES = {
    GetManifest: st.builds(GetManifest, rids, ids),
    ManifestData: st.builds(ManifestData, rids, ids, st.none() | st.binary(min_size=1,
                                                                         max_size=500)),
    Have: st.builds(Have, rids, ids, st.integers(0, MAX_U64), st.integers(1, MAX_HAVE)),
    HaveBits: have_bits(),
    Get: st.builds(Get, rids, st.lists(ids, min_size=1, max_size=MAX_GET_IDS, unique=True)),
    Cancel: st.builds(Cancel, st.lists(ids, min_size=1, max_size=MAX_GET_IDS, unique=True)),
    Data: datas(),
    Missing: st.builds(Missing, rids, ids),
}
messages = st.one_of(*STRATEGIES.values())


def feed(dec: ExchangeDecoder, data: bytes, eof: bool = True) -> list:
    """Feed `data` as a transport would (at most dec.room at a time), draining as it goes."""
    out = []
    while True:
        while (m := dec.next_message()) is not None:
            out.append(m)
        if not data:
            break
        n = dec.room
        dec.receive_data(data[:n])
        data = data[n:]
    if eof:
        dec.receive_data(b"")
        while (m := dec.next_message()) is not None:
            out.append(m)
    return out


def test_every_message_type_has_a_strategy_and_a_unique_tag():
    assert set(STRATEGIES) == set(MESSAGE_TYPES.values())
    assert len(MESSAGE_TYPES) == 8


@given(messages)
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_round_trip_is_identity_and_canonical(msg):
    frame = encode_message(msg)
    n = int.from_bytes(frame[:HEADER], "big")
    assert n <= MAX_FRAME
    doc = codec.decode(frame[HEADER:HEADER + n])
    assert doc["v"] == 1 and doc["t"] == msg.TAG
    if isinstance(msg, Data):
        assert doc["size"] == len(msg.payload) and frame[HEADER + n:] == msg.payload
    else:
        assert len(frame) == HEADER + n
        assert decode_payload(frame[HEADER:]) == msg
    back = decode_frame(frame)
    assert back == msg and type(back) is type(msg)
    assert encode_message(back) == frame


@given(datas())
@settings(max_examples=100)
def test_data_header_then_payload_is_the_frame_and_opens(msg):
    hdr = encode_data_header(msg.rid, msg.id, msg.codec, msg.raw_len, len(msg.payload))
    assert hdr + msg.payload == encode_message(msg)
    assert chunk_id(open_data(decode_frame(hdr + msg.payload))) == msg.id


def test_largest_valid_message_of_every_type_fits_its_limit():
    big = bytes(range(256)) * (MAX_CHUNK // 256)              # a whole 8 MiB chunk
    worst_zstd = os.urandom(zstd_bound(MAX_CHUNK))            # zstd payload at its bound
    manifest = Manifest("m" * 255, (MAX_MANIFEST // 40) * LIST_ENTRIES * (1 << 20), 1 << 20,
                        tuple(bytes([1]) * 32 for _ in range(MAX_MANIFEST // 40)))
    assert len(manifest.encode()) <= MAX_MANIFEST
    print(f"\nlargest manifest in one frame: {manifest.size / 2**40:.0f} TiB at 1 MiB chunks")
    worst = [
        GetManifest(MAX_U64, b"m" * 32),
        ManifestData(MAX_U64, b"m" * 32, b"\xff" * MAX_MANIFEST),
        Have(MAX_U64, b"m" * 32, MAX_U64, MAX_HAVE),
        HaveBits(MAX_U64, b"m" * 32, MAX_U64, MAX_HAVE, b"\xff" * (MAX_HAVE // 8)),
        Get(MAX_U64, tuple(bytes([0xFF] * 31) + bytes([i + 1]) for i in range(MAX_GET_IDS))),
        Cancel(tuple(bytes([0xFF] * 31) + bytes([i + 1]) for i in range(MAX_GET_IDS))),
        Data(MAX_U64, b"d" * 32, CODEC_RAW, MAX_CHUNK, big),
        Data(MAX_U64, b"d" * 32, CODEC_ZSTD, MAX_CHUNK, worst_zstd),
        Missing(MAX_U64, b"d" * 32),
    ]
    assert {type(m) for m in worst} == set(MESSAGE_TYPES.values())
    for m in worst:
        assert len(encode_payload(m)) < MAX_FRAME
        assert decode_frame(encode_message(m)) == m
    assert len(encode_message(worst[7])) == HEADER + len(encode_payload(worst[7])) + MAX_PAYLOAD


@given(st.lists(messages, min_size=1, max_size=4))
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_frames_split_at_every_byte_boundary_reassemble(msgs):
    stream = b"".join(encode_message(m) for m in msgs)
    step = max(1, len(stream) // 300)
    for cut in range(0, len(stream) + 1, step):
        dec = ExchangeDecoder()
        got = feed(dec, stream[:cut], eof=False) + feed(dec, stream[cut:])
        assert got == msgs


def test_byte_at_a_time_and_many_frames_at_once():
    plain = b"hello chunk" * 100
    msgs = [Missing(1, b"a" * 32), data_from_plain(2, chunk_id(plain), plain),
            Data(3, b"b" * 32, CODEC_RAW, 3, b"xyz"), ManifestData(4, b"m" * 32, None),
            HaveBits.from_flags(5, b"m" * 32, 9, [True, False, True])]
    stream = b"".join(encode_message(m) for m in msgs)
    dec = ExchangeDecoder()
    got = []
    for b in stream:
        dec.receive_data(bytes([b]))
        while (m := dec.next_message()) is not None:
            got.append(m)
    assert got == msgs
    dec = ExchangeDecoder()
    dec.receive_data(stream)
    assert dec.room == 0                        # messages wait: drain before feeding more
    assert [dec.next_message() for _ in range(6)] == msgs + [None]
    dec.receive_data(bytearray(b""))
    assert dec.next_message() is None


def _only_remote_errors(data: bytes, **kw) -> None:
    try:
        msgs = feed(ExchangeDecoder(**kw), data)
    except RemoteProtocolError:
        return
    for m in msgs:
        assert type(m) in MESSAGE_TYPES.values()
        assert decode_frame(encode_message(m)) == m


@given(st.binary(max_size=300))
@settings(max_examples=500)
def test_random_bytes_only_raise_remote_protocol_error(data):
    _only_remote_errors(data)
    _only_remote_errors(data, requests_only=True)
    for f in (decode_payload, decode_frame):
        try:
            f(data)
        except RemoteProtocolError:
            pass


@given(st.binary(max_size=200))
@settings(max_examples=300)
def test_random_document_behind_a_valid_length_prefix(data):
    _only_remote_errors(len(data).to_bytes(HEADER, "big") + data)


@given(messages, st.data())
@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
def test_mutated_frames_only_raise_remote_protocol_error(msg, data):
    frame = bytearray(encode_message(msg))
    op = data.draw(st.sampled_from(["replace", "delete", "insert", "truncate", "extend"]))
    i = data.draw(st.integers(0, len(frame) - 1))
    if op == "replace":
        frame[i] ^= data.draw(st.integers(1, 255))
    elif op == "delete":
        del frame[i]
    elif op == "insert":
        frame.insert(i, data.draw(st.integers(0, 255)))
    elif op == "truncate":
        del frame[i:]
    else:
        frame += data.draw(st.binary(min_size=1, max_size=8))
    _only_remote_errors(bytes(frame))
    if op == "replace":
        try:
            assert decode_frame(bytes(frame)) != msg
        except RemoteProtocolError:
            pass


@given(datas(), st.data())
@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
def test_every_single_byte_change_of_a_data_frame_is_rejected_or_unverifiable(msg, data):
    original = open_data(msg)
    frame = bytearray(encode_message(msg))
    i = data.draw(st.integers(0, len(frame) - 1))
    frame[i] ^= data.draw(st.integers(1, 255))
    try:
        got = decode_frame(bytes(frame))
    except RemoteProtocolError:
        return
    assert got != msg
    if (got.id, got.codec, got.raw_len, got.payload) == (msg.id, msg.codec, msg.raw_len,
                                                         msg.payload):
        assert got.rid != msg.rid              # the rid is the only unverified field
        return
    try:
        plain = open_data(got)
    except (RemoteProtocolError, ChunkHashMismatch):
        return
    # a change zstd ignores (e.g. a frame-header flag) still yields exactly the chunk
    assert plain == original and got.id == msg.id


def test_every_byte_change_of_a_small_raw_data_frame():
    plain = b"abc"
    msg = Data(1, chunk_id(plain), CODEC_RAW, 3, plain)
    frame = encode_message(msg)
    for i in range(len(frame)):
        for x in (1, 0x80, 0xFF):
            f = bytearray(frame)
            f[i] ^= x
            try:
                got = decode_frame(bytes(f))
            except RemoteProtocolError:
                continue
            if got.rid != msg.rid:
                continue
            with pytest.raises((RemoteProtocolError, ChunkHashMismatch)):
                open_data(got)


def test_open_data_checks_the_hash_with_evidence():
    plain = os.urandom(1000)
    bad = Data(1, chunk_id(b"other"), CODEC_RAW, 1000, plain)
    with pytest.raises(ChunkHashMismatch) as info:
        open_data(bad)
    assert info.value.expected == chunk_id(b"other") and info.value.actual == chunk_id(plain)
    z = zstandard.ZstdCompressor().compress(plain)
    with pytest.raises(ChunkHashMismatch):
        open_data(Data(1, chunk_id(b"other"), CODEC_ZSTD, 1000, z))


def test_open_data_refuses_bad_zstd_payloads():
    plain = bytes(100_000) + b"\x01"
    cid = chunk_id(plain)
    z = zstandard.ZstdCompressor().compress(plain)
    no_size = zstandard.ZstdCompressor(write_content_size=False).compress(plain)
    assert open_data(Data(1, cid, CODEC_ZSTD, len(plain), z)) == plain
    assert open_data(Data(1, cid, CODEC_ZSTD, len(plain), no_size)) == plain
    bad = {
        "not zstd": b"not a zstd frame",
        "trailing bytes": z + b"\x00",
        "two frames": z + z,
        "truncated": z[:-3],
        "declares more": zstandard.ZstdCompressor().compress(plain + b"x"),
    }
    for name, payload in bad.items():
        with pytest.raises(RemoteProtocolError):
            open_data(Data(1, cid, CODEC_ZSTD, len(plain), payload))
    # a bomb: 8 MiB of zeros (275 bytes of zstd) claimed as a 1000-byte chunk, with and
    # without a content size; as a 1-byte chunk it is already too big to construct
    bomb = zstandard.ZstdCompressor().compress(bytes(MAX_CHUNK))
    bomb2 = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(MAX_CHUNK))
    for payload in (bomb, bomb2):
        with pytest.raises(RemoteProtocolError):
            open_data(Data(1, cid, CODEC_ZSTD, 1000, payload))
        with pytest.raises(LocalProtocolError):
            Data(1, cid, CODEC_ZSTD, 1, payload)
    with pytest.raises(RemoteProtocolError):        # shorter than raw_len
        open_data(Data(1, cid, CODEC_ZSTD, len(plain) + 1, no_size))


def test_delta_codec_is_refused_on_the_wire():
    with pytest.raises(LocalProtocolError, match="deltas are re-encoded"):
        Data(1, b"d" * 32, 2, 10, b"x" * 10)
    with pytest.raises(LocalProtocolError):
        encode_data_header(1, b"d" * 32, 2, 10, 10)
    doc = codec.encode({"codec": 2, "id": b"d" * 32, "raw_len": 10, "rid": 1, "size": 10,
                        "t": "data", "v": 1})
    with pytest.raises(RemoteProtocolError, match="deltas"):
        decode_frame(len(doc).to_bytes(4, "big") + doc + b"x" * 10)


def test_data_from_plain_picks_zstd_only_when_it_shrinks():
    comp = bytes(4096)
    rand = os.urandom(4096)
    assert data_from_plain(1, chunk_id(comp), comp).codec == CODEC_ZSTD
    d = data_from_plain(1, chunk_id(rand), rand)
    assert d.codec == CODEC_RAW and d.payload == rand
    assert open_data(data_from_plain(1, chunk_id(comp), memoryview(comp))) == comp


def test_have_bits_are_lsb_first_with_zero_padding():
    hb = HaveBits.from_flags(1, b"m" * 32, 100, [True, False, False, True, False,
                                                 False, False, False, False, True])
    assert hb.bits == bytes([0b00001001, 0b00000010])
    assert list(hb.positions()) == [100, 103, 109]
    assert hb.has(103) and not hb.has(104) and not hb.has(99) and not hb.has(110)
    assert pack_bits([]) == b""
    with pytest.raises(LocalProtocolError, match="padding"):
        HaveBits(1, b"m" * 32, 0, 10, bytes([0, 0b100]))
    with pytest.raises(LocalProtocolError):
        HaveBits(1, b"m" * 32, 0, 10, bytes(3))
    doc = codec.encode({"bits": bytes([0xFF]), "count": 7, "manifest_id": b"m" * 32,
                        "rid": 1, "start": 0, "t": "have_bits", "v": 1})
    with pytest.raises(RemoteProtocolError, match="padding"):
        decode_frame(len(doc).to_bytes(4, "big") + doc)


@given(st.lists(st.booleans(), min_size=1, max_size=100), st.integers(0, 2**40))
def test_have_bits_positions_match_flags(flags, start):
    hb = HaveBits.from_flags(1, b"m" * 32, start, flags)
    assert list(hb.positions()) == [start + i for i, f in enumerate(flags) if f]
    assert decode_frame(encode_message(hb)) == hb


def test_open_manifest_verifies_the_id():
    m = Manifest("vm1", 3 << 20, 1 << 20, (b"l" * 32,), {"host": "esx1"}, 5)
    assert open_manifest(ManifestData(1, m.id, m.encode())) == m
    assert open_manifest(ManifestData(1, m.id, None)) is None
    with pytest.raises(ChunkHashMismatch) as info:
        open_manifest(ManifestData(1, b"x" * 32, m.encode()))
    assert info.value.expected == b"x" * 32 and info.value.actual == m.id
    junk = b"\x01\x02"
    with pytest.raises(RemoteProtocolError):
        open_manifest(ManifestData(1, chunk_id(junk), junk))


def test_oversized_length_prefix_is_rejected_before_the_body():
    prefix = (MAX_FRAME + 1).to_bytes(HEADER, "big")
    dec = ExchangeDecoder()
    dec.receive_data(prefix[:2])
    assert dec.next_message() is None
    with pytest.raises(OversizedFrame):
        dec.receive_data(prefix[2:])
    assert dec.room == 0
    with pytest.raises(RemoteProtocolError):
        dec.next_message()
    with pytest.raises(RemoteProtocolError):
        dec.receive_data(b"x")


def test_data_body_size_is_checked_before_buffering():
    # a header announcing a raw payload bigger than raw_len, or a zstd one past the bound
    for codec_, raw_len, size in [(0, 10, 11), (1, MAX_CHUNK, MAX_PAYLOAD + 1),
                                  (0, MAX_CHUNK + 1, MAX_CHUNK + 1), (1, 10, 0)]:
        doc = codec.encode({"codec": codec_, "id": b"d" * 32, "raw_len": raw_len, "rid": 1,
                            "size": size, "t": "data", "v": 1})
        dec = ExchangeDecoder()
        with pytest.raises(RemoteProtocolError):
            dec.receive_data(len(doc).to_bytes(4, "big") + doc)   # no body sent at all


def test_room_bounds_the_buffer():
    dec = ExchangeDecoder()
    assert dec.room == HEADER + MAX_FRAME
    with pytest.raises(LocalProtocolError):
        dec.receive_data(bytes(HEADER + MAX_FRAME + 1))
    hdr = encode_data_header(1, b"d" * 32, CODEC_RAW, 1000, 1000)
    dec.receive_data(hdr)
    assert dec.room == 1000 + HEADER + MAX_FRAME
    dec.receive_data(b"x" * 999)
    assert dec.next_message() is None and dec.room == 1 + HEADER + MAX_FRAME
    dec.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="inside a frame"):
        dec.next_message()


def test_server_decoder_refuses_responses_before_their_body():
    hdr = encode_data_header(1, b"d" * 32, CODEC_RAW, 1000, 1000)
    with pytest.raises(RemoteProtocolError, match="not a request"):
        ExchangeDecoder(requests_only=True).receive_data(hdr)
    for m in (GetManifest(1, b"m" * 32), Have(2, b"m" * 32, 0, 5), Get(3, (b"c" * 32,)),
              Cancel((b"c" * 32,))):
        assert feed(ExchangeDecoder(requests_only=True), encode_message(m)) == [m]


def _doc(**fields) -> bytes:
    doc = codec.encode(fields)
    return len(doc).to_bytes(4, "big") + doc


HOSTILE = {
    "not a map": _doc() [:4] + codec.encode([1]),
    "version 2": _doc(v=2, t="missing", rid=1, id=b"c" * 32),
    "unknown tag": _doc(v=1, t="ping", rid=1),
    "missing field": _doc(v=1, t="missing", rid=1),
    "extra field": _doc(v=1, t="missing", rid=1, id=b"c" * 32, x=0),
    "zero id": _doc(v=1, t="missing", rid=1, id=ZERO_ID),
    "get no ids": _doc(v=1, t="get", rid=1, ids=[]),
    "get too many": _doc(v=1, t="get", rid=1, ids=[bytes([1, i]) * 16 for i in range(65)]),
    "get repeated": _doc(v=1, t="get", rid=1, ids=[b"c" * 32, b"c" * 32]),
    "get ids bytes": _doc(v=1, t="get", rid=1, ids=b"c" * 32),
    "get zero id": _doc(v=1, t="get", rid=1, ids=[ZERO_ID]),
    "have count 0": _doc(v=1, t="have", rid=1, manifest_id=b"m" * 32, start=0, count=0),
    "have count big": _doc(v=1, t="have", rid=1, manifest_id=b"m" * 32, start=0,
                           count=MAX_HAVE + 1),
    "bits short": _doc(v=1, t="have_bits", rid=1, manifest_id=b"m" * 32, start=0, count=9,
                       bits=b"\x01"),
    "manifest empty": _doc(v=1, t="manifest", rid=1, manifest_id=b"m" * 32, data=b""),
    "manifest text": _doc(v=1, t="manifest", rid=1, manifest_id=b"m" * 32, data="x"),
    "data with payload field": _doc(v=1, t="data", rid=1, id=b"c" * 32, codec=0, raw_len=1,
                                    size=1, payload=b"x") + b"x",
    "data raw_len 0": _doc(v=1, t="data", rid=1, id=b"c" * 32, codec=0, raw_len=0, size=0),
    "data codec bool": _doc(v=1, t="data", rid=1, id=b"c" * 32, codec=True, raw_len=1,
                            size=1) + b"x",
    "data size text": _doc(v=1, t="data", rid=1, id=b"c" * 32, codec=0, raw_len=1,
                           size="1") + b"x",
    "data cut short": _doc(v=1, t="data", rid=1, id=b"c" * 32, codec=0, raw_len=5,
                           size=5) + b"xx",
    "unsorted keys": (lambda d: len(d).to_bytes(4, "big") + d)(
        msgpack.packb({"v": 1, "t": "missing", "rid": 1, "id": b"c" * 32})),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_frame_is_a_remote_protocol_error(name):
    with pytest.raises(RemoteProtocolError):
        feed(ExchangeDecoder(), HOSTILE[name])


@pytest.mark.parametrize("make", [
    lambda: GetManifest(-1, b"m" * 32), lambda: GetManifest(1, b"m"),
    lambda: ManifestData(1, b"m" * 32, b""), lambda: ManifestData(1, b"m" * 32, bytes(MAX_MANIFEST + 1)),
    lambda: Have(1, b"m" * 32, 0, 0), lambda: Have(1, b"m" * 32, -1, 1),
    lambda: Have(1, b"m" * 32, 0, MAX_HAVE + 1), lambda: Get(1, ()),
    lambda: Get(1, (ZERO_ID,)), lambda: Get(1, (b"c" * 32,) * 2),
    lambda: Get(1, tuple(bytes([1, i]) * 16 for i in range(MAX_GET_IDS + 1))),
    lambda: Cancel(()), lambda: Cancel((ZERO_ID,)), lambda: Cancel((b"c" * 32,) * 2),
    lambda: Cancel(tuple(bytes([1, i]) * 16 for i in range(MAX_GET_IDS + 1))),
    lambda: Data(1, b"c" * 32, 0, 3, b"ab"), lambda: Data(1, b"c" * 32, 0, 0, b""),
    lambda: Data(1, b"c" * 32, 1, 3, b""), lambda: Data(1, b"c" * 32, 0, 3, bytearray(b"abc")),
    lambda: Data(1, b"c" * 32, 1, 1, bytes(zstd_bound(1) + 1)),
    lambda: Data(1, ZERO_ID, 0, 1, b"\x00"), lambda: Missing(1, b"c" * 31),
])
def test_invalid_values_cannot_be_constructed(make):
    with pytest.raises(LocalProtocolError):
        make()


def test_answers():
    g = Get(5, (b"a" * 32, b"b" * 32))
    assert answers(g, Missing(5, b"a" * 32)) and answers(g, Data(5, b"b" * 32, 0, 1, b"x"))
    assert not answers(g, Missing(5, b"c" * 32)) and not answers(g, Missing(6, b"a" * 32))
    assert not answers(Cancel((b"a" * 32,)), Missing(5, b"a" * 32))   # Cancel has no answer
    assert answers(GetManifest(1, b"m" * 32), ManifestData(1, b"m" * 32, None))
    assert not answers(GetManifest(1, b"m" * 32), ManifestData(1, b"n" * 32, None))
    h = Have(2, b"m" * 32, 8, 3)
    assert answers(h, HaveBits(2, b"m" * 32, 8, 3, b"\x07"))
    assert not answers(h, HaveBits(2, b"m" * 32, 8, 2, b"\x03"))
    assert not answers(Missing(1, b"a" * 32), Missing(1, b"a" * 32))


def test_one_mib_data_frame_decodes_from_pieces_and_a_whole_body_is_not_copied():
    """Throughput is measured in bench/ (no timing asserts here); what makes it fast is
    checked: a 1 MiB Data frame decodes the same from 64 KiB pieces, and a body that
    arrives as one whole bytes object (the fast channel delivers a chunk payload as its
    own record) becomes the payload itself, not a copy."""
    plain = os.urandom(1 << 20)
    msg = Data(7, chunk_id(plain), CODEC_RAW, len(plain), plain)
    frame = encode_message(msg)
    dec = ExchangeDecoder()
    for i in range(0, len(frame), 65536):
        dec.receive_data(frame[i:i + 65536])
    assert dec.next_message() == msg
    head, body = bytes(frame[:len(frame) - len(plain)]), bytes(frame[len(frame) - len(plain):])
    dec = ExchangeDecoder()
    dec.receive_data(head)
    assert dec.next_message() is None
    dec.receive_data(body)
    got = dec.next_message()
    assert got == msg and got.payload is body


def test_open_data_into_checks_like_open_data_without_allocating():
    from hypersdk.protocol.exchange import open_data_into, zstd_frame_size
    plain = bytes(100_000) + b"\x01"
    cid = chunk_id(plain)
    buf = bytearray(len(plain) + 1)
    for z in (zstandard.ZstdCompressor().compress(plain),
              zstandard.ZstdCompressor(write_content_size=False).compress(plain),
              zstandard.ZstdCompressor(write_checksum=True, level=19).compress(plain)):
        assert zstd_frame_size(z) == len(z)
        view = open_data_into(Data(1, cid, CODEC_ZSTD, len(plain), z), buf)
        assert view == plain and view.obj is buf            # decoded into the buffer
    raw = os.urandom(1000)
    assert open_data_into(Data(1, chunk_id(raw), CODEC_RAW, 1000, raw), None) == raw
    z = zstandard.ZstdCompressor(write_checksum=True).compress(plain)
    no_size = zstandard.ZstdCompressor(write_content_size=False).compress(plain)
    bad_sum = z[:-1] + bytes([z[-1] ^ 1])
    bad = {"not zstd": b"not a zstd frame", "trailing bytes": z + b"\x00",
           "two frames": z + z, "truncated": z[:-3], "no checksum": z[:-4],
           "bad checksum": bad_sum, "skippable": b"\x50\x2a\x4d\x18" + bytes(8) + z,
           "declares more": zstandard.ZstdCompressor().compress(plain + b"x"),
           "more, no size": zstandard.ZstdCompressor(
               write_content_size=False).compress(plain + b"x")}
    for name, payload in bad.items():
        for opener in (open_data, lambda d: open_data_into(d, buf)):
            with pytest.raises(RemoteProtocolError):
                opener(Data(1, cid, CODEC_ZSTD, len(plain), payload))
    bomb = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(MAX_CHUNK))
    with pytest.raises(RemoteProtocolError):
        open_data_into(Data(1, cid, CODEC_ZSTD, 1000, bomb), buf)
    with pytest.raises(RemoteProtocolError):             # shorter than raw_len
        open_data_into(Data(1, cid, CODEC_ZSTD, len(plain) + 1, no_size), buf + b"x")
    with pytest.raises(ChunkHashMismatch):
        open_data_into(Data(1, chunk_id(b"other"), CODEC_ZSTD, len(plain), z), buf)
    with pytest.raises(LocalProtocolError):               # no room for raw_len + 1
        open_data_into(Data(1, cid, CODEC_ZSTD, len(plain), z), bytearray(len(plain)))
