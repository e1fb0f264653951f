"""Manifest and canonical codec: round trips, canonical form, hostile bytes."""
import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hypersdk.protocol import codec
from hypersdk.protocol.chunks import ZERO_ID
from hypersdk.protocol.errors import LocalProtocolError, RemoteProtocolError
from hypersdk.protocol.manifest import (
    LIST_ENTRIES,
    Manifest,
    chunk_count,
    decode_manifest,
    list_count,
)

ids = st.binary(min_size=32, max_size=32)
chunk_sizes = st.sampled_from([1 << k for k in range(16, 24)])
names = st.text(min_size=1, max_size=40).filter(lambda s: "\x00" not in s)
sources = st.dictionaries(st.text(max_size=10), st.one_of(st.text(max_size=20),
                                                          st.integers(0, 2**40)), max_size=4)


@st.composite
def manifests(draw):
    cs = draw(chunk_sizes)
    size = draw(st.one_of(st.integers(0, 4 * cs), st.integers(0, 3 * LIST_ENTRIES * cs)))
    n_lists = list_count(chunk_count(size, cs))
    lists = draw(st.lists(st.one_of(ids, st.just(ZERO_ID)), min_size=n_lists, max_size=n_lists))
    return Manifest(name=draw(names), size=size, chunk_size=cs, lists=tuple(lists),
                    source=draw(sources), created=draw(st.integers(0, 2**63)))


@given(manifests())
def test_round_trip_is_identity_and_canonical(m):
    data = m.encode()
    back = decode_manifest(data)
    assert back == m
    assert back.encode() == data          # one encoding per manifest
    assert back.id == m.id and len(m.id) == 32


@given(manifests(), st.data())
@settings(max_examples=200)
def test_any_single_byte_change_is_rejected_or_changes_the_id(m, data):
    enc = bytearray(m.encode())
    i = data.draw(st.integers(0, len(enc) - 1))
    enc[i] ^= data.draw(st.integers(1, 255))
    try:
        other = decode_manifest(bytes(enc))
    except RemoteProtocolError:
        return
    assert other.id != m.id


@given(st.binary(max_size=2048))
def test_random_bytes_only_raise_remote_protocol_error(blob):
    try:
        decode_manifest(blob)
    except RemoteProtocolError:
        pass


@given(manifests(), st.integers(0, 400), st.binary(min_size=1, max_size=8))
def test_truncated_or_extended_encodings_are_rejected(m, cut, extra):
    enc = m.encode()
    with pytest.raises(RemoteProtocolError):
        decode_manifest(enc[:max(0, len(enc) - 1 - cut)])
    with pytest.raises(RemoteProtocolError):
        decode_manifest(enc + extra)


def test_non_canonical_key_order_is_rejected():
    m = Manifest(name="a", size=0, chunk_size=1 << 20, lists=())
    doc = m.to_doc()
    unsorted = msgpack.packb(dict(reversed(list(sorted(doc.items())))), use_bin_type=True)
    with pytest.raises(RemoteProtocolError, match="canonical"):
        decode_manifest(unsorted)


@pytest.mark.parametrize("change, match", [
    ({"v": 4}, "version"),         # 2: keyed ids (test_keyed_ids.py), 3: labels (test_labels.py)
    ({"chunk_size": 1000}, "chunk size"),
    ({"size": -1}, "size"),
    ({"lists": [b"x" * 31]}, "lists|hash list"),
    ({"extra": 1}, "keys"),
])
def test_invalid_fields_are_named(change, match):
    doc = Manifest(name="a", size=10, chunk_size=1 << 16, lists=(b"\1" * 32,)).to_doc()
    doc.update(change)
    with pytest.raises(RemoteProtocolError, match=match):
        decode_manifest(codec.encode(doc))


def test_list_count_must_match_size():
    with pytest.raises(LocalProtocolError, match="hash lists"):
        Manifest(name="a", size=LIST_ENTRIES * (1 << 16) + 1, chunk_size=1 << 16,
                 lists=(b"\1" * 32,))


def test_codec_refuses_floats_and_non_string_keys():
    with pytest.raises(LocalProtocolError):
        codec.encode({"a": 1.5})
    with pytest.raises(LocalProtocolError):
        codec.encode({1: 2})
    with pytest.raises(RemoteProtocolError):
        codec.decode(msgpack.packb({"a": 1.5}))


def test_codec_bounds_document_size():
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        codec.decode(b"\xc0" * 100, max_size=10)


def test_claimed_list_length_is_bounded_by_document_size():
    # array32 header claiming 1,000,000 elements, followed by 3 bytes
    with pytest.raises(RemoteProtocolError):
        codec.decode(b"\xdd\x00\x0f\x42\x40" + b"\x01\x02\x03")
    assert codec.decode(msgpack.packb([1, 2, 3])) == [1, 2, 3]


def test_codec_refuses_integers_outside_64_bits_with_a_typed_error():
    from hypersdk.protocol import codec
    from hypersdk.protocol.errors import LocalProtocolError
    for bad in (1 << 64, -(1 << 63) - 1):
        with pytest.raises(LocalProtocolError):
            codec.encode({"n": bad})
    assert codec.decode(codec.encode({"n": (1 << 64) - 1})) == {"n": (1 << 64) - 1}
