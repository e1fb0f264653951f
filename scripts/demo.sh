#!/bin/sh
# Demo of what the node does today: back up a realistic VM disk image, change
# it, back it up again (only the changed chunks are stored), restore, verify.
# Runs in a throw-away data dir; set DEMO_SIZE (default 256M) for a bigger disk.
set -eu
cd "$(dirname "$0")/.."
H="$PWD/.venv/bin/hypersdk"
SIZE=${DEMO_SIZE:-256M}
WORK=$(mktemp -d /tmp/hypersdk-demo.XXXXXX)
export HYPERSDK_DATA_DIR="$WORK/store"
trap 'rm -rf "$WORK"' EXIT
step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

MAKE_IMAGE=../shared/bench/make_image.py
echo "== building a $SIZE ext4 disk image (day 1) and its next-day version (day 2)"
if [ -f "$MAKE_IMAGE" ]; then
    python3 "$MAKE_IMAGE" v1 "$WORK/disk.img" --size "$SIZE" --seed 1 2>/dev/null
    python3 "$MAKE_IMAGE" v2 "$WORK/disk.img" "$WORK/disk-day2.img" --seed 2 2>/dev/null
else
    .venv/bin/python scripts/synthetic_image.py "$WORK/disk.img" "$WORK/disk-day2.img" "$SIZE"
fi

step "$H" backup "$WORK/disk.img" --name vm-web01
cp "$WORK/disk-day2.img" "$WORK/disk.img"        # the VM ran for a day
step "$H" backup "$WORK/disk.img" --name vm-web01
echo "(day 2 stores only what changed: new chunks as zstd deltas against day 1's)"
step "$H" backups
step "$H" store stats
step "$H" restore vm-web01@1 "$WORK/restored-day1.img"
step "$H" restore vm-web01 "$WORK/restored-day2.img"
echo
echo "== byte-identical? (sha256 of the day-2 source and its restore)"
sha256sum "$WORK/disk-day2.img" "$WORK/restored-day2.img"
cmp "$WORK/disk-day2.img" "$WORK/restored-day2.img" && echo "identical"
echo "sparse restore: apparent $(du -h --apparent-size "$WORK/restored-day2.img" | cut -f1), on disk $(du -h "$WORK/restored-day2.img" | cut -f1)"
step "$H" verify
step "$H" delete vm-web01@1
echo "(day-1 chunks that day 2 changed stay: they are the bases of day 2's delta chunks)"
step "$H" gc
step "$H" verify vm-web01
step "$H" store stats
