"""The architecture is enforced, not just described (issue 15, DESIGN.md "Layout").

- import-linter's contracts (pyproject.toml [tool.importlinter]): protocol/ and
  dht/ import no trio, sockets, files, clocks or databases; the node's layers
  cli -> daemon -> service -> audit -> exchange | kademlia -> store | sources ->
  net only ever import downwards; only the CLI reaches simnet;
- no import cycles between any two modules (function-level imports included);
- ruff finds nothing;
- the installed distribution has one top-level package, hypersdk, and the
  package list in pyproject.toml names every package folder of the tree;
- node/ keeps its concepts in subpackages: only a handful of modules at its top.
"""
from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from conftest import REPO

BIN = Path(sys.executable).parent


def _run(*cmd, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([*map(str, cmd)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def test_import_contracts_hold():
    p = _run(BIN / "lint-imports", "--no-cache")
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    assert "0 broken" in p.stdout


def test_ruff_finds_nothing():
    p = _run(BIN / "ruff", "check", ".")
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]


def _cycles(adj: dict[str, list[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (iterative Tarjan)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in adj:
        if root in index:
            continue
        work = [(root, iter(adj[root]))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(adj.get(w, ()))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c"]]
    assert _cycles({"a": ["b"], "b": []}) == []


def test_no_import_cycles():
    import grimp
    g = grimp.build_graph("hypersdk")
    mods = [m for m in g.modules if m.startswith("hypersdk")]
    adj = {m: sorted(x for x in g.find_modules_directly_imported_by(m)
                     if x.startswith("hypersdk") and x != m) for m in mods}
    assert _cycles(adj) == []


def _package_dirs() -> set[str]:
    out = set()
    for top in ("node", "dht", "protocol", "simnet"):
        for init in (REPO / top).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO).parts
            out.add(".".join(("hypersdk",) + rel))
    return out | {"hypersdk"}


def test_pyproject_lists_every_package_of_the_tree():
    conf = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert set(conf["packages"]) == _package_dirs()


def test_node_keeps_its_concepts_in_subpackages():
    top = sorted(p.name for p in (REPO / "node").glob("*.py") if p.name != "__init__.py")
    assert len(top) <= 4, f"node/ has {len(top)} modules at its top: {top}"
    for pkg in (REPO / "node").iterdir():
        if (pkg / "__init__.py").exists():
            doc = (pkg / "__init__.py").read_text()
            assert doc.lstrip().startswith('"""'), f"node/{pkg.name} says nothing of itself"


@pytest.mark.slow
def test_the_wheel_installs_only_hypersdk_at_top_level(tmp_path):
    p = _run(sys.executable, "-m", "pip", "wheel", "--no-deps",
             "-q", "-w", tmp_path, ".", timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    (wheel,) = tmp_path.glob("hypersdk-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"hypersdk"}, tops
    for must in ("hypersdk/node/store/store.py", "hypersdk/protocol/audit.py",
                 "hypersdk/dht/routing.py", "hypersdk/simnet/runner.py"):
        assert must in names
