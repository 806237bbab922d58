#!/usr/bin/env bash
# bench/many.sh - repository-wide work at scale (issue 19), on synthetic
# snapshots written by examples/synth_repo.rs over one real backup:
#   chains: BENCH_SOURCES x BENCH_DEPTH snapshots (default 100 x 100 =
#           10,000: per source a full and 99 deltas layered on it), then
#           `snapshots` (cold: a new catalog cache; warm), `snapshots --json`,
#           `backup` of one more (the real image, incremental), `check`
#           (structure), `restore` of the deepest synthetic snapshot
#   big:    one full snapshot of BENCH_BIG_BLOCKS entries (default
#           100,000,000: a 6 TiB disk, 6,104 pages), then `check`
#           (structure), `diff` against the real snapshot, `stats`, `forget` +
#           `prune` of it: wall time and peak RSS each
# Environment: BENCH_STEPS="chains big" BENCH_SOURCES=100 BENCH_DEPTH=100
#   BENCH_BIG_BLOCKS=100000000 BENCH_DIR=<repo>/bench-work-many BENCH_KEEP=0
#   BENCH_BUILD=1 CBTVAULT=<repo>/target/release/cbtvault
#   SYNTH=<repo>/target/release/examples/synth_repo
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STEPS=${BENCH_STEPS:-chains big}
SOURCES=${BENCH_SOURCES:-100}
DEPTH=${BENCH_DEPTH:-100}
BIG=${BENCH_BIG_BLOCKS:-100000000}
WORK=${BENCH_DIR:-$ROOT/bench-work-many}
KEEP=${BENCH_KEEP:-0}
BUILD=${BENCH_BUILD:-1}
CBT=${CBTVAULT:-$ROOT/target/release/cbtvault}
SYNTH=${SYNTH:-$ROOT/target/release/examples/synth_repo}
MARKER=.many-bench
BENCH_NAME=many-bench

die() { echo "many-bench: error: $*" >&2; exit 1; }
log() { echo "== $*" >&2; }
has() { [[ " $STEPS " == *" $1 "* ]]; }
# shellcheck source=bench/workdir.sh
source "$ROOT/bench/workdir.sh"
claim_workdir
if [[ $BUILD == 1 && -z ${CBTVAULT:-} ]]; then
  (cd "$ROOT" && cargo build --release --quiet --example synth_repo)
fi
private_binary
[[ -x $SYNTH ]] || die "synth_repo not found: $SYNTH (cargo build --release --example synth_repo)"

timed() {
  /usr/bin/time -f '%e %M' -o "$WORK/.t" "$@" >"$WORK/.out" 2>"$WORK/.err" || {
    cat "$WORK/.err" >&2; die "failed: $*"; }
  awk '{printf "%s %.1f\n", $1, $2/1024}' "$WORK/.t"
}
row() { printf '%-44s %10s s %9s MiB  %s\n' "$1" "$2" "$3" "${4:-}"; }
summary_field() { python3 -c 'import json,sys
for l in open(sys.argv[1]):
    j=json.loads(l)
    if j.get("message_type")=="summary": print(j[sys.argv[2]])' "$WORK/.out" "$1"; }

export CBTVAULT_REPOSITORY=$WORK/repo
export CBTVAULT_CACHE_DIR=$WORK/cache
"$CBT" init >/dev/null
IMG=$WORK/real.img
head -c $((64 << 20)) /dev/urandom > "$IMG"
"$CBT" backup "$IMG" --source-id real >/dev/null

if has chains; then
  N=$((SOURCES * DEPTH))
  read -r s m < <(timed "$SYNTH" "$WORK/repo" chains "$SOURCES" "$DEPTH")
  row "synth: $N snapshots written" "$s" "$m"
  rm -rf "$WORK/cache"
  read -r s m < <(timed "$CBT" snapshots)
  row "snapshots ($((N + 1)), new cache)" "$s" "$m"
  read -r s m < <(timed "$CBT" snapshots)
  row "snapshots (warm)" "$s" "$m" "$(wc -l < "$WORK/.out") lines"
  read -r s m < <(timed "$CBT" --json snapshots)
  row "snapshots --json (warm)" "$s" "$m"
  dd if=/dev/urandom of="$IMG" bs=64k count=16 seek=100 conv=notrunc status=none
  read -r s m < <(timed "$CBT" --json backup "$IMG" --source-id real)
  row "backup of one more (incremental)" "$s" "$m" "parent $(summary_field parent_id | cut -c1-8)"
  read -r s m < <(timed "$CBT" check)
  row "check (structure)" "$s" "$m"
  DEEP=$("$CBT" --json snapshots --source synthetic:disk-00000 | python3 -c 'import json,sys
print([json.loads(l) for l in sys.stdin if "\"snapshot\"" in l][-1]["snapshot_id"])')
  read -r s m < <(timed "$CBT" restore "$DEEP" --target "$WORK/deep.img")
  row "restore (depth $((DEPTH - 1)), 64 GiB sparse)" "$s" "$m"
  rm -f "$WORK/deep.img"
fi
if has big; then
  read -r s m < <(timed "$SYNTH" "$WORK/repo" big "$BIG")
  row "synth: one snapshot of $BIG entries" "$s" "$m" \
    "$(du -sm "$WORK/repo/manifests" | cut -f1) MiB of pages"
  BIGID=$("$CBT" --json snapshots --source synthetic:big | python3 -c 'import json,sys
print([json.loads(l) for l in sys.stdin if "\"snapshot\"" in l][-1]["snapshot_id"])')
  REAL=$("$CBT" --json snapshots --source real | python3 -c 'import json,sys
print([json.loads(l) for l in sys.stdin if "\"snapshot\"" in l][-1]["snapshot_id"])')
  read -r s m < <(timed "$CBT" check)
  row "check (structure)" "$s" "$m"
  read -r s m < <(timed "$CBT" diff --force "$REAL" "$BIGID")
  row "diff real -> big" "$s" "$m"
  read -r s m < <(timed "$CBT" stats)
  row "stats (the repository)" "$s" "$m"
  read -r s m < <(timed "$CBT" forget "$BIGID" --prune)
  row "forget --prune big" "$s" "$m"
fi
