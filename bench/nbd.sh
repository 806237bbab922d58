#!/usr/bin/env bash
# bench/nbd.sh - cbtvault's NBD source side by side with nbdcopy.
#
# One run, one generated image (60% random 64 KiB blocks, 40% zero), served
# by qemu-nbd on loopback (--shared=8):
#   nbdcopy URI /dev/null        (libnbd's copier, writing to a file)
#   nbdcopy URI null:            (the pure read ceiling)
#   cbtvault backup nbd://...    full backup (plaintext), then the same over TLS
#   dirty-bitmap incremental     qcow2 + persistent bitmap, 2% of blocks rewritten
# Environment: BENCH_SIZE_MIB (4096), BENCH_DIR (<repo>/bench-work-nbd),
# BENCH_KEEP=1 keeps the work dir, CBTVAULT (binary), BENCH_CONNECTIONS (4),
# BENCH_DROP_CACHES (0: the image stays in the page cache, as in the issue's
# reference figures; 1: caches dropped before every timed step),
# BENCH_REPO_DIR (the work dir: where the repositories go; /dev/shm takes the
# disk's write speed out of the comparison with nbdcopy -> null:, which
# writes nothing).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SIZE_MIB=${BENCH_SIZE_MIB:-4096}
WORK=${BENCH_DIR:-$ROOT/bench-work-nbd}
CBT=${CBTVAULT:-$ROOT/target/release/cbtvault}
CONN=${BENCH_CONNECTIONS:-4}
REPOS=${BENCH_REPO_DIR:-$WORK}/nbd-bench-repos
BS=65536

die() { echo "nbd-bench: error: $*" >&2; exit 1; }
log() { echo "== $*" >&2; }
for t in qemu-nbd qemu-img qemu-io nbdcopy python3 /usr/bin/time openssl; do
  command -v "$t" >/dev/null || die "missing tool: $t (apt-get install qemu-utils libnbd-bin)"
done
[[ -z ${CBTVAULT:-} ]] && (cd "$ROOT" && cargo build --release -q)
rm -rf -- "$WORK"; mkdir -p "$WORK"; WORK=$(cd "$WORK" && pwd)
PIDS=()
cleanup() {
  local rc=$?
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  [[ ${BENCH_KEEP:-0} == 1 ]] || rm -rf -- "$WORK" "${REPOS:-}"
  exit $rc
}
trap cleanup EXIT
drop() {
  sync
  if [[ ${BENCH_DROP_CACHES:-0} == 1 ]]; then
    echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
  else
    cat "$IMG" >/dev/null  # warm: every tool reads from memory
  fi
}

# seconds and peak RSS (MiB) of a command: "secs rss"
# (wall time to the millisecond from the clock: time's %e has 10 ms steps,
# too coarse for a 0.1 s incremental; time still gives the peak RSS)
timed() {
  local t0 t1
  t0=$(date +%s.%N)
  /usr/bin/time -f '%e %M' -o "$WORK/.t" "$@" >"$WORK/.out" 2>"$WORK/.err" || {
    cat "$WORK/.err" >&2; die "failed: $*"; }
  t1=$(date +%s.%N)
  awk -v t0="$t0" -v t1="$t1" '{printf "%.3f %.1f\n", t1 - t0, $2/1024}' "$WORK/.t"
}

IMG=$WORK/image.raw
log "generating a ${SIZE_MIB} MiB image"
python3 - "$IMG" "$SIZE_MIB" <<'PY'
import os, sys, hashlib
path, mib = sys.argv[1], int(sys.argv[2])
blocks = mib * 16
with open(path, "wb") as f:
    f.truncate(blocks * 65536)
    seed = hashlib.blake2b(b"nbd-bench").digest()
    for i in range(blocks):
        if i % 5 < 3:
            f.seek(i * 65536)
            f.write(os.urandom(65536))
PY

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.1; done; die "port $1"; }

# TLS credentials for qemu-nbd (a CA and a server certificate for 127.0.0.1).
PKI=$WORK/pki; mkdir -p "$PKI"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=bench-ca \
  -keyout "$PKI/ca-key.pem" -out "$PKI/ca-cert.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=127.0.0.1 \
  -keyout "$PKI/server-key.pem" -out "$PKI/server.csr" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' >"$PKI/ext"
openssl x509 -req -in "$PKI/server.csr" -CA "$PKI/ca-cert.pem" -CAkey "$PKI/ca-key.pem" \
  -CAcreateserial -days 2 -extfile "$PKI/ext" -out "$PKI/server-cert.pem" 2>/dev/null

P=$(port); qemu-nbd -r -t --shared=8 -f raw -x disk -b 127.0.0.1 -p "$P" "$IMG" & PIDS+=($!); wait_port "$P"
PT=$(port)
qemu-nbd -r -t --shared=8 -f raw -x disk -b 127.0.0.1 -p "$PT" \
  --object "tls-creds-x509,id=tls0,dir=$PKI,endpoint=server,verify-peer=no" --tls-creds tls0 "$IMG" & PIDS+=($!)
wait_port "$PT"
URI=nbd://127.0.0.1:$P/disk
TURI=nbds://127.0.0.1:$PT/disk

log "nbdcopy to /dev/null"; drop; read -r nc_dev _ < <(timed nbdcopy "$URI" /dev/null)
log "nbdcopy to null:";     drop; read -r nc_null _ < <(timed nbdcopy "$URI" null:)
log "nbdcopy TLS to null:"; drop; read -r nc_tls _ < <(timed nbdcopy "$TURI?tls-certificates=$PKI" null:)

rm -rf "$REPOS"; mkdir -p "$REPOS"
R=$REPOS/repo; "$CBT" -r "$R" init -q
log "cbtvault full backup"; drop; read -r cb_full cb_full_rss < <(timed "$CBT" -r "$R" backup -q "$URI" --nbd-connections "$CONN")
R2=$REPOS/repo-tls; "$CBT" -r "$R2" init -q
log "cbtvault full backup over TLS"; drop
read -r cb_tls cb_tls_rss < <(timed "$CBT" -r "$R2" backup -q "$TURI" --tls-ca "$PKI/ca-cert.pem" --nbd-connections "$CONN")

# Dirty-bitmap incremental: a qcow2 copy with a persistent bitmap, 2% rewritten.
Q=$WORK/image.qcow2
log "qcow2 copy with a persistent dirty bitmap"
qemu-img convert -f raw -O qcow2 "$IMG" "$Q"
qemu-img bitmap --add "$Q" b0
SQ=$WORK/q.sock
qemu-nbd -r -t --shared=8 -f qcow2 -x disk -k "$SQ" "$Q" & QP=$!; PIDS+=($QP)
for _ in $(seq 100); do [[ -S $SQ ]] && break; sleep 0.1; done
R3=$REPOS/repo-qcow; "$CBT" -r "$R3" init -q
QURI="nbd+unix:///disk?socket=$SQ"
drop; read -r q_full _ < <(timed "$CBT" -r "$R3" backup -q "$QURI" --dirty-bitmap b0 --source-id bench-disk)
kill "$QP"; wait "$QP" 2>/dev/null || true; rm -f "$SQ"
BLOCKS=$((SIZE_MIB * 16)); CHANGED=$((BLOCKS / 50))
# BENCH_INC_ROUNDS (5) rounds, each: a new bitmap, 2% of the blocks rewritten (other ones
# each round), an incremental through that bitmap. The median counts.
incs=()
INC_ROUNDS=${BENCH_INC_ROUNDS:-5}
for round in $(seq "$INC_ROUNDS"); do
  bm=b0; [[ $round -gt 1 ]] && { bm=b$round; qemu-img bitmap --add "$Q" "$bm"; }
  python3 - "$BLOCKS" "$CHANGED" "$round" >"$WORK/qemu-io.cmds" <<'PY'
import random, sys
blocks, n, seed = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(41 + seed)
for i in sorted(rng.sample(range(blocks), n)):
    print(f"write -P {rng.randrange(1,255)} {i*65536} 64k")
PY
  log "round $round: rewriting $CHANGED blocks with qemu-io"
  # qemu-io reads commands from stdin when none are given with -c.
  qemu-io -f qcow2 "$Q" <"$WORK/qemu-io.cmds" >/dev/null
  qemu-nbd -r -t --shared=8 -f qcow2 -x disk -k "$SQ" -B "$bm" "$Q" & QP=$!; PIDS+=($QP)
  for _ in $(seq 100); do [[ -S $SQ ]] && break; sleep 0.1; done
  drop; read -r t q_inc_rss < <(timed "$CBT" -r "$R3" --json backup "$QURI" --dirty-bitmap "$bm" --source-id bench-disk)
  incs+=("$t")
  q_read=$(python3 -c 'import json,sys; print(json.loads(open(sys.argv[1]).read().splitlines()[-1])["blocks_read"])' "$WORK/.out")
  [[ $q_read == "$CHANGED" ]] || die "round $round read $q_read blocks, $CHANGED were rewritten"
  kill "$QP"; wait "$QP" 2>/dev/null || true; rm -f "$SQ"
done
q_inc=$(printf '%s\n' "${incs[@]}" | sort -n | sed -n "$(( (INC_ROUNDS + 1) / 2 ))p")
log "incrementals: ${incs[*]} (median $q_inc)"

MIB=$SIZE_MIB
python3 - <<PY
mib=$MIB
rows = [
  ("nbdcopy URI /dev/null", $nc_dev), ("nbdcopy URI null: (ceiling)", $nc_null),
  ("nbdcopy TLS null:", $nc_tls), ("cbtvault backup full", $cb_full),
  ("cbtvault backup full, TLS", $cb_tls), ("cbtvault full (qcow2)", $q_full),
  ("cbtvault dirty-bitmap incremental (2%, median of $INC_ROUNDS)", $q_inc),
]
for name, s in rows:
    print(f"{name:42s} {s:7.3f} s  {mib/s:8.1f} MiB/s")
print()
print(f"full vs nbdcopy /dev/null: {$nc_dev/$cb_full:.2f}x  (target >= 1.0x)")
print(f"full vs null: ceiling:     {$nc_null/$cb_full:.2f}x  (target >= 0.5x; issue 19: >= 0.7x)")
print(f"TLS cost:                  {($cb_tls/$cb_full-1)*100:+.0f}%  (target <= +25%)")
print(f"incremental / full (qcow2): {$q_inc/$q_full*100:.1f}%  (target <= 5%; issue 19: <= 3%), blocks read {$q_read} of $CHANGED rewritten; rounds: ${incs[*]} s")
print(f"peak RSS full {$cb_full_rss} MiB, TLS {$cb_tls_rss} MiB, incremental {$q_inc_rss} MiB")
import json
print(json.dumps({"size_mib": mib, "nbdcopy_devnull_s": $nc_dev, "nbdcopy_null_s": $nc_null,
  "nbdcopy_tls_null_s": $nc_tls, "cbtvault_full_s": $cb_full, "cbtvault_full_tls_s": $cb_tls,
  "cbtvault_qcow_full_s": $q_full, "cbtvault_dirty_incremental_s": $q_inc, "blocks_read": $q_read,
  "blocks_rewritten": $CHANGED}))
PY
