#!/usr/bin/env bash
# bench/serve.sh - `cbtvault serve` as an NBD source, next to qemu-nbd.
#
# One generated raw image is backed up into a new repository. Then
# `qemu-img convert -f raw -O raw URI out.raw` copies the disk to a local file,
# alternately from
#   cbtvault serve SNAPSHOT --socket S   (packs read, zstd-decompressed and
#                                          BLAKE3-verified on every read)
#   qemu-nbd -r -f raw -k S IMAGE        (the raw image itself)
# BENCH_RUNS times each; the median wall time counts. Server CPU time (user +
# sys from /proc) is reported per run. The first copy of each is compared with
# the image (qemu rounds the size up to 512 bytes; the tail must be zeros).
#
# Environment:
#   BENCH_SIZE_MIB=1024     image size in MiB
#   BENCH_DATA=mixed        block mix by i % 5: mixed = 0,1 random, 2 text, 3,4 zero;
#                           random = 0..2 random, 3,4 zero; text = 0..2 text, 3,4 zero
#                           (text compresses about 3x with zstd -3; zero blocks are holes)
#   BENCH_RUNS=3            copies per server
#   BENCH_DROP_CACHES=0     1 = drop the page cache before every copy (if permitted)
#   BENCH_SEED=42           seed of the generated data
#   BENCH_DIR=<repo>/bench-work-serve   work dir; removed at the end unless BENCH_KEEP=1
#   BENCH_KEEP=0
#   BENCH_BUILD=1           0 = do not run `cargo build --release`
#   CBTVAULT=<repo>/target/release/cbtvault
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SIZE_MIB=${BENCH_SIZE_MIB:-1024}
DATA=${BENCH_DATA:-mixed}
RUNS=${BENCH_RUNS:-3}
DROP=${BENCH_DROP_CACHES:-0}
SEED=${BENCH_SEED:-42}
WORK=${BENCH_DIR:-$ROOT/bench-work-serve}
KEEP=${BENCH_KEEP:-0}
BUILD=${BENCH_BUILD:-1}
CBT=${CBTVAULT:-$ROOT/target/release/cbtvault}
MARKER=.serve-bench

die() { echo "serve-bench: error: $*" >&2; exit 1; }
log() { echo "== $*" >&2; }

[[ $SIZE_MIB =~ ^[0-9]+$ && $SIZE_MIB -ge 1 ]] || die "BENCH_SIZE_MIB must be a positive integer"
[[ $DATA == mixed || $DATA == random || $DATA == text ]] || die "BENCH_DATA must be mixed, random or text"
[[ $RUNS =~ ^[0-9]+$ && $RUNS -ge 1 ]] || die "BENCH_RUNS must be a positive integer"
for t in python3 qemu-img qemu-nbd cmp; do
  command -v "$t" >/dev/null || die "missing tool: $t (qemu-img and qemu-nbd are in qemu-utils)"
done

# shellcheck source=bench/workdir.sh
. "$ROOT/bench/workdir.sh"
PIDS=()
bench_cleanup_extra() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
}
claim_workdir

private_binary

CACHES=warm
if [[ $DROP == 1 ]] && sync && (echo 3 >/proc/sys/vm/drop_caches) 2>/dev/null; then
  CACHES=dropped
fi
drop_caches() { sync; if [[ $CACHES == dropped ]]; then echo 3 >/proc/sys/vm/drop_caches; fi; }

IMG=$WORK/image.raw
REPO=$WORK/repo
log "generating ${SIZE_MIB} MiB image ($DATA)"
python3 - "$IMG" "$SIZE_MIB" "$DATA" "$SEED" <<'PY'
import random, sys
path, size_mib, data, seed = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
BS = 65536
rng = random.Random(seed)
# Text: words drawn from a fixed vocabulary, sliced from a 4 MiB pool.
words = [bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(4000)]
pool = bytearray()
while len(pool) < 4 << 20:
    pool += b" ".join(rng.choice(words) for _ in range(12)) + b"\n"
kinds = {"mixed": "rrtzz", "random": "rrrzz", "text": "tttzz"}[data]
with open(path, "wb") as f:
    blocks = size_mib * 16
    f.truncate(blocks * BS)
    for i in range(blocks):
        k = kinds[i % 5]
        if k == "z":
            continue
        f.seek(i * BS)
        if k == "r":
            f.write(rng.randbytes(BS))
        else:
            at = rng.randrange(len(pool) - BS)
            f.write(bytes(pool[at:at + BS]))
PY

log "init + backup"
"$CBT" -r "$REPO" init >/dev/null
t0=$(date +%s%N)
ID=$("$CBT" -r "$REPO" --json backup "$IMG" | python3 -c 'import json,sys; print(json.loads(sys.stdin.read().splitlines()[-1])["snapshot_id"])')
t1=$(date +%s%N)
BACKUP_S=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.2f", (b-a)/1e9}')

wait_socket() { for _ in $(seq 200); do [[ -S $1 ]] && return 0; sleep 0.05; done; die "no socket $1"; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
TICK=$(getconf CLK_TCK)

"$CBT" -r "$REPO" serve "$ID" --socket "$WORK/cbtvault.sock" >"$WORK/serve.out" 2>"$WORK/serve.err" &
PIDS+=($!); CBT_PID=$!
qemu-nbd -r -f raw -t --shared=8 -x disk -k "$WORK/qemu.sock" "$IMG" 2>"$WORK/qemu-nbd.err" &
PIDS+=($!); QEMU_PID=$!
wait_socket "$WORK/cbtvault.sock"
wait_socket "$WORK/qemu.sock"
declare -A URI=(
  [cbtvault]="nbd+unix:///$ID?socket=$WORK/cbtvault.sock"
  [qemu-nbd]="nbd+unix:///disk?socket=$WORK/qemu.sock"
)
declare -A PID=([cbtvault]=$CBT_PID [qemu-nbd]=$QEMU_PID)

check_copy() {
  local size
  size=$(stat -c %s "$IMG")
  cmp -n "$size" "$IMG" "$1" || die "$2: copy differs from the image"
  [[ $(tail -c +"$((size + 1))" "$1" | tr -d '\0' | wc -c) == 0 ]] || die "$2: data past the end"
}

declare -A TIMES CPUS
for run in $(seq "$RUNS"); do
  for server in cbtvault qemu-nbd; do
    rm -f "$WORK/out.raw"
    drop_caches
    c0=$(cpu_ticks "${PID[$server]}")
    t0=$(date +%s%N)
    qemu-img convert -f raw -O raw "${URI[$server]}" "$WORK/out.raw"
    t1=$(date +%s%N)
    c1=$(cpu_ticks "${PID[$server]}")
    wall=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.3f", (b-a)/1e9}')
    cpu=$(awk -v a="$c0" -v b="$c1" -v t="$TICK" 'BEGIN{printf "%.2f", (b-a)/t}')
    TIMES[$server]+="$wall "
    CPUS[$server]+="$cpu "
    log "run $run $server: ${wall}s, server cpu ${cpu}s"
    if [[ $run == 1 ]]; then check_copy "$WORK/out.raw" "$server"; fi
  done
done

median() { tr ' ' '\n' <<<"$1" | grep . | sort -g | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}'; }
M_CBT=$(median "${TIMES[cbtvault]}")
M_QEMU=$(median "${TIMES[qemu-nbd]}")
RATIO=$(awk -v a="$M_CBT" -v b="$M_QEMU" 'BEGIN{printf "%.2f", b/a}')
mibs() { awk -v s="$SIZE_MIB" -v t="$1" 'BEGIN{printf "%.0f", s/t}'; }

echo
echo "serve benchmark: ${SIZE_MIB} MiB image ($DATA), caches $CACHES, $(nproc) cores, $RUNS runs, medians"
printf '  %-10s %8s %10s   %s\n' server wall MiB/s "server cpu s (per run)"
printf '  %-10s %7ss %10s   %s\n' cbtvault "$M_CBT" "$(mibs "$M_CBT")" "${CPUS[cbtvault]}"
printf '  %-10s %7ss %10s   %s\n' qemu-nbd "$M_QEMU" "$(mibs "$M_QEMU")" "${CPUS[qemu-nbd]}"
echo "  cbtvault speed / qemu-nbd speed = $RATIO (target >= 0.70); backup took ${BACKUP_S}s"
printf '{"size_mib":%s,"data":"%s","caches":"%s","runs":%s,"cbtvault_s":%s,"qemu_nbd_s":%s,"ratio":%s}\n' \
  "$SIZE_MIB" "$DATA" "$CACHES" "$RUNS" "$M_CBT" "$M_QEMU" "$RATIO"
