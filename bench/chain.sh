#!/usr/bin/env bash
# bench/chain.sh - restore at the end of a long chain of incrementals
# (issue 19): a BENCH_DISK (default 64G) sparse image whose every
# BENCH_STRIDE-th (16th) 64 KiB block holds random data (4 GiB of 64 GiB),
# a full backup, then BENCH_CHAIN (1000) incrementals, each after rewriting
# BENCH_CHANGED (16) random blocks and driven by a XenServer-style bitmap
# (--changed-blocks). Then, one run each, wall time and peak RSS:
#   restore of the full (depth 0) to a sparse file
#   restore of the newest (after BENCH_CHAIN incrementals) to a sparse file
#   restore of a new full backup of the final image (same content as the
#   newest, depth 0: the newest holds more data than the first full, as
#   the changed blocks land on holes too)
# (target: newest <= 1.1x the full of the same content), each checked
# against the image (BLAKE3 of the restored file = of the source at that
# point), plus the time of the first and the last incremental backups, and
# of `snapshots`. Backups use the product's default synthetic full
# (`--full-every 64`) unless BENCH_FULL_EVERY says otherwise (0: never,
# the chain is BENCH_CHAIN manifests deep).
#
# Environment: BENCH_DISK=64G BENCH_STRIDE=16 BENCH_CHAIN=1000
#   BENCH_CHANGED=16 BENCH_SEED=7 BENCH_DIR=<repo>/bench-work-chain
#   BENCH_FULL_EVERY= BENCH_DROP_CACHES=1 BENCH_KEEP=0 BENCH_BUILD=1
#   CBTVAULT=<repo>/target/release/cbtvault
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DISK=${BENCH_DISK:-64G}
STRIDE=${BENCH_STRIDE:-16}
CHAIN=${BENCH_CHAIN:-1000}
CHANGED=${BENCH_CHANGED:-16}
SEED=${BENCH_SEED:-7}
WORK=${BENCH_DIR:-$ROOT/bench-work-chain}
KEEP=${BENCH_KEEP:-0}
EVERY=()
[[ -n ${BENCH_FULL_EVERY:-} ]] && EVERY=(--full-every "$BENCH_FULL_EVERY")
BUILD=${BENCH_BUILD:-1}
CBT=${CBTVAULT:-$ROOT/target/release/cbtvault}
MARKER=.chain-bench
BENCH_NAME=chain-bench

die() { echo "chain-bench: error: $*" >&2; exit 1; }
log() { echo "== $*" >&2; }
for t in python3 /usr/bin/time; do
  command -v "$t" >/dev/null || die "missing tool: $t"
done
python3 -c 'import blake3' 2>/dev/null || die "python3 module blake3 missing (pip install blake3)"
# shellcheck source=bench/workdir.sh
source "$ROOT/bench/workdir.sh"
claim_workdir
private_binary

# Each timed step starts with the page cache written back and, when
# allowed, dropped (BENCH_DROP_CACHES=1, the default).
timed() {
  sync
  if [[ ${BENCH_DROP_CACHES:-1} == 1 ]]; then echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true; fi
  /usr/bin/time -f '%e %M' -o "$WORK/.t" "$@" >"$WORK/.out" 2>"$WORK/.err" || {
    cat "$WORK/.err" >&2; die "failed: $*"; }
  awk '{printf "%s %.1f\n", $1, $2/1024}' "$WORK/.t"
}
row() { printf '%-40s %10s s %9s MiB  %s\n' "$1" "$2" "$3" "${4:-}"; }

IMG=$WORK/disk.img
export CBTVAULT_REPOSITORY=$WORK/repo
"$CBT" init >/dev/null
log "image: $DISK, every ${STRIDE}th block random"
python3 - "$IMG" "$DISK" "$STRIDE" "$SEED" <<'PY'
import os, random, sys
path, size, stride, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
size = int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
with open(path, "wb") as f:
    f.truncate(size)
    for b in range(0, size // 65536, stride):
        f.seek(b * 65536)
        f.write(random.Random(seed * 1000003 + b).randbytes(65536))
PY
BYTES=$(stat -c %s "$IMG")
BLOCKS=$(( BYTES / 65536 ))
hash_of() { python3 -c 'import blake3,sys
h=blake3.blake3(max_threads=blake3.blake3.AUTO)
with open(sys.argv[1],"rb") as f:
    while True:
        b=f.read(1<<24)
        if not b: break
        h.update(b)
print(h.hexdigest())' "$1"; }

read -r s m < <(timed "$CBT" --json backup "$IMG" --source-id chain)
row "backup (full)" "$s" "$m"
FULL_ID=$(python3 -c 'import json,sys
for l in open(sys.argv[1]):
    j=json.loads(l)
    if j.get("message_type")=="summary": print(j["snapshot_id"])' "$WORK/.out")
FULL_HASH=$(hash_of "$IMG")

# One python process makes the changes: it reads a step number per line
# and answers when the image and the bitmap are written.
mkfifo "$WORK/steps" "$WORK/done"
cat > "$WORK/changer.py" <<'PY'
import base64, random, sys
path, blocks, n, seed, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
r = random.Random(seed)
with open(path, "r+b") as f:
    for line in sys.stdin:
        step = int(line)
        bits = bytearray((blocks + 7) // 8)
        for b in r.sample(range(blocks), n):
            f.seek(b * 65536)
            f.write(r.randbytes(65536))
            bits[b // 8] |= 0x80 >> (b % 8)
        f.flush()
        with open(out, "w") as o:
            o.write(base64.b64encode(bytes(bits)).decode())
        print(step, flush=True)
PY
python3 "$WORK/changer.py" "$IMG" "$BLOCKS" "$CHANGED" "$SEED" "$WORK/bitmap.b64" <"$WORK/steps" >"$WORK/done" &
CHANGER=$!
exec 3>"$WORK/steps" 4<"$WORK/done"
log "$CHAIN incrementals of $CHANGED blocks each"
t0=$(date +%s.%N)
for k in $(seq 1 "$CHAIN"); do
  echo "$k" >&3
  read -r _ <&4
  if [[ $k == 1 || $k == "$CHAIN" ]]; then
    read -r s m < <(timed "$CBT" --json backup "$IMG" --source-id chain --changed-blocks "$WORK/bitmap.b64" "${EVERY[@]}")
    row "backup (incremental $k)" "$s" "$m"
  else
    "$CBT" backup "$IMG" --source-id chain --changed-blocks "$WORK/bitmap.b64" "${EVERY[@]}" >/dev/null 2>"$WORK/.err" \
      || { cat "$WORK/.err" >&2; die "incremental $k failed"; }
  fi
  (( k % 100 == 0 )) && log "  $k done"
done
exec 3>&- 4<&-
wait "$CHANGER"
log "chain built in $(python3 -c "import time;print('%.0f s'%(time.time()-$t0))")"
NEW_HASH=$(hash_of "$IMG")

read -r s m < <(timed "$CBT" snapshots)
row "snapshots ($((CHAIN + 1)))" "$s" "$m"
read -r fs fm < <(timed "$CBT" restore "$FULL_ID" --target "$WORK/full.img")
[[ $(hash_of "$WORK/full.img") == "$FULL_HASH" ]] || die "restore of the full differs from the image"
rm -f "$WORK/full.img"
row "restore (full, depth 0)" "$fs" "$fm" "verified"
read -r ns nm < <(timed "$CBT" restore latest --target "$WORK/newest.img")
[[ $(hash_of "$WORK/newest.img") == "$NEW_HASH" ]] || die "restore of the newest differs from the image"
rm -f "$WORK/newest.img"
row "restore (newest, $CHAIN incrementals)" "$ns" "$nm" \
  "verified; $(python3 -c "print('%.2fx the first full' % ($ns/$fs))")"
read -r s m < <(timed "$CBT" --json backup "$IMG" --source-id bench:chain-same --full)
row "backup (full of the final image)" "$s" "$m"
read -r ss sm < <(timed "$CBT" restore latest --source bench:chain-same --target "$WORK/same.img")
[[ $(hash_of "$WORK/same.img") == "$NEW_HASH" ]] || die "restore of the new full differs from the image"
rm -f "$WORK/same.img"
row "restore (full of the same content)" "$ss" "$sm" "verified"
row "newest / full of the same content" "" "" \
  "$(python3 -c "print('%.2fx (target <= 1.1x)' % ($ns/$ss))")"
read -r s m < <(timed "$CBT" check)
row "check (structure)" "$s" "$m"
log "repository: $(du -sm "$WORK/repo" | cut -f1) MiB, $(find "$WORK/repo/manifests" -type f | wc -l) manifest pages"
