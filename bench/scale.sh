#!/usr/bin/env bash
# bench/scale.sh - cbtvault at disk sizes no test machine has (issue 19).
#
# The source is nbdkit's sparse-random plugin: a disk of BENCH_SIZE (default
# 1T) of which about BENCH_PERCENT % (default 3.125: 32 GiB of 1 TiB) holds
# data, reported through base:allocation so the holes are never read. One
# run of each, wall time and peak RSS (from /usr/bin/time):
#   nbdcopy SRC null:                  the read ceiling of the source
#   cbtvault backup SRC                full backup into a new repository
#   cbtvault backup SRC (again)        incremental without a bitmap (the
#                                      plugin has no dirty bitmap): every
#                                      data extent read again, nothing new
#   cbtvault check                     structure (catalog, trailers, manifests)
#   cbtvault serve latest -> nbdcopy null:   restore of the newest snapshot
#   cbtvault restore latest FILE       restore to a sparse file
# and the repository's packs, their blob counts, and the catalog's size.
#
# With BENCH_SOURCE=qcow2 the sparse-random disk is first converted into a
# qcow2 image (nbdcopy skips the holes) and every step reads it through
# qemu-nbd. The step `bitmap` reads a second state of the disk: a qcow2
# overlay on the first in which BENCH_BITMAP_PERCENT % of the blocks
# (default 0.1, chosen at random with the seed; a 64 KiB pattern each) were
# rewritten with qemu-io, recorded in a persistent dirty bitmap, and backs
# it up with --dirty-bitmap: an incremental that reads only those blocks.
# Both images are kept for later runs when BENCH_QCOW2_BASE and
# BENCH_QCOW2_CHANGED name them (making them takes ~5 and ~11 minutes at
# 16 TiB).
#
# Environment:
#   BENCH_SIZE=1T  BENCH_PERCENT=3.125  BENCH_SEED=1
#   BENCH_CONNECTIONS=4                 --nbd-connections
#   BENCH_DIR=<repo>/bench-work-scale   work dir (needs room for the repository:
#                                       about the data size, compressed)
#   BENCH_KEEP=0  BENCH_BUILD=1  CBTVAULT=<repo>/target/release/cbtvault
#   BENCH_STEPS="ceiling full incremental check serve restore"   (+ bitmap)
#   BENCH_SOURCE=nbdkit|qcow2  BENCH_BITMAP_PERCENT=0.1
#   BENCH_QCOW2_BASE=<work>/base.qcow2  BENCH_QCOW2_CHANGED=<work>/changed.qcow2
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SIZE=${BENCH_SIZE:-1T}
PERCENT=${BENCH_PERCENT:-3.125}
SEED=${BENCH_SEED:-1}
CONN=${BENCH_CONNECTIONS:-4}
WORK=${BENCH_DIR:-$ROOT/bench-work-scale}
KEEP=${BENCH_KEEP:-0}
BUILD=${BENCH_BUILD:-1}
CBT=${CBTVAULT:-$ROOT/target/release/cbtvault}
STEPS=${BENCH_STEPS:-ceiling full incremental check serve restore}
SOURCE=${BENCH_SOURCE:-nbdkit}
BITMAP_PERCENT=${BENCH_BITMAP_PERCENT:-0.1}
MARKER=.scale-bench
BENCH_NAME=scale-bench

die() { echo "scale-bench: error: $*" >&2; exit 1; }
log() { echo "== $*" >&2; }
for t in nbdkit nbdcopy nbdinfo python3 /usr/bin/time; do
  command -v "$t" >/dev/null || die "missing tool: $t (apt-get install nbdkit libnbd-bin time)"
done
# shellcheck source=bench/workdir.sh
source "$ROOT/bench/workdir.sh"
PIDS=()
bench_cleanup_extra() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; }
claim_workdir
private_binary

# seconds and peak RSS (MiB) of a command: "secs rss"
timed() {
  /usr/bin/time -f '%e %M' -o "$WORK/.t" "$@" >"$WORK/.out" 2>"$WORK/.err" || {
    cat "$WORK/.err" >&2; die "failed: $*"; }
  awk '{printf "%s %.1f\n", $1, $2/1024}' "$WORK/.t"
}
has() { [[ " $STEPS " == *" $1 "* ]]; }

SOCK=$WORK/source.sock
start_nbdkit() {
  nbdkit --exit-with-parent -r -U "$SOCK" -f sparse-random size="$SIZE" percent="$PERCENT" seed="$SEED" &
  NPID=$!; PIDS+=($NPID)
  # sparse-random lays out its extents before it listens: ~50 s at 16 TiB.
  for _ in $(seq 3000); do [[ -S $SOCK ]] && break; sleep 0.1; done
  SRC="nbd+unix:///?socket=$SOCK"
}
QSOCK=$WORK/qcow2.sock
# qemu-nbd serving a qcow2 image read-only (persistent, 4 connections);
# extra options (-B BITMAP) before the image.
serve_qcow2() {
  local image=$1; shift
  if [[ -n ${QPID:-} ]]; then kill "$QPID" 2>/dev/null || true; wait "$QPID" 2>/dev/null || true; fi
  rm -f "$QSOCK"
  qemu-nbd -r -t -e 4 -f qcow2 -k "$QSOCK" "$@" "$image" &
  QPID=$!; PIDS+=($QPID)
  for _ in $(seq 100); do [[ -S $QSOCK ]] && break; sleep 0.1; done
}
if [[ $SOURCE == qcow2 ]]; then
  command -v qemu-img >/dev/null && command -v qemu-io >/dev/null || die "missing qemu-img/qemu-io (qemu-utils)"
  # The converted disk (BENCH_QCOW2_BASE) and its changed state
  # (BENCH_QCOW2_CHANGED: an overlay on the base holding the rewritten
  # blocks and the dirty bitmap since-full that lists them) are made once
  # and reused by later runs (both are only read by the measured steps).
  BASE=${BENCH_QCOW2_BASE:-$WORK/base.qcow2}
  CHANGED=${BENCH_QCOW2_CHANGED:-$WORK/changed.qcow2}
  if [[ ! -e $BASE ]]; then
    start_nbdkit
    BYTES=$(nbdinfo --size "$SRC")
    log "converting the source into $BASE"
    qemu-img create -q -f qcow2 -o cluster_size=65536 "$BASE.part" "$BYTES"
    t0=$(date +%s.%N)
    nbdcopy --destination-is-zero --request-size=65536 "$SRC" -- [ qemu-nbd -f qcow2 "$BASE.part" ]
    mv "$BASE.part" "$BASE"
    log "converted in $(python3 -c "import time;print('%.1f s'%(time.time()-$t0))")"
    kill "$NPID" 2>/dev/null || true
  fi
  serve_qcow2 "$BASE"
  SRC="nbd+unix:///?socket=$QSOCK"
else
  start_nbdkit
fi
BYTES=$(nbdinfo --size "$SRC")
BLOCKS=$(( (BYTES + 65535) / 65536 ))
log "source: $SIZE ($BYTES bytes, $BLOCKS blocks), ${PERCENT}% data, through $SOURCE"
export CBTVAULT_REPOSITORY=$WORK/repo
"$CBT" init >/dev/null

row() { printf '%-34s %10s s %9s MiB  %s\n' "$1" "$2" "$3" "${4:-}"; }

if has ceiling; then
  read -r s m < <(timed nbdcopy --request-size=65536 "$SRC" null:)
  row "nbdcopy -> null: (ceiling)" "$s" "$m"
fi
if has full || has incremental || has bitmap || has check || has serve || has restore; then
  read -r s m < <(timed "$CBT" --json backup "$SRC" --source-id scale --nbd-connections "$CONN")
  FULL_S=$s
  read_bytes=$(python3 -c 'import json,sys
for l in open(sys.argv[1]):
    j=json.loads(l)
    if j.get("message_type")=="summary": print(j["read_bytes"], j["blocks_new"])' "$WORK/.out")
  row "backup (full)" "$s" "$m" "read/new-blocks: $read_bytes"
fi
if has incremental; then
  # NBD sources take change tracking from the server (--dirty-bitmap);
  # sparse-random has none, so this incremental reads every data extent
  # again and stores nothing new: the cost of the work around the blocks.
  read -r s m < <(timed "$CBT" --json backup "$SRC" --source-id scale --nbd-connections "$CONN")
  row "backup (incremental, nothing new)" "$s" "$m" \
    "$(python3 -c "print('%.1f%% of the full' % (100*$s/$FULL_S))")"
fi
if has bitmap; then
  [[ $SOURCE == qcow2 ]] || die "the bitmap step needs BENCH_SOURCE=qcow2"
  if [[ ! -e $CHANGED ]]; then
    qemu-img create -q -f qcow2 -b "$BASE" -F qcow2 "$CHANGED.part"
    qemu-img bitmap --add "$CHANGED.part" since-full
    N=$(python3 -c "print(max(1, int($BLOCKS * $BITMAP_PERCENT / 100)))")
    log "rewriting $N blocks ($BITMAP_PERCENT%) with qemu-io into $CHANGED"
    python3 - "$BLOCKS" "$N" "$SEED" > "$WORK/writes.qio" <<'PY'
import random, sys
blocks, n, seed = map(int, sys.argv[1:4])
r = random.Random(seed)
for b in sorted(r.sample(range(blocks), n)):
    print("write -q -P %d %d 64k" % (b % 251, b * 65536))
PY
    t0=$(date +%s.%N)
    qemu-io -f qcow2 "$CHANGED.part" < "$WORK/writes.qio" > /dev/null
    mv "$CHANGED.part" "$CHANGED"
    log "written in $(python3 -c "import time;print('%.1f s'%(time.time()-$t0))")"
  fi
  serve_qcow2 "$CHANGED" -B since-full
  read -r s m < <(timed "$CBT" --json backup "$SRC" --source-id scale --nbd-connections "$CONN" --dirty-bitmap since-full)
  summary=$(python3 -c 'import json,sys
for l in open(sys.argv[1]):
    j=json.loads(l)
    if j.get("message_type")=="summary": print("read %d blocks, %d new" % (j["blocks_read"], j["blocks_new"]))' "$WORK/.out")
  row "backup (bitmap $BITMAP_PERCENT%)" "$s" "$m" \
    "$summary; $(python3 -c "print('%.1f%% of the full' % (100*$s/$FULL_S))")"
fi
if has check; then
  read -r s m < <(timed "$CBT" check)
  row "check (structure)" "$s" "$m"
fi
if has serve; then
  SSOCK=$WORK/serve.sock
  "$CBT" serve latest --socket "$SSOCK" >/dev/null 2>"$WORK/serve.err" &
  PIDS+=($!); SPID=$!
  for _ in $(seq 300); do [[ -S $SSOCK ]] && break; sleep 0.1; done
  read -r s m < <(timed nbdcopy --request-size=65536 "nbd+unix:///?socket=$SSOCK" null:)
  srss=$(awk '/VmHWM/ {printf "%.1f", $2/1024}' "/proc/$SPID/status")
  kill "$SPID"; wait "$SPID" 2>/dev/null || true
  row "serve latest -> nbdcopy null:" "$s" "$srss" "(RSS of serve)"
fi
if has restore; then
  read -r s m < <(timed "$CBT" restore latest --target "$WORK/restored.img")
  row "restore latest -> sparse file" "$s" "$m"
  rm -f "$WORK/restored.img"
fi
packs=$(find "$WORK/repo/data" -type f | wc -l)
catalog=$(du -sm "$WORK/repo" --exclude=data 2>/dev/null | cut -f1)
log "repository: $packs packs; $(du -sm "$WORK/repo/data" | cut -f1) MiB of packs; ${catalog} MiB besides"
