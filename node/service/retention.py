"""Retention: which versions of one backup name a `forget` policy keeps.

    sel = select(versions, keep_last=3, keep_daily=7)
    sel.keep, sel.remove        # newest first
    sel.reasons                 # parallel to keep: ["last", "daily 2026-12-06", ...]

Pure (no store, no clock, no I/O), so the rules can be tested on their own:
`versions` are anything with `.version` and `.created` (ns since the epoch, UTC),
image backups (catalog.Backup) and VM backup sets (vm_sets.VmSet) alike.

The rules are restic's `forget` (restic 0.17 and later), applied to one name's
versions, newest first (equal times: the higher version counts as newer):
- keep_last n: the n newest versions;
- keep_hourly / daily / weekly / monthly / yearly n: for the last n hours, days,
  ISO weeks (Monday to Sunday), months or years that hold a version, the newest
  version of each; periods are natural calendar ones, not counted back from now;
- a rule that still has room when the oldest version is reached keeps it too
  ("oldest daily ..."), so the history reaches as far back as the counts allow;
- a version kept by any rule is kept; every other version is removed.
So any policy keeps the newest version. Calendar periods are in the time zone
`tz` (None: this process's local zone, as restic uses the local time; the TZ
environment of the CLI or node decides). A policy with every count 0 is refused:
restic keeps everything then, which a typo (`--keep-dayly`) makes look like
"forgot nothing"; here a policy must name at least one rule of 1 or more.
"""
from __future__ import annotations

import datetime
from dataclasses import astuple, dataclass, fields
from typing import NamedTuple

from hypersdk.node.errors import UsageError

RULES = ("last", "hourly", "daily", "weekly", "monthly", "yearly")

# rule -> (the calendar period of a local time, how a reason names it)
_PERIOD = {
    "hourly": (lambda t: (t.year, t.month, t.day, t.hour), lambda t: f"{t:%Y-%m-%d %H}h"),
    "daily": (lambda t: (t.year, t.month, t.day), lambda t: f"{t:%Y-%m-%d}"),
    "weekly": (lambda t: t.isocalendar()[:2],
               lambda t: "{}-W{:02d}".format(*t.isocalendar()[:2])),
    "monthly": (lambda t: (t.year, t.month), lambda t: f"{t:%Y-%m}"),
    "yearly": (lambda t: t.year, lambda t: f"{t:%Y}"),
}


@dataclass(frozen=True)
class Policy:
    """How many versions each rule keeps (0: the rule is off)."""
    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0

    def __post_init__(self):
        for f in fields(self):
            n = getattr(self, f.name)
            if type(n) is not int or n < 0:
                raise UsageError(f"--keep-{f.name} {n}: must be a whole number, 0 or more")
        if not any(astuple(self)):
            raise UsageError("forget needs a policy: at least one of --keep-last, --keep-hourly, "
                             "--keep-daily, --keep-weekly, --keep-monthly, --keep-yearly with "
                             "N of 1 or more (it never removes every version)")

    @classmethod
    def from_args(cls, a: dict) -> Policy:
        """From the op's arguments keep_last, keep_daily, ... (missing or None: 0)."""
        return cls(**{r: a.get(f"keep_{r}") or 0 for r in RULES})

    def to_json(self) -> dict:
        return {f"keep_{r}": getattr(self, r) for r in RULES}

    def describe(self) -> str:
        """As `forget` prints it: "last 3, daily 7"."""
        return ", ".join(f"{r} {getattr(self, r)}" for r in RULES if getattr(self, r))


class Selection(NamedTuple):
    keep: list
    remove: list
    reasons: list          # reasons[i]: why keep[i] is kept (one or more)


def local_time(created_ns: int, tz=None) -> datetime.datetime:
    """The version's creation time in zone tz (None: local, naive)."""
    return datetime.datetime.fromtimestamp(created_ns // 1_000_000_000, tz)


def select(versions, *, keep_last: int = 0, keep_hourly: int = 0, keep_daily: int = 0,
           keep_weekly: int = 0, keep_monthly: int = 0, keep_yearly: int = 0,
           tz=None) -> Selection:
    """The versions the policy keeps and removes, with the reasons (module doc)."""
    return apply(versions, Policy(keep_last, keep_hourly, keep_daily, keep_weekly,
                                  keep_monthly, keep_yearly), tz)


def apply(versions, policy: Policy, tz=None) -> Selection:
    order = sorted(versions, key=lambda v: (v.created, v.version), reverse=True)
    left = {r: getattr(policy, r) for r in RULES}
    seen: dict = {r: None for r in RULES}         # the period each rule kept last
    keep, remove, reasons = [], [], []
    for i, v in enumerate(order):
        when = local_time(v.created, tz)
        oldest = i == len(order) - 1
        why = []
        for rule in RULES:
            if left[rule] <= 0:
                continue
            if rule == "last":                       # every version is a period of its own
                left[rule] -= 1
                why.append("last")
                continue
            period, name = _PERIOD[rule]
            p = period(when)
            if p != seen[rule] or oldest:
                why.append(("oldest " if p == seen[rule] else "") + f"{rule} {name(when)}")
                seen[rule] = p
                left[rule] -= 1
        if why:
            keep.append(v)
            reasons.append(why)
        else:
            remove.append(v)
    return Selection(keep, remove, reasons)
