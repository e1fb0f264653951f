"""Simnet scenarios: a TOML file -> a validated, frozen Scenario.

A scenario names everything a run needs; the seed and the node count can be
overridden on the command line (`hypersdk simnet run FILE --nodes N --seed S`).
Every key is optional except [network] nodes; unknown keys and impossible
values raise node.errors.UserError naming the file, the table and the key:

    small.toml: [workload] provides: must be >= 0

Format (all times in simulated seconds, bandwidths in Mbit/s):

    name = "small"                 # default: the file's stem
    description = "..."
    seed = 1                       # default seed (--seed overrides)
    duration = 3600.0              # workload span: provides in the first half,
                                   # lookups in the second half

    [network]
    nodes = 50                     # --nodes overrides
    regions = ["na-east", "eu-west"]          # round-robin over these (default: all 5)
    # region_weights = { na-east = 3, eu-west = 1 }  # or: random, by weight (not both)
    uplink_mbps = 100.0            # per node; 0 = unlimited
    downlink_mbps = 1000.0
    jitter_ms = 0.0                # uniform extra one-way delay
    loss = 0.0                     # packet loss probability, 0 <= loss < 1
    bootstrap_nodes = 3            # everyone joins through these
    join_window = 60.0             # joins start spread uniformly over this span

    [dht]
    k = 20
    alpha = 3
    disjoint_paths = 1             # S/Kademlia disjoint lookup paths
    request_timeout = 5.0
    provider_capacity = 0          # provider records each node keeps (0: the node's
                                   # default, dht/providers.py MAX_RECORDS); small
                                   # values let a simulated flood fill stores cheaply

    [churn]
    replace_per_hour = 0.2         # fraction of the nodes replaced per simulated hour

    [faults]
    malicious = 0.2                # fraction of nodes that lie (node/kademlia/rpc.py)
    malicious_strategy = "mixed"   # "far-peers" | "fabricated" | "mixed" | "eclipse"
                                   # (eclipse: the liars collude, each answering with
                                   # the liars closest to the target)
    flood_keys = 0                 # each malicious node, during the workload's first
                                   # half, announces itself for this many random keys
                                   # to each of FLOOD_TARGETS peers of its table
    drop = 0.0                     # fraction of nodes that become unreachable after the join
    hang = 0.0                     # fraction of nodes that blackhole after the join

    [workload]
    provides = 100                 # keys, each provided by one random honest node
    lookups = 200                  # find_providers from random honest nodes
    reprovide = true               # at the end, one random honest node provides
    reprovide_keys = 1000          # this many fresh keys at once (DhtService.provide_many:
                                   # the keyspace sweep of the republish) and the
                                   # messages per key are counted
"""
from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path

from hypersdk.node.errors import UserError
from hypersdk.simnet.network import REGIONS

STRATEGIES = ("far-peers", "fabricated", "mixed", "eclipse")


@dataclass(frozen=True)
class NetworkSpec:
    nodes: int
    regions: tuple[str, ...] = REGIONS
    region_weights: tuple[tuple[str, float], ...] = ()
    uplink_mbps: float = 100.0
    downlink_mbps: float = 1000.0
    jitter_ms: float = 0.0
    loss: float = 0.0
    bootstrap_nodes: int = 3
    join_window: float = 60.0


@dataclass(frozen=True)
class DhtSpec:
    k: int = 20
    alpha: int = 3
    disjoint_paths: int = 1
    request_timeout: float = 5.0
    provider_capacity: int = 0


@dataclass(frozen=True)
class ChurnSpec:
    replace_per_hour: float = 0.0


@dataclass(frozen=True)
class FaultSpec:
    malicious: float = 0.0
    malicious_strategy: str = "mixed"
    flood_keys: int = 0
    drop: float = 0.0
    hang: float = 0.0


@dataclass(frozen=True)
class WorkloadSpec:
    provides: int = 100
    lookups: int = 200
    reprovide: bool = True
    reprovide_keys: int = 1000


@dataclass(frozen=True)
class Scenario:
    name: str
    network: NetworkSpec
    description: str = ""
    seed: int = 1
    duration: float = 3600.0
    dht: DhtSpec = field(default_factory=DhtSpec)
    churn: ChurnSpec = field(default_factory=ChurnSpec)
    faults: FaultSpec = field(default_factory=FaultSpec)
    workload: WorkloadSpec = field(default_factory=WorkloadSpec)

    def with_overrides(self, *, nodes: int | None = None, seed: int | None = None,
                       where: str = "command line") -> "Scenario":
        s = self
        if nodes is not None:
            _check(where, "", "--nodes", nodes, int, lo=1)
            s = replace(s, network=replace(s.network, nodes=nodes))
            _cross_checks(where, s)
        if seed is not None:
            s = replace(s, seed=seed)
        return s

    def to_json(self) -> dict:
        n, d, c, f, w = self.network, self.dht, self.churn, self.faults, self.workload
        return {"name": self.name, "description": self.description, "seed": self.seed,
                "duration": self.duration,
                "network": {**vars(n), "regions": list(n.regions),
                            "region_weights": dict(n.region_weights)},
                "dht": vars(d).copy(), "churn": vars(c).copy(), "faults": vars(f).copy(),
                "workload": vars(w).copy()}


def _where(table: str, key: str) -> str:
    return f"[{table}] {key}" if table else key


def _check(src: str, table: str, key: str, value, kind, *, lo=None, hi=None,
           lo_open=False, hi_open=False):
    """Type and range check; returns the value (ints accepted for floats)."""
    def bad(msg):
        raise UserError(f"{src}: {_where(table, key)}: {msg}")
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            bad(f"must be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            bad("must be finite")
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            bad(f"must be an integer, got {value!r}")
    elif kind is bool:
        if not isinstance(value, bool):
            bad(f"must be true or false, got {value!r}")
    elif kind is str:
        if not isinstance(value, str):
            bad(f"must be a string, got {value!r}")
    if lo is not None and (value <= lo if lo_open else value < lo):
        bad(f"must be {'>' if lo_open else '>='} {lo}")
    if hi is not None and (value >= hi if hi_open else value > hi):
        bad(f"must be {'<' if hi_open else '<='} {hi}")
    return value


# key -> (type, lo, hi, lo_open, hi_open) for plain scalar keys of each table
_RULES = {
    "network": {"nodes": (int, 1, None, False, False),
                "uplink_mbps": (float, 0, None, False, False),
                "downlink_mbps": (float, 0, None, False, False),
                "jitter_ms": (float, 0, None, False, False),
                "loss": (float, 0, 1, False, True),
                "bootstrap_nodes": (int, 1, None, False, False),
                "join_window": (float, 0, None, False, False)},
    "dht": {"k": (int, 1, None, False, False), "alpha": (int, 1, None, False, False),
            "disjoint_paths": (int, 1, None, False, False),
            "request_timeout": (float, 0, None, True, False),
            "provider_capacity": (int, 0, None, False, False)},
    "churn": {"replace_per_hour": (float, 0, None, False, False)},
    "faults": {"malicious": (float, 0, 1, False, False), "drop": (float, 0, 1, False, False),
               "hang": (float, 0, 1, False, False), "malicious_strategy": (str, None, None, 0, 0),
               "flood_keys": (int, 0, None, False, False)},
    "workload": {"provides": (int, 0, None, False, False), "lookups": (int, 0, None, False, False),
                 "reprovide": (bool, None, None, 0, 0),
                 "reprovide_keys": (int, 0, None, False, False)},
}
_TOP = {"name": str, "description": str, "seed": int, "duration": float}
_SPECS = {"network": NetworkSpec, "dht": DhtSpec, "churn": ChurnSpec, "faults": FaultSpec,
          "workload": WorkloadSpec}


def _table(src: str, name: str, raw) -> dict:
    if not isinstance(raw, dict):
        raise UserError(f"{src}: [{name}]: must be a table")
    out = {}
    for key, value in raw.items():
        if name == "network" and key == "regions":
            if not isinstance(value, list) or not value:
                raise UserError(f"{src}: [network] regions: must be a non-empty list of "
                                f"region names ({', '.join(REGIONS)})")
            for r in value:
                if r not in REGIONS:
                    raise UserError(f"{src}: [network] regions: unknown region {r!r} "
                                    f"(known: {', '.join(REGIONS)})")
            if len(set(value)) != len(value):
                raise UserError(f"{src}: [network] regions: lists a region twice")
            out[key] = tuple(value)
        elif name == "network" and key == "region_weights":
            if not isinstance(value, dict) or not value:
                raise UserError(f"{src}: [network] region_weights: must be a non-empty table "
                                f"of region = weight")
            ws = []
            for r, w in value.items():
                if r not in REGIONS:
                    raise UserError(f"{src}: [network] region_weights: unknown region {r!r} "
                                    f"(known: {', '.join(REGIONS)})")
                ws.append((r, _check(src, "network", f"region_weights.{r}", w, float, lo=0)))
            if sum(w for _, w in ws) <= 0:
                raise UserError(f"{src}: [network] region_weights: weights must not all be 0")
            out[key] = tuple(ws)
        elif key in _RULES[name]:
            kind, lo, hi, lo_open, hi_open = _RULES[name][key]
            out[key] = _check(src, name, key, value, kind, lo=lo, hi=hi,
                              lo_open=bool(lo_open), hi_open=bool(hi_open))
        else:
            known = sorted([*_RULES[name], *(("regions", "region_weights")
                                              if name == "network" else ())])
            raise UserError(f"{src}: [{name}] {key}: unknown key (known: {', '.join(known)})")
    return out


def _cross_checks(src: str, s: Scenario) -> None:
    n, f = s.network, s.faults
    if n.region_weights and n.regions != REGIONS:
        raise UserError(f"{src}: [network] region_weights: give regions or region_weights, "
                        f"not both")
    if n.bootstrap_nodes > n.nodes:
        raise UserError(f"{src}: [network] bootstrap_nodes: must be <= nodes ({n.nodes})")
    if f.malicious_strategy not in STRATEGIES:
        raise UserError(f"{src}: [faults] malicious_strategy: must be one of "
                        f"{', '.join(STRATEGIES)}, got {f.malicious_strategy!r}")
    if f.malicious + f.drop + f.hang > 1:
        raise UserError(f"{src}: [faults]: malicious + drop + hang must be <= 1")
    honest = n.nodes - n.bootstrap_nodes - _count(n.nodes, f.malicious + f.drop + f.hang)
    if honest < 1 and (s.workload.provides or s.workload.lookups):
        raise UserError(f"{src}: [faults]: no honest node left outside the bootstrap nodes "
                        f"to run the workload")
    if s.workload.lookups and not s.workload.provides:
        raise UserError(f"{src}: [workload] lookups: need provides >= 1 (lookups search "
                        f"for provided keys)")
    if s.dht.disjoint_paths > s.dht.k:
        raise UserError(f"{src}: [dht] disjoint_paths: must be <= k ({s.dht.k})")


def _count(nodes: int, fraction: float) -> int:
    return int(round(nodes * fraction))


def parse(text: str, *, src: str = "scenario", default_name: str = "scenario") -> Scenario:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{src}: not valid TOML: {exc}") from None
    top: dict = {}
    tables: dict = {}
    for key, value in raw.items():
        if key in _SPECS:
            tables[key] = _table(src, key, value)
        elif key in _TOP:
            lo = 0 if key in ("seed", "duration") else None
            top[key] = _check(src, "", key, value, _TOP[key], lo=lo,
                              lo_open=key == "duration")
        else:
            raise UserError(f"{src}: {key}: unknown key (known: "
                            f"{', '.join(sorted([*_TOP, *(f'[{t}]' for t in _SPECS)]))})")
    if "nodes" not in tables.get("network", {}):
        raise UserError(f"{src}: [network] nodes: required")
    s = Scenario(name=top.pop("name", default_name),
                 **{k: _SPECS[k](**v) for k, v in tables.items()}, **top)
    _cross_checks(src, s)
    return s


def load(path: str | Path) -> Scenario:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: no such scenario file") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, not a scenario file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read: {exc}") from None
    return parse(text, src=str(path), default_name=p.stem)
