#!/bin/sh
# Demo of what the node does today:
#  1. one store: back up a realistic VM disk image, change it, back it up again
#     (only the changed chunks are stored), restore, verify, delete, gc;
#  2. a local network of real nodes on 127.0.0.1 (libp2p): membership, A's backup
#     replicated by itself to two other sites (B storage-only, C), E restores it
#     from every holder at once (swarm), peers/status, and C verifies the backup
#     on the network from the gossiped audit logs;
#  3. vSphere: a VM backed up from vcsim (snapshot + Changed Block Tracking),
#     changed, backed up incrementally (only changed blocks read), restored;
#  4. simnet: a simulated network of 150 nodes on virtual time, a fifth of them
#     hostile (eclipse + provider-record flood), replication through churn and a
#     site's loss (a 300-node model, then 12 whole nodes running the daemon's
#     services), then audit-log gossip.
# Runs in a throw-away dir; set DEMO_SIZE (default 256M) for a bigger disk.
set -eu
cd "$(dirname "$0")/.."
H="$PWD/.venv/bin/hypersdk"
SIZE=${DEMO_SIZE:-256M}
WORK=$(mktemp -d /tmp/hypersdk-demo.XXXXXX)
export HYPERSDK_DATA_DIR="$WORK/store"
cleanup() {   # stop the nodes (start_node runs in $(...) subshells: pids go to a file)
    PIDS=$(cat "$WORK/node.pids" 2>/dev/null || true)
    for p in $PIDS; do kill "$p" 2>/dev/null || true; done
    for p in $PIDS; do   # bounded wait for each node to exit cleanly
        i=0; while kill -0 "$p" 2>/dev/null && [ $i -lt 100 ]; do i=$((i + 1)); sleep 0.1; done
    done
    rm -rf "$WORK"
}
trap cleanup EXIT
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

echo
echo "== a thin (sparse) copy of the disk, as VM exports usually are: holes are skipped, not read"
cp --sparse=always "$WORK/disk-day2.img" "$WORK/thin.img"
echo "thin.img: apparent $(du -h --apparent-size "$WORK/thin.img" | cut -f1), on disk $(du -h "$WORK/thin.img" | cut -f1)"
step "$H" backup "$WORK/thin.img" --name vm-thin
step "$H" restore vm-thin "$WORK/restored-thin.img"
cmp "$WORK/thin.img" "$WORK/restored-thin.img" && echo "identical"
echo "(verify --against compares a backup with its source chunk by chunk: the check for"
echo " backups of sparse sources made before this release, which verify cannot see)"
step "$H" verify vm-thin --against "$WORK/thin.img"

echo
echo "== a local network: three nodes on 127.0.0.1 (libp2p: TCP, Noise, Yamux)"
export HYPERSDK_AUDIT_SYNC=2     # audit anti-entropy every 2 s (default 30) for the demo
start_node() {     # start_node DIR [--bootstrap ADDR]: run a node, wait for its address
    dir=$1; shift
    [ -f "$dir/node.key" ] || "$H" --data-dir "$dir" node init >/dev/null
    "$H" --data-dir "$dir" node run --listen /ip4/127.0.0.1/tcp/0 "$@" >"$dir.log" 2>&1 &
    echo $! >> "$WORK/node.pids"
    i=0
    until [ -s "$dir/node.addrs" ]; do
        i=$((i + 1)); [ $i -le 300 ] || { echo "node $dir did not start"; cat "$dir.log"; exit 1; }
        sleep 0.1
    done
    head -n1 "$dir/node.addrs"
}
A=$(start_node "$HYPERSDK_DATA_DIR" --replicate-interval 1)
echo "node A (holds the backups) at $A"
B=$(start_node "$WORK/b" --bootstrap "$A" --replicate-interval 1); echo "node B at $B"
C=$(start_node "$WORK/c" --bootstrap "$A" --replicate-interval 1); echo "node C at $C"
echo
echo "== membership: A creates a network and invites B and C with one-time tokens;"
echo "   from then on every connection proves membership before anything runs on it."
echo "   B is a storage-only site (--no-data-key): it will hold replicas it cannot read"
step "$H" network create --name demo-net --site hq
TOKEN_B=$("$H" invite --site vault --no-data-key --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
TOKEN_C=$("$H" invite --site branch-2 --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
step "$H" --data-dir "$WORK/b" join "$TOKEN_B"
step "$H" --data-dir "$WORK/c" join "$TOKEN_C"
echo "(a node belongs to one network, and each token works once:)"
"$H" --data-dir "$WORK/c" join "$TOKEN_B" || true
step "$H" members
echo "(a stranger, D, with a fresh key: refused at the handshake, it learns nothing else)"
D=$(start_node "$WORK/d"); echo "node D at $D"
"$H" --data-dir "$WORK/d" join "$A" || true
"$H" status --json | python3 -c 'import json,sys; m=json.load(sys.stdin)["membership"]; print("A:", m["mode"], {k: v for k, v in m["counters"].items() if k.startswith("refused")})'
step "$H" --data-dir "$WORK/b" key show
echo "(A backs up the day-2 disk again, now with the network's data key: sealed at rest;"
echo " its earlier backups stay as they were, readable by any member)"
step "$H" backup "$WORK/disk-day2.img" --name vm-web01
MID=$("$H" backups --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[-1]["manifest"])')
echo "(B and C know only the manifest id $MID; they find its holders in the DHT)"
wait_providers() {  # wait_providers DIR N: until DIR's node finds N holders of $MID
    i=0
    until [ "$("$H" --data-dir "$1" dht find "$MID" --count "$2" --json |
               python3 -c 'import json,sys; print(len(json.load(sys.stdin)["providers"]))')" -ge "$2" ]; do
        i=$((i + 1)); [ $i -le 100 ] || { echo "fewer than $2 holders of $MID found"; exit 1; }
        sleep 0.1
    done
}
echo
echo "== replication: nobody types fetch. A keeps 2 copies of each backup on other sites"
echo "   (never its own), B at site vault and C at site branch-2 pull them from the swarm,"
echo "   and A signs a replica entry for each holder once it holds the whole copy"
i=0
until "$H" status --json | python3 -c '
import json, sys
r = json.load(sys.stdin)["replication"]
sys.exit(0 if not any(q["manifest"] == sys.argv[1] for q in r["queue"]) and r["confirmed"] else 1)' "$MID"; do
    i=$((i + 1)); [ $i -le 600 ] || { echo "A's backup did not reach two other sites"; exit 1; }
    sleep 0.1
done
"$H" status --json | python3 -c '
import json, sys
r = json.load(sys.stdin)["replication"]
state, n, q = r["state"], r["confirmed"], len(r["queue"])
print(f"A: {state}; copies confirmed {n}, backups waiting {q}")'
"$H" audit log --json | python3 -c '
import json, sys
for e in json.load(sys.stdin):
    b = e["body"]
    if e["kind"] == "replica" and b["manifest"] == sys.argv[1]:
        print("  A signed: replica of", b["manifest"][:16], "held by", b["holder"][:16])' "$MID"
step "$H" policy show
echo "(any member lists the network's backups from the gossiped logs, with their copies)"
i=0
until [ "$("$H" --data-dir "$WORK/c" backups --network --json | python3 -c '
import json, sys
print(max([r["copies"] for r in json.load(sys.stdin) if r["manifest"] == sys.argv[1]] or [0]))' "$MID")" -ge 2 ]; do
    i=$((i + 1)); [ $i -le 300 ] || { echo "C did not learn of the copies"; exit 1; }
    sleep 0.1
done
step "$H" --data-dir "$WORK/c" backups --network
step "$H" --data-dir "$WORK/b" backups
echo "(B cannot read what it holds, nor even its name:)"
"$H" --data-dir "$WORK/b" restore "$MID" "$WORK/restored-on-b.img" || true
echo "(E, a new member at a fourth site, restores from every holder at once)"
TOKEN_E=$("$H" invite --site branch-3 --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
E=$(start_node "$WORK/e" --bootstrap "$A"); echo "node E at $E"
step "$H" --data-dir "$WORK/e" join "$TOKEN_E"
wait_providers "$WORK/e" 3
"$H" --data-dir "$WORK/e" restore "$MID" "$WORK/restored-on-c.img" --json > "$WORK/c-restore.json"
python3 - "$WORK/c-restore.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
f = d["fetched"]
print(f"E restored {d['out']}: fetched {f['chunks_fetched']} chunks "
      f"({f['bytes_fetched']} bytes) in {f['seconds']:.2f} s from {len(f['bytes_by_peer'])} peers:")
for peer, n in sorted(f["bytes_by_peer"].items()):
    print(f"  {peer[:16]}  {n} bytes")
PY
cmp "$WORK/disk-day2.img" "$WORK/restored-on-c.img" && echo "E's restore is byte-identical to the day-2 disk (B's sealed records checked under the key)"
step "$H" --data-dir "$WORK/c" peers
step "$H" --data-dir "$WORK/c" status

echo
echo "== audit gossip: C holds A's signed log, and verifies A's backup on the network"
A_ID=$("$H" status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["node_id"])')
i=0
until "$H" --data-dir "$WORK/c" audit log "$A_ID" --json 2>/dev/null |
      python3 -c 'import json,sys; sys.exit(0 if any(e["kind"] == "backup" for e in json.load(sys.stdin)) else 1)'; do
    i=$((i + 1)); [ $i -le 300 ] || { echo "A's log did not reach C"; exit 1; }
    sleep 0.1
done
step "$H" --data-dir "$WORK/c" audit log "$A_ID" --limit 4
step "$H" --data-dir "$WORK/c" audit verify "$A_ID"
step "$H" --data-dir "$WORK/c" verify "$MID" --network

echo
.venv/bin/python scripts/demo_vsphere.py "$WORK"

echo
echo "== simnet: the same DHT code on a simulated network (virtual time), a fifth of it hostile"
echo "(they collude to eclipse lookups and flood provider stores; lookups still find their providers)"
step "$H" simnet run scenarios/hostile-20pct.toml --nodes 150 --out "$WORK/simnet"
echo "(replication over 10 simulated days: churn, a whole site lost on day 5, repair)"
step "$H" simnet replication --nodes 300 --days 10 --out "$WORK/simnet-replication"
echo "(the same with whole nodes: every node runs the daemon's own services on virtual time)"
step "$H" simnet replication-nodes --nodes 12 --sites 4 --hours 4 --site-loss-hour 1 \
    --grace-hours 1 --out "$WORK/simnet-replication-nodes"
echo "(and the audit-log gossip: how fast an entry reaches every node, and a partition healing)"
step "$H" simnet gossip --nodes 100 --entries 5
