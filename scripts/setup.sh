#!/bin/sh
# Set up a fresh Debian 12 (Python 3.11 + apt) and run the demo or the tests.
#   sh scripts/setup.sh demo          set up, then run scripts/demo.sh
#   sh scripts/setup.sh test [ARGS]   set up, then run pytest ARGS (slow tests only in
#                                     CI, i.e. CI=true, or with HYPERSDK_SLOW=1)
set -eu
cd "$(dirname "$0")/.."
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo
# gcc + libgmp-dev build fastecdsa (a py-libp2p dependency); e2fsprogs + zstd
# are what ../shared/bench/make_image.py needs to build realistic disk images;
# qemu-utils (qemu-img) writes the streamOptimized VMDKs the VMDK reader's tests read;
# golang-go + golang-github-vmware-govmomi-dev + patch build the vSphere simulator
# (../shared/vcsim/build-vcsim.sh, run by scripts/vcsim.py for the tests and the demo).
PKGS="python3-venv python3-dev gcc libgmp-dev e2fsprogs zstd qemu-utils golang-go
      golang-github-vmware-govmomi-dev patch"
missing=""
for p in $PKGS; do
    dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
done
if [ -n "$missing" ]; then
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
what=${1:-}
[ $# -gt 0 ] && shift
case "$what" in
    demo) exec sh scripts/demo.sh "$@" ;;
    # slow tests (@pytest.mark.slow: the 1000-node gossip, 3000-node lookups, kill
    # storms, 20 processes) run in CI (which sets CI=true) or with HYPERSDK_SLOW=1
    test) if [ "${CI:-}" = true ] || [ "${HYPERSDK_SLOW:-}" = 1 ]; then
              exec .venv/bin/python -m pytest "$@"
          fi
          exec .venv/bin/python -m pytest -m "not slow" "$@" ;;
    *) echo "usage: sh scripts/setup.sh demo|test [pytest args]" >&2; exit 2 ;;
esac
