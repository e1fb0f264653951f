"""Retention: `hypersdk forget` (restic's policy rules) and deleting VM backup sets.

The selection (node/service/retention.py) is checked on its own: properties over
random version histories (hypothesis) against an independent model of each rule,
and worked examples from restic's documentation and test data. The command is
checked on real `hypersdk` processes: versions with set creation times are made
in-process (backup(..., now_ns=...)), VM sets from set records (vm_sets.add) and,
end to end, from a vSphere simulator. Every removal must leave exactly one signed
delete entry per image backup removed, and nothing must change on a dry run or
on bad input.
"""
from __future__ import annotations

import datetime
import json
import random
import signal
from dataclasses import dataclass

import pytest
from conftest import Cli, mixed_image
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from test_audit_intents import check_exactly_once

from hypersdk.node.errors import UsageError
from hypersdk.node.service.retention import Policy, select

UTC = datetime.timezone.utc
CS = 64 << 10
ENV = {"TZ": "UTC"}                   # the calendar of the processes these tests start


@dataclass(frozen=True)
class V:
    version: int
    created: int


def ns(text: str, tz=UTC) -> int:
    """'2026-12-06 12:00[:00[.1]]' in tz -> ns since the epoch."""
    t = datetime.datetime.fromisoformat(text).replace(tzinfo=tz)
    return int(t.timestamp()) * 10**9 + t.microsecond * 1000


def history(*times: str) -> list[V]:
    """Versions 1, 2, ... created at the given UTC times."""
    return [V(i + 1, ns(t)) for i, t in enumerate(times)]


def refs(vs) -> list[int]:
    return [v.version for v in vs]


# -- the selection: properties -----------------------------------------------------------

RULES = ("last", "hourly", "daily", "weekly", "monthly", "yearly")


@st.composite
def histories(draw):
    """Version histories as backups make them: mostly increasing times, bunched into
    the same hours, days and weeks, sometimes out of order (a clock set back) or equal."""
    n = draw(st.integers(0, 40))
    t = draw(st.integers(ns("1990-01-01 00:00"), ns("2030-01-01 00:00")))   # + 45 y at most
    out = []
    for i in range(n):
        step = draw(st.sampled_from([0, 60, 3600, 5 * 3600, 86400, 3 * 86400, 8 * 86400,
                                     40 * 86400, 400 * 86400, -3600]))
        t += step * 10**9 + draw(st.integers(0, 10**9))
        out.append(V(i + 1, t))
    return out


policies = st.builds(lambda *n: dict(zip(RULES, n)),
                     *[st.integers(0, 6) for _ in RULES]).filter(lambda p: any(p.values()))
zones = st.sampled_from([UTC, datetime.timezone(datetime.timedelta(hours=5, minutes=30)),
                         datetime.timezone(datetime.timedelta(hours=-8))])


def run(versions, policy: dict, tz):
    return select(versions, tz=tz, **{f"keep_{r}": n for r, n in policy.items()})


def newest_first(versions):
    return sorted(versions, key=lambda v: (v.created, v.version), reverse=True)


# an independent model of one calendar rule (restic: the newest version of each of the
# last n periods that have one; and the oldest version while the rule has room left)
PERIOD = {"hourly": lambda t: (t.date(), t.hour), "daily": lambda t: t.date(),
          "weekly": lambda t: t.isocalendar()[:2], "monthly": lambda t: (t.year, t.month),
          "yearly": lambda t: t.year}


def model(versions, rule: str, n: int, tz) -> set[int]:
    order = newest_first(versions)
    if rule == "last":
        return {v.version for v in order[:n]}
    newest: dict = {}
    for v in order:
        newest.setdefault(PERIOD[rule](datetime.datetime.fromtimestamp(v.created // 10**9, tz)),
                          v.version)
    kept = set(list(newest.values())[:n])
    if order and len(newest) < n:
        kept.add(order[-1].version)
    return kept


@settings(max_examples=300, deadline=None)
@given(histories(), policies, zones)
def test_keep_and_remove_partition_the_versions_with_a_reason_for_each_kept(vs, policy, tz):
    keep, remove, reasons = run(vs, policy, tz)
    assert sorted(refs(keep) + refs(remove)) == refs(vs)          # all, each once
    assert len(reasons) == len(keep) and all(reasons)
    assert refs(keep) == refs(newest_first(keep)) and refs(remove) == refs(newest_first(remove))
    if vs:                                                        # any policy keeps the newest
        assert keep[0] == newest_first(vs)[0]
    assert len(keep) <= sum(policy.values())                      # each rule keeps at most n


@settings(max_examples=300, deadline=None)
@given(histories(), policies, zones)
def test_each_rule_matches_the_model_and_the_policy_is_their_union(vs, policy, tz):
    union = set()
    for rule, n in policy.items():
        if n:
            alone = run(vs, {rule: n}, tz)
            assert set(refs(alone.keep)) == model(vs, rule, n, tz), rule
            assert all(r[0].removeprefix("oldest ").startswith(rule) for r in alone.reasons)
            union |= set(refs(alone.keep))
    assert set(refs(run(vs, policy, tz).keep)) == union


@settings(max_examples=200, deadline=None)
@given(histories(), policies, st.sampled_from(RULES), st.integers(1, 5), zones)
def test_a_larger_count_never_removes_a_version_a_smaller_one_kept(vs, policy, rule, more, tz):
    before = set(refs(run(vs, policy, tz).keep))
    after = set(refs(run(vs, dict(policy, **{rule: policy[rule] + more}), tz).keep))
    assert before <= after


@settings(max_examples=200, deadline=None)
@given(histories(), st.integers(0, 5))
def test_keep_last_keeps_exactly_the_n_newest(vs, n):
    assume(n > 0)
    keep, remove, _ = select(vs, keep_last=n, tz=UTC)
    assert keep == newest_first(vs)[:n]
    assert len(remove) == max(0, len(vs) - n)


@settings(max_examples=200, deadline=None)
@given(histories(), policies, zones)
def test_nothing_is_removed_when_a_rule_has_room_for_every_version(vs, policy, tz):
    assert run(vs, dict(policy, last=len(vs) + policy["last"]), tz).remove == []
    days = {datetime.datetime.fromtimestamp(v.created // 10**9, tz).date() for v in vs}
    if vs and len(days) == len(vs):            # one version a day: daily n >= versions
        assert run(vs, {"daily": len(vs)}, tz).remove == []


@pytest.mark.parametrize("kw, message", [
    ({}, "forget needs a policy"),
    ({"keep_last": 0, "keep_daily": 0}, "forget needs a policy"),
    ({"keep_daily": -1}, "--keep-daily -1: must be"),
    ({"keep_last": 3, "keep_yearly": -2}, "--keep-yearly -2: must be"),
    ({"keep_last": True}, "--keep-last True: must be"),
])
def test_an_empty_or_negative_policy_is_refused(kw, message):
    with pytest.raises(UsageError, match=message):
        select(history("2026-12-06 12:00"), **kw)


# -- the selection: worked examples -----------------------------------------------------

def test_restic_docs_twelve_sundays_keep_daily_4():
    """restic doc 060_forget: a backup every Sunday for 12 weeks; `forget --keep-daily 4`
    keeps the last four Sundays and removes the other eight."""
    sundays = history(*[f"2019-{m:02d}-{d:02d} 11:00" for m, d in [
        (9, 1), (9, 8), (9, 15), (9, 22), (9, 29), (10, 6), (10, 13), (10, 20), (10, 27),
        (11, 3), (11, 10), (11, 17)]])
    keep, remove, reasons = select(sundays, keep_daily=4, tz=UTC)
    assert refs(keep) == [12, 11, 10, 9] and refs(remove) == [8, 7, 6, 5, 4, 3, 2, 1]
    assert reasons == [["daily 2019-11-17"], ["daily 2019-11-10"], ["daily 2019-11-03"],
                       ["daily 2019-10-27"]]


RESTIC_TEST_TIMES = [   # the tail of restic's internal/restic/snapshot_policy_test.go list
    "2015-11-22 10:20:30", "2016-01-01 01:02:03", "2016-01-01 01:03:03", "2016-01-01 07:08:03",
    "2016-01-03 07:02:03", "2016-01-04 10:23:03", "2016-01-04 11:23:03", "2016-01-04 12:23:03",
    "2016-01-04 12:24:03", "2016-01-04 12:28:03", "2016-01-04 12:30:03", "2016-01-04 16:23:03",
    "2016-01-05 09:02:03", "2016-01-06 08:02:03", "2016-01-07 10:02:03", "2016-01-08 20:02:03",
    "2016-01-09 21:02:03", "2016-01-12 21:02:03", "2016-01-12 21:08:03", "2016-01-18 12:02:03"]


def test_restic_golden_daily_3_and_daily_3_weekly_4():
    """restic's golden files policy_keep_snapshots_6 ({Daily: 3}) and _13 ({Daily: 3,
    Weekly: 4}): the same versions, the same reasons (ISO weeks: 2016-01-03 is a
    Sunday of 2015-W53)."""
    vs = history(*RESTIC_TEST_TIMES)
    at = {v.version: t for v, t in zip(vs, RESTIC_TEST_TIMES)}
    keep, _, reasons = select(vs, keep_daily=3, tz=UTC)
    assert [at[v.version] for v in keep] == ["2016-01-18 12:02:03", "2016-01-12 21:08:03",
                                             "2016-01-09 21:02:03"]
    keep, _, reasons = select(vs, keep_daily=3, keep_weekly=4, tz=UTC)
    assert [at[v.version] for v in keep] == ["2016-01-18 12:02:03", "2016-01-12 21:08:03",
                                             "2016-01-09 21:02:03", "2016-01-03 07:02:03"]
    assert reasons == [["daily 2016-01-18", "weekly 2016-W03"],
                       ["daily 2016-01-12", "weekly 2016-W02"],
                       ["daily 2016-01-09", "weekly 2016-W01"], ["weekly 2015-W53"]]


def test_restic_docs_a_century_of_dailies():
    """restic doc: a backup every day for 100 years and `--keep-daily 7 --keep-weekly 5
    --keep-monthly 12 --keep-yearly 75` keep the 7 newest days, the last day of 4 more
    weeks, of 11 or 12 months and of 74 or 75 years (the newest counts for each)."""
    end = datetime.datetime(2026, 12, 6, 12, tzinfo=UTC)                # a Sunday
    days = [end - datetime.timedelta(days=i) for i in range(36525)][::-1]
    vs = [V(i + 1, int(t.timestamp()) * 10**9) for i, t in enumerate(days)]
    keep, remove, reasons = select(vs, keep_daily=7, keep_weekly=5, keep_monthly=12,
                                   keep_yearly=75, tz=UTC)
    when = {v.version: days[v.version - 1] for v in vs}
    by_rule = {r: [when[v.version] for v, why in zip(keep, reasons)
                   if any(w.startswith(r) for w in why)]
               for r in ("daily", "weekly", "monthly", "yearly")}
    assert by_rule["daily"] == [end - datetime.timedelta(days=i) for i in range(7)]
    assert len(by_rule["weekly"]) == 5 and all(t.weekday() == 6 for t in by_rule["weekly"])
    assert len(by_rule["monthly"]) == 12
    assert all((t + datetime.timedelta(days=1)).day == 1 for t in by_rule["monthly"][1:])
    assert len(by_rule["yearly"]) == 75 and by_rule["yearly"][-1].year == 1952
    assert all((t.month, t.day) == (12, 31) for t in by_rule["yearly"][1:])
    assert len(keep) == len(set().union(*map(set, by_rule.values())))
    assert len(keep) + len(remove) == len(vs)


def test_the_oldest_version_is_kept_while_a_rule_has_room():
    """restic >= 0.17: not enough days for --keep-daily 5: the oldest is kept too."""
    vs = history("2026-12-06 08:00", "2026-12-06 12:00", "2026-12-06 16:00")
    keep, remove, reasons = select(vs, keep_daily=5, tz=UTC)
    assert refs(keep) == [3, 1] and refs(remove) == [2]
    assert reasons == [["daily 2026-12-06"], ["oldest daily 2026-12-06"]]
    keep, remove, _ = select(vs, keep_daily=1, tz=UTC)              # no room left: removed
    assert refs(keep) == [3] and refs(remove) == [2, 1]


def test_weeks_are_iso_weeks_across_the_new_year():
    """2026-12-28 (Mon) to 2027-01-03 (Sun) is one week, 2026-W53."""
    vs = history("2026-12-21 12:00", "2026-12-30 12:00", "2027-01-02 12:00")
    keep, remove, reasons = select(vs, keep_weekly=2, tz=UTC)
    assert refs(keep) == [3, 1] and refs(remove) == [2]
    assert reasons == [["weekly 2026-W53"], ["weekly 2026-W52"]]


def test_days_are_in_the_given_time_zone():
    vs = history("2026-12-05 12:00", "2026-12-06 12:00", "2026-12-06 23:30")
    assert refs(select(vs, keep_daily=2, tz=UTC).keep) == [3, 1]        # Dec 6, Dec 5
    plus2 = datetime.timezone(datetime.timedelta(hours=2))              # 23:30 is Dec 7 there
    keep, _, reasons = select(vs, keep_daily=2, tz=plus2)
    assert refs(keep) == [3, 2] and reasons == [["daily 2026-12-07"], ["daily 2026-12-06"]]


def test_equal_times_the_higher_version_is_newer():
    vs = [V(1, ns("2026-12-06 12:00")), V(2, ns("2026-12-06 12:00"))]
    assert refs(select(vs, keep_last=1).keep) == [2]


def test_policy_text_and_json():
    p = Policy(last=3, weekly=2)
    assert p.describe() == "last 3, weekly 2"
    assert p.to_json()["keep_last"] == 3 and p.to_json()["keep_daily"] == 0


# -- the command, on real processes -------------------------------------------------------

def image(tmp_path, seed: int):
    path = tmp_path / f"v{seed}.img"
    path.write_bytes(random.Random(seed).randbytes(2 * CS + 100))
    return path


def backup_at(store, tmp_path, name: str, t: str):
    """Back up a new image as the next version of NAME, created at UTC time t
    (in-process, with the audit intent a `backup` writes): (result, image bytes)."""
    from hypersdk.node.service.backup import backup
    from hypersdk.node.store import intents as store_intents

    def owe(db, m, version):
        store_intents.add(db, "backup", {"manifest": m.id, "name": m.name, "size": m.size,
                                         "chunks": m.n_chunks, "source": m.source})
    path = image(tmp_path, random.Random(f"{name}{t}").randrange(1 << 30))
    r = backup(store, str(path), name=name, chunk_size=CS, now_ns=lambda: ns(t), extra=owe)
    return r, path.read_bytes()


def backups_at(cli: Cli, tmp_path, name: str, times: list[str]) -> dict[int, bytes]:
    """Versions of NAME created at each UTC time: {version: image bytes}."""
    from hypersdk.node.audit import intents as audit_intents
    from hypersdk.node.store.store import ChunkStore
    out = {}
    with ChunkStore(cli.data_dir) as store:
        for t in times:
            r, data = backup_at(store, tmp_path, name, t)
            out[r.version] = data
        audit_intents.flush(store)
    return out


def sets_at(cli: Cli, tmp_path, name: str, times: list[str]) -> None:
    """VM backup sets NAME@1.. created at each UTC time, two disks each (NAME/disk-a,
    NAME/disk-b), recorded as `backup vsphere://` records them (node/store/vm_sets.py)."""
    from hypersdk.node.audit import intents as audit_intents
    from hypersdk.node.store import vm_sets
    from hypersdk.node.store.store import ChunkStore
    with ChunkStore(cli.data_dir) as store:
        for t in times:
            disks = []
            for key, label in enumerate(("disk-a", "disk-b")):
                r, _ = backup_at(store, tmp_path, f"{name}/{label}", t)
                disks.append({"label": label, "key": 2000 + key, "ref": f"{name}/{label}@{r.version}",
                              "manifest": r.manifest_id.hex(), "capacity": r.size,
                              "change_id": None, "mode": "full", "chunk_size": CS})
            with store.db as db:
                vm_sets.add(db, name, vm_sets.next_version(db, name), ns(t),
                            {"vm": {"name": name}, "source": f"vsphere://u@h/DC/vm/{name}",
                             "disks": disks})
        audit_intents.flush(store)


def entries(cli: Cli, kind: str) -> list[dict]:
    return [e["body"] for e in cli.json("audit", "log", "--limit", "100000") if e["kind"] == kind]


TIMES = ["2026-11-20 12:00", "2026-11-28 12:00", "2026-12-01 12:00", "2026-12-05 12:00",
         "2026-12-06 12:00", "2026-12-08 08:00", "2026-12-08 12:00", "2026-12-09 12:00"]


def test_forget_dry_run_then_forget_removes_exactly_what_it_listed(tmp_path):
    """--keep-daily 3 --keep-weekly 3 over 8 versions: Dec 9 (daily, week 50), Dec 8
    12:00 (daily), Dec 6 (daily, week 49), Nov 28 (week 48) stay; the dry run lists
    that and changes nothing, the real run removes the other four with one delete
    entry each, `gc` reclaims their chunks, and the kept ones still restore."""
    cli = Cli(tmp_path / "data")
    images = backups_at(cli, tmp_path, "vm1", TIMES)
    before = cli.json("backups")
    policy = ("--keep-daily", "3", "--keep-weekly", "3")
    dry = cli.json("forget", "vm1", *policy, "--dry-run", **ENV)
    assert dry["dry_run"] is True
    assert [(d["ref"], d["reasons"]) for d in dry["keep"]] == [
        ("vm1@8", ["daily 2026-12-09", "weekly 2026-W50"]), ("vm1@7", ["daily 2026-12-08"]),
        ("vm1@5", ["daily 2026-12-06", "weekly 2026-W49"]), ("vm1@2", ["weekly 2026-W48"])]
    assert [d["ref"] for d in dry["remove"]] == ["vm1@6", "vm1@4", "vm1@3", "vm1@1"]
    text = cli("forget", "vm1", *policy, "--dry-run", **ENV).stdout
    assert "remove vm1@6" in text and "daily 2026-12-06, weekly 2026-W49" in text
    assert "would remove 4 of 8 version(s)" in text and "nothing changed" in text
    assert cli.json("backups") == before and entries(cli, "delete") == []

    done = cli.json("forget", "vm1", *policy, **ENV)
    assert done["dry_run"] is False
    assert (done["keep"], done["remove"]) == (dry["keep"], dry["remove"])
    assert [b["ref"] for b in cli.json("backups")] == ["vm1@2", "vm1@5", "vm1@7", "vm1@8"]
    gone = {d["manifest"]: d["version"] for d in dry["remove"]}
    deletes = entries(cli, "delete")
    assert sorted((e["manifest"], e["name"], e["version"]) for e in deletes) == \
        sorted((m, "vm1", v) for m, v in gone.items())
    assert check_exactly_once(cli) == {"backups": 4, "backup_entries": 8, "delete_entries": 4}
    assert cli.json("gc")["chunks_deleted"] >= 4 * 2            # their own random chunks
    for v in (2, 8):
        out = tmp_path / f"r{v}.img"
        cli("restore", f"vm1@{v}", out)
        assert out.read_bytes() == images[v]
    again = cli.json("forget", "vm1", *policy, **ENV)          # the same policy: a fixpoint
    assert again["remove"] == [] and len(again["keep"]) == 4


def test_forget_all_applies_the_policy_to_each_name_on_its_own(tmp_path):
    cli = Cli(tmp_path / "data")
    backups_at(cli, tmp_path, "a", TIMES[:3])
    backups_at(cli, tmp_path, "b", TIMES[3:5])
    doc = cli.json("forget", "--all", "--keep-last", "1", **ENV)
    assert [d["ref"] for d in doc["keep"]] == ["a@3", "b@2"]
    assert [d["ref"] for d in doc["remove"]] == ["a@2", "a@1", "b@1"]
    assert [b["ref"] for b in cli.json("backups")] == ["a@3", "b@2"]
    assert check_exactly_once(cli)["delete_entries"] == 3


def test_days_follow_the_time_zone_of_the_process(tmp_path):
    cli = Cli(tmp_path / "data")
    backups_at(cli, tmp_path, "z", ["2026-12-05 12:00", "2026-12-06 12:00", "2026-12-06 23:30"])
    utc = cli.json("forget", "z", "--keep-daily", "2", "--dry-run", TZ="UTC")
    east = cli.json("forget", "z", "--keep-daily", "2", "--dry-run", TZ="Etc/GMT-2")  # UTC+2
    assert [d["ref"] for d in utc["keep"]] == ["z@3", "z@1"]
    assert [d["ref"] for d in east["keep"]] == ["z@3", "z@2"]
    assert east["keep"][0]["reasons"] == ["daily 2026-12-07"]


@pytest.mark.parametrize("args, code, fragments", [
    (["forget", "vm1"], 2, ["forget needs a policy", "--keep-last"]),
    (["forget", "vm1", "--keep-last", "0"], 2, ["forget needs a policy"]),
    (["forget", "vm1", "--keep-daily", "-1"], 2, ["--keep-daily -1: must be"]),
    (["forget", "vm1", "--keep-last", "two"], 2, ["'two' is not a valid integer"]),
    (["forget", "nosuch", "--keep-last", "1"], 1, ["no backup named 'nosuch'"]),
    (["forget", "vm1@2", "--keep-last", "1"], 2, ["not a version ('vm1@2')"]),
    (["forget", "--keep-last", "1"], 2, ["one backup NAME, or --all"]),
    (["forget", "vm1", "--all", "--keep-last", "1"], 2, ["one backup NAME, or --all"]),
])
def test_bad_input_is_one_clear_line_and_changes_nothing(tmp_path, args, code, fragments):
    from test_cli import one_error_line
    cli = Cli(tmp_path / "data")
    backups_at(cli, tmp_path, "vm1", TIMES[:3])
    before = cli.json("backups")
    p = cli(*args, ok=False, **ENV)
    one_error_line(p, *fragments)
    assert p.returncode == code
    p = cli(*args, "--json", ok=False, **ENV)                  # under --json: the document too
    assert json.loads(p.stdout)["exit"] == code
    assert cli.json("backups") == before and entries(cli, "delete") == []


def test_forget_on_a_missing_data_dir_leaves_none_behind(tmp_path):
    cli = Cli(tmp_path / "data")
    p = cli("forget", "vm1", "--keep-last", "1", ok=False)
    assert "no backup named 'vm1'" in p.stderr and not cli.data_dir.exists()


def test_a_kill_after_the_commit_still_gives_one_delete_entry_per_removal(tmp_path):
    cli = Cli(tmp_path / "data")
    backups_at(cli, tmp_path, "vm1", TIMES[:4])
    p = cli("forget", "vm1", "--keep-last", "1", ok=None, HYPERSDK_TEST_CRASH_AT="delete-committed")
    assert p.returncode == -signal.SIGKILL
    assert [b["ref"] for b in cli.json("backups")] == ["vm1@4"]
    assert check_exactly_once(cli) == {"backups": 1, "backup_entries": 4, "delete_entries": 3}


@pytest.fixture
def node_cli(tmp_path):
    from test_node_cli import Node, status
    cli = Cli(tmp_path / "data")
    cli("node", "init")
    n = Node(cli, env=ENV)
    try:
        n.wait_ready()
        yield cli, n, status
    finally:
        n.kill()


def test_forget_runs_in_the_node_when_one_runs(tmp_path, node_cli):
    """With a node on the data dir the CLI sends `forget` to it (daemon ARGS); the node's
    time zone (TZ=UTC here) decides the days."""
    cli, n, status = node_cli
    backups_at(cli, tmp_path, "vm1", TIMES)
    doc = cli.json("forget", "vm1", "--keep-daily", "3", "--keep-weekly", "3")
    assert [d["ref"] for d in doc["keep"]] == ["vm1@8", "vm1@7", "vm1@5", "vm1@2"]
    assert status(cli)["served"].get("forget") == 1
    assert [b["ref"] for b in cli.json("backups")] == ["vm1@2", "vm1@5", "vm1@7", "vm1@8"]
    p = cli("forget", "vm1", ok=False)                     # refused before reaching the node
    assert "forget needs a policy" in p.stderr
    assert check_exactly_once(cli)["delete_entries"] == 4


# -- VM backup sets ------------------------------------------------------------------------

class ImagesOnly(Cli):
    """check_exactly_once's view: the image backups (a set's disks are image backups;
    the set rows themselves have no manifest and no audit entry of their own)."""

    def json(self, *args, **kw):
        doc = super().json(*args, **kw)
        return [d for d in doc if d.get("kind") != "vm"] if args[:1] == ("backups",) else doc


def exactly_once(cli: Cli) -> dict:
    return check_exactly_once(ImagesOnly(cli.data_dir))


def listed(cli: Cli) -> tuple[list[str], list[str]]:
    docs = cli.json("backups")
    return ([d["ref"] for d in docs if d.get("kind") == "vm"],
            [d["ref"] for d in docs if d.get("kind") != "vm"])


def test_vm_sets_are_forgotten_and_deleted_whole_and_never_one_disk_alone(tmp_path):
    from test_cli import one_error_line
    cli = Cli(tmp_path / "data")
    sets_at(cli, tmp_path, "web", TIMES[:3])
    backups_at(cli, tmp_path, "img", TIMES[:2])
    before = cli.json("backups")
    # one disk of a set, alone: refused, nothing changed
    p = cli("delete", "web/disk-a@3", ok=False)
    one_error_line(p, "web/disk-a@3 is a disk of VM backup web@3", "hypersdk delete web@3")
    p = cli("forget", "web/disk-b", "--keep-last", "1", ok=False, **ENV)
    one_error_line(p, "disk backups of the VM backup 'web'", "forget 'web' instead")
    dry = cli.json("forget", "web", "--keep-last", "1", "--dry-run", **ENV)
    assert [(d["ref"], d["kind"]) for d in dry["keep"]] == [("web@3", "vm")]
    assert [(d["ref"], d["disks"]) for d in dry["remove"]] == [
        ("web@2", ["web/disk-a@2", "web/disk-b@2"]), ("web@1", ["web/disk-a@1", "web/disk-b@1"])]
    assert cli.json("backups") == before and entries(cli, "delete") == []

    # --all: the set's versions as one name, its disks with it, the image on its own
    doc = cli.json("forget", "--all", "--keep-last", "1", **ENV)
    assert [d["ref"] for d in doc["remove"]] == ["web@2", "web@1", "img@1"]
    assert listed(cli) == (["web@3"], ["img@2", "web/disk-a@3", "web/disk-b@3"])
    assert sorted((e["name"], e["version"]) for e in entries(cli, "delete")) == [
        ("img", 1), ("web/disk-a", 1), ("web/disk-a", 2), ("web/disk-b", 1), ("web/disk-b", 2)]
    assert exactly_once(cli) == {"backups": 3, "backup_entries": 8, "delete_entries": 5}

    # delete NAME: the latest set, with its disk backups
    d = cli.json("delete", "web")
    assert d["deleted"]["ref"] == "web@3" and d["deleted"]["kind"] == "vm"
    assert [b["ref"] for b in d["backups_deleted"]] == ["web/disk-a@3", "web/disk-b@3"]
    assert listed(cli) == ([], ["img@2"])
    assert exactly_once(cli) == {"backups": 1, "backup_entries": 8, "delete_entries": 7}
    p = cli("delete", "web@3", ok=False)
    one_error_line(p, "no backup 'web@3'")


def test_delete_text_of_a_set(tmp_path):
    cli = Cli(tmp_path / "data")
    sets_at(cli, tmp_path, "web", TIMES[:2])
    out = cli("delete", "web@1").stdout
    assert out.strip() == ("deleted VM backup web@1 and its 2 disk backup(s) (web/disk-a@1, "
                           "web/disk-b@1); run `hypersdk gc` to reclaim space")
    assert listed(cli) == (["web@2"], ["web/disk-a@2", "web/disk-b@2"])


def test_a_set_and_its_disk_backups_go_in_one_transaction(tmp_path):
    """A failure while removing the second disk backup leaves the set, both disk
    backups and no audit intent: nothing of it was removed."""
    from hypersdk.node.store import catalog, vm_sets
    from hypersdk.node.store import intents as store_intents
    from hypersdk.node.store.store import ChunkStore
    cli = Cli(tmp_path / "data")
    sets_at(cli, tmp_path, "web", TIMES[:1])
    with ChunkStore(cli.data_dir) as store:
        s = vm_sets.resolve(store.db, "web@1")

        def owe_then_fail(db, name, version, manifest):
            store_intents.add(db, "delete", {"manifest": manifest, "name": name,
                                             "version": version})
            if name.endswith("disk-b"):
                raise OSError("disk full")
        with pytest.raises(OSError):
            vm_sets.delete_set(store.db, s, extra=owe_then_fail)
        assert vm_sets.resolve(store.db, "web@1") == s
        assert [b.ref for b in catalog.list_backups(store)] == ["web/disk-a@1", "web/disk-b@1"]
        assert store_intents.pending(store) == []
        assert vm_sets.owner(store.db, "web/disk-b", 1, bytes.fromhex(s.doc["disks"][1]["manifest"])) == s
        assert vm_sets.owner(store.db, "web/disk-b", 1, b"\0" * 32) is None   # another manifest
        gone = vm_sets.delete_set(store.db, s)
        assert [(n, v) for n, v, _ in gone] == [("web/disk-a", 1), ("web/disk-b", 1)]
        assert vm_sets.list_sets(store.db) == [] and catalog.list_backups(store) == []


@pytest.fixture(scope="module")
def vcsim():
    from vcsim_helpers import vcsim_binary
    return vcsim_binary()


def test_vm_backups_from_vsphere_forgotten_then_deleted(tmp_path, vcsim):
    """Three backups of a vcsim VM; `forget --keep-last 1` removes two sets and their
    disk backups; the kept set restores byte-identical and stays the base of the next
    incremental backup; `delete NAME@N` removes a set; one delete entry per disk backup."""
    from test_cli import one_error_line
    from test_vm_backup import PW, VM, mutate, restored
    from test_vm_backup import image as vm_image
    from vcsim_helpers import Vcsim
    MiB = 1 << 20
    cli = Cli(tmp_path / "data")
    with Vcsim(vcsim, tmp_path / "sim") as sim:
        img = vm_image(4 * MiB, 7, [(0, MiB)])
        live = sim.set_disk(VM, bytes(img))
        for i in range(3):
            if i:
                mutate(live, img, [(i * MiB, 4096)], i)
            cli.json("backup", sim.url(VM), "--insecure", "--name", "web", **PW)
        doc = cli.json("forget", "web", "--keep-last", "1", **ENV)
        assert [d["ref"] for d in doc["keep"]] == ["web@3"]
        assert [d["ref"] for d in doc["remove"]] == ["web@2", "web@1"]
        assert listed(cli) == (["web@3"], ["web/disk-202-0@3"])
        one_error_line(cli("delete", "web/disk-202-0@3", ok=False), "is a disk of VM backup web@3")
        assert list(restored(cli, "web@3", tmp_path / "r3").values()) == [bytes(img)]
        mutate(live, img, [(3 * MiB, 4096)], 3)
        inc = cli.json("backup", sim.url(VM), "--insecure", "--name", "web", **PW)
        assert inc["ref"] == "web@4" and inc["disks"][0]["mode"] == "incremental"
    d = cli.json("delete", "web@3")
    assert [b["ref"] for b in d["backups_deleted"]] == ["web/disk-202-0@3"]
    assert listed(cli) == (["web@4"], ["web/disk-202-0@4"])
    assert sorted((e["name"], e["version"]) for e in entries(cli, "delete")) == [
        ("web/disk-202-0", 1), ("web/disk-202-0", 2), ("web/disk-202-0", 3)]
    assert exactly_once(cli) == {"backups": 1, "backup_entries": 4, "delete_entries": 3}
    assert list(restored(cli, "web@4", tmp_path / "r4").values()) == [bytes(img)]


def test_copies_held_for_other_members_are_not_forgotten(tmp_path, store):
    """`forget --all` at a site that holds other members' replicas thins only its own
    backups: a replica goes when its author deletes it, never by our policy."""
    from hypersdk.node.service.backup import backup as run_backup
    from hypersdk.node.service.ops import STORE_OPS
    from hypersdk.node.store import catalog

    img = mixed_image(tmp_path / "x.img", 3 << 16, chunk=1 << 16)
    for t in (1, 2):
        run_backup(store, str(img), name="own", chunk_size=1 << 16, now_ns=lambda t=t: t * 10**18)
    for t in (3, 4):
        img.write_bytes(bytes([t]) * (3 << 16))
        run_backup(store, str(img), name="theirs", chunk_size=1 << 16,
                   now_ns=lambda t=t: t * 10**18)
    with store.db:                              # two copies held for another member
        store.db.execute("""UPDATE backups SET stats='{"replica": true}' WHERE name='theirs'""")

    class Ui:
        on_wait = None
    doc, _, code = STORE_OPS["forget"].fn(store, {"all": True, "keep_last": 1}, Ui())
    assert code == 0 and [d["ref"] for d in doc["remove"]] == ["own@1"]
    assert {b.ref for b in catalog.list_backups(store)} == {"own@2", "theirs@1", "theirs@2"}
