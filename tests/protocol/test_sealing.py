"""protocol/sealing.py: data keys, keyed chunk ids and sealed records.

What must hold: a record opens to exactly what was sealed, and only under the
key, kind and object id it was sealed for; sealing is deterministic (same
inputs, same record; another key, other ids and records); any change to a
record, any truncation, any garbage or oversized input raises SealError and
nothing else; keyed ids are not plain BLAKE3 and differ between keys; the
fingerprint reveals neither K nor a subkey.
"""
from __future__ import annotations

import random
import struct

import blake3
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hypersdk.protocol import exchange
from hypersdk.protocol import sealing as sl
from hypersdk.protocol.chunks import DEFAULT_CHUNK, MAX_CHUNK, ZERO_ID, chunk_id
from hypersdk.protocol.errors import IntegrityError, LocalProtocolError, RemoteProtocolError
from hypersdk.protocol.manifest import LIST_ENTRIES

K1 = sl.DataKey.generate(bytes(range(1, 33)))
K2 = sl.DataKey.generate(bytes(range(2, 34)))
TEXT = b"the quick brown fox jumps over the lazy dog; " * 8


def rand(n: int, seed: int = 7) -> bytes:
    return random.Random(seed).randbytes(n)


def sealed(data: bytes, key=K1, kind=sl.KIND_CHUNK, codec=0):
    oid = sl.keyed_id(key, data)
    return oid, sl.seal(key, kind, oid, codec, len(data), data)


# a small record for the exhaustive / property tests
SMALL = TEXT[:200]
SMALL_OID, SMALL_REC = sealed(SMALL)


# -- keys ---------------------------------------------------------------------------
def test_subkeys_are_blake3_derive_key_of_k_with_the_documented_contexts():
    k = bytes(range(1, 33))
    ctx = lambda p: blake3.blake3(k, derive_key_context=f"hypersdk 2026-12 {p} v1").digest()
    assert K1.secret == k
    assert K1.id_key == ctx("chunk id")
    assert K1.record_key == ctx("record key")
    assert K1.iv_key == ctx("record iv")
    assert K1.fingerprint == blake3.blake3(ctx("fingerprint")).digest()
    assert len({K1.secret, K1.id_key, K1.record_key, K1.iv_key, K1.fingerprint}) == 5


def test_fingerprint_differs_between_keys_and_reveals_no_key_material():
    assert K1.fingerprint != K2.fingerprint
    for k in (K1, K2):
        assert len(k.fingerprint) == 32
        assert k.fingerprint not in (k.secret, k.id_key, k.record_key, k.iv_key)
        assert k.fingerprint != blake3.blake3(k.secret).digest()
    assert K1.secret.hex() not in repr(K1) and K1.id_key.hex() not in repr(K1)
    assert K1.fingerprint.hex()[:16] in repr(K1)


def test_from_bytes_round_trips_and_equality_is_by_key():
    again = sl.DataKey.from_bytes(bytearray(K1.secret))
    assert again == K1 and hash(again) == hash(K1) and again != K2
    assert again.record_key == K1.record_key and again.fingerprint == K1.fingerprint


@pytest.mark.parametrize("b", [b"", bytes(31), bytes(33), bytes(32), "k" * 32, None, 5])
def test_from_bytes_refuses_what_cannot_be_a_key(b):
    with pytest.raises(RemoteProtocolError):
        sl.DataKey.from_bytes(b)


@pytest.mark.parametrize("b", [b"", bytes(31), bytes(32), bytes(33), bytearray(32), "x" * 32])
def test_generate_refuses_bad_randomness(b):
    with pytest.raises(LocalProtocolError):
        sl.DataKey.generate(b)


# -- keyed ids ----------------------------------------------------------------------
@pytest.mark.parametrize("data", [b"", b"x", TEXT, rand(DEFAULT_CHUNK)])
def test_keyed_id_is_blake3_keyed_and_not_plain_blake3(data):
    kid = sl.keyed_id(K1, data)
    assert kid == blake3.blake3(data, key=K1.id_key).digest()
    assert len(kid) == 32 and kid != chunk_id(data) and kid != ZERO_ID
    assert kid != sl.keyed_id(K2, data)
    assert sl.keyed_id(K1, memoryview(data)) == kid == sl.keyed_id(K1, bytearray(data))


def test_keyed_ids_still_deduplicate_and_distinguish():
    assert sl.keyed_id(K1, TEXT) == sl.keyed_id(K1, bytes(TEXT))
    assert sl.keyed_id(K1, TEXT) != sl.keyed_id(K1, TEXT + b"\0")


# -- round trips --------------------------------------------------------------------
@pytest.mark.parametrize("data", [
    b"", b"\x01", (TEXT * 3000)[:DEFAULT_CHUNK - 1], (TEXT * 3000)[:DEFAULT_CHUNK],
    rand(DEFAULT_CHUNK), rand(MAX_CHUNK, seed=3)],
    ids=["0", "1", "chunk-1", "chunk", "incompressible", "max-chunk"])
def test_round_trip(data):
    oid, rec = sealed(data, codec=0)
    assert len(rec) == len(data) + sl.RECORD_OVERHEAD
    assert rec[0] == sl.MAGIC and rec[1] == sl.KIND_CHUNK and rec[2] == 0
    assert struct.unpack(">I", rec[3:7])[0] == len(data)
    if len(data) >= 16:
        assert data[:64] not in rec and data[-64:] not in rec     # it is encrypted
    got = sl.open_record(K1, sl.KIND_CHUNK, oid, rec)
    assert got == sl.Opened(0, len(data), data) and type(got.payload) is bytearray
    assert sl.peek_header(rec) == sl.Header(sl.KIND_CHUNK, 0, len(data), len(data))


def test_round_trip_of_a_compressed_payload_keeps_codec_and_raw_len():
    import zstandard
    data = (TEXT * 3000)[:DEFAULT_CHUNK]
    z = zstandard.ZstdCompressor(level=3).compress(data)
    oid = sl.keyed_id(K1, data)
    rec = sl.seal(K1, sl.KIND_CHUNK, oid, 1, len(data), z)
    assert len(rec) == len(z) + sl.RECORD_OVERHEAD < len(data)
    assert sl.open_record(K1, sl.KIND_CHUNK, oid, rec) == (1, len(data), z)
    assert sl.peek_header(rec) == (sl.KIND_CHUNK, 1, len(data), len(z))


@pytest.mark.parametrize("kind", [sl.KIND_CHUNK, sl.KIND_MANIFEST, sl.KIND_HASHLIST])
def test_every_kind_and_buffer_type_round_trips(kind):
    data = TEXT * 4
    oid = rand(32, seed=kind)
    for buf in (data, bytearray(data), memoryview(data), memoryview(b"__" + data)[2:]):
        rec = sl.seal(K1, kind, oid, 255, len(data), buf)
        assert rec == sl.seal(K1, kind, oid, 255, len(data), data)
        assert sl.open_record(K1, kind, oid, memoryview(rec)) == (255, len(data), data)
        assert sl.open_record(K1, kind, oid, bytearray(rec)) == (255, len(data), data)


def test_record_layout_is_header_iv_then_aes_gcm():
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    header = bytes([sl.MAGIC, sl.KIND_CHUNK, 0]) + len(SMALL).to_bytes(4, "big")
    iv = blake3.blake3(header + SMALL_OID + SMALL, key=K1.iv_key).digest()[:12]
    ct = AESGCM(K1.record_key).encrypt(iv, SMALL, header + SMALL_OID)
    assert SMALL_REC == header + iv + ct
    assert sl.RECORD_OVERHEAD == 7 + 12 + 16


# -- determinism --------------------------------------------------------------------
def test_sealing_is_deterministic_and_keyed():
    data = rand(5000)
    oid1, rec1 = sealed(data, K1)
    assert (oid1, rec1) == sealed(bytes(data), K1)
    oid2, rec2 = sealed(data, K2)
    assert oid1 != oid2 and rec1 != rec2 and rec1[19:] != rec2[19:]
    # same id under two keys: still different records
    assert sl.seal(K2, sl.KIND_CHUNK, oid1, 0, len(data), data) != rec1
    # any sealed field changes the IV
    ivs = {bytes(sl.seal(K1, k, o, c, n, p)[7:19]) for k, o, c, n, p in [
        (1, oid1, 0, 5000, data), (2, oid1, 0, 5000, data), (1, oid2, 0, 5000, data),
        (1, oid1, 1, 5000, data), (1, oid1, 0, 4999, data), (1, oid1, 0, 5000, data[:-1] + b"!")]}
    assert len(ivs) == 6


# -- rejection ----------------------------------------------------------------------
def expect_seal_error(rec, *, key=K1, kind=sl.KIND_CHUNK, oid=SMALL_OID) -> sl.SealError:
    with pytest.raises(sl.SealError) as ei:
        sl.open_record(key, kind, oid, rec)
    assert isinstance(ei.value, IntegrityError) and ei.value.oid == oid and ei.value.reason
    assert oid.hex() in str(ei.value)
    return ei.value


def test_every_single_byte_flip_is_rejected_exhaustively():
    for pos in range(len(SMALL_REC)):
        bad = bytearray(SMALL_REC)
        bad[pos] ^= 0x01
        expect_seal_error(bytes(bad))


@given(pos=st.integers(0, len(SMALL_REC) - 1), xor=st.integers(1, 255))
def test_any_single_byte_change_is_rejected(pos, xor):
    bad = bytearray(SMALL_REC)
    bad[pos] ^= xor
    expect_seal_error(bytes(bad))


def test_every_truncation_and_extension_is_rejected():
    for n in range(len(SMALL_REC)):
        expect_seal_error(SMALL_REC[:n])
        expect_seal_error(SMALL_REC[len(SMALL_REC) - n:] if n else b"")
    for extra in (b"\0", b"x" * 16, SMALL_REC):
        expect_seal_error(SMALL_REC + extra)


def test_wrong_oid_kind_or_key_is_rejected():
    e = expect_seal_error(SMALL_REC, oid=sl.keyed_id(K1, b"another chunk"))
    assert "authenticate" in e.reason
    e = expect_seal_error(SMALL_REC, kind=sl.KIND_MANIFEST)
    assert "expected a manifest" in e.reason and e.kind == sl.KIND_MANIFEST
    e = expect_seal_error(SMALL_REC, key=K2)
    assert "authenticate" in e.reason
    # the kind byte rewritten to match: the AAD still refuses it
    forged = SMALL_REC[:1] + bytes([sl.KIND_HASHLIST]) + SMALL_REC[2:]
    expect_seal_error(forged, kind=sl.KIND_HASHLIST)
    # same (key, oid, payload) sealed as another kind does not open as this one
    other = sl.seal(K1, sl.KIND_HASHLIST, SMALL_OID, 0, len(SMALL), SMALL)
    expect_seal_error(other[:1] + bytes([sl.KIND_CHUNK]) + other[2:])


def test_header_and_iv_swapped_between_records_are_rejected():
    oid2, rec2 = sealed(SMALL[::-1])
    expect_seal_error(rec2[:19] + SMALL_REC[19:])
    expect_seal_error(SMALL_REC[:7] + rec2[7:19] + SMALL_REC[19:])


def test_oversized_and_impossible_headers_are_rejected_before_any_crypto():
    hdr = lambda magic, kind, codec, n: struct.pack(">BBBI", magic, kind, codec, n)
    body = bytes(12 + 16)
    cases = {
        "magic": hdr(0x28, 1, 0, 0) + body,
        "unknown kind": hdr(sl.MAGIC, 9, 0, 0) + body,
        "kind 0": hdr(sl.MAGIC, 0, 0, 0) + body,
        "exceeds": hdr(sl.MAGIC, 1, 0, MAX_CHUNK + 1) + body,
        "manifest raw_len": hdr(sl.MAGIC, 2, 0, sl.MAX_MANIFEST_RAW + 1) + body,
    }
    for why, rec in cases.items():
        kind = 2 if why == "manifest raw_len" else 1
        with pytest.raises(sl.SealError):
            sl.peek_header(rec)
        with pytest.raises(sl.SealError):
            sl.open_record(K1, kind, SMALL_OID, rec)
    huge = hdr(sl.MAGIC, 1, 0, MAX_CHUNK) + bytes(sl.MAX_PAYLOAD + 12 + 16 + 1)
    with pytest.raises(sl.SealError, match="longer than the largest record"):
        sl.peek_header(huge)
    e = expect_seal_error(huge)
    assert str(sl.MAX_RECORD) in e.reason


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_garbage_gives_seal_error_only(data):
    for rec in (data, bytes([sl.MAGIC, sl.KIND_CHUNK]) + data):
        with pytest.raises(sl.SealError):
            sl.open_record(K1, sl.KIND_CHUNK, SMALL_OID, rec)
        try:
            h = sl.peek_header(rec)
        except sl.SealError:
            continue
        assert h.sealed_len == len(rec) - sl.RECORD_OVERHEAD and h.kind in sl.MAX_RAW
        assert (h.kind, h.codec, h.raw_len) == struct.unpack(">xBBI", rec[:7])
        assert h.raw_len <= sl.MAX_RAW[h.kind]


@given(st.binary(min_size=0, max_size=64), st.integers(1, 3), st.integers(0, 255))
def test_random_payloads_round_trip_and_peek(payload, kind, codec):
    oid = blake3.blake3(payload).digest()
    rec = sl.seal(K2, kind, oid, codec, len(payload), payload)
    assert sl.peek_header(rec) == (kind, codec, len(payload), len(payload))
    assert sl.open_record(K2, kind, oid, rec) == (codec, len(payload), payload)


# -- what we must not seal ----------------------------------------------------------
@pytest.mark.parametrize("args, why", [
    ((K1, sl.KIND_CHUNK, ZERO_ID, 0, 1, b"\0"), "zero"),
    ((K1, 5, SMALL_OID, 0, 1, b"x"), "kind"),
    ((K1, sl.KIND_LABELS, SMALL_OID, 0, sl.MAX_LABELS_RAW + 1, b"x"), "raw_len"),
    ((K1, True, SMALL_OID, 0, 1, b"x"), "kind"),
    ((K1, sl.KIND_CHUNK, SMALL_OID[:31], 0, 1, b"x"), "object id"),
    ((K1, sl.KIND_CHUNK, bytearray(SMALL_OID), 0, 1, b"x"), "object id"),
    ((K1, sl.KIND_CHUNK, SMALL_OID, 256, 1, b"x"), "codec"),
    ((K1, sl.KIND_CHUNK, SMALL_OID, -1, 1, b"x"), "codec"),
    ((K1, sl.KIND_CHUNK, SMALL_OID, 0, MAX_CHUNK + 1, b"x"), "raw_len"),
    ((K1, sl.KIND_MANIFEST, SMALL_OID, 0, sl.MAX_MANIFEST_RAW + 1, b"x"), "raw_len"),
    ((K1, sl.KIND_CHUNK, SMALL_OID, 0, -1, b"x"), "raw_len"),
    ((K1, sl.KIND_CHUNK, SMALL_OID, 0, 1, "text"), "payload"),
    ((K1.secret, sl.KIND_CHUNK, SMALL_OID, 0, 1, b"x"), "DataKey"),
])
def test_seal_refuses_arguments_the_format_does_not_allow(args, why):
    with pytest.raises(LocalProtocolError, match=why):
        sl.seal(*args)


def test_seal_refuses_an_oversized_payload_and_accepts_the_largest():
    big = bytearray(sl.MAX_PAYLOAD + 1)
    with pytest.raises(LocalProtocolError, match="exceeds"):
        sl.seal(K1, sl.KIND_CHUNK, SMALL_OID, 1, MAX_CHUNK, big)
    rec = sl.seal(K1, sl.KIND_CHUNK, SMALL_OID, 1, MAX_CHUNK, memoryview(big)[:-1])
    assert len(rec) == sl.MAX_RECORD
    assert sl.peek_header(rec) == (sl.KIND_CHUNK, 1, MAX_CHUNK, sl.MAX_PAYLOAD)
    assert sl.open_record(K1, sl.KIND_CHUNK, SMALL_OID, rec).payload == bytes(sl.MAX_PAYLOAD)


def test_open_refuses_bad_arguments_as_local_errors():
    with pytest.raises(LocalProtocolError, match="zero"):
        sl.open_record(K1, sl.KIND_CHUNK, ZERO_ID, SMALL_REC)
    with pytest.raises(LocalProtocolError, match="record must be"):
        sl.open_record(K1, sl.KIND_CHUNK, SMALL_OID, "not bytes")
    with pytest.raises(LocalProtocolError, match="record must be"):
        sl.peek_header(12345)


def test_bounds_match_the_rest_of_the_protocol():
    assert sl.MAX_PAYLOAD == exchange.MAX_PAYLOAD + 32 == exchange.zstd_bound(MAX_CHUNK) + 32
    assert sl.MAX_RAW[sl.KIND_HASHLIST] >= LIST_ENTRIES * 32
    assert sl.MAX_MANIFEST_RAW >= 16 * exchange.MAX_MANIFEST
    assert sl.MAX_RECORD == sl.MAX_PAYLOAD + 35 < 1 << 31       # AES-GCM's per-call limit
