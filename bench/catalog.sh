#!/usr/bin/env bash
# bench/catalog.sh - the catalog at 100 million blocks (issue 19).
#
# Two repositories, each seeded with one small real backup: A keeps its
# catalog as it is, B gets BENCH_ROWS (100,000,000) more catalog rows from
# `synth_repo REPO catalog ROWS` (distinct random block ids over the whole
# id space). Then, one run each, the page cache dropped before each step:
#   catalog size of B on disk: bytes per row;
#   backup of the same BENCH_IMAGE_MIB (4096) MiB random image into A and
#   into B: wall time, MiB/s, peak RSS; throughput of B over A (target: at
#   least 0.8x);
#   a second, incremental-free backup of the image into B (every block
#   already known: lookups that hit);
#   `snapshots` in B.
# B's `check` would call its synthetic rows damaged (they name blobs its
# pack does not hold); this measures size and speed only.
#
# Environment: BENCH_ROWS=100000000 BENCH_IMAGE_MIB=4096 BENCH_SEED=11
#   BENCH_DIR=<repo>/bench-work-catalog BENCH_KEEP=0 BENCH_BUILD=1
#   CBTVAULT=<repo>/target/release/cbtvault
#   SYNTH=<repo>/target/release/examples/synth_repo
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROWS=${BENCH_ROWS:-100000000}
IMAGE_MIB=${BENCH_IMAGE_MIB:-4096}
SEED=${BENCH_SEED:-11}
WORK=${BENCH_DIR:-$ROOT/bench-work-catalog}
KEEP=${BENCH_KEEP:-0}
BUILD=${BENCH_BUILD:-1}
CBT=${CBTVAULT:-$ROOT/target/release/cbtvault}
SYNTH=${SYNTH:-$ROOT/target/release/examples/synth_repo}
MARKER=.catalog-bench
BENCH_NAME=catalog-bench

die() { echo "catalog-bench: error: $*" >&2; exit 1; }
log() { echo "== $*" >&2; }
for t in openssl /usr/bin/time; do
  command -v "$t" >/dev/null || die "missing tool: $t"
done
# shellcheck source=bench/workdir.sh
source "$ROOT/bench/workdir.sh"
claim_workdir
private_binary
if [[ $BUILD == 1 ]]; then
  (cd "$ROOT" && cargo build --release --locked --example synth_repo >&2)
fi
[[ -x $SYNTH ]] || die "no synth_repo at $SYNTH (cargo build --release --example synth_repo)"

drop() { sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true; }
timed() {
  drop
  /usr/bin/time -f '%e %M' -o "$WORK/.t" "$@" >"$WORK/.out" 2>"$WORK/.err" || {
    cat "$WORK/.err" >&2; die "failed: $*"; }
  awk '{printf "%s %.1f\n", $1, $2/1024}' "$WORK/.t"
}
row() { printf '%-44s %10s s %9s MiB  %s\n' "$1" "$2" "$3" "${4:-}"; }

SEEDIMG=$WORK/seed.img
head -c $((4 << 20)) /dev/urandom >"$SEEDIMG"
IMG=$WORK/disk.img
{ openssl enc -aes-128-ctr -nosalt -pbkdf2 -pass "pass:catalog-$SEED" -in /dev/zero 2>/dev/null || true; } |
  head -c $((IMAGE_MIB << 20)) >"$IMG"
for r in a b; do
  "$CBT" -r "$WORK/$r" init >/dev/null
  "$CBT" -r "$WORK/$r" backup "$SEEDIMG" --source-id seed >/dev/null 2>&1 || die "seed backup into $r failed"
done

log "synth: $ROWS catalog rows into B"
read -r s m < <(timed "$SYNTH" "$WORK/b" catalog "$ROWS")
row "synth: $ROWS rows" "$s" "$m"
# A local repository keeps its catalog in its own folder.
CAT=$WORK/b/catalog.sqlite
[[ -f $CAT ]] || die "no catalog at $CAT"
# The rows may still be in the write-ahead log: fold it in first.
"$CBT" -r "$WORK/b" snapshots >/dev/null
BYTES=$(( $(stat -c %s "$CAT") + $(stat -c %s "$CAT-wal" 2>/dev/null || echo 0) ))
log "catalog: $CAT"
row "catalog of B on disk" "" "$((BYTES >> 20))" \
  "$(python3 -c "print('%.1f bytes per row' % ($BYTES / ($ROWS + 64)))")"

read -r as am < <(timed "$CBT" -r "$WORK/a" backup "$IMG" --source-id img)
row "backup ${IMAGE_MIB} MiB, small catalog (A)" "$as" "$am" \
  "$(python3 -c "print('%.0f MiB/s' % ($IMAGE_MIB / $as))")"
read -r bs bm < <(timed "$CBT" -r "$WORK/b" backup "$IMG" --source-id img)
row "backup ${IMAGE_MIB} MiB, +$ROWS rows (B)" "$bs" "$bm" \
  "$(python3 -c "print('%.0f MiB/s = %.2fx A (target >= 0.8x)' % ($IMAGE_MIB / $bs, $as / $bs))")"
read -r s m < <(timed "$CBT" -r "$WORK/b" backup "$IMG" --source-id img2)
row "backup again into B (every block known)" "$s" "$m" \
  "$(python3 -c "print('%.0f MiB/s' % ($IMAGE_MIB / $s))")"
read -r s m < <(timed "$CBT" -r "$WORK/b" snapshots)
row "snapshots (B)" "$s" "$m"
