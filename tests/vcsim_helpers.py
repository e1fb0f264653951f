"""vcsim for tests: scripts/vcsim.py (the simulator itself, shared with the demo and
the benchmarks), skipped with the reason when it cannot be built here."""
from __future__ import annotations

import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
from vcsim import PASSWORD, USER, BuildFailed, Vcsim, build  # noqa: E402

__all__ = ["PASSWORD", "USER", "Vcsim", "vcsim_binary"]


def vcsim_binary():
    try:
        return build()
    except BuildFailed as exc:
        if "not available" in str(exc):
            pytest.skip(str(exc))
        pytest.fail(str(exc))
