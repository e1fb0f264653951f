"""Keyed chunk ids in the pure protocol: manifest v2, id schemes, exchange and
possession checks under a data key (protocol/ids.py, manifest.py, exchange.py,
possession.py)."""
import pytest
from hypothesis import given
from hypothesis import strategies as st

from hypersdk.protocol import codec
from hypersdk.protocol.chunks import ZERO_ID, VerifiedChunk, chunk_id
from hypersdk.protocol.errors import ChunkHashMismatch, LocalProtocolError, RemoteProtocolError
from hypersdk.protocol.exchange import Data, data_from_plain, open_data, open_data_into
from hypersdk.protocol.ids import DataKeyMissing, id_of, scheme_key
from hypersdk.protocol.manifest import Manifest, decode_manifest
from hypersdk.protocol.possession import Challenge, Proof, answer, check, reference
from hypersdk.protocol.sealing import DataKey, keyed_id

K1 = DataKey.generate(bytes(range(1, 33)))
K2 = DataKey.generate(bytes(range(2, 34)))
CS = 1 << 16


def _m(key=None, **kw):
    return Manifest(name="vm", size=CS + 1, chunk_size=CS, lists=(b"\1" * 32,),
                    source={"path": "/secret/vm.img"}, created=7, key=key, **kw)


def test_plain_manifest_keeps_version_1_and_its_exact_bytes():
    m = _m()
    doc = m.to_doc()
    assert doc["v"] == 1 and "key" not in doc
    # the bytes a manifest of the previous release had, hence its id
    old = codec.encode({"v": 1, "name": "vm", "size": CS + 1, "chunk_size": CS,
                        "lists": [b"\1" * 32], "source": {"path": "/secret/vm.img"},
                        "created": 7})
    assert m.encode() == old and m.id == chunk_id(old)
    assert decode_manifest(old) == m


def test_keyed_manifest_is_version_2_names_the_key_and_round_trips():
    m = _m(K1.fingerprint)
    doc = m.to_doc()
    assert doc["v"] == 2 and doc["key"] == K1.fingerprint
    back = decode_manifest(m.encode())
    assert back == m and back.key == K1.fingerprint and back.encode() == m.encode()
    assert m.id == chunk_id(m.encode())          # the manifest id stays plain BLAKE3
    assert m.id != _m(K2.fingerprint).id != _m().id


@pytest.mark.parametrize("change, match", [
    ({"v": 2}, "keys"),                         # version 2 without its key field
    ({"v": 2, "key": None}, "must name its key"),
    ({"v": 2, "key": b"x" * 31}, "fingerprint"),
    ({"v": 2, "key": "ab" * 16}, "fingerprint"),
    ({"v": 1, "key": b"x" * 32}, "keys"),       # version 1 never has one
    ({"v": True}, "version"),
])
def test_malformed_key_fields_are_refused(change, match):
    doc = _m().to_doc()
    doc.update(change)
    with pytest.raises(RemoteProtocolError, match=match):
        decode_manifest(codec.encode(doc))


def test_constructor_refuses_a_bad_fingerprint():
    with pytest.raises(LocalProtocolError, match="fingerprint"):
        _m(b"short")


@given(st.binary(min_size=1, max_size=4096))
def test_id_schemes_differ_and_keys_differ(data):
    plain, k1, k2 = id_of(None, data), id_of(K1, data), id_of(K2, data)
    assert plain == chunk_id(data) and k1 == keyed_id(K1, data)
    assert len({plain, k1, k2}) == 3


def test_scheme_key_names_the_missing_key():
    assert scheme_key(None, None) is None and scheme_key(None, K1) is None
    assert scheme_key(K1.fingerprint, K1) is K1
    for have in (None, K2):
        with pytest.raises(DataKeyMissing) as e:
            scheme_key(K1.fingerprint, have)
        assert str(e.value) == (f"this backup is encrypted with data key "
                                f"{K1.fingerprint.hex()[:16]}; this node does not have it")


@pytest.mark.parametrize("compressible", [True, False])
def test_exchange_checks_keyed_ids_only_under_the_key(compressible):
    import random
    plain = (b"abc" * 30000)[:CS] if compressible else random.Random(3).randbytes(CS)
    kid = keyed_id(K1, plain)
    msg = data_from_plain(1, kid, plain)
    assert (msg.codec == 1) is compressible
    buf = bytearray(CS + 4096)
    got = open_data(msg, K1)
    assert got == plain and type(got) is VerifiedChunk and got.cid == kid
    assert bytes(open_data_into(msg, buf, K1)) == plain
    for key in (None, K2):                      # without the key (or another) it fails
        with pytest.raises(ChunkHashMismatch) as e:
            open_data(msg, key)
        assert e.value.expected == kid
        with pytest.raises(ChunkHashMismatch):
            open_data_into(msg, buf, key)
    # a plain id is not accepted under a key either: the scheme is the manifest's
    plain_msg = data_from_plain(1, chunk_id(plain), plain)
    assert open_data(plain_msg) == plain
    with pytest.raises(ChunkHashMismatch):
        open_data(plain_msg, K1)
    bad = bytearray(plain)
    bad[5] ^= 1
    with pytest.raises(ChunkHashMismatch):
        open_data(Data(1, kid, 0, CS, bytes(bad)), K1)


def test_possession_reference_accepts_keyed_copies_it_can_check():
    plain = b"possession of a keyed chunk" * 100
    kid = keyed_id(K1, plain)
    nonce = b"\7" * 32
    want = answer(nonce, plain)
    assert reference(kid, nonce, plain) is None            # plain bytes, no key: no check
    assert reference(kid, nonce, plain, K2) is None        # the wrong key
    assert reference(kid, nonce, plain, K1).answer == want
    assert reference(kid, nonce, VerifiedChunk.of(kid, plain)).answer == want
    assert reference(kid, nonce, VerifiedChunk.of(b"\1" * 32, plain)) is None  # another id
    assert reference(chunk_id(plain), nonce, plain).answer == want  # plain ids as before
    ch = Challenge(1, b"\2" * 32, nonce, (kid,))
    assert check(ch, Proof(1, b"\2" * 32, (want,)), {kid: VerifiedChunk.of(kid, plain)}
                 ).result == "ok"
    assert check(ch, Proof(1, b"\2" * 32, (b"\0" * 32,)), {kid: VerifiedChunk.of(kid, plain)}
                 ).result == "damaged"
    assert ZERO_ID not in (kid,)


def test_seal_into_and_open_record_into_match_the_allocating_forms():
    from hypersdk.protocol import sealing as sl
    payload = b"a payload sealed into a reused buffer " * 500
    oid = keyed_id(K1, payload)
    rec = sl.seal(K1, sl.KIND_CHUNK, oid, 1, 70000, payload)
    buf = bytearray(len(payload) + sl.RECORD_OVERHEAD + 100)
    got = sl.seal_into(K1, sl.KIND_CHUNK, oid, 1, 70000, memoryview(payload), buf)
    assert type(got) is memoryview and bytes(got) == bytes(rec)
    with pytest.raises(LocalProtocolError, match="writable buffer"):
        sl.seal_into(K1, sl.KIND_CHUNK, oid, 1, 70000, payload, bytearray(len(rec) - 1))
    with pytest.raises(LocalProtocolError, match="writable buffer"):
        sl.seal_into(K1, sl.KIND_CHUNK, oid, 1, 70000, payload, bytes(len(rec)))
    out = bytearray(len(payload) + 5)
    opened = sl.open_record_into(K1, sl.KIND_CHUNK, oid, got, out)
    assert (opened.codec, opened.raw_len, bytes(opened.payload)) == (1, 70000, payload)
    assert sl.open_record(K1, sl.KIND_CHUNK, oid, rec) == (1, 70000, bytearray(payload))
    bad = bytearray(rec)
    bad[40] ^= 1
    with pytest.raises(sl.SealError, match="does not authenticate"):
        sl.open_record_into(K1, sl.KIND_CHUNK, oid, bad, out)
    with pytest.raises(LocalProtocolError, match="writable buffer"):
        sl.open_record_into(K1, sl.KIND_CHUNK, oid, rec, bytearray(len(payload) - 1))
