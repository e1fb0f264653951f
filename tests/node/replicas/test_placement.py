"""Choosing holders (node/replicas/placement.py) and the replication policy file
(node/replicas/policy.py)."""
from __future__ import annotations

import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hypersdk.node.errors import UserError
from hypersdk.node.replicas.placement import Candidate, choose, distance
from hypersdk.node.replicas.policy import Policy, set_rule

MID = bytes(32)


def _c(i: int, site: str, free: int = 10**9) -> Candidate:
    return Candidate(i.to_bytes(32, "big"), site, free)


def test_distinct_sites_never_the_authors_nearest_first():
    cands = [_c(1, "hq"), _c(2, "b"), _c(3, "b"), _c(9, "c"), _c(5, "d")]
    got = choose(MID, 100, 2, cands, author_site="hq")
    assert [(c.site, c.node_id[-1]) for c in got] == [("b", 2), ("d", 5)]
    # more copies than sites: the rest go to more nodes of the other sites, nearest
    # first, never the author's site
    assert choose(MID, 100, 5, cands, author_site="hq") == [cands[1], cands[4], cands[3],
                                                           cands[2]]
    # sites taken already, nodes excluded, offers too small
    assert choose(MID, 100, 2, cands, author_site="hq", taken_sites={"b"}) == [cands[4], cands[3]]
    assert choose(MID, 100, 3, cands, author_site="hq", taken_sites={"b", "c", "d"},
                  excluded={cands[3].node_id, cands[4].node_id}) == [cands[1], cands[2]]
    assert choose(MID, 100, 1, cands, author_site="hq", excluded={cands[1].node_id}) == [cands[2]]
    small = [_c(2, "b", 99), _c(3, "b", 100)]
    assert choose(MID, 100, 1, small, author_site="hq") == [small[1]]
    assert choose(MID, 100, 0, cands, author_site="hq") == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2**16), st.sampled_from("abcdef"),
                          st.integers(0, 200)), max_size=30),
       st.integers(0, 8), st.binary(min_size=32, max_size=32))
def test_choices_obey_every_rule(raw, need, mid):
    cands = list({i: Candidate(i.to_bytes(32, "big"), s, f) for i, s, f in raw}.values())
    got = choose(mid, 100, need, cands, author_site="a", taken_sites={"f"})
    ids = [c.node_id for c in got]
    assert len(got) <= need and len(set(ids)) == len(ids)
    assert all(c.site != "a" and c.free >= 100 for c in got)
    fresh = {c.site for c in cands if c.site not in ("a", "f") and c.free >= 100}
    nodes = {c.node_id for c in cands if c.site != "a" and c.free >= 100}
    assert len(got) == min(need, len(nodes))               # as many as there are
    first = got[:len(fresh)]                               # new sites first, one node each,
    assert len({c.site for c in first}) == len(first) == min(need, len(fresh))
    assert all(c.site in fresh for c in first)
    for c in first:                                        # each its site's nearest node
        assert all(distance(c.node_id, mid) <= distance(o.node_id, mid) for o in cands
                   if o.site == c.site and o.free >= 100)


def test_policy_file_defaults_names_and_vm_disks(tmp_path):
    assert Policy.load(tmp_path).rule("x").replicas == 2
    assert Policy.load(tmp_path, 0).rule("x").replicas == 0     # node run --replicas 0
    set_rule(tmp_path, "db", 3, 2)
    pol = set_rule(tmp_path, None, 1, None)
    assert pol.rule("db").to_json() == {"replicas": 3, "min": 2}
    assert pol.rule("web").to_json() == {"replicas": 1, "min": 1}
    set_rule(tmp_path, "vm", 4, None)
    assert Policy.load(tmp_path).rule("vm/disk-202-0").replicas == 4   # a VM set's disk
    assert (os.stat(tmp_path / "policy.json").st_mode & 0o777) in (0o600, 0o644)
    assert Policy.load(tmp_path, 5).rule("db").replicas == 3    # names beat the default


@pytest.mark.parametrize("doc, why", [
    ("not json", "not JSON"), ([], "expected"), ({"names": []}, "names"),
    ({"default": {"replicas": -1}}, "0..16"), ({"default": {"replicas": 2, "min": 3}}, "more"),
    ({"names": {"x": {"copies": 2}}}, "expected"), ({"extra": 1}, "expected"),
])
def test_a_malformed_policy_file_is_one_clear_error(tmp_path, doc, why):
    (tmp_path / "policy.json").write_text(doc if isinstance(doc, str) else json.dumps(doc))
    with pytest.raises(UserError, match=why):
        Policy.load(tmp_path)


def test_policy_cli(tmp_path):
    from conftest import Cli
    cli = Cli(tmp_path / "data")
    assert cli.json("policy", "show") == {"default": {"replicas": 2, "min": 2}, "names": {}}
    assert "db: 3 replica(s) on other sites, under-replicated below 1" in cli(
        "policy", "set", "db", "--replicas", "3", "--min", "1").stdout
    cli("policy", "set", "--default", "--replicas", "1")
    assert cli.json("policy", "show") == {"default": {"replicas": 1, "min": 1},
                                          "names": {"db": {"replicas": 3, "min": 1}}}
    for bad in (["set", "db", "--default", "--replicas", "1"], ["set", "--replicas", "1"],
                ["set", "db", "--replicas", "2", "--min", "3"], ["set", "db", "--replicas", "17"]):
        p = cli("policy", *bad, ok=False)
        assert p.returncode != 0 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert cli.json("policy", "show")["names"] == {"db": {"replicas": 3, "min": 1}}
