"""The replication protocol: an author places copies of its backups on other sites.

REPLICATE_PROTOCOL, one request frame and one answer frame per stream (the shape
of the membership protocols: a 4-byte length, then canonical msgpack; answer_once
in node/service/frames.py serves it). Only members reach it (node/net/gate.py).

    offer                        -> {site, free, quota, used}      what the holder
                                    can take: its announcement of free space, asked
                                    by an author choosing holders
    replicate manifest size      -> {state, reason}               please hold a copy:
                                    "queued" (accepted: the holder pulls it from the
                                    swarm, durably queued), "held" (it already has
                                    it all), "refused" (reason: e.g. over its quota)
    status manifest              -> {state, reason}               "held", "queued",
                                    "fetching", "failed" (reason), "unknown"
    release manifest             -> {state, reason}               the author deleted
                                    it: the holder drops its copy ("released", or
                                    "unknown" when it held none)

`size` is what the copy may take at most (the backup's non-zero bytes before
compression): the holder checks it against its quota before it accepts. The
holder answers about itself only; the author never trusts "held" blindly for
long: its health checks prove possession (node/audit/possession.py).

Pure: no I/O. Malformed frames raise ReplicateError (a RemoteProtocolError).
"""
from __future__ import annotations

from dataclasses import dataclass

from . import codec
from .errors import LocalProtocolError, RemoteProtocolError

REPLICATE_PROTOCOL = "/hypersdk/replicate/1"
VERSION = 1
MAX_FRAME = 4096
MAX_REASON = 300
MAX_SITE = 128
MAX_SIZE = 1 << 62
OPS = ("offer", "replicate", "status", "release")
STATES = ("queued", "fetching", "held", "failed", "refused", "unknown", "released")


class ReplicateError(RemoteProtocolError):
    """A replication frame that is malformed or out of bounds."""


def _id(v) -> bool:
    return type(v) is bytes and len(v) == 32


def _size(v) -> bool:
    return type(v) is int and 0 <= v <= MAX_SIZE


def _text(v, n: int) -> bool:
    return type(v) is str and len(v) <= n and v.isprintable()


_REQ = {
    "offer": {"v": lambda v: v == VERSION, "op": lambda v: v == "offer"},
    "replicate": {"v": lambda v: v == VERSION, "op": lambda v: v == "replicate",
                  "manifest": _id, "size": _size},
    "status": {"v": lambda v: v == VERSION, "op": lambda v: v == "status", "manifest": _id},
    "release": {"v": lambda v: v == VERSION, "op": lambda v: v == "release", "manifest": _id},
}
_OFFER = {"v": lambda v: v == VERSION, "site": lambda v: _text(v, MAX_SITE),
          "free": _size, "quota": lambda v: v is None or _size(v), "used": _size}
_STATE = {"v": lambda v: v == VERSION, "state": lambda v: type(v) is str and v in STATES,
          "reason": lambda v: _text(v, MAX_REASON)}


@dataclass(frozen=True)
class Request:
    op: str
    manifest: bytes | None = None
    size: int = 0


@dataclass(frozen=True)
class Offer:
    site: str
    free: int                     # bytes it would still accept
    quota: int | None             # None: no quota (free = its disk's free space)
    used: int


@dataclass(frozen=True)
class State:
    state: str
    reason: str = ""


def _frame(doc: dict) -> bytes:
    payload = codec.encode(doc)
    if len(payload) > MAX_FRAME:
        raise LocalProtocolError(f"replication frame of {len(payload)} bytes")
    return len(payload).to_bytes(4, "big") + payload


def frame_length(header: bytes) -> int:
    n = int.from_bytes(header, "big")
    if not 0 < n <= MAX_FRAME:
        raise ReplicateError(f"replication frame of {n} bytes (at most {MAX_FRAME})")
    return n


def _check(doc, schema: dict, what: str) -> dict:
    if type(doc) is not dict or doc.keys() != schema.keys():
        raise ReplicateError(f"{what}: unexpected fields")
    for k, check in schema.items():
        if not check(doc[k]):
            raise ReplicateError(f"{what}: field {k!r} is invalid or out of bounds")
    return doc


def request(op: str, manifest: bytes | None = None, size: int = 0) -> bytes:
    doc = {"v": VERSION, "op": op}
    if op != "offer":
        doc["manifest"] = manifest
    if op == "replicate":
        doc["size"] = size
    try:
        _check(doc, _REQ.get(op, {}), f"{op} request")
    except ReplicateError as exc:             # our own arguments: a bug here, not a peer's
        raise LocalProtocolError(str(exc)) from None
    return _frame(doc)


def decode_request(payload: bytes) -> Request:
    doc = codec.decode(payload, max_size=MAX_FRAME)
    op = doc.get("op") if type(doc) is dict else None
    if type(op) is not str or op not in _REQ:
        raise ReplicateError("not a replication request")
    _check(doc, _REQ[op], f"{op} request")
    return Request(op, doc.get("manifest"), doc.get("size", 0))


def offer_answer(o: Offer) -> bytes:
    doc = {"v": VERSION, "site": o.site[:MAX_SITE], "free": o.free, "quota": o.quota,
           "used": o.used}
    return _frame(_check(doc, _OFFER, "offer"))


def decode_offer(payload: bytes) -> Offer:
    doc = _check(codec.decode(payload, max_size=MAX_FRAME), _OFFER, "offer")
    return Offer(doc["site"], doc["free"], doc["quota"], doc["used"])


def state_answer(state: str, reason: str = "") -> bytes:
    reason = "".join(c if c.isprintable() else " " for c in reason)[:MAX_REASON]
    return _frame(_check({"v": VERSION, "state": state, "reason": reason}, _STATE, "answer"))


_REFUSED = {"v": lambda v: v == VERSION, "refused": lambda v: _text(v, MAX_REASON)}


def decode_state(payload: bytes) -> State:
    """An answer to replicate/status/release; a refusal of the request itself (the
    shared {"v", "refused"} frame of node/service/frames.py) is State("refused")."""
    doc = codec.decode(payload, max_size=MAX_FRAME)
    if type(doc) is dict and "refused" in doc:
        doc = _check(doc, _REFUSED, "refusal")
        return State("refused", doc["refused"])
    doc = _check(doc, _STATE, "answer")
    return State(doc["state"], doc["reason"])
