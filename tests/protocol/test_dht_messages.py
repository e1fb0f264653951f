"""DHT messages and framing: round trips, reassembly, hostile bytes, signed records."""
import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hypersdk.protocol import codec
from hypersdk.protocol.dht_messages import (
    MAX_ADDR,
    MAX_BATCH_KEYS,
    MAX_PEERS,
    MAX_PROVIDERS,
    MAX_SITE,
    MAX_U64,
    MAX_VALUE,
    MESSAGE_TYPES,
    Ack,
    AddProvider,
    AddProviders,
    FindNode,
    GetProviders,
    GetRecord,
    Nodes,
    PeerInfo,
    Ping,
    Pong,
    Providers,
    PutRecord,
    RecordFound,
    SignedRecord,
    answers,
)
from hypersdk.protocol.errors import LocalProtocolError, RemoteProtocolError
from hypersdk.protocol.framing import (
    HEADER,
    MAX_FRAME,
    FrameDecoder,
    OversizedFrame,
    decode_message,
    encode_message,
    encode_payload,
)

ids = st.binary(min_size=32, max_size=32)
rids = st.one_of(st.integers(0, MAX_U64), st.sampled_from([0, 1, 127, 128, 2**32, MAX_U64]))
addrs = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1,
                max_size=MAX_ADDR)
sites = st.text(max_size=MAX_SITE)
peers = st.builds(PeerInfo, ids, addrs, sites)
peer_lists = st.lists(peers, max_size=MAX_PEERS)
senders = st.none() | peers                # every request may say who is asking
records = st.builds(SignedRecord, key=ids, value=st.binary(max_size=MAX_VALUE), author=ids,
                    seq=st.integers(0, MAX_U64), signature=st.binary(min_size=64, max_size=64))
private_keys = st.binary(min_size=32, max_size=32).map(Ed25519PrivateKey.from_private_bytes)

STRATEGIES = {
    Ping: st.builds(Ping, rids, senders),
    Pong: st.builds(Pong, rids),
    FindNode: st.builds(FindNode, rids, ids, senders),
    Nodes: st.builds(Nodes, rids, peer_lists),
    GetProviders: st.builds(GetProviders, rids, ids, senders),
    Providers: st.builds(Providers, rids, st.lists(peers, max_size=MAX_PROVIDERS), peer_lists),
    AddProvider: st.builds(AddProvider, rids, ids, peers, senders),
    AddProviders: st.builds(AddProviders, rids,
                            st.lists(ids, min_size=1, max_size=40, unique=True).map(sorted),
                            peers, senders),
    Ack: st.builds(Ack, rids, st.booleans()),
    PutRecord: st.builds(PutRecord, rids, records, senders),
    GetRecord: st.builds(GetRecord, rids, ids, senders),
    RecordFound: st.builds(RecordFound, rids, st.none() | records, peer_lists),
}
messages = st.one_of(*STRATEGIES.values())


def feed(dec: FrameDecoder, data: bytes, eof: bool = True) -> list:
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
    assert len(MESSAGE_TYPES) == 12


@given(messages)
@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
def test_round_trip_is_identity_and_canonical(msg):
    frame = encode_message(msg)
    assert int.from_bytes(frame[:HEADER], "big") == len(frame) - HEADER <= MAX_FRAME
    doc = codec.decode(frame[HEADER:])
    assert doc["v"] == 1 and doc["t"] == msg.TAG
    assert codec.encode(doc) == frame[HEADER:]     # the direct encoding is the canonical one
    back = decode_message(frame[HEADER:])
    assert back == msg and type(back) is type(msg)
    assert encode_message(back) == frame


def _worst_peer(i: int) -> PeerInfo:
    return PeerInfo(bytes([i]) * 32, "/" * MAX_ADDR, "\U0010ffff" * MAX_SITE)


def test_largest_valid_message_of_every_type_fits_in_a_frame():
    big_peers = tuple(_worst_peer(i) for i in range(MAX_PEERS))
    record = SignedRecord(b"k" * 32, b"\xff" * MAX_VALUE, b"a" * 32, MAX_U64, b"s" * 64)
    me = _worst_peer(99)
    worst = [
        Ping(MAX_U64, me), Pong(MAX_U64), FindNode(MAX_U64, b"t" * 32, me),
        Nodes(MAX_U64, big_peers), GetProviders(MAX_U64, b"k" * 32, me),
        Providers(MAX_U64, tuple(_worst_peer(i) for i in range(MAX_PROVIDERS)), big_peers),
        AddProvider(MAX_U64, b"k" * 32, _worst_peer(0), me), Ack(MAX_U64, False),
        AddProviders(MAX_U64, tuple(i.to_bytes(32, "big") for i in range(MAX_BATCH_KEYS)),
                     _worst_peer(0), me),
        PutRecord(MAX_U64, record, me), GetRecord(MAX_U64, b"k" * 32, me),
        RecordFound(MAX_U64, record, big_peers),
    ]
    assert {type(m) for m in worst} == set(MESSAGE_TYPES.values())
    for m in worst:
        assert decode_message(encode_payload(m)) == m
    assert max(len(encode_payload(m)) for m in worst) < MAX_FRAME


@given(st.lists(messages, min_size=1, max_size=4))
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_frames_split_at_every_byte_boundary_reassemble(msgs):
    stream = b"".join(encode_message(m) for m in msgs)
    step = max(1, len(stream) // 300)          # every boundary up to 300 bytes, then sampled
    for cut in range(0, len(stream) + 1, step):
        dec = FrameDecoder()
        got = feed(dec, stream[:cut], eof=False) + feed(dec, stream[cut:])
        assert got == msgs


def test_byte_at_a_time_and_many_frames_in_one_receive_data():
    msgs = [Ping(1), Nodes(2, [PeerInfo(b"\x01" * 32, "/ip4/10.0.0.1/tcp/4001", "par")]),
            RecordFound(3, None, ()), Ack(4)]
    stream = b"".join(encode_message(m) for m in msgs)
    for cut in range(len(stream) + 1):        # literally every boundary
        dec = FrameDecoder()
        assert feed(dec, stream[:cut], eof=False) + feed(dec, stream[cut:]) == msgs
    dec = FrameDecoder()
    got = []
    for b in stream:
        dec.receive_data(bytes([b]))
        while (m := dec.next_message()) is not None:
            got.append(m)
    assert got == msgs
    dec = FrameDecoder()
    dec.receive_data(stream)                   # all four frames at once
    assert [dec.next_message() for _ in range(5)] == msgs + [None]
    dec.receive_data(b"")
    assert dec.next_message() is None          # clean end of stream


def _only_remote_errors(data: bytes) -> None:
    """Decoding `data` yields valid messages or a RemoteProtocolError, nothing else."""
    try:
        msgs = feed(FrameDecoder(), data)
    except RemoteProtocolError:
        return
    for m in msgs:
        assert type(m) in MESSAGE_TYPES.values()
        assert decode_message(encode_payload(m)) == m       # it is a valid message


@given(st.binary(max_size=300))
@settings(max_examples=500)
def test_random_bytes_only_raise_remote_protocol_error(data):
    _only_remote_errors(data)
    try:
        decode_message(data)
    except RemoteProtocolError:
        pass


@given(st.binary(max_size=200))
@settings(max_examples=300)
def test_random_payload_behind_a_valid_length_prefix(data):
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
    if op == "replace" and i >= HEADER:        # a changed payload never decodes to msg
        try:
            assert decode_message(bytes(frame[HEADER:])) != msg
        except RemoteProtocolError:
            pass


def test_oversized_length_prefix_is_rejected_before_the_body():
    prefix = (MAX_FRAME + 1).to_bytes(HEADER, "big")
    dec = FrameDecoder()
    dec.receive_data(prefix[:2])
    assert dec.next_message() is None          # half a header: wait
    with pytest.raises(OversizedFrame, match="exceeds"):
        dec.receive_data(prefix[2:])           # rejected on the prefix alone
    assert dec.room == MAX_FRAME + HEADER      # nothing kept
    with pytest.raises(RemoteProtocolError):   # and it stays failed
        dec.next_message()
    with pytest.raises(RemoteProtocolError):
        dec.receive_data(b"x")
    with pytest.raises(RemoteProtocolError):
        FrameDecoder().receive_data(b"\xff\xff\xff\xff" + b"\x00" * 100)


def test_buffer_is_bounded_and_room_is_enforced():
    dec = FrameDecoder()
    dec.receive_data(MAX_FRAME.to_bytes(4, "big"))   # the largest allowed prefix waits
    assert dec.next_message() is None and dec.room == MAX_FRAME
    with pytest.raises(LocalProtocolError):
        dec.receive_data(bytes(MAX_FRAME + 1))
    dec.receive_data(bytes(MAX_FRAME - 1))
    assert dec.room == 1 and dec.next_message() is None
    dec.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="inside a frame"):
        dec.next_message()


def _payload(**doc) -> bytes:
    return codec.encode(doc)


PEER = {"id": b"p" * 32, "addr": "/ip4/1.2.3.4/tcp/1", "site": ""}
RECORD = {"key": b"k" * 32, "value": b"", "author": b"a" * 32, "seq": 0, "signature": b"s" * 64}
HOSTILE = {
    "not a map": codec.encode([1, 2]),
    "empty": b"",
    "trailing bytes": _payload(v=1, t="ping", rid=1) + b"\x00",
    "version 2": _payload(v=2, t="ping", rid=1),
    "version true": _payload(v=True, t="ping", rid=1),
    "version missing": _payload(t="ping", rid=1),
    "unknown tag": _payload(v=1, t="store", rid=1),
    "tag not text": _payload(v=1, t=[1], rid=1),
    "missing field": _payload(v=1, t="find_node", rid=1),
    "unknown field": _payload(v=1, t="ping", rid=1, extra=0),
    "rid negative": _payload(v=1, t="ping", rid=-1),
    "rid bool": _payload(v=1, t="ping", rid=True),
    "rid text": _payload(v=1, t="ping", rid="1"),
    "target 31 bytes": _payload(v=1, t="find_node", rid=1, target=b"x" * 31),
    "target as text": _payload(v=1, t="find_node", rid=1, target="x" * 32),
    "too many peers": _payload(v=1, t="nodes", rid=1, peers=[PEER] * (MAX_PEERS + 1)),
    "too many providers": _payload(v=1, t="providers", rid=1, closer=[],
                                   providers=[PEER] * (MAX_PROVIDERS + 1)),
    "huge peer list": _payload(v=1, t="nodes", rid=1, peers=[None] * 5000),
    "peers not a list": _payload(v=1, t="nodes", rid=1, peers={"a": 1}),
    "peer extra key": _payload(v=1, t="nodes", rid=1, peers=[dict(PEER, x=1)]),
    "peer id short": _payload(v=1, t="nodes", rid=1, peers=[dict(PEER, id=b"p")]),
    "addr too long": _payload(v=1, t="nodes", rid=1, peers=[dict(PEER, addr="/" * 257)]),
    "addr with space": _payload(v=1, t="nodes", rid=1, peers=[dict(PEER, addr="/ip4/ x")]),
    "site too long": _payload(v=1, t="nodes", rid=1, peers=[dict(PEER, site="s" * 65)]),
    "sender nil": _payload(v=1, t="ping", rid=1, sender=None),     # absent, never nil
    "sender not a peer": _payload(v=1, t="find_node", rid=1, target=b"t" * 32, sender=b"x"),
    "sender on a response": _payload(v=1, t="pong", rid=1, sender=PEER),
    "provider missing": _payload(v=1, t="add_provider", rid=1, key=b"k" * 32, provider=None),
    "batch without keys": _payload(v=1, t="add_providers", rid=1, keys=[], provider=PEER),
    "batch keys not a list": _payload(v=1, t="add_providers", rid=1, keys=b"k" * 32,
                                      provider=PEER),
    "batch too many keys": _payload(
        v=1, t="add_providers", rid=1, provider=PEER,
        keys=[i.to_bytes(32, "big") for i in range(MAX_BATCH_KEYS + 1)]),
    "batch huge key list": _payload(v=1, t="add_providers", rid=1, provider=PEER,
                                    keys=[None] * 5000),
    "batch key short": _payload(v=1, t="add_providers", rid=1, keys=[b"k" * 31], provider=PEER),
    "batch key text": _payload(v=1, t="add_providers", rid=1, keys=["k" * 32], provider=PEER),
    "batch keys unsorted": _payload(v=1, t="add_providers", rid=1, provider=PEER,
                                    keys=[b"b" * 32, b"a" * 32]),
    "batch keys repeated": _payload(v=1, t="add_providers", rid=1, provider=PEER,
                                    keys=[b"a" * 32, b"a" * 32]),
    "batch provider missing": _payload(v=1, t="add_providers", rid=1, keys=[b"a" * 32],
                                       provider=None),
    "put without record": _payload(v=1, t="put_record", rid=1, record=None),
    "value too big": _payload(v=1, t="put_record", rid=1,
                              record=dict(RECORD, value=bytes(MAX_VALUE + 1))),
    "signature short": _payload(v=1, t="put_record", rid=1, record=dict(RECORD, signature=b"s")),
    "seq negative": _payload(v=1, t="put_record", rid=1, record=dict(RECORD, seq=-1)),
    "stored as int": _payload(v=1, t="ack", rid=1, stored=1),
    "unsorted keys": msgpack.packb({"v": 1, "t": "ping", "rid": 1}),
    "wide integer": b"\x83\xa3rid\xcf" + (1).to_bytes(8, "big") + b"\xa1t\xa4ping\xa1v\x01",
    "float": msgpack.packb({"rid": 1.0, "t": "ping", "v": 1}),
    "str8 for short text": b"\x83\xa3rid\x01\xa1t\xd9\x04ping\xa1v\x01",
    "binary where text": msgpack.packb({"rid": 1, "t": b"ping", "v": 1}, use_bin_type=True),
    "deep nesting": b"\x91" * 10000 + b"\x00",
    "too big": _payload(v=1, t="get_record", rid=1, key=bytes(MAX_FRAME)),
}


def test_hand_built_canonical_payload_decodes():
    assert decode_message(b"\x83\xa3rid\x01\xa1t\xa4ping\xa1v\x01") == Ping(1)


def test_sender_is_optional_and_absent_on_the_wire_when_none():
    me = PeerInfo(b"m" * 32, "/ip4/10.0.0.9/tcp/4001", "lyon")
    assert encode_payload(Ping(1)) == b"\x83\xa3rid\x01\xa1t\xa4ping\xa1v\x01"  # unchanged
    assert "sender" not in codec.decode(encode_payload(FindNode(2, b"t" * 32)))
    for msg in (Ping(1, me), FindNode(2, b"t" * 32, me), GetProviders(3, b"k" * 32, me),
                AddProvider(4, b"k" * 32, me, me), GetRecord(5, b"k" * 32, me),
                AddProviders(6, (b"k" * 32,), me, me)):
        assert codec.decode(encode_payload(msg))["sender"]["id"] == me.id
        assert decode_message(encode_payload(msg)) == msg


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_payload_is_a_remote_protocol_error(name):
    payload = HOSTILE[name]
    with pytest.raises(RemoteProtocolError):
        decode_message(payload)
    if len(payload) <= MAX_FRAME:
        with pytest.raises(RemoteProtocolError):
            feed(FrameDecoder(), len(payload).to_bytes(HEADER, "big") + payload)


@pytest.mark.parametrize("make", [
    lambda: PeerInfo(b"x" * 31, "/a"), lambda: PeerInfo(b"x" * 32, ""),
    lambda: PeerInfo(b"x" * 32, "/ä"), lambda: PeerInfo(b"x" * 32, "/a", "s" * 65),
    lambda: PeerInfo(b"x" * 32, "/a", "\ud800"), lambda: Ping(-1), lambda: Ping(2**64),
    lambda: Ping(True), lambda: Nodes(1, [PeerInfo(b"x" * 32, "/a")] * (MAX_PEERS + 1)),
    lambda: Nodes(1, [b"x" * 32]), lambda: PutRecord(1, None), lambda: Ack(1, 1),
    lambda: Ping(1, b"x" * 32), lambda: FindNode(1, b"t" * 32, {"id": b"x" * 32}),
    lambda: SignedRecord(b"k" * 32, bytes(MAX_VALUE + 1), b"a" * 32, 0, b"s" * 64),
    lambda: AddProviders(1, (), PeerInfo(b"x" * 32, "/a")),
    lambda: AddProviders(1, [b"k" * 32] * 2, PeerInfo(b"x" * 32, "/a")),
    lambda: AddProviders(1, (b"b" * 32, b"a" * 32), PeerInfo(b"x" * 32, "/a")),
    lambda: AddProviders(1, tuple(i.to_bytes(32, "big") for i in range(MAX_BATCH_KEYS + 1)),
                         PeerInfo(b"x" * 32, "/a")),
    lambda: AddProviders(1, (b"k" * 31,), PeerInfo(b"x" * 32, "/a")),
    lambda: AddProviders(1, b"k" * 32, PeerInfo(b"x" * 32, "/a")),
    lambda: AddProviders(1, (b"k" * 32,), None),
])
def test_invalid_values_cannot_be_constructed(make):
    with pytest.raises(LocalProtocolError):
        make()


def test_batch_bound_matches_the_reprovide_planner():
    from hypersdk.dht import reprovide
    assert reprovide.MAX_BATCH_KEYS == MAX_BATCH_KEYS


def test_the_largest_add_providers_fits_a_frame_with_room_to_spare():
    worst = AddProviders(MAX_U64, tuple(bytes([0xFF] * 30) + i.to_bytes(2, "big")
                                        for i in range(MAX_BATCH_KEYS)),
                         _worst_peer(0), _worst_peer(1))
    payload = encode_payload(worst)
    print(f"\nlargest AddProviders: {len(payload):,} bytes of {MAX_FRAME:,}")
    assert len(payload) < 0.6 * MAX_FRAME        # dht/reprovide.py's budget
    frame = encode_message(worst)
    assert feed(FrameDecoder(), frame) == [worst]


def test_lists_become_tuples_and_messages_are_hashable():
    p = PeerInfo(b"x" * 32, "/ip4/1.2.3.4/tcp/1", "lyon")
    m = Providers(7, [p], [p, p])
    assert m.providers == (p,) and m.closer == (p, p) and hash(m) == hash(Providers(7, (p,), (p, p)))
    with pytest.raises(LocalProtocolError):
        encode_message(object())


def test_answers_matches_type_and_rid():
    assert answers(Ping(5), Pong(5)) and not answers(Ping(5), Pong(6))
    assert answers(PutRecord(1, SignedRecord(b"k" * 32, b"", b"a" * 32, 0, b"s" * 64)), Ack(1))
    assert answers(GetRecord(2, b"k" * 32), RecordFound(2, None, ()))
    assert not answers(FindNode(3, b"t" * 32), Providers(3, (), ()))
    assert not answers(Pong(1), Ping(1))


@given(private_keys, ids, st.binary(max_size=MAX_VALUE), st.integers(0, MAX_U64))
@settings(max_examples=100)
def test_signed_record_verifies_and_round_trips(sk, key, value, seq):
    rec = SignedRecord.sign(sk, key, value, seq)
    assert rec.verify()
    assert rec.author == sk.public_key().public_bytes_raw()
    back = decode_message(encode_payload(PutRecord(9, rec))).record
    assert back == rec and back.verify()
    assert rec.signing_bytes().startswith(b"hypersdk/dht-record/v1\x00")


@given(private_keys, ids, st.binary(min_size=1, max_size=256), st.integers(0, MAX_U64),
       st.sampled_from(["key", "value", "author", "signature", "seq"]), st.data())
@settings(max_examples=300)
def test_any_single_byte_change_to_a_record_breaks_its_signature(sk, key, value, seq, field, data):
    rec = SignedRecord.sign(sk, key, value, seq)
    flip = data.draw(st.integers(1, 255))
    if field == "seq":
        changed = seq ^ (flip << 8 * data.draw(st.integers(0, 7)))
    else:
        b = bytearray(getattr(rec, field))
        b[data.draw(st.integers(0, len(b) - 1))] ^= flip
        changed = bytes(b)
    fields = dict(key=rec.key, value=rec.value, author=rec.author, seq=rec.seq,
                  signature=rec.signature)
    fields[field] = changed
    assert not SignedRecord(**fields).verify()


@given(private_keys, st.binary(max_size=64), st.data())
@settings(max_examples=300)
def test_any_single_byte_change_to_an_encoded_record_is_rejected_or_unverifiable(sk, value, data):
    rec = SignedRecord.sign(sk, b"k" * 32, value, 1)
    payload = bytearray(encode_payload(PutRecord(1, rec)))
    payload[data.draw(st.integers(0, len(payload) - 1))] ^= data.draw(st.integers(1, 255))
    try:
        got = decode_message(bytes(payload))
    except RemoteProtocolError:
        return
    if isinstance(got, PutRecord) and got.record != rec:   # (a changed rid is not signed)
        assert not got.record.verify()
