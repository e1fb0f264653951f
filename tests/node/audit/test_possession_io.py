"""PossessionServer + challenge / prove_holder over simnet (virtual time) and libp2p (127.0.0.1).

Simnet tests run on trio's MockClock (autojump): timeouts are virtual seconds.
libp2p tests bound every step with STEP_LIMIT real seconds.
"""
from __future__ import annotations

import random
from collections import Counter

import pytest
import trio
from p2p_helpers import STEP_LIMIT, start_transport

from hypersdk.dht.contact import Contact
from hypersdk.node.audit.possession import (
    PROTOCOL_ID,
    ChallengeFailed,
    HolderResult,
    PossessionServer,
    challenge,
    prove_holder,
)
from hypersdk.node.exchange.chunk_source import MemorySource, StoreSource
from hypersdk.protocol.audit import SCHEMAS, VERIFY_RESULTS
from hypersdk.protocol.chunks import ZERO_ID, chunk_id
from hypersdk.protocol.possession import (
    MAX_MESSAGE,
    MAX_SAMPLE,
    Challenge,
    Proof,
    check,
    decode_frame,
    encode_message,
)
from hypersdk.simnet.transport import LinkModel, SimNetwork

CS = 64 << 10
MID = b"\x4d" * 32


def image(seed: int = 1, n: int = 12) -> list[bytes]:
    """Chunks: random ones, a zero chunk every fourth, a short last chunk."""
    rng = random.Random(seed)
    out = [bytes(CS) if i % 4 == 3 else rng.randbytes(CS) for i in range(n)]
    out[-1] = out[-1][:1000]
    return out


def ids_of(chunks) -> list[bytes]:
    return [ZERO_ID if c == bytes(len(c)) else chunk_id(c) for c in chunks]


def holder_source(chunks) -> MemorySource:
    src = MemorySource()
    for c in chunks:
        if c != bytes(len(c)):
            src.add(c)
    return src


def reader_of(chunks):
    """The verifier's reference copies (async reader(cid) -> plaintext | None)."""
    by_id = {chunk_id(c): c for c in chunks}

    async def read(cid):
        await trio.lowlevel.checkpoint()
        return by_id.get(cid)
    return read


async def sim_pair(nursery, source=None, **server_kw):
    net = SimNetwork(LinkModel(delay=0.01))
    await nursery.start(net.run)
    a = net.add_node(b"a" * 32, "/ip4/10.0.0.1/tcp/1")
    b = net.add_node(b"b" * 32, "/ip4/10.0.0.2/tcp/1")
    server = None
    if source is not None:
        server = PossessionServer(source, **server_kw)
        b.set_handler(PROTOCOL_ID, server.handle)
    return net, a, b, Contact(b.peer_id, b.addr), server


def summary_fits_audit(res: HolderResult) -> bool:
    body = SCHEMAS["verify"]
    return (body["summary"](res.summary) and body["result"](res.result)
            and body["holder"](res.holder) and body["manifest"](res.manifest))


async def raw_exchange(net_a, contact, data: bytes, limit: int = 1 << 16) -> bytes:
    """Send raw bytes on a possession stream; everything the server sends back."""
    stream = await net_a.open_stream(contact.id, contact.addr, PROTOCOL_ID)
    got = b""
    try:
        await stream.send_all(data)
        for _ in range(64):                          # bounded
            piece = await stream.receive_some(limit)
            if not piece:
                break
            got += piece
    finally:
        await stream.aclose()
    return got


# -- simnet ------------------------------------------------------------------------------

async def test_honest_holder_proves_ok(nursery, autojump_clock):
    chunks = image()
    net, a, b, contact, server = await sim_pair(nursery, holder_source(chunks))
    rng = random.Random(1)
    with trio.fail_after(STEP_LIMIT):
        res = await prove_holder(a, contact, MID, ids_of(chunks), reader_of(chunks),
                                 sample_size=MAX_SAMPLE, rng=rng, timeout=5)
    n = len({c for c in ids_of(chunks) if c != ZERO_ID})
    assert (res.result, res.asked, res.proven, res.wrong, res.not_held) == ("ok", n, n, 0, 0)
    assert res.holder == b.peer_id and res.manifest == MID and len(res.nonce) == 32
    assert summary_fits_audit(res) and res.summary["proven"] == n
    assert server.counters["challenges answered"] == 1 and server.errors == []
    assert net.handler_errors == []
    # a sample smaller than the manifest, deterministic nonce for simnet
    res2 = await prove_holder(a, contact, MID, ids_of(chunks), reader_of(chunks),
                              sample_size=3, rng=rng, timeout=5, nonce=rng.randbytes(32))
    assert (res2.result, res2.asked, res2.proven) == ("ok", 3, 3)
    assert res2.nonce != res.nonce


async def test_missing_and_damaged_holders(nursery, autojump_clock):
    chunks = image()
    ids = ids_of(chunks)
    src = holder_source(chunks)
    net, a, b, contact, server = await sim_pair(nursery, src)
    lost = [ids[0], ids[5]]
    for c in lost:
        del src.chunks[c]
    with trio.fail_after(STEP_LIMIT):
        res = await prove_holder(a, contact, MID, ids, reader_of(chunks),
                                 sample_size=MAX_SAMPLE, rng=random.Random(2), timeout=5)
    assert res.result == "missing"
    assert (res.not_held, res.wrong, res.proven) == (2, 0, res.asked - 2)
    assert set(res.missing_ids) == set(lost) and summary_fits_audit(res)
    assert res.summary["not_held"] == 2 and ids[0].hex() in res.summary["missing_ids"]

    bad = bytearray(src.chunks[ids[1]])                 # bit rot at the holder
    bad[100] ^= 0x40
    src.chunks[ids[1]] = bytes(bad)
    with trio.fail_after(STEP_LIMIT):
        res = await prove_holder(a, contact, MID, ids, reader_of(chunks),
                                 sample_size=MAX_SAMPLE, rng=random.Random(3), timeout=5)
    assert res.result == "damaged" and res.wrong_ids == (ids[1],)
    assert (res.wrong, res.not_held) == (1, 2) and summary_fits_audit(res)


async def test_verifier_without_reference_is_not_fooled(nursery, autojump_clock):
    chunks = image()
    net, a, b, contact, server = await sim_pair(nursery, holder_source(chunks))

    async def nothing(cid):
        await trio.lowlevel.checkpoint()
        return None

    async def wrong_copy(cid):
        await trio.lowlevel.checkpoint()
        return b"a copy that does not hash to its id"

    for reader in (nothing, wrong_copy):
        with trio.fail_after(STEP_LIMIT):
            res = await prove_holder(a, contact, MID, ids_of(chunks), reader,
                                     sample_size=4, rng=random.Random(4), timeout=5)
        assert (res.result, res.unverifiable, res.wrong) == ("failed", 4, 0)


async def test_stale_answers_and_replayed_proofs_fail(nursery, autojump_clock):
    chunks = image()
    ids = ids_of(chunks)
    net, a, b, contact, server = await sim_pair(nursery, holder_source(chunks))
    rng = random.Random(5)
    sampled = [c for c in ids if c != ZERO_ID][:4]
    old_nonce = b"\x01" * 32
    with trio.fail_after(STEP_LIMIT):                    # a proof the cheater recorded once
        old = await challenge(a, contact, MID, sampled, nonce=old_nonce, rng=rng, timeout=5)
    ok = check(Challenge(old.rid, MID, old_nonce, tuple(sampled)), old, dict(
        zip((chunk_id(c) for c in chunks), chunks)))
    assert ok.result == "ok"
    kept = dict(zip(sampled, old.answers))               # ... then threw the chunks away

    async def stale(stream, peer_id):                    # right rid, answers of the old nonce
        ch = decode_frame(await stream.receive_some(MAX_MESSAGE + 4))
        await stream.send_all(encode_message(
            Proof(ch.rid, ch.manifest, tuple(kept.get(c, b"\x00" * 32) for c in ch.ids))))

    b.set_handler(PROTOCOL_ID, stale)
    with trio.fail_after(STEP_LIMIT):
        res = await prove_holder(a, contact, MID, sampled, reader_of(chunks),
                                 sample_size=4, rng=rng, timeout=5)
    assert res.result == "damaged" and res.wrong == 4 and res.proven == 0

    async def replay(stream, peer_id):                   # the whole old frame again
        await stream.receive_some(MAX_MESSAGE + 4)
        await stream.send_all(encode_message(old))

    b.set_handler(PROTOCOL_ID, replay)
    with trio.fail_after(STEP_LIMIT):
        res = await prove_holder(a, contact, MID, sampled, reader_of(chunks),
                                 sample_size=4, rng=rng, timeout=5)
    assert res.result == "failed" and res.misbehaved and res.reason == "wrong reply"
    with trio.fail_after(STEP_LIMIT), pytest.raises(ChallengeFailed) as info:
        await challenge(a, contact, MID, sampled, nonce=old_nonce, rng=rng, timeout=5)
    assert info.value.misbehaved                         # even the same nonce: a new rid


async def test_garbage_and_oversized_frames_drop_the_stream_only(nursery, autojump_clock):
    chunks = image()
    net, a, b, contact, server = await sim_pair(nursery, holder_source(chunks))
    ch = encode_message(Challenge(1, MID, b"\x02" * 32, (ids_of(chunks)[0],)))
    cases = [
        (b"\x00\x00\x00\x05hello", "malformed"),
        ((1 << 30).to_bytes(4, "big") + b"x" * 100, "oversized"),
        (encode_message(Proof(1, MID, (None,))), "malformed"),   # a response, not a request
        (ch + b"\x00", "trailing data"),
    ]
    with trio.fail_after(STEP_LIMIT):
        for data, counter in cases:
            assert await raw_exchange(a, contact, data) == b""    # closed, no reply
            assert server.counters[counter] >= 1
        assert len(decode_frame(await raw_exchange(a, contact, ch)).answers) == 1
        res = await prove_holder(a, contact, MID, ids_of(chunks), reader_of(chunks),
                                 sample_size=8, rng=random.Random(6), timeout=5)
    assert res.result == "ok"
    assert server.errors == [] and server.counters["errors"] == 0
    assert net.handler_errors == []


async def test_stalled_request_is_dropped_in_virtual_time(nursery, autojump_clock):
    chunks = image()
    net, a, b, contact, server = await sim_pair(nursery, holder_source(chunks),
                                                request_timeout=3)
    frame = encode_message(Challenge(1, MID, b"\x02" * 32, (ids_of(chunks)[0],)))
    t0 = trio.current_time()
    with trio.fail_after(STEP_LIMIT):
        assert await raw_exchange(a, contact, frame[:10]) == b""
    assert 3 <= trio.current_time() - t0 < 4 and server.counters["stalled"] == 1


async def test_silent_holder_is_unreachable_within_timeout(nursery, autojump_clock):
    chunks = image()
    net, a, b, contact, _ = await sim_pair(nursery)

    async def silent(stream, peer_id):
        await trio.sleep_forever()

    b.set_handler(PROTOCOL_ID, silent)
    t0 = trio.current_time()
    with trio.fail_after(STEP_LIMIT):
        res = await prove_holder(a, contact, MID, ids_of(chunks), reader_of(chunks),
                                 sample_size=4, rng=random.Random(7), timeout=5)
    assert (res.result, res.reason, res.misbehaved) == ("unreachable", "timeout", False)
    assert 5 <= trio.current_time() - t0 < 5.5 and summary_fits_audit(res)

    gone = Contact(b"z" * 32, "/ip4/10.9.9.9/tcp/1")          # nobody there
    with trio.fail_after(STEP_LIMIT):
        res = await prove_holder(a, gone, MID, ids_of(chunks), reader_of(chunks),
                                 sample_size=4, rng=random.Random(7), timeout=5)
    assert (res.result, res.reason, res.holder) == ("unreachable", "unreachable", b"z" * 32)


async def test_per_peer_and_rate_bounds(nursery, autojump_clock):
    chunks = image(n=90)                                 # more than MAX_SAMPLE distinct ids
    gate = trio.Event()

    class SlowSource(MemorySource):
        async def read(self, cid):
            await gate.wait()
            return self.chunks.get(cid)

    src = SlowSource()
    for c in chunks:
        src.add(c)
    net, a, b, contact, server = await sim_pair(nursery, src, per_peer=1, burst=MAX_SAMPLE,
                                                rate=1.0)
    ids = ids_of(chunks)
    results = []

    async def one(size):
        results.append(await prove_holder(a, contact, MID, ids, reader_of(chunks),
                                          sample_size=size, rng=random.Random(size),
                                          timeout=30))

    with trio.fail_after(STEP_LIMIT):
        async with trio.open_nursery() as n:
            n.start_soon(one, 4)
            for _ in range(100):                         # bounded poll: the first is in flight
                if server.inflight:
                    break
                await trio.sleep(0.01)
            await one(2)                                 # same peer, second at once: busy
            assert results[0].reason == "refused: busy"
            assert results[0].result == "unreachable"
            gate.set()
        assert results[1].result == "ok"
        # 4 + 2 ids used from a 64-id bucket refilled at 1 id/s: a full sample is refused
        await one(MAX_SAMPLE)
    assert results[2].reason == "refused: rate limited"
    assert server.counters["busy"] == 1 and server.counters["rate limited"] == 1


async def test_nothing_to_prove_for_an_all_zero_image(nursery, autojump_clock):
    net, a, b, contact, server = await sim_pair(nursery, MemorySource())
    res = await prove_holder(a, contact, MID, [ZERO_ID] * 5, reader_of([]),
                             rng=random.Random(0), timeout=5)
    assert (res.result, res.asked) == ("ok", 0) and server.counters["streams"] == 0
    assert all(r in VERIFY_RESULTS for r in ("ok", "unreachable", "failed"))


# -- libp2p on 127.0.0.1 ---------------------------------------------------------------

async def test_over_libp2p_with_a_store(nursery, store, tmp_path):
    from hypersdk.node.service.backup import backup
    rng = random.Random(8)
    data = b"".join(image(9, 10))
    img = tmp_path / "disk.img"
    img.write_bytes(data)
    backup(store, str(img), name="vm", chunk_size=CS)
    chunks = [data[i:i + CS] for i in range(0, len(data), CS)]
    ids = ids_of(chunks)
    server = PossessionServer(StoreSource(store, threaded=True))
    a = (await start_transport(nursery)).transport
    b = (await start_transport(nursery)).transport
    b.set_handler(PROTOCOL_ID, server.handle)
    contact = Contact(b.peer_id, b.addr)
    verifier_copy = StoreSource(store, threaded=True)    # the verifier holds the backup too
    with trio.fail_after(STEP_LIMIT):
        res = await prove_holder(a, contact, MID, ids, verifier_copy.read,
                                 sample_size=MAX_SAMPLE, rng=rng, timeout=STEP_LIMIT,
                                 threaded=True)
        assert (res.result, res.proven) == ("ok", len({c for c in ids if c != ZERO_ID}))
        # garbage first, then an honest challenge on the same host
        assert await raw_exchange(a, contact, b"\x00\x00\x00\x03abc") == b""
        res = await prove_holder(a, contact, MID, ids, verifier_copy.read, sample_size=3,
                                 rng=rng, timeout=STEP_LIMIT)
        assert res.result == "ok"
    assert server.counters["malformed"] == 1 and server.errors == []


async def test_over_libp2p_missing_and_damaged(nursery):
    chunks = image(10)
    ids = ids_of(chunks)
    src = holder_source(chunks)
    del src.chunks[ids[0]]
    bad = bytearray(src.chunks[ids[1]])
    bad[0] ^= 1
    src.chunks[ids[1]] = bytes(bad)
    server = PossessionServer(src)
    a = (await start_transport(nursery)).transport
    b = (await start_transport(nursery)).transport
    b.set_handler(PROTOCOL_ID, server.handle)
    with trio.fail_after(STEP_LIMIT):
        res = await prove_holder(a, Contact(b.peer_id, b.addr), MID, ids, reader_of(chunks),
                                 sample_size=MAX_SAMPLE, rng=random.Random(11),
                                 timeout=STEP_LIMIT)
    assert res.result == "damaged" and res.wrong_ids == (ids[1],)
    assert res.missing_ids == (ids[0],) and res.not_held == 1
    assert b.handler_errors == [] and server.errors == []


# -- sampling goal, several holders, the answer deadline (issue 18, finding 6) ------------

async def _sim_holders(nursery, sources, delay=0.01):
    """A verifier node and one holder per source on a simnet; their contacts."""
    net = SimNetwork(LinkModel(delay=delay))
    await nursery.start(net.run)
    a = net.add_node(b"v" * 32, "/ip4/10.0.0.1/tcp/1")
    contacts = []
    for i, src in enumerate(sources):
        h = net.add_node(bytes([i + 1]) * 32, f"/ip4/10.0.1.{i + 1}/tcp/1")
        h.set_handler(PROTOCOL_ID, PossessionServer(src).handle)
        contacts.append(Contact(h.peer_id, h.addr))
    return net, a, contacts


def small_chunks(n: int, seed: int = 5) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(48) for _ in range(n)]


async def test_goal_sample_catches_one_percent_loss(nursery, autojump_clock):
    """A holder that lost 1% of 2,000 chunks: the default goal (1% at 99%) catches it
    in (about) 99 of 100 verifications, where the old fixed 16-chunk sample caught it
    in about 15. Deterministic: seeded rngs, virtual time."""
    from hypersdk.node.audit.possession import prove_holders
    from hypersdk.protocol.possession import plan
    chunks = small_chunks(2000)
    ids = ids_of(chunks)
    src = holder_source(chunks)
    for cid in random.Random(9).sample(ids, 20):
        del src.chunks[cid]
    net, a, (holder,) = await _sim_holders(nursery, [src])
    caught_goal = caught_16 = 0
    for run in range(100):
        p = plan(ids, seed=b"\7" * 32, round_no=run, rng=random.Random(run))
        with trio.fail_after(STEP_LIMIT):
            (r,) = await prove_holders(a, [holder], MID, p.ids, reader_of(chunks),
                                       rng=random.Random(run), timeout=5, chunk_bytes=48)
        assert r.result in ("ok", "missing") and r.asked == len(p.ids) > 400
        assert r.frames == -(-len(p.ids) // MAX_SAMPLE) and not r.late
        caught_goal += r.result == "missing"
        with trio.fail_after(STEP_LIMIT):
            old = await prove_holder(a, holder, MID, ids, reader_of(chunks), sample_size=16,
                                     rng=random.Random(run), timeout=5)
        caught_16 += old.result == "missing"
        await trio.sleep(30)             # the holder's rate bucket refills (virtual time)
    assert caught_goal >= 97 and caught_16 <= 30, (caught_goal, caught_16)


async def test_several_holders_one_read_per_chunk_and_their_own_nonces(nursery,
                                                                        autojump_clock):
    from hypersdk.node.audit.possession import prove_holders
    chunks = small_chunks(150)
    ids = ids_of(chunks)
    damaged = holder_source(chunks)
    damaged.chunks[ids[3]] = b"not the chunk"
    net, a, contacts = await _sim_holders(nursery, [holder_source(chunks), damaged,
                                                    holder_source(chunks[:100])])
    reads = Counter()
    base = reader_of(chunks)

    async def counting(cid):
        reads[cid] += 1
        return await base(cid)
    with trio.fail_after(STEP_LIMIT):
        res = await prove_holders(a, contacts, MID, ids, counting, rng=random.Random(3),
                                  timeout=5, chunk_bytes=48, extra={"round": 4})
    assert [r.result for r in res] == ["ok", "damaged", "missing"]
    assert res[1].wrong_ids == (ids[3],) and len(res[2].missing_ids) == 50
    assert len({r.nonce for r in res}) == 3
    assert set(reads.values()) == {1} and len(reads) == 150       # one read per sampled id
    assert all(r.frames == 3 and summary_fits_audit(r) and r.summary["round"] == 4
               for r in res)


async def test_an_answer_after_the_deadline_fails(nursery, autojump_clock):
    """A holder that has to fetch each chunk from elsewhere (0.1 s a chunk, here in
    virtual time) answers correctly but after the deadline of 1 MiB chunks
    (ANSWER_BASE + 64 MiB at ANSWER_RATE): "failed", late, not an offence. An
    honest holder answers in time; without chunk_bytes there is no deadline."""
    from hypersdk.node.audit.possession import answer_deadline, prove_holders
    chunks = small_chunks(100)
    ids = ids_of(chunks)

    class Outsourcing(MemorySource):
        async def read(self, cid):
            await trio.sleep(0.1)
            return self.chunks.get(cid)
    far = Outsourcing()
    for c in chunks:
        far.add(c)
    net, a, contacts = await _sim_holders(nursery, [holder_source(chunks), far])
    with trio.fail_after(STEP_LIMIT):
        honest, late = await prove_holders(a, contacts, MID, ids, reader_of(chunks),
                                           rng=random.Random(4), timeout=30,
                                           chunk_bytes=1 << 20)
    assert honest.result == "ok" and honest.late == 0 and honest.slowest < honest.allowed
    assert honest.allowed in (answer_deadline(64, 1 << 20), answer_deadline(36, 1 << 20))
    assert (late.result, late.misbehaved, late.proven, late.late) == ("failed", False, 100, 2)
    assert late.reason.startswith("late: 2 of 2 answer(s) after the deadline")
    assert late.slowest > late.allowed and summary_fits_audit(late)
    assert late.summary["late"] == 2 and late.summary["deadline_ms"] == round(late.allowed * 1e3)
    with trio.fail_after(STEP_LIMIT):
        (r,) = await prove_holders(a, contacts[1:], MID, ids, reader_of(chunks),
                                   rng=random.Random(5), timeout=30)
    assert (r.result, r.late, r.allowed) == ("ok", 0, 0.0)
