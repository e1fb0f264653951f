"""Proof of possession ("/hypersdk/possession/1"): messages, frames, answers, checks.

Goal: let a verifier (`hypersdk verify REF --network`) learn whether a replica
holder still holds a backup's chunks, without downloading them. The verifier
sends a Challenge: a fresh 32-byte nonce and a random sample of the
manifest's chunk ids; the holder answers, per sampled id, BLAKE3(nonce ||
plaintext chunk), or None for "I do not hold it". The verifier compares each
answer with the one it computes from a copy of the chunk it holds or fetches.

Why this shape:
- The answer binds the nonce, and the nonce is fresh per challenge, so an
  answer (or a whole Proof) recorded earlier is worthless later: a holder
  must read the chunk at challenge time. A holder that kept only the answers
  to old nonces answers wrong ("damaged").
- The answer is over the plaintext (after decompression), so it does not
  depend on how either side stores the chunk (raw, zstd, zstd delta, sealed
  at rest). With keyed chunk ids (protocol/ids.py) nothing changes for the
  holder; the verifier checks its reference copy against the keyed id
  (`reference`).
- Sealed form (Challenge.sealed, for backups with keyed ids): a holder without
  the data key (a storage-only member) cannot answer over the plaintext, so the
  answer is BLAKE3(nonce || the sealed record the holder serves for the id), as
  protocol/exchange.py CODEC_SEALED sends it. Every holder answers it, key or
  not. The verifier's reference is a sealed record of the id that opens under
  the key and whose plaintext has the keyed id (`reference_sealed`). Sealing is
  deterministic, so a record that travelled from the author to the holder as
  stored is the author's byte for byte; but two honest holders may hold
  different records of one chunk (another zstd level, a delta re-encoded), so
  an answer that differs from the verifier's own record is not yet damage: the
  verifier then fetches that holder's record (the caller's `retrieve`, a few ids
  at most) and judges the answer against it, once it opened and checked it. A
  holder that answers without the record, or serves a record that is not the
  chunk, is "damaged" either way.
- How many chunks to ask (`sample_size`): from a stated goal, not a fixed
  count. The default goal is "a holder that lost 1% of the backup's distinct
  chunks is caught with 99% confidence" (DEFAULT_LOSS, DEFAULT_CONFIDENCE): the
  smallest s for which s ids drawn without replacement from n miss every one of
  the k = ceil(loss * n) lost ones with probability <= 1 - confidence (exact
  hypergeometric, not the 1 - (1 - f)^s approximation). That is 459 for a large
  backup, fewer for a small one, every chunk when the backup is smaller than
  that (n <= 100 at 1%). A fixed 16 caught 5% loss in about half the runs.
- Coverage over time (`plan`): a random sample may leave a chunk unasked for
  ever. So each verification also asks the next window of a rotation through
  every distinct chunk, in an order only the verifier knows (a permutation
  seeded by the verifier's secret `seed` and the pass number; round r of a
  pass asks window r), of the same size s. Every chunk is asked at least once
  every ceil(n / s) verifications (`SamplePlan.rounds`). The rotation alone
  would let a holder drop chunks once they were asked (a window is never asked
  again in the same pass); the uniform part, drawn afresh each time, still
  catches that with the stated confidence. A sample is at most 2 s ids,
  sent in frames of MAX_SAMPLE.
- "I do not hold it" is an answer, not an error: an honest holder that lost a
  chunk (or found it damaged in its store, which reads as missing) says so,
  and the verifier records "missing".

Non-goals: which holders to ask (the caller: audit `replica` entries, DHT
providers), how the verifier gets its reference copies (a `reader` the caller
provides), scoring peers (node/).

One request per stream (as the DHT): the verifier opens a stream, sends one
Challenge frame, reads one Proof or Refused frame back, and closes.

    request                                     tag          response, echo rid     tag
    Challenge(rid, manifest, nonce, ids)        "challenge"  Proof(rid, manifest,   "proof"
                                                                answers)
                                                             or Refused(rid, reason) "refused"

Frames: a 4-byte big-endian payload length (framing.HEADER) and one canonical
msgpack map {"v": VERSION, "t": tag, <field>: <value>...} (framing.open_document
parses it; codec.encode builds it). None answers are nil. Every constructible
message is valid; constructors raise LocalProtocolError, decoders turn that
into RemoteProtocolError, and nothing else ever escapes a decoder.

Bounds: ids and answers 1..MAX_SAMPLE = 64 (a Challenge is ~2.3 KiB, a Proof
~2.2 KiB); a frame's payload is at most MAX_MESSAGE = 4 KiB, checked on the
length prefix before any of the body is buffered (OversizedFrame); Refused
reasons are at most MAX_REASON characters. Challenge ids are distinct and never
ZERO_ID (zero chunks are never stored, so there is nothing to prove).

Result of a check (protocol.audit.VERIFY_RESULTS):
    "damaged"  at least one answer differs from the verifier's reference
    "missing"  none wrong, but the holder said "not held" for at least one id
    "ok"       none wrong or missing and at least one answer verified
    "failed"   nothing could be verified: the proof does not answer the
               challenge, or the verifier had no reference for any answered id
("unreachable" is decided by the caller that could not get a proof at all.)
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import ClassVar, Iterable, Mapping

import blake3

from .chunks import ID_LEN, ZERO_ID, VerifiedChunk, chunk_id
from .errors import ChunkHashMismatch, LocalProtocolError, RemoteProtocolError
from .exchange import CODEC_SEALED, Data, open_data
from .framing import HEADER, FrameDecoder, OversizedFrame, encode_document, open_document
from .sealing import KIND_CHUNK, SealError, keyed_id, peek_header

PROTOCOL_ID = "/hypersdk/possession/1"
VERSION = 1
NONCE_LEN = 32
MAX_SAMPLE = 64               # ids per challenge: bounds the holder's work per request
MAX_MESSAGE = 4 << 10         # payload bytes of one frame (largest valid: ~2.3 KiB)
MAX_REASON = 200              # characters of a Refused reason
MAX_U64 = (1 << 64) - 1
DEFAULT_LOSS = 0.01           # the goal: a holder missing 1% of the chunks ...
DEFAULT_CONFIDENCE = 0.99     # ... is caught in 99% of verifications
MIN_LOSS = 0.005              # finer goals ask more than a holder's burst allows (node/)

__all__ = ["PROTOCOL_ID", "VERSION", "NONCE_LEN", "MAX_SAMPLE", "MAX_MESSAGE", "MAX_REASON",
           "Challenge", "Proof", "Refused", "Precomputed", "ProofResult", "answer", "sample",
           "reference", "reference_sealed", "answers_challenge", "check", "encode_payload",
           "DEFAULT_LOSS", "DEFAULT_CONFIDENCE", "MIN_LOSS", "sample_size", "miss_probability",
           "SamplePlan", "plan", "frames", "check_all",
           "encode_message",
           "decode_payload", "decode_frame", "PossessionDecoder", "OversizedFrame"]


# -- field checks: LocalProtocolError and nothing else ---------------------------------

def _u64(name: str, v) -> None:
    if type(v) is not int or not 0 <= v <= MAX_U64:
        raise LocalProtocolError(f"{name} must be an integer in 0..2**64-1, not {v!r:.40}")


def _bytes32(name: str, v) -> None:
    if type(v) is not bytes or len(v) != ID_LEN:
        raise LocalProtocolError(f"{name} must be {ID_LEN} bytes")


def _count(name: str, v) -> None:
    if type(v) is not tuple or not 1 <= len(v) <= MAX_SAMPLE:
        raise LocalProtocolError(f"{name} must be a tuple of 1..{MAX_SAMPLE} items")


# -- messages -------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Challenge:
    """Prove you hold these chunks of `manifest`: answer BLAKE3(nonce || chunk) each,
    or with sealed=True BLAKE3(nonce || the chunk's sealed record) (module doc)."""
    TAG: ClassVar[str] = "challenge"
    rid: int
    manifest: bytes
    nonce: bytes
    ids: tuple
    sealed: bool = False

    def __post_init__(self):
        _u64("rid", self.rid)
        if type(self.sealed) is not bool:
            raise LocalProtocolError("sealed must be true or false")
        _bytes32("manifest", self.manifest)
        _bytes32("nonce", self.nonce)
        _count("ids", self.ids)
        for cid in self.ids:
            _bytes32("chunk id", cid)
            if cid == ZERO_ID:
                raise LocalProtocolError("the zero chunk is never challenged")
        if len(set(self.ids)) != len(self.ids):
            raise LocalProtocolError("challenge ids must be distinct")


@dataclass(frozen=True, slots=True)
class Proof:
    """answers[i] = BLAKE3(nonce || chunk ids[i]), or None: not held."""
    TAG: ClassVar[str] = "proof"
    rid: int
    manifest: bytes
    answers: tuple

    def __post_init__(self):
        _u64("rid", self.rid)
        _bytes32("manifest", self.manifest)
        _count("answers", self.answers)
        for a in self.answers:
            if a is not None:
                _bytes32("answer", a)


@dataclass(frozen=True, slots=True)
class Refused:
    """The holder will not answer now (e.g. "busy", "rate limited"): no verdict."""
    TAG: ClassVar[str] = "refused"
    rid: int
    reason: str

    def __post_init__(self):
        _u64("rid", self.rid)
        if type(self.reason) is not str or len(self.reason) > MAX_REASON:
            raise LocalProtocolError(f"reason must be text of at most {MAX_REASON} characters")


MESSAGE_TYPES = {cls.TAG: cls for cls in (Challenge, Proof, Refused)}
REQUEST_TAGS = frozenset({"challenge"})
RESPONSE_TAGS = frozenset({"proof", "refused"})
_FIELDS = {"challenge": ("rid", "manifest", "nonce", "ids", "sealed"),
           "proof": ("rid", "manifest", "answers"),
           "refused": ("rid", "reason")}
_KEYS = {tag: frozenset(names) for tag, names in _FIELDS.items()}
_LISTS = frozenset({"ids", "answers"})


# -- answers, sampling, checking ----------------------------------------------------------

def answer(nonce: bytes, plain) -> bytes:
    """BLAKE3(nonce || plain): a holder's answer for one chunk (plain = the
    chunk's plaintext; bytes, bytearray or memoryview, not copied)."""
    if type(nonce) is not bytes or len(nonce) != NONCE_LEN:
        raise LocalProtocolError(f"nonce must be {NONCE_LEN} bytes")
    h = blake3.blake3(nonce)
    h.update(plain)
    return h.digest()


def sample(ids: Iterable[bytes], n: int, rng) -> list[bytes]:
    """min(n, #distinct) distinct non-zero ids of `ids`, drawn uniformly at random
    with `rng` (a random.Random; the same rng state gives the same sample).
    ZERO_ID is excluded (zero chunks are never stored). n in 1..MAX_SAMPLE."""
    if type(n) is not int or not 1 <= n <= MAX_SAMPLE:
        raise LocalProtocolError(f"sample size must be 1..{MAX_SAMPLE}, not {n!r:.20}")
    distinct = [c for c in dict.fromkeys(ids) if c != ZERO_ID]
    return rng.sample(distinct, min(n, len(distinct)))


def miss_probability(n: int, lost: int, s: int) -> float:
    """The probability that s distinct ids drawn uniformly from n miss all `lost`
    of them (hypergeometric: C(n - lost, s) / C(n, s))."""
    if not 0 <= lost <= n or not 0 <= s <= n:
        raise LocalProtocolError("need 0 <= lost <= n and 0 <= s <= n")
    p = 1.0
    for i in range(s):
        if n - lost - i <= 0:
            return 0.0
        p *= (n - lost - i) / (n - i)
    return p


def _goal(loss, confidence) -> None:
    if not (type(loss) in (int, float) and MIN_LOSS <= loss < 1):
        raise LocalProtocolError(f"loss must be in {MIN_LOSS}..1, not {loss!r:.20}")
    if not (type(confidence) in (int, float) and 0 < confidence < 1):
        raise LocalProtocolError(f"confidence must be in (0, 1), not {confidence!r:.20}")


def sample_size(n: int, loss: float = DEFAULT_LOSS,
                confidence: float = DEFAULT_CONFIDENCE) -> int:
    """The fewest ids to ask of n distinct chunks so that a holder missing
    ceil(loss * n) of them (at least one) is caught with probability >= confidence
    (module doc). n when even all of them are needed; 0 for n = 0."""
    _goal(loss, confidence)
    if type(n) is not int or n < 0:
        raise LocalProtocolError(f"n must be a count, not {n!r:.20}")
    lost = max(1, math.ceil(loss * n - 1e-9)) if n else 0
    p, s = 1.0, 0
    while s < n and p > 1 - confidence:    # at most ~ln(1/(1-c))/loss + 1 steps, or n
        p *= (n - lost - s) / (n - s)
        s += 1
    return s


@dataclass(frozen=True, slots=True)
class SamplePlan:
    """What one verification asks (`plan`): ids = the uniform draw plus this
    round's rotation window, distinct, in random order."""
    ids: tuple
    n: int                  # distinct non-zero chunks of the backup
    uniform: int            # ids drawn uniformly (the stated goal)
    window: tuple           # the rotation window of this round (ids in it)
    round: int              # this verification's round number (0, 1, ...)
    rounds: int             # rounds of one pass: every chunk asked once per pass

    @property
    def whole(self) -> bool:
        """The sample is the whole backup."""
        return len(self.ids) == self.n


def _rotation(distinct: list, seed: bytes, pass_no: int) -> list:
    order = list(distinct)
    key = blake3.blake3(b"hypersdk possession rotation" + seed
                        + pass_no.to_bytes(8, "big")).digest()
    random.Random(key).shuffle(order)
    return order


def plan(ids: Iterable[bytes], *, seed: bytes, round_no: int, rng,
         loss: float = DEFAULT_LOSS, confidence: float = DEFAULT_CONFIDENCE) -> SamplePlan:
    """The sample of one verification of a backup whose chunk list is `ids`
    (duplicates and ZERO_ID skipped): sample_size(n) ids drawn with `rng`, plus
    window `round_no % rounds` of pass `round_no // rounds` of the rotation keyed by
    `seed` (the verifier's secret, 32 bytes: a holder that could compute it would
    know which chunks come next). Round numbers are the caller's to keep (one per
    verification of this backup)."""
    _bytes32("seed", seed)
    _u64("round", round_no)
    distinct = [c for c in dict.fromkeys(ids) if c != ZERO_ID]
    n = len(distinct)
    s = sample_size(n, loss, confidence)
    if s == n:                                      # the whole backup, every time
        picked = list(distinct)
        rng.shuffle(picked)
        return SamplePlan(tuple(picked), n, n, tuple(distinct), round_no, 1)
    rounds = -(-n // s)
    pass_no, r = divmod(round_no, rounds)
    order = _rotation(distinct, seed, pass_no)
    window = order[r * s:(r + 1) * s]
    picked = list(dict.fromkeys(rng.sample(distinct, s) + window))
    rng.shuffle(picked)
    return SamplePlan(tuple(picked), n, s, tuple(window), round_no, rounds)


def frames(ids, size: int = MAX_SAMPLE) -> list[tuple]:
    """`ids` cut into challenge-sized tuples (the last may be shorter)."""
    ids = tuple(ids)
    return [ids[i:i + size] for i in range(0, len(ids), size)]


@dataclass(frozen=True, slots=True)
class Precomputed:
    """An expected answer the verifier computed already (see `reference`)."""
    answer: bytes


def reference(cid: bytes, nonce: bytes, plain, key=None) -> Precomputed | None:
    """The expected answer for chunk `cid` from the verifier's copy `plain`, or
    None when the copy is absent or does not hash to `cid` (a bad reference
    must not make an honest holder look damaged). Lets a verifier drop each
    plaintext as soon as it is read, instead of keeping a whole sample.

    Keyed ids (protocol/ids.py): the answer is over the plaintext either way; only
    the check of the copy differs. A copy is accepted when it is a VerifiedChunk of
    `cid` (a local store or open_data checked it under its scheme already), or when
    it hashes to `cid` plainly, or keyed under `key` (a DataKey) when one is given."""
    if plain is None:
        return None
    if not (type(plain) is VerifiedChunk and plain.cid == cid) and chunk_id(plain) != cid \
            and (key is None or keyed_id(key, plain) != cid):
        return None
    return Precomputed(answer(nonce, plain))


def reference_sealed(cid: bytes, nonce: bytes, record, key) -> Precomputed | None:
    """The expected sealed-form answer for chunk `cid` from a sealed record of it
    (as CODEC_SEALED carries it), or None when there is no record, no key, or the
    record is not a chunk's that opens under `key` to a plaintext with the keyed id
    `cid`."""
    if record is None or key is None:
        return None
    try:
        h = peek_header(record)
        if h.kind != KIND_CHUNK:                   # challenges name chunks only
            return None
        open_data(Data(0, cid, CODEC_SEALED, h.raw_len, bytes(record)), key)
    except (SealError, RemoteProtocolError, LocalProtocolError, ChunkHashMismatch):
        return None
    return Precomputed(answer(nonce, record))


@dataclass(frozen=True, slots=True)
class ProofResult:
    """What `check` concluded. wrong_ids / missing_ids are the evidence."""
    result: str                       # "ok" | "damaged" | "missing" | "failed"
    asked: int
    proven: int = 0                   # answer equals the reference
    wrong: int = 0                    # answer differs from the reference
    not_held: int = 0                 # the holder said None
    unverifiable: int = 0             # answered, but the verifier had no reference
    wrong_ids: tuple = field(default=())
    missing_ids: tuple = field(default=())
    reason: str = ""


def answers_challenge(ch: Challenge, proof) -> bool:
    """True if `proof` is a Proof for exactly this challenge (rid, manifest, count)."""
    return (type(proof) is Proof and proof.rid == ch.rid and proof.manifest == ch.manifest
            and len(proof.answers) == len(ch.ids))


def check(ch: Challenge, proof: Proof, expected: Mapping) -> ProofResult:
    """Judge `proof` against `expected[cid]` for each challenged id: the verifier's
    plaintext copy of the chunk (checked against cid first; a copy that does not
    hash to cid is no reference), a Precomputed answer, or None / absent (no
    reference: that answer is unverifiable). A None answer counts as not held
    whether or not there is a reference. See the module docstring for results."""
    if not answers_challenge(ch, proof):
        return ProofResult("failed", len(ch.ids), reason="proof does not answer the challenge")
    proven = unverifiable = 0
    wrong, missing = [], []
    for cid, got in zip(ch.ids, proof.answers):
        if got is None:
            missing.append(cid)
            continue
        ref = expected.get(cid)
        if ref is not None and type(ref) is not Precomputed:
            ref = reference(cid, ch.nonce, ref)
        if ref is None:
            unverifiable += 1
        elif ref.answer == got:
            proven += 1
        else:
            wrong.append(cid)
    result, reason = _verdict(len(wrong), len(missing), proven)
    return ProofResult(result, len(ch.ids), proven, len(wrong), len(missing), unverifiable,
                       tuple(wrong), tuple(missing), reason)


def _verdict(wrong: int, missing: int, proven: int) -> tuple[str, str]:
    """(result, reason): damaged over missing over ok over failed."""
    if wrong:
        return "damaged", f"{wrong} wrong answer(s)"
    if missing:
        return "missing", f"{missing} chunk(s) not held"
    if proven:
        return "ok", ""
    return "failed", "no answer could be verified (no reference chunks)"


def check_all(pairs, expected: Mapping) -> ProofResult:
    """`check` over several frames of one verification: pairs = [(Challenge,
    Proof)], judged as one challenge of all their ids (counts summed, results as
    `check`: damaged over missing over ok over failed)."""
    parts = [check(ch, proof, expected) for ch, proof in pairs]
    if not parts:
        return ProofResult("failed", 0, reason="nothing was asked")
    if any(p.reason == "proof does not answer the challenge" for p in parts):
        return ProofResult("failed", sum(p.asked for p in parts),
                           reason="proof does not answer the challenge")
    tot = {f: sum(getattr(p, f) for p in parts)
           for f in ("asked", "proven", "wrong", "not_held", "unverifiable")}
    wrong = tuple(c for p in parts for c in p.wrong_ids)
    missing = tuple(c for p in parts for c in p.missing_ids)
    result, reason = _verdict(len(wrong), len(missing), tot["proven"])
    return ProofResult(result, wrong_ids=wrong, missing_ids=missing, reason=reason, **tot)


# -- encoding -----------------------------------------------------------------------------

def encode_payload(msg) -> bytes:
    """The canonical document of `msg` (a frame without its length prefix)."""
    return encode_document(msg, MESSAGE_TYPES, VERSION, MAX_MESSAGE)


def encode_message(msg) -> bytes:
    """One frame: 4-byte big-endian length + canonical payload."""
    payload = encode_payload(msg)
    return len(payload).to_bytes(HEADER, "big") + payload


# -- decoding -----------------------------------------------------------------------------

def decode_payload(payload, tags: frozenset = frozenset(MESSAGE_TYPES)):
    """The message that is `payload` (no length prefix), whose tag is in `tags`
    (REQUEST_TAGS on a holder, RESPONSE_TAGS on a verifier)."""
    if len(payload) > MAX_MESSAGE:
        raise RemoteProtocolError(f"message of {len(payload)} bytes exceeds {MAX_MESSAGE}")
    tag, doc = open_document(payload, MESSAGE_TYPES, VERSION)
    if tag not in tags:
        raise RemoteProtocolError(f"unexpected {tag} message")
    if doc.keys() != _KEYS[tag]:
        raise RemoteProtocolError(f"{tag} fields {sorted(doc)} are not {sorted(_KEYS[tag])}")
    for name in _LISTS & doc.keys():
        if type(doc[name]) is not list:
            raise RemoteProtocolError(f"{name} must be a list")
        doc[name] = tuple(doc[name])
    try:
        return MESSAGE_TYPES[tag](**doc)
    except LocalProtocolError as exc:
        raise RemoteProtocolError(f"invalid {tag} message: {exc}") from None


def decode_frame(frame, tags: frozenset = frozenset(MESSAGE_TYPES)):
    """The one message that is exactly `frame` (RemoteProtocolError otherwise)."""
    dec = PossessionDecoder(tags)
    data = bytes(frame)
    if len(data) > dec.room:
        raise RemoteProtocolError("more than one bounded frame")
    dec.receive_data(data)
    dec.receive_data(b"")
    msg = dec.next_message()
    if msg is None:
        raise RemoteProtocolError("no frame")
    if dec.trailing:
        raise RemoteProtocolError("bytes after the frame")
    return msg


class PossessionDecoder(FrameDecoder):
    """Reads the one frame of a stream direction (the h11 pattern, no I/O).

        while (msg := dec.next_message()) is None:
            data = await stream.receive_some(dec.room)
            dec.receive_data(data)                    # b"" marks end of stream
        if dec.trailing: ...                          # more bytes than one frame

    Holds at most HEADER + MAX_MESSAGE bytes; an oversized length prefix raises
    OversizedFrame as soon as its 4 bytes arrive. next_message returns None
    until the frame is complete, then the message once (None afterwards); a
    stream that ends inside the frame raises RemoteProtocolError. A stream that
    ends before its first byte is no protocol error: `ended_empty` becomes True
    and next_message keeps returning None (the caller decides what silence
    means). After a RemoteProtocolError the decoder stays failed.
    """

    def __init__(self, tags: frozenset = frozenset(MESSAGE_TYPES)):
        super().__init__(lambda payload: decode_payload(payload, tags), MAX_MESSAGE)
        self._taken = False

    @property
    def room(self) -> int:
        """How many bytes receive_data accepts now."""
        if self._eof or self._error is not None:
            return 0
        return super().room

    @property
    def started(self) -> bool:
        """Some bytes of the frame arrived (tells a stall from silence)."""
        return bool(self._buf) or self._taken

    @property
    def ended_empty(self) -> bool:
        """The stream ended before any byte arrived."""
        return self._eof and not self._buf and not self._taken

    @property
    def trailing(self) -> bool:
        """Bytes arrived after the one frame."""
        return self._taken and bool(self._buf)

    def next_message(self):
        """The frame's message once complete (once), else None."""
        self._raise_if_failed()
        if self._taken:
            return None
        msg = super().next_message()
        if msg is not None:
            self._taken = True
        return msg
