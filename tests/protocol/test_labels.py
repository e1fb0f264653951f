"""Sealed labels (protocol/labels.py): a backup's name, source and time hidden from
holders without the data key, in manifests (version 3) and in audit entries."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hypersdk.node.net.identity import Identity
from hypersdk.protocol import audit, codec
from hypersdk.protocol.errors import LocalProtocolError, RemoteProtocolError
from hypersdk.protocol.manifest import Manifest, decode_manifest, open_labels, seal_labels
from hypersdk.protocol.sealing import DataKey

K = DataKey.generate(bytes(range(1, 33)))
OTHER = DataKey.generate(bytes(range(2, 34)))
A = Identity.from_private_bytes(bytes(range(32)))
NAME = "payroll-db-primary"
SOURCE = {"path": "/srv/vm/payroll-db.img", "kind": "image", "size": 1 << 30}


def _manifest(name=NAME, source=SOURCE, lists=(b"\1" * 32,), created=1_765_000_000_123_456_789):
    return Manifest(name=name, size=10, chunk_size=1 << 16, lists=lists, source=source,
                    created=created, key=K.fingerprint)


def test_a_sealed_manifest_shows_structure_and_hides_its_labels():
    m = seal_labels(_manifest(), K)
    data = m.encode()
    assert codec.decode(data)["v"] == 3
    for secret in (NAME, SOURCE["path"]):
        assert secret.encode() not in data
    held = decode_manifest(data)
    assert not held.opened and held.name is None and held.source == {} and held.created == 0
    assert (held.size, held.chunk_size, held.lists, held.key) == (10, 1 << 16, m.lists, K.fingerprint)
    assert held.id == m.id and held.encode() == data        # one encoding, one id
    back = open_labels(held, K)
    assert (back.name, back.source, back.created) == (NAME, SOURCE, m.created)
    assert back.id == m.id and back.encode() == data
    assert seal_labels(_manifest(), K).encode() == data     # deterministic: re-sealing agrees


def test_labels_open_only_with_their_key_and_in_their_manifest():
    m = seal_labels(_manifest(), K)
    with pytest.raises(RemoteProtocolError, match="data key"):
        open_labels(decode_manifest(m.encode()), OTHER)
    # the same labels moved into a manifest with other lists do not open there
    other = seal_labels(_manifest(lists=(b"\2" * 32,)), K)
    doc = codec.decode(other.encode())
    doc["labels"] = m.labels
    with pytest.raises(RemoteProtocolError, match="labels"):
        open_labels(decode_manifest(codec.encode(doc)), K)
    # a flipped bit anywhere in the record
    for i in (0, 9, len(m.labels) - 1):
        bad = bytearray(m.labels)
        bad[i] ^= 0x10
        doc = codec.decode(m.encode())
        doc["labels"] = bytes(bad)
        with pytest.raises(RemoteProtocolError):
            open_labels(decode_manifest(codec.encode(doc)), K)


def test_a_version_3_manifest_is_strict():
    doc = codec.decode(seal_labels(_manifest(), K).encode())
    for change, match in [({"key": None}, "name its key"), ({"name": "x"}, "keys"),
                          ({"labels": "text"}, "bytes"), ({"labels": b"\0" * 20000}, "labels")]:
        with pytest.raises(RemoteProtocolError, match=match):
            decode_manifest(codec.encode(dict(doc, **change)))
    with pytest.raises(LocalProtocolError, match="key"):
        seal_labels(_manifest(), OTHER)                  # the ids' key seals the labels
    with pytest.raises(LocalProtocolError, match="name"):
        Manifest(name=None, size=10, chunk_size=1 << 16, lists=(b"\1" * 32,))


@settings(max_examples=60, deadline=None)
@given(name=st.text(min_size=1, max_size=255),
       source=st.dictionaries(st.text(max_size=20), st.one_of(st.text(max_size=200),
                                                              st.integers(0, 1 << 60)),
                              max_size=8),
       created=st.integers(0, 1 << 62))
def test_any_labels_round_trip(name, source, created):
    m = seal_labels(_manifest(name=name, source=source, created=created), K)
    back = open_labels(decode_manifest(m.encode()), K)
    assert (back.name, back.source, back.created) == (name, source, created)


# -- audit entries ----------------------------------------------------------------
MID = b"\7" * 32
BACKUP = {"manifest": MID, "name": NAME, "size": 10, "chunks": 1, "source": SOURCE}
DELETE = {"manifest": MID, "name": NAME, "version": 3}


@pytest.mark.parametrize("kind, body", [("backup", BACKUP), ("delete", DELETE)])
def test_a_sealed_entry_names_nothing_without_the_key(kind, body):
    sealed = audit.seal_body(K, kind, body)
    assert audit.body_problem(kind, sealed) is None
    e = audit.make_entry(A, 0, None, 1, kind, sealed)
    assert NAME.encode() not in e.raw and SOURCE["path"].encode() not in e.raw
    got = audit.decode_entry(e.raw)
    assert audit.open_body(got.body, K) == body
    assert audit.open_body(got.body, None) is None
    assert audit.open_body(got.body, OTHER) is None
    assert audit.open_body(body, None) is body            # plaintext bodies stay valid
    assert audit.seal_body(K, "replica", {"manifest": MID, "holder": MID}) == \
        {"manifest": MID, "holder": MID}


def test_sealed_labels_are_bound_to_their_entry():
    a = audit.seal_body(K, "backup", BACKUP)
    b = audit.seal_body(K, "backup", dict(BACKUP, manifest=b"\x08" * 32))
    moved = dict(b, labels=a["labels"])                   # valid shape, wrong manifest
    assert audit.body_problem("backup", moved) is None
    assert audit.open_body(moved, K) is None
    # a delete's labels do not pass for a backup's (other fields inside)
    d = audit.seal_body(K, "delete", DELETE)
    assert audit.open_body(dict(a, labels=d["labels"]), K) is None


@pytest.mark.parametrize("change", [{"name": NAME}, {"key": b"\1" * 31}, {"labels": b""},
                                    {"labels": b"\0" * 20000}, {"source": {}}])
def test_mixed_or_malformed_sealed_bodies_are_refused(change):
    body = dict(audit.seal_body(K, "backup", BACKUP), **change)
    assert audit.body_problem("backup", body) is not None
    with pytest.raises(LocalProtocolError):
        audit.make_entry(A, 0, None, 1, "backup", body)
