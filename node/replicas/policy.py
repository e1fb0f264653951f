"""Replication policy: how many copies of a backup live on other sites.

DATA/policy.json (the config-file form; `hypersdk policy set` writes it):

    {"default": {"replicas": 2, "min": 2},
     "names": {"payroll-db": {"replicas": 3, "min": 2}, "scratch": {"replicas": 0}}}

replicas: copies wanted on distinct sites other than the author's (0: none).
min: below it the backup is reported under-replicated (default: replicas).
A name not listed takes the default; no file, or no default in it: DEFAULT_REPLICAS,
or what `node run --replicas N` says (the node's default for its network). A VM
set's disks (NAME/LABEL) follow the set's NAME unless listed themselves.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from hypersdk.node.errors import UserError
from hypersdk.node.files import private_dir, write_atomic

FILE = "policy.json"
DEFAULT_REPLICAS = 2
MAX_REPLICAS = 16
MAX_BYTES = 1 << 20


@dataclass(frozen=True)
class Rule:
    replicas: int
    min: int

    def to_json(self) -> dict:
        return {"replicas": self.replicas, "min": self.min}


def _rule(doc, where: str) -> Rule:
    if type(doc) is not dict or not doc.keys() <= {"replicas", "min"} or "replicas" not in doc:
        raise UserError(f"{where}: expected {{\"replicas\": N, \"min\": M}}")
    n, m = doc["replicas"], doc.get("min", doc["replicas"])
    for v in (n, m):
        if type(v) is not int or not 0 <= v <= MAX_REPLICAS:
            raise UserError(f"{where}: replicas and min must be integers in 0..{MAX_REPLICAS}")
    if m > n:
        raise UserError(f"{where}: min {m} is more than replicas {n}")
    return Rule(n, m)


class Policy:
    def __init__(self, default: Rule, names: dict[str, Rule]):
        self.default, self.names = default, names

    @classmethod
    def load(cls, data_dir, default_replicas: int | None = None) -> Policy:
        """DATA/policy.json; default_replicas (node run --replicas) when the file sets
        no default. UserError naming the file for anything malformed."""
        path = Path(data_dir) / FILE
        base = DEFAULT_REPLICAS if default_replicas is None else default_replicas
        default = Rule(base, base)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return cls(default, {})
        except OSError as exc:
            raise UserError(f"cannot read {path}: {exc.strerror}") from None
        if len(raw) > MAX_BYTES:
            raise UserError(f"{path}: larger than {MAX_BYTES} bytes")
        try:
            doc = json.loads(raw)
        except ValueError as exc:
            raise UserError(f"{path}: not JSON ({exc})") from None
        if type(doc) is not dict or not doc.keys() <= {"default", "names"}:
            raise UserError(f"{path}: expected {{\"default\": ..., \"names\": {{...}}}}")
        if "default" in doc and default_replicas is None:
            default = _rule(doc["default"], f"{path} default")
        names = doc.get("names", {})
        if type(names) is not dict:
            raise UserError(f"{path}: names must map backup names to rules")
        return cls(default, {str(k): _rule(v, f"{path} names.{k}") for k, v in names.items()})

    def rule(self, name: str) -> Rule:
        if name in self.names:
            return self.names[name]
        set_name = name.split("/", 1)[0]            # a VM set's disk: NAME/LABEL
        return self.names.get(set_name, self.default)

    def to_json(self) -> dict:
        return {"default": self.default.to_json(),
                "names": {k: v.to_json() for k, v in sorted(self.names.items())}}


def set_rule(data_dir, name: str | None, replicas: int, minimum: int | None) -> Policy:
    """Write NAME's rule (None: the default) into DATA/policy.json, atomically."""
    path = private_dir(Path(data_dir)) / FILE
    pol = Policy.load(data_dir)
    rule = _rule({"replicas": replicas, "min": replicas if minimum is None else minimum},
                 "policy")
    doc = {"default": pol.default.to_json(),
           "names": {k: v.to_json() for k, v in pol.names.items()}}
    if name is None:
        doc["default"] = rule.to_json()
    else:
        doc["names"][name] = rule.to_json()
    write_atomic(path, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode())
    return Policy.load(data_dir)
