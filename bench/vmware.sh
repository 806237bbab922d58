#!/usr/bin/env bash
# bench/vmware.sh - a vSphere VM backup through the simulator (issue 16).
#
# `cbtvault sim --vmware` serves one VM with a BENCH_SIZE_MIB disk that the
# guest fills with random data (every byte written, so the first full reads
# it all). Then, BENCH_ROUNDS (3) times alternately:
#   1. curl of the disk's -flat.vmdk from the same HTTPS /folder endpoint to
#      /dev/null (the read ceiling: one stream, nothing verified or stored);
#   2. cbtvault backup vmware://... into a new repository (a full: CBT
#      enable, snapshot, QueryChangedDiskAreas '*', Range reads, hash,
#      compress, store, snapshot removal);
# then the guest rewrites 2% of the 64 KiB blocks, and the incremental runs
# (BENCH_ROUNDS times, other blocks each round). Then the newest snapshot is
# restored into vSphere (PUT /folder of the whole flat file) against curl
# uploading the same size. Medians; targets: full at least 0.8x curl's
# throughput, incremental at most 5% of the full's time.
#
# Environment: BENCH_SIZE_MIB=4096 BENCH_ROUNDS=3
#   BENCH_REPO_DIR=<work dir> (where the repository goes: /dev/shm takes
#   the disk's write speed out of the comparison with curl -> /dev/null)
#   BENCH_DIR=<repo>/bench-work-vmware BENCH_KEEP=0 BENCH_BUILD=1
#   CBTVAULT=<repo>/target/release/cbtvault
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SIZE_MIB=${BENCH_SIZE_MIB:-4096}
ROUNDS=${BENCH_ROUNDS:-3}
WORK=${BENCH_DIR:-$ROOT/bench-work-vmware}
KEEP=${BENCH_KEEP:-0}
BUILD=${BENCH_BUILD:-1}
CBT=${CBTVAULT:-$ROOT/target/release/cbtvault}
MARKER=.vmware-bench
BENCH_NAME=vmware-bench

die() { echo "$BENCH_NAME: error: $*" >&2; exit 1; }
log() { echo "== $*" >&2; }
for t in curl python3 /usr/bin/time; do command -v "$t" >/dev/null || die "missing tool: $t"; done
# shellcheck source=bench/workdir.sh
source "$ROOT/bench/workdir.sh"
SIM_PID=
bench_cleanup_extra() {
  [[ -n $SIM_PID ]] && kill "$SIM_PID" 2>/dev/null && wait "$SIM_PID" 2>/dev/null
  [[ -n ${REPO:-} && $KEEP != 1 ]] && rm -rf -- "$REPO"
  true
}
claim_workdir
if [[ $BUILD == 1 && -z ${CBTVAULT:-} ]]; then
  log "cargo build --release"; (cd "$ROOT" && cargo build --release --quiet)
fi

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
export CBTVAULT_SIM_PASSWORD=bench-$RANDOM$RANDOM
export CBTVAULT_VMWARE_PASSWORD=$CBTVAULT_SIM_PASSWORD
log "starting cbtvault sim --vmware with a $SIZE_MIB MiB disk"
"$CBT" --json sim --vmware --dir "$WORK/host" --listen "127.0.0.1:$PORT" --disk-mib "$SIZE_MIB" \
  >"$WORK/sim.json" 2>"$WORK/sim.err" &
SIM_PID=$!
for _ in $(seq 100); do [[ -s $WORK/sim.json ]] && break; sleep 0.1; done
[[ -s $WORK/sim.json ]] || die "the simulator did not start: $(cat "$WORK/sim.err")"
field() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$WORK/sim.json" "$1"; }
VM=$(field vm_id); FP=$(field fingerprint_sha256)
KEY=2000
HOOK="https://127.0.0.1:$PORT/sim/guest_write?vm=$VM&disk=$KEY"

cat >"$WORK/guest.py" <<'PY'
import base64, http.client, os, random, ssl, sys
port, vm, key, size_mib, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx)
auth = "Basic " + base64.b64encode(f"root:{os.environ['CBTVAULT_SIM_PASSWORD']}".encode()).decode()
def write(off, data):
    conn.request("POST", f"/sim/guest_write?vm={vm}&disk={key}&offset={off}", data,
                 {"authorization": auth, "content-length": str(len(data))})
    r = conn.getresponse(); b = r.read()
    if r.status != 200: raise SystemExit(f"guest_write: {r.status} {b[:200]}")
size = size_mib << 20
if mode == "fill":
    piece = 4 << 20
    for off in range(0, size, piece):
        write(off, os.urandom(min(piece, size - off)))
else:  # change ROUND: 2% of the blocks
    rng = random.Random(int(mode))
    blocks = size // 65536
    for b in sorted(rng.sample(range(blocks), blocks // 50)):
        write(b * 65536, os.urandom(65536))
PY
log "the guest fills the disk with random data"
python3 "$WORK/guest.py" "$PORT" "$VM" "$KEY" "$SIZE_MIB" fill
sync

timed() {  # timed NAME CMD...: seconds into T[NAME]
  /usr/bin/time -f '%e %M' -o "$WORK/.t" "$@" >"$WORK/.out" 2>"$WORK/.err" || {
    cat "$WORK/.err" >&2; die "failed: $*"; }
}
declare -a CURL FULL INC
REPO=${BENCH_REPO_DIR:-$WORK}/vmware-bench-repo
FLAT="https://127.0.0.1:$PORT/folder/demo-vm/demo-vm-flat.vmdk?dcPath=ha-datacenter&dsName=datastore1"
SRC="vmware://root@127.0.0.1:$PORT/vm/$VM"
for r in $(seq "$ROUNDS"); do
  # The folder first (the simulator, like vSphere, refuses a PUT into a
  # folder that does not exist; the product makes it with MakeDirectory).
  mkdir -p "$WORK/host/datastore1/up-$r"
  timed curl -sS -k -f -u "root:$CBTVAULT_SIM_PASSWORD" -o /dev/null "$FLAT"
  read -r s _ <"$WORK/.t"; CURL+=("$s"); log "round $r: curl $s s"
  rm -rf "$REPO"; "$CBT" -r "$REPO" init -q
  timed "$CBT" -r "$REPO" --json backup "$SRC" --fingerprint "$FP"
  read -r s m <"$WORK/.t"; FULL+=("$s"); FULL_RSS=$((m / 1024)); log "round $r: full backup $s s, peak RSS $FULL_RSS MiB"
done
for r in $(seq "$ROUNDS"); do
  python3 "$WORK/guest.py" "$PORT" "$VM" "$KEY" "$SIZE_MIB" "$r"
  sync
  timed "$CBT" -r "$REPO" --json backup "$SRC" --fingerprint "$FP"
  read -r s m <"$WORK/.t"; INC+=("$s"); INC_RSS=$((m / 1024))
  python3 - "$WORK/.out" "$SIZE_MIB" <<'PY'
import json, sys
s = json.loads(open(sys.argv[1]).read().splitlines()[-1])
d = s["disks"][0]
assert not d["full"], d
blocks = int(sys.argv[2]) * 16
assert d["blocks_read"] <= blocks // 50, d["blocks_read"]
print(f"  incremental read {d['blocks_read']} blocks", file=sys.stderr)
PY
  log "round $r: incremental $s s, peak RSS $INC_RSS MiB"
done
# Restore into vSphere (a new flat VMDK through PUT /folder, every byte
# of the disk) against curl uploading the disk's own flat file to the same
# endpoint (the write ceiling); the uploads are removed after each round.
declare -a UP RES
LIVE=$WORK/host/datastore1/demo-vm/demo-vm-flat.vmdk
LATEST=$(python3 -c 'import json,sys; print(json.loads(open(sys.argv[1]).read().splitlines()[-1])["disks"][0]["snapshot_id"])' "$WORK/.out")
for r in $(seq "$ROUNDS"); do
  # The folder first (the simulator, like vSphere, refuses a PUT into a
  # folder that does not exist; the product makes it with MakeDirectory).
  mkdir -p "$WORK/host/datastore1/up-$r"
  timed curl -sS -k -f -u "root:$CBTVAULT_SIM_PASSWORD" -T "$LIVE" -o /dev/null \
    "https://127.0.0.1:$PORT/folder/up-$r/up-flat.vmdk?dcPath=ha-datacenter&dsName=datastore1"
  read -r s _ <"$WORK/.t"; UP+=("$s"); log "round $r: curl upload $s s"
  rm -rf "$WORK/host/datastore1/up-$r"
  timed "$CBT" -r "$REPO" --json restore "$LATEST" --fingerprint "$FP" \
    --target "vmware://root@127.0.0.1:$PORT/datastore/datastore1/res-$r/res.vmdk"
  read -r s m <"$WORK/.t"; RES+=("$s"); RES_RSS=$((m / 1024)); log "round $r: restore into vSphere $s s, peak RSS $RES_RSS MiB"
  rm -rf "$WORK/host/datastore1/res-$r"
done
python3 - "$SIZE_MIB" "${CURL[*]}" "${FULL[*]}" "${INC[*]}" "$FULL_RSS" "$INC_RSS" "${UP[*]}" "${RES[*]}" "$RES_RSS" <<'PY'
import statistics, sys
mib = int(sys.argv[1])
curl, full, inc = ([float(x) for x in a.split()] for a in sys.argv[2:5])
up, res = ([float(x) for x in a.split()] for a in sys.argv[7:9])
c, f, i = statistics.median(curl), statistics.median(full), statistics.median(inc)
u, r = statistics.median(up), statistics.median(res)
print(f"curl -T /folder upload    : {u:7.2f} s  {mib/u:7.1f} MiB/s  (runs {up})")
print(f"cbtvault restore (vSphere): {r:7.2f} s  {mib/r:7.1f} MiB/s  (runs {res}), peak RSS {sys.argv[9]} MiB; {u/r:.2f}x curl")
print(f"curl /folder -> /dev/null : {c:7.2f} s  {mib/c:7.1f} MiB/s  (runs {curl})")
print(f"cbtvault full backup      : {f:7.2f} s  {mib/f:7.1f} MiB/s  (runs {full}), peak RSS {sys.argv[5]} MiB")
print(f"cbtvault incremental (2%) : {i:7.2f} s  (runs {inc}), peak RSS {sys.argv[6]} MiB")
print(f"full vs curl: {c/f:.2f}x (target >= 0.8x); incremental / full: {i/f*100:.1f}% (target <= 5%)")
PY
