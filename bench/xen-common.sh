# bench/xen-common.sh - sourced by xen.sh and xen-restore.sh: options, work
# dir, `cbtvault sim` with one BENCH_SIZE_MIB disk, and HELP (a JSON-RPC
# helper: fill | change [ROUND] | sr | nbd). Sets SIM_PID, PORT, VM, FP, HELP.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SIZE_MIB=${BENCH_SIZE_MIB:-4096}
WORK=${BENCH_DIR:-$ROOT/bench-work-xen}
KEEP=${BENCH_KEEP:-0}
BUILD=${BENCH_BUILD:-1}
CBT=${CBTVAULT:-$ROOT/target/release/cbtvault}
MARKER=.xen-bench

die() { echo "xen-bench: error: $*" >&2; exit 1; }
log() { echo "== $*" >&2; }

[[ $SIZE_MIB =~ ^[0-9]+$ && $SIZE_MIB -ge 8 ]] || die "BENCH_SIZE_MIB must be an integer >= 8"
for t in python3 nbdcopy; do
  command -v "$t" >/dev/null || die "missing tool: $t (nbdcopy is in libnbd-bin)"
done
if [[ -e $WORK ]]; then
  [[ -e $WORK/$MARKER || -z $(ls -A "$WORK") ]] || die "$WORK is not a previous bench work dir; refusing to wipe it"
  rm -rf -- "$WORK"
fi
mkdir -p "$WORK"; touch "$WORK/$MARKER"; WORK=$(cd "$WORK" && pwd)
SIM_PID=
cleanup() {
  [[ -n $SIM_PID ]] && kill "$SIM_PID" 2>/dev/null && wait "$SIM_PID" 2>/dev/null
  [[ $KEEP == 1 ]] || rm -rf -- "$WORK"
}
trap cleanup EXIT

if [[ $BUILD == 1 ]]; then
  log "cargo build --release"
  (cd "$ROOT" && cargo build --release --quiet)
fi

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
export CBTVAULT_SIM_PASSWORD=bench-$RANDOM$RANDOM
export CBTVAULT_XEN_PASSWORD=$CBTVAULT_SIM_PASSWORD
log "starting cbtvault sim with a $SIZE_MIB MiB disk"
"$CBT" --json sim --dir "$WORK/host" --listen "127.0.0.1:$PORT" --disk-mib "$SIZE_MIB" >"$WORK/sim.json" 2>"$WORK/sim.err" &
SIM_PID=$!
for _ in $(seq 100); do [[ -s $WORK/sim.json ]] && break; sleep 0.1; done
[[ -s $WORK/sim.json ]] || die "the simulator did not start: $(cat "$WORK/sim.err")"

# The helper speaks JSON-RPC and the simulator's guest-write hook.
cat >"$WORK/helper.py" <<'PY'
import http.client, json, os, ssl, sys, urllib.parse
info = json.load(open(sys.argv[1]))
cmd = sys.argv[2]
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
vdi = info["vdi_uuids"][0]
size = int(sys.argv[3]) << 20
def write(offset, data):
    q = urllib.parse.urlencode({"session_id": s, "vdi": vdi, "offset": offset})
    conn.request("PUT", "/sim/guest_write?" + q, data, {"content-length": str(len(data))})
    r = conn.getresponse(); body = r.read()
    if r.status != 200 or b"Success" not in body: raise SystemExit(f"guest_write: {r.status} {body[:200]}")
if cmd == "fill":
    piece = 4 << 20
    for off in range(0, size, 2 * piece):
        write(off, os.urandom(min(piece, size - off)))
elif cmd == "change":
    # 1% of the disk's blocks, spread over the blocks `fill` wrote (so the
    # amount of data stays that of the full: a later snapshot differs from
    # the first in where its blocks are stored, not in how many there are);
    # argv[4]: a round number, so each round rewrites other blocks.
    shift = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    blocks = size // 65536; n = max(1, blocks // 100)
    per = (4 << 20) // 65536
    data = [b for b in range(blocks) if (b // per) % 2 == 0]
    step = max(1, len(data) // n)
    for k in range(n):
        write(data[(k * step + shift) % len(data)] * 65536, os.urandom(65536))
    print(n)
elif cmd == "sr":
    ref = rpc("VDI.get_by_uuid", [s, vdi])
    print(rpc("SR.get_uuid", [s, rpc("VDI.get_SR", [s, ref])]))
elif cmd == "nbd":
    ref = rpc("VDI.get_by_uuid", [s, vdi])
    e = rpc("VDI.get_nbd_info", [s, ref])[0]
    os.makedirs(sys.argv[4], exist_ok=True)
    open(os.path.join(sys.argv[4], "ca-cert.pem"), "w").write(e["cert"])
    name = urllib.parse.quote(e["exportname"], safe="")
    print(f"nbds://{e['address']}:{e['port']}/{name}?tls-certificates={sys.argv[4]}&tls-hostname={e['subject']}")
PY
HELP() { python3 "$WORK/helper.py" "$WORK/sim.json" "$@"; }
VM=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["vm_uuid"])' "$WORK/sim.json")
FP=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["fingerprint_sha256"])' "$WORK/sim.json")
