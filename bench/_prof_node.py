"""Bench-only: run `hypersdk ARGS` under cProfile; stats to $HYPERSDK_DATA_DIR/node.prof
(written at exit, SIGTERM included)."""
import cProfile
import os
import signal
import sys

from hypersdk.node.cli.app import main  # noqa: E402

prof = cProfile.Profile()
out = os.path.join(os.environ.get("HYPERSDK_DATA_DIR", "."), "node.prof")


def _term(*_):
    raise SystemExit(0)


signal.signal(signal.SIGTERM, _term)
sys.argv = ["hypersdk", *sys.argv[1:]]
prof.enable()
try:
    main()
finally:
    prof.disable()
    prof.dump_stats(out)
