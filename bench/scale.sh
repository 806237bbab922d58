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
# Environment:
#   BENCH_SIZE=1T  BENCH_PERCENT=3.125  BENCH_SEED=1
#   BENCH_CONNECTIONS=4                 --nbd-connections
#   BENCH_DIR=<repo>/bench-work-scale   work dir (needs room for the repository:
#                                       about the data size, compressed)
#   BENCH_KEEP=0  BENCH_BUILD=1  CBTVAULT=<repo>/target/release/cbtvault
#   BENCH_STEPS="ceiling full incremental check serve restore"
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
nbdkit --exit-with-parent -r -U "$SOCK" -f sparse-random size="$SIZE" percent="$PERCENT" seed="$SEED" &
PIDS+=($!)
for _ in $(seq 100); do [[ -S $SOCK ]] && break; sleep 0.1; done
SRC="nbd+unix:///?socket=$SOCK"
BYTES=$(nbdinfo --size "$SRC")
BLOCKS=$(( (BYTES + 65535) / 65536 ))
log "source: $SIZE ($BYTES bytes, $BLOCKS blocks), ${PERCENT}% data"
export CBTVAULT_REPOSITORY=$WORK/repo
"$CBT" init >/dev/null

row() { printf '%-34s %10s s %9s MiB  %s\n' "$1" "$2" "$3" "${4:-}"; }

if has ceiling; then
  read -r s m < <(timed nbdcopy --request-size=65536 "$SRC" null:)
  row "nbdcopy -> null: (ceiling)" "$s" "$m"
fi
if has full || has incremental || has check || has serve || has restore; then
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
