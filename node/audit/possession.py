"""Proof of possession over a Transport: the holder's server and the verifier's calls.

    server = PossessionServer(source)            # node.exchange.chunk_source StoreSource / MemorySource
    transport.set_handler(PROTOCOL_ID, server.handle)

    res = await prove_holder(transport, contact, manifest_id, chunk_ids, reader,
                             sample_size=16, rng=rng, timeout=30.0)
    res.result, res.summary                      # -> an audit `verify` entry

The protocol (messages, answers, verdicts) is protocol/possession.py; this
module only moves its frames. One request per stream, as the DHT
(node/kademlia/rpc.py): the verifier opens a stream, sends one Challenge, reads one
Proof or Refused, closes.

Holder side (PossessionServer.handle), the rules that keep a peer from making
us hash the whole store:
- the request must arrive whole within REQUEST_TIMEOUT (a stalled or silent
  stream is dropped), in one frame of at most MAX_MESSAGE bytes (the decoder
  rejects a bigger length prefix before buffering it), with nothing after it;
  malformed, oversized, trailing or non-request bytes drop the stream with no
  reply (counted in `counters`);
- a challenge names at most MAX_SAMPLE ids (the protocol bounds it);
- at most `per_peer` challenges of one peer and `max_inflight` in total are
  answered at once; more get Refused("busy");
- each peer has a token bucket of chunk ids (`burst` ids, refilled at `rate`
  ids per second); a challenge that needs more tokens than the bucket holds
  gets Refused("rate limited"). Buckets are kept for at most MAX_TRACKED peers
  (the least recently seen is forgotten: at worst that peer starts again with
  a full bucket);
- chunks are read and hashed one at a time (memory: one chunk per challenge in
  flight); with a threaded source (StoreSource(threaded=True)) the hashing
  runs in a worker thread too, so the event loop never stalls on it;
- nothing escapes handle(): transport errors end the stream quietly, a bug is
  counted in counters["errors"], kept in `errors` and logged (an exception
  escaping a py-libp2p handler kills the host).

Verifier side: `challenge` sends one Challenge and returns the Proof, or raises
ChallengeFailed (reason "unreachable" / "timeout" / "refused: ..." with
misbehaved=False, or a protocol violation with misbehaved=True).
`prove_holders` challenges several holders at once on one sample (chosen by
protocol.possession.plan from a stated goal), in frames of MAX_SAMPLE ids, then
reads a reference for each answered id once through the caller's `reader` (one
at a time: a chunk is hashed with every holder's nonce and dropped before the
next is read) and checks; it never raises for what a holder does, it returns
HolderResults whose `result` is one of protocol.audit.VERIFY_RESULTS.
`prove_holder` is the one-holder, one-frame form.

The deadline (why an answer must be quick): a holder that dropped the chunks
could still answer correctly by fetching them from another replica when
challenged. Each frame must therefore be answered within
answer_deadline(ids, chunk size) = ANSWER_BASE + ids x chunk size / ANSWER_RATE
(2 s + 2 s for a full frame of 1 MiB chunks), counted from the moment the
challenge is sent: reading and hashing 64 MiB from a local disk fits easily
(measured: bench/bench_possession.py, BENCHMARKS.md), fetching them over a link
slower than about 64 MiB / 4 s (130 Mbit/s) does not. A correct answer after
the deadline is "failed" (reason "late: ..."), not an offence: a holder on a
faster link than that, or an overloaded honest one, is not told apart by time
alone, and the figures are in the verify entry (slowest_ms, deadline_ms).

Nonces: a fresh nonce per challenge, os.urandom(32) by default. Simnet, which
must repeat exactly, passes nonce=rng.randbytes(32) (predictable: never in a
real node, a holder that can predict nonces can precompute answers).
"""
from __future__ import annotations

import logging
import os
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

import trio

from hypersdk.node import runtime
from hypersdk.node.net.transport import TransportError
from hypersdk.protocol.errors import RemoteProtocolError
from hypersdk.protocol.exchange import CODEC_SEALED
from hypersdk.protocol.possession import (
    MAX_SAMPLE,
    NONCE_LEN,
    PROTOCOL_ID,
    REQUEST_TAGS,
    RESPONSE_TAGS,
    Challenge,
    OversizedFrame,
    PossessionDecoder,
    Precomputed,
    Proof,
    Refused,
    answer,
    answers_challenge,
    check_all,
    encode_message,
    frames,
    reference,
    reference_sealed,
    sample,
)

log = logging.getLogger(__name__)

__all__ = ["PROTOCOL_ID", "PossessionServer", "ChallengeFailed", "HolderResult", "challenge",
           "prove_holder", "prove_holders", "answer_deadline", "DEFAULT_SAMPLE", "ANSWER_BASE",
           "ANSWER_RATE"]

REQUEST_TIMEOUT = 10.0      # seconds for the one request frame to arrive
ANSWER_TIMEOUT = 60.0       # seconds to read, hash and send the answers
CLOSE_GRACE = 1.0
PER_PEER = 2                # challenges of one peer answered at once
MAX_INFLIGHT = 16           # challenges answered at once, all peers
RATE = 64.0                 # chunk ids per second per peer (one full challenge a second)
BURST = 32 * MAX_SAMPLE     # ids a peer may ask in a burst: one verification's sample
                            # (<= 2 x 919 ids at the finest goal, protocol.possession.MIN_LOSS)
ANSWER_BASE = 2.0           # seconds of a deadline for round trips and scheduling ...
ANSWER_RATE = 32 << 20      # ... plus the sampled bytes at this rate (module doc)
MAX_TRACKED = 4096          # peers with a token bucket
DEFAULT_SAMPLE = 32
RETRIEVE_MAX = 8            # sealed form: records fetched from a holder to judge its answers
_NOT_THE_CHUNK = Precomputed(b"")   # no answer equals it (answers are 32 bytes)


async def _close_quietly(stream) -> None:
    with trio.move_on_after(CLOSE_GRACE):
        try:
            await stream.aclose()
        except (TransportError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass


async def _read_one(stream, dec: PossessionDecoder):
    """The one message of the stream direction, or None if it ended before its
    first byte. Raises RemoteProtocolError for bad bytes (OversizedFrame for a
    huge prefix). Bytes that arrived with the frame show as dec.trailing; later
    ones are never read (the stream closes)."""
    while (msg := dec.next_message()) is None:
        if dec.ended_empty:
            return None
        dec.receive_data(await stream.receive_some(dec.room))
    return msg


# -- holder side ----------------------------------------------------------------------------

@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float


class PossessionServer:
    """Answers Challenges from a ChunkSource (module docstring: holder side)."""

    def __init__(self, source, *, per_peer: int = PER_PEER, max_inflight: int = MAX_INFLIGHT,
                 rate: float = RATE, burst: int = BURST,
                 request_timeout: float = REQUEST_TIMEOUT,
                 answer_timeout: float = ANSWER_TIMEOUT, max_tracked: int = MAX_TRACKED,
                 banned=None):
        """banned(peer_id) -> True for a peer the node's reputation banned: its
        challenges are not answered."""
        if burst < MAX_SAMPLE:
            raise ValueError(f"burst must allow one full challenge ({MAX_SAMPLE} ids)")
        self.source = source
        self.threaded = bool(getattr(source, "threaded", False))
        self.per_peer = per_peer
        self.max_inflight = max_inflight
        self.rate = rate
        self.burst = burst
        self.request_timeout = request_timeout
        self.answer_timeout = answer_timeout
        self.max_tracked = max_tracked
        self.banned = banned
        self.counters: Counter = Counter()
        self.errors: list[BaseException] = []
        self._inflight: Counter = Counter()
        self._total = 0
        self._buckets: OrderedDict[bytes, _Bucket] = OrderedDict()

    @property
    def inflight(self) -> int:
        """Challenges being answered now (all peers)."""
        return self._total

    async def handle(self, stream, peer_id: bytes) -> None:
        """Transport handler: one challenge per stream. Never raises."""
        self.counters["streams"] += 1
        try:
            await self._serve(stream, peer_id)
        except (TransportError, trio.BrokenResourceError, trio.ClosedResourceError):
            self.counters["inbound broken"] += 1
        except Exception as exc:                   # a bug: keep it for tests, not the peer
            self.counters["errors"] += 1
            self.errors.append(exc)
            log.exception("possession handler failed")
        finally:
            await _close_quietly(stream)

    async def _serve(self, stream, peer_id: bytes) -> None:
        if self.banned is not None and self.banned(peer_id):
            self.counters["banned peers refused"] += 1
            return
        ch = None
        with trio.move_on_after(self.request_timeout):
            dec = PossessionDecoder(REQUEST_TAGS)
            try:
                ch = await _read_one(stream, dec)
            except OversizedFrame:
                self.counters["oversized"] += 1
                return
            except RemoteProtocolError:
                self.counters["malformed"] += 1
                return
            if ch is None:                         # asked nothing
                self.counters["empty"] += 1
                return
            if dec.trailing:
                self.counters["trailing data"] += 1
                return
        if ch is None:
            self.counters["stalled"] += 1
            return
        refusal = self._admit(peer_id, len(ch.ids))
        if refusal is not None:
            self.counters[refusal] += 1
            with trio.move_on_after(self.request_timeout):
                await stream.send_all(encode_message(Refused(ch.rid, refusal)))
            return
        self._inflight[peer_id] += 1
        self._total += 1
        try:
            with trio.move_on_after(self.answer_timeout) as scope:
                proof = await self._prove(ch)
                await stream.send_all(encode_message(proof))
                self.counters["challenges answered"] += 1
            if scope.cancelled_caught:
                self.counters["answer timeouts"] += 1
        finally:
            self._total -= 1
            self._inflight[peer_id] -= 1
            if not self._inflight[peer_id]:
                del self._inflight[peer_id]

    def _admit(self, peer_id: bytes, n_ids: int) -> str | None:
        """None if this challenge may be answered now, else the refusal reason."""
        if self._total >= self.max_inflight or self._inflight[peer_id] >= self.per_peer:
            return "busy"
        now = trio.current_time()
        b = self._buckets.pop(peer_id, None)
        if b is None:
            b = _Bucket(float(self.burst), now)
            while len(self._buckets) >= self.max_tracked:
                self._buckets.popitem(last=False)
        b.tokens = min(float(self.burst), b.tokens + (now - b.at) * self.rate)
        b.at = now
        self._buckets[peer_id] = b                 # most recently seen last
        if b.tokens < n_ids:
            return "rate limited"
        b.tokens -= n_ids
        return None

    async def _record(self, cid: bytes):
        """The sealed record this node serves for cid (Challenge.sealed), or None."""
        got = await self.source.get(cid)
        return got[2] if got is not None and got[0] == CODEC_SEALED else None

    async def _prove(self, ch: Challenge) -> Proof:
        answers = []
        for cid in ch.ids:
            plain = await (self._record(cid) if ch.sealed else self.source.read(cid))
            if plain is None:
                answers.append(None)
                self.counters["not held"] += 1
            elif self.threaded:
                answers.append(await runtime.run_sync(answer, ch.nonce, plain))
            else:
                answers.append(answer(ch.nonce, plain))
            del plain                              # one chunk in memory at a time
        return Proof(ch.rid, ch.manifest, tuple(answers))


# -- verifier side ------------------------------------------------------------------------

class ChallengeFailed(Exception):
    """No usable Proof. reason: "unreachable", "timeout", "refused: <why>" (no
    offence), or a protocol violation with misbehaved=True: "malformed",
    "oversized", "wrong reply", "trailing data", "stalled"."""

    def __init__(self, reason: str, misbehaved: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.misbehaved = misbehaved


async def challenge(net, contact, manifest_id: bytes, ids, *, nonce: bytes | None = None,
                    rng, timeout: float, rid: int | None = None, sealed: bool = False) -> Proof:
    """Send one Challenge for `ids` (1..MAX_SAMPLE distinct non-zero chunk ids) of
    `manifest_id` to `contact` (dht.contact.Contact: .id, .addr) over transport
    `net`, and return its Proof, already checked to answer this challenge
    (same rid and manifest, one answer per id, in order). nonce: 32 bytes,
    os.urandom by default (pass your own to be able to check the answers:
    check(Challenge(proof.rid, manifest_id, nonce, tuple(ids)), proof, ...)).
    The rid is drawn from `rng` unless given. Raises ChallengeFailed (see its
    docstring); LocalProtocolError for bad arguments."""
    if nonce is None:
        nonce = os.urandom(NONCE_LEN)
    ch = Challenge(rng.getrandbits(64) if rid is None else rid, manifest_id, nonce, tuple(ids),
                   sealed)
    return (await _ask(net, contact, ch, timeout))[0]


async def _ask(net, contact, ch: Challenge, timeout: float) -> tuple[Proof, float]:
    """(the Proof answering `ch`, seconds from sending the challenge to the whole
    proof), or ChallengeFailed. `timeout` bounds everything, dial included."""
    frame = encode_message(ch)
    dec = PossessionDecoder(RESPONSE_TAGS)
    try:
        with trio.fail_after(timeout):
            stream = await net.open_stream(contact.id, contact.addr, PROTOCOL_ID)
            try:
                sent = trio.current_time()
                await stream.send_all(frame)
                reply = await _read_one(stream, dec)
                took = trio.current_time() - sent
            finally:                               # forceful once the deadline passed
                await stream.aclose()
    except trio.TooSlowError:
        if dec.started:      # bytes trickled in but no frame completed: a stall
            raise ChallengeFailed("stalled", misbehaved=True) from None
        raise ChallengeFailed("timeout") from None
    except OversizedFrame:
        raise ChallengeFailed("oversized", misbehaved=True) from None
    except RemoteProtocolError:
        raise ChallengeFailed("malformed", misbehaved=True) from None
    except (TransportError, trio.BrokenResourceError, trio.ClosedResourceError):
        raise ChallengeFailed("unreachable") from None
    if reply is None:
        raise ChallengeFailed("unreachable")       # closed without a word
    if dec.trailing:
        raise ChallengeFailed("trailing data", misbehaved=True)
    if type(reply) is Refused and reply.rid == ch.rid:
        raise ChallengeFailed(f"refused: {reply.reason}")
    if not answers_challenge(ch, reply):
        raise ChallengeFailed("wrong reply", misbehaved=True)
    return reply, took


def answer_deadline(n_ids: int, chunk_bytes: int, *, base: float = ANSWER_BASE,
                    rate: float = ANSWER_RATE) -> float:
    """Seconds a holder has to answer a challenge of n_ids chunks of at most
    chunk_bytes each (module doc: the deadline)."""
    return base + n_ids * chunk_bytes / rate


@dataclass(frozen=True, slots=True)
class HolderResult:
    """The verdict on one holder of one manifest (an audit `verify` entry:
    manifest=manifest, holder=holder, result=result, summary=summary)."""
    holder: bytes
    manifest: bytes
    result: str                       # protocol.audit.VERIFY_RESULTS
    asked: int = 0
    proven: int = 0
    wrong: int = 0
    not_held: int = 0
    unverifiable: int = 0
    retrieved: int = 0                # sealed form: records fetched from the holder to judge
    reason: str = ""                  # why, when not "ok" ("" when ok)
    misbehaved: bool = False          # the holder broke the protocol (score it down)
    nonce: bytes = b""
    wrong_ids: tuple = field(default=())
    missing_ids: tuple = field(default=())
    frames: int = 0                   # challenges sent (each at most MAX_SAMPLE ids)
    slowest: float = 0.0              # seconds of the slowest answer
    allowed: float = 0.0              # the deadline of that answer (0: none set)
    late: int = 0                     # answers that came after their deadline
    extra: dict = field(default_factory=dict)   # the caller's (sample plan) for the summary

    @property
    def summary(self) -> dict:
        """Small text -> text|int map for the audit entry (protocol.audit _small_map:
        <= 32 entries, keys <= 64 chars, text <= 1024 chars)."""
        s = {"protocol": PROTOCOL_ID, "asked": self.asked, "proven": self.proven,
             "wrong": self.wrong, "not_held": self.not_held,
             "unverifiable": self.unverifiable}
        if self.retrieved:
            s["retrieved"] = self.retrieved
        if self.nonce:
            s["nonce"] = self.nonce.hex()
        if self.reason:
            s["reason"] = self.reason[:200]
        if self.wrong_ids:
            s["wrong_ids"] = ",".join(c.hex() for c in self.wrong_ids[:8])
        if self.missing_ids:
            s["missing_ids"] = ",".join(c.hex() for c in self.missing_ids[:8])
        if self.frames:
            s["frames"] = self.frames
            s["slowest_ms"] = round(self.slowest * 1000)
        if self.allowed:
            s["deadline_ms"] = round(self.allowed * 1000)
        if self.late:
            s["late"] = self.late
        s.update(self.extra)
        return s


async def prove_holder(net, contact, manifest_id: bytes, chunk_ids, reader, *,
                       sample_size: int = DEFAULT_SAMPLE, rng, timeout: float,
                       nonce: bytes | None = None, threaded: bool = False,
                       key=None, sealed: bool = False, retrieve=None) -> HolderResult:
    """Challenge `contact` on one random sample of `sample_size` (<= MAX_SAMPLE) of
    `chunk_ids` (the manifest's chunk list; duplicates and ZERO_ID are skipped) and
    judge its answers: prove_holders for one holder, one frame, no deadline but
    `timeout`. Never raises for what the holder does (bugs and cancellation aside).
    An image with no non-zero chunk has nothing to prove: "ok" with asked=0, no I/O."""
    ids = sample(chunk_ids, min(sample_size, MAX_SAMPLE), rng)
    return (await prove_holders(net, [contact], manifest_id, ids, reader, rng=rng,
                                timeout=timeout, nonces=[nonce] if nonce else None,
                                threaded=threaded, key=key, sealed=sealed,
                                retrieve=retrieve))[0]


@dataclass
class _Asked:
    """One holder's side of a verification in progress."""
    contact: object
    nonce: bytes
    pairs: list = field(default_factory=list)     # (Challenge, Proof)
    failure: ChallengeFailed | None = None
    slowest: float = 0.0
    allowed: float = 0.0
    late: int = 0
    expected: dict = field(default_factory=dict)  # cid -> Precomputed | None
    answered: set = field(default_factory=set)    # ids it answered (not None)


async def prove_holders(net, contacts, manifest_id: bytes, ids, reader, *, rng,
                        timeout: float, chunk_bytes: int | None = None,
                        nonces=None, threaded: bool = False, key=None, sealed: bool = False,
                        retrieve=None, extra: dict | None = None) -> list[HolderResult]:
    """Challenge every holder in `contacts` (at once) on the chunk ids `ids` (the
    sample: distinct, non-zero; protocol.possession.plan chooses it), in frames of
    MAX_SAMPLE sent one after another, each with a fresh rid and all with the
    holder's own nonce (`nonces[i]`, os.urandom by default: a holder cannot use
    another's answers), and judge the answers. One HolderResult per contact, in order.

    chunk_bytes: the backup's chunk size; with it each frame must be answered
    within answer_deadline(len(frame), chunk_bytes) (module doc), and a holder that
    answers correctly but later is "failed" with the times in the reason (it may
    have fetched the chunks from another replica). `timeout` bounds each frame
    in any case; a holder with no answer by then is "unreachable".

    reader: async reader(cid) -> plaintext bytes | None, the verifier's copy of a
    chunk (local store or a network fetch, the caller's choice); called once per
    sampled id that some holder answered, after every holder replied, one id at a
    time (memory: one chunk; the answers each holder's nonce calls for are computed
    from the one copy); a copy that does not hash to its id counts as no reference.
    With keyed chunk ids (protocol/ids.py) a copy is checked against the keyed id:
    the reader returns what a store read already verified (a VerifiedChunk, as
    StoreSource.read does), or `key` (the DataKey) lets plain bytes be checked.
    threaded=True hashes in a worker thread (real nodes).
    sealed=True (keyed ids; `key` required): the sealed form (protocol/possession.py):
    reader(cid) returns a sealed record of the chunk (checked here with
    reference_sealed), and an answer that matches no reference is judged against
    the holder's own record: `retrieve(contact, cids)` -> {cid: record} fetches at
    most RETRIEVE_MAX of them from the holder; a mismatch it does not settle counts
    as unverifiable, not wrong. retrieve None: the references are authoritative.

    Results: "ok" / "damaged" / "missing" / "failed" as protocol.possession.check;
    "unreachable" when no proof came (dial failure, timeout, stream closed,
    Refused: reason says which); "failed" with misbehaved=True when the holder
    broke the protocol (malformed, oversized, wrong or replayed reply); "failed"
    (not misbehaved) when it answered late. Nothing to ask (no ids): "ok" with
    asked=0, no I/O."""
    ids = tuple(ids)
    if not ids:
        return [HolderResult(c.id, manifest_id, "ok",
                             reason="nothing to prove (no non-zero chunks)") for c in contacts]
    asked = [_Asked(c, (nonces[i] if nonces and nonces[i] else os.urandom(NONCE_LEN)))
             for i, c in enumerate(contacts)]

    async def ask(a: _Asked) -> None:
        for part in frames(ids):
            ch = Challenge(rng.getrandbits(64), manifest_id, a.nonce, part, sealed)
            try:
                proof, took = await _ask(net, a.contact, ch, timeout)
            except ChallengeFailed as exc:
                a.failure = exc
                return
            a.pairs.append((ch, proof))
            a.answered.update(c for c, got in zip(part, proof.answers) if got is not None)
            allowed = answer_deadline(len(part), chunk_bytes) if chunk_bytes else 0.0
            if took >= a.slowest:
                a.slowest, a.allowed = took, allowed
            if allowed and took > allowed:
                a.late += 1
    async with trio.open_nursery() as n:
        for a in asked:
            n.start_soon(ask, a)
    await _references(asked, ids, reader, key, sealed, threaded)
    out = []
    for a in asked:
        out.append(await _judge(a, manifest_id, len(ids), key, sealed, threaded, retrieve,
                                timeout, extra or {}))
    return out


async def _references(asked, ids, reader, key, sealed: bool, threaded: bool) -> None:
    """Fill each holder's expected answers from one read of each sampled chunk."""
    ref = reference_sealed if sealed else reference
    for cid in ids:
        want = [a for a in asked if cid in a.answered]
        if not want:
            continue                               # "not held" needs no reference
        plain = await reader(cid)

        def compute(plain=plain, want=want, cid=cid):
            for a in want:
                a.expected[cid] = ref(cid, a.nonce, plain, key)
        if threaded and plain is not None:
            await runtime.run_sync(compute)
        else:
            compute()
        del plain


async def _judge(a: _Asked, manifest_id, n_ids, key, sealed, threaded, retrieve, timeout,
                 extra) -> HolderResult:
    c = a.contact
    timing = dict(frames=len(a.pairs), slowest=a.slowest, allowed=a.allowed, late=a.late,
                  extra=extra)
    if a.failure is not None:
        exc = a.failure
        result = "failed" if exc.misbehaved else "unreachable"
        return HolderResult(c.id, manifest_id, result, asked=n_ids, reason=exc.reason,
                            misbehaved=exc.misbehaved, nonce=a.nonce, **timing)
    expected = a.expected
    r = check_all(a.pairs, expected)
    retrieved = 0
    if sealed and retrieve is not None and (r.wrong or r.unverifiable):
        # another encoding of the chunk, or damage: judge the holder's own record
        ref = reference_sealed
        again = [cid for ch, proof in a.pairs for cid, got in zip(ch.ids, proof.answers)
                 if got is not None and (expected.get(cid) is None or expected[cid].answer != got)]
        for cid in again[RETRIEVE_MAX:]:
            expected[cid] = None                   # beyond the second look: unverifiable
        again = again[:RETRIEVE_MAX]
        try:
            with trio.fail_after(timeout):
                records = await retrieve(c, again)
        except (TransportError, trio.TooSlowError):
            records = {}
        for cid in again:
            rec = records.get(cid)
            if rec is None:
                expected[cid] = None               # unsettled: unverifiable, not wrong
            else:
                retrieved += 1
                got = await runtime.run_sync(ref, cid, a.nonce, rec, key) \
                    if threaded else ref(cid, a.nonce, rec, key)
                # a record the holder serves that is not the chunk: its answer is wrong
                expected[cid] = got if got is not None else _NOT_THE_CHUNK
        r = check_all(a.pairs, expected)
    result, reason = r.result, r.reason
    if a.late and result == "ok":
        result = "failed"
        reason = (f"late: {a.late} of {len(a.pairs)} answer(s) after the deadline (slowest "
                  f"{a.slowest:.2f} s, {a.allowed:.2f} s allowed): a holder that had to fetch "
                  "the chunks from elsewhere answers this slowly")
    return HolderResult(c.id, manifest_id, result, r.asked, r.proven, r.wrong, r.not_held,
                        r.unverifiable, retrieved, reason, False, a.nonce, r.wrong_ids,
                        r.missing_ids, **timing)
