#!/usr/bin/env bash
# bench/jobs.sh - a job over a simulated pool (issue 18): 10 VMs x 2 disks x
# BENCH_DISK_MIB (1024), each disk holding BENCH_DATA_MIB (32) of random
# data written by the guest; `cbtvault run` with --concurrency 1 and 4,
# alternately, BENCH_ROUNDS (2) times each, each into a new repository: a
# full backup of the pool (xapi-nbd has no block status: every byte of
# every disk is read), then the guest rewrites 2% of each disk's blocks,
# then the nightly incremental. Wall time and peak RSS of each run; the
# target: 4-way at least 1.7x faster than 1-way, peak RSS under 300 MiB.
#
# BENCH_NBD_MIBPS=N caps each NBD connection of the simulator at N MiB/s,
# as a real host's disk and network do (the simulator otherwise shares this
# machine's two CPUs with cbtvault, and nothing is left to overlap).
#
# Environment: BENCH_DISK_MIB=1024 BENCH_DATA_MIB=32 BENCH_VMS=10 BENCH_NBD_MIBPS=0
#   BENCH_ROUNDS=2 BENCH_DIR=<repo>/bench-work-jobs BENCH_KEEP=0
#   BENCH_BUILD=1 CBTVAULT=<repo>/target/release/cbtvault
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DISK_MIB=${BENCH_DISK_MIB:-1024}
DATA_MIB=${BENCH_DATA_MIB:-32}
VMS=${BENCH_VMS:-10}
ROUNDS=${BENCH_ROUNDS:-2}
WORK=${BENCH_DIR:-$ROOT/bench-work-jobs}
KEEP=${BENCH_KEEP:-0}
BUILD=${BENCH_BUILD:-1}
CBT=${CBTVAULT:-$ROOT/target/release/cbtvault}
MARKER=.jobs-bench
BENCH_NAME=jobs-bench

die() { echo "$BENCH_NAME: error: $*" >&2; exit 1; }
log() { echo "== $*" >&2; }
# shellcheck source=bench/workdir.sh
source "$ROOT/bench/workdir.sh"
SIM_PID=
bench_cleanup_extra() { [[ -n $SIM_PID ]] && kill "$SIM_PID" 2>/dev/null && wait "$SIM_PID" 2>/dev/null || true; }
claim_workdir
if [[ $BUILD == 1 && -z ${CBTVAULT:-} ]]; then
  log "cargo build --release"; (cd "$ROOT" && cargo build --release --quiet)
fi

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
NBD=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
export CBTVAULT_SIM_PASSWORD=bench-$RANDOM$RANDOM
log "starting cbtvault sim"
"$CBT" --json sim --dir "$WORK/host" --listen "127.0.0.1:$PORT" --nbd-listen "127.0.0.1:$NBD" \
  --disk-mib 8 >"$WORK/sim.json" 2>"$WORK/sim.err" &
SIM_PID=$!
for _ in $(seq 100); do [[ -s $WORK/sim.json ]] && break; sleep 0.1; done
[[ -s $WORK/sim.json ]] || die "the simulator did not start: $(cat "$WORK/sim.err")"

log "creating $VMS VMs of 2 x $DISK_MIB MiB, $DATA_MIB MiB of random data per disk"
cat >"$WORK/guest.py" <<'PY'
import http.client, json, os, ssl, sys, urllib.parse
info = json.load(open(sys.argv[1])); vms, disk, data = map(int, sys.argv[2:5])
host, port = info["url"].split("//")[1].rstrip("/").rsplit(":", 1)
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
conn = http.client.HTTPSConnection(host, int(port), context=ctx)
def rpc(method, params):
    body = json.dumps({"jsonrpc": "2.0", "method": method, "params": params, "id": 1})
    conn.request("POST", "/jsonrpc", body, {"content-type": "application/json"})
    r = json.loads(conn.getresponse().read())
    if "error" in r: raise SystemExit(f"{method}: {r['error']}")
    return r["result"]
s = rpc("session.login_with_password", [info["username"], os.environ["CBTVAULT_SIM_PASSWORD"], "1.1", "bench"])
if len(sys.argv) > 5:  # change ROUND: 2% of each disk's blocks rewritten
    import random
    rng = random.Random(int(sys.argv[5]))
    for vm in rpc("VM.get_all", [s]):
        if "bench" not in rpc("VM.get_tags", [s, vm]): continue
        for vbd in rpc("VM.get_VBDs", [s, vm]):
            vdi = rpc("VDI.get_uuid", [s, rpc("VBD.get_VDI", [s, vbd])])
            blocks = (disk << 20) // 65536
            for b in rng.sample(range(blocks), blocks // 50):
                q = urllib.parse.urlencode({"session_id": s, "vdi": vdi, "offset": b * 65536})
                conn.request("PUT", "/sim/guest_write?" + q, os.urandom(65536), {"content-length": "65536"})
                r = conn.getresponse(); r.read()
                if r.status != 200: raise SystemExit(f"guest_write: {r.status}")
    raise SystemExit(0)
rate = int(os.environ.get("BENCH_NBD_MIBPS", "0"))
if rate:  # each NBD connection as fast as a host's disk and link, not the CPU's
    rpc("sim.set_fault", [s, "nbd_rate_bytes_per_s", rate << 20])
for i in range(vms):
    vm = rpc("sim.create_vm", [s, f"bench-vm{i:02}", [disk << 20, disk << 20]])
    rpc("VM.add_tags", [s, vm, "bench"])
    for vbd in rpc("VM.get_VBDs", [s, vm]):
        vdi = rpc("VDI.get_uuid", [s, rpc("VBD.get_VDI", [s, vbd])])
        piece = 4 << 20
        # Spread over the disk: every (disk / data)-th piece.
        stride = max(piece, (disk << 20) // max(1, (data << 20) // piece))
        for k in range((data << 20) // piece):
            q = urllib.parse.urlencode({"session_id": s, "vdi": vdi, "offset": k * stride})
            conn.request("PUT", "/sim/guest_write?" + q, os.urandom(piece), {"content-length": str(piece)})
            r = conn.getresponse(); b = r.read()
            if r.status != 200: raise SystemExit(f"guest_write: {r.status} {b[:200]}")
PY
python3 "$WORK/guest.py" "$WORK/sim.json" "$VMS" "$DISK_MIB" "$DATA_MIB"
FP=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["fingerprint_sha256"])' "$WORK/sim.json")
printf '%s\n' "$CBTVAULT_SIM_PASSWORD" >"$WORK/xen.pass"

config() {  # config FILE REPO
  cat >"$1" <<EOF
[state]
dir = "$WORK/state"
[repositories.r]
location = "$2"
[hosts.sim]
type = "xenserver"
url = "xen://root@127.0.0.1:$PORT"
password_file = "$WORK/xen.pass"
fingerprint = ["$FP"]
max_concurrent = 8
[jobs.bench]
repository = "r"
hosts = ["sim"]
select.tags = ["bench"]
EOF
}

declare -A T M
timed_run() {  # timed_run N KEY CONFIG MODE
  /usr/bin/time -f '%e %M' -o "$WORK/.t" "$CBT" --json run bench --config "$3" \
    --concurrency "$1" >"$WORK/out-$2.json" 2>"$WORK/err-$2" || die "run failed: $(tail -5 "$WORK/err-$2")"
  read -r s k <"$WORK/.t"
  T[$2]=$s; M[$2]=$((k / 1024))
  python3 - "$WORK/out-$2.json" "$VMS" "$4" <<'PY'
import json, sys
r = json.loads(open(sys.argv[1]).read().splitlines()[-1])["runs"][0]
assert r["status"] == "ok", r["status"]
assert len(r["vms"]) == int(sys.argv[2]) and all(v["mode"] == sys.argv[3] for v in r["vms"]), r["vms"]
edges = sorted([(v["start_time"], 1) for v in r["vms"]] + [(v["end_time"], -1) for v in r["vms"]], key=lambda e: (e[0], e[1]))
n = most = 0
for _, d in edges: n += d; most = max(most, n)
print(f"  {len(r['vms'])} VMs {sys.argv[3]}, {sum(v['read_bytes'] for v in r['vms'])>>20} MiB read, at most {most} at once", file=sys.stderr)
PY
  log "$2: ${T[$2]} s, peak RSS ${M[$2]} MiB"
}
run() {  # run N ROUND
  local repo=$WORK/repo-$1-$2
  "$CBT" -r "$repo" init -q
  config "$WORK/c-$1-$2.toml" "$repo"
  sync
  timed_run "$1" "full-$1-$2" "$WORK/c-$1-$2.toml" full
  python3 "$WORK/guest.py" "$WORK/sim.json" "$VMS" "$DISK_MIB" "$DATA_MIB" "$1$2"
  sync
  timed_run "$1" "inc-$1-$2" "$WORK/c-$1-$2.toml" incremental
  rm -rf "$repo"
}
for round in $(seq "$ROUNDS"); do
  run 1 "$round"
  run 4 "$round"
done
list() { for r in $(seq "$ROUNDS"); do printf '%s,' "${T[$1-$2-$r]}"; done; }
rss() { for r in $(seq "$ROUNDS"); do printf '%s,%s,' "${M[full-$1-$r]}" "${M[inc-$1-$r]}"; done; }
python3 <<PY
import statistics
for kind in ("full", "inc"):
    a = [$(list full 1)] if kind == "full" else [$(list inc 1)]
    b = [$(list full 4)] if kind == "full" else [$(list inc 4)]
    ma, mb = statistics.median(a), statistics.median(b)
    print(f"{kind:4s} --concurrency 1: {ma:7.2f} s {a}   --concurrency 4: {mb:7.2f} s {b}   speed-up {ma/mb:.2f}x (target >= 1.7x)")
print(f"peak RSS: --concurrency 1 {max([$(rss 1)])} MiB, --concurrency 4 {max([$(rss 4)])} MiB (target < 300 MiB)")
PY
