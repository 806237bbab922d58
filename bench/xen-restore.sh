#!/usr/bin/env bash
# bench/xen-restore.sh - restore into XenServer (the simulator on loopback).
#
# `cbtvault sim` serves one VM with a BENCH_SIZE_MIB disk; the guest writes
# random data into half of it. A full VDI backup, then BENCH_CHAIN-1
# incrementals (1% of blocks rewritten before each): a chain of BENCH_CHAIN.
# Then, timed: restore of the newest snapshot into a new VDI in the SR
# (/import_raw_vdi), restore of the first (full) snapshot the same way, and
# `cp` + sync of the raw image on the same disk (each timed twice from a
# cold page cache, the better time counts; MiB/s are disk MiB restored per
# second). Targets (issue 6): newest
# <= 1.1x the full's time, restore >= 0.7x cp, peak RSS < 300 MiB.
#
# Environment:
#   BENCH_SIZE_MIB=4096   disk size
#   BENCH_CHAIN=30        snapshots in the chain
#   BENCH_DIR=<repo>/bench-work-xen   work dir (removed unless BENCH_KEEP=1)
#   BENCH_KEEP=0
#   BENCH_BUILD=1         0 = skip `cargo build --release`
#   CBTVAULT=<repo>/target/release/cbtvault
source "$(dirname "${BASH_SOURCE[0]}")/xen-common.sh"

log "guest writes random data into half of the disk"
t0=$(date +%s.%N); HELP fill "$SIZE_MIB"; t1=$(date +%s.%N)
log "  $(python3 -c "print(f'{$t1-$t0:.1f}s')")"

now() { date +%s.%N; }
secs() { python3 -c "print(f'{$2-$1:.2f}')"; }

CHAIN=${BENCH_CHAIN:-30}
SR=$(HELP sr "$SIZE_MIB")
VDI=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["vdi_uuids"][0])' "$WORK/sim.json")
SRC="xen://root@127.0.0.1:$PORT/vdi/$VDI"
R=$WORK/repo; "$CBT" -r "$R" init >/dev/null
log "full backup, then $((CHAIN - 1)) incrementals"
"$CBT" -r "$R" -q backup "$SRC" --fingerprint "$FP"
for i in $(seq 2 "$CHAIN"); do
  # Other blocks each time: the newest snapshot takes blocks from every
  # layer of the chain.
  HELP change "$SIZE_MIB" "$i" >/dev/null
  "$CBT" -r "$R" -q backup "$SRC" --fingerprint "$FP"
done
IDS=$("$CBT" -r "$R" --json snapshots | python3 -c 'import json,sys; v=[m for m in map(json.loads, sys.stdin.read().splitlines()) if m["message_type"]=="snapshot"]; print(v[0]["snapshot_id"], v[-1]["snapshot_id"], len(v))')
read -r FIRST NEWEST COUNT <<<"$IDS"
log "chain of $COUNT snapshots; restoring"
timed() { /usr/bin/time -f '%e %M' -o "$WORK/.t" "$@" >"$WORK/.out" 2>"$WORK/.err" || { cat "$WORK/.err" >&2; die "failed: $*"; }; awk '{printf "%s %.1f\n", $1, $2/1024}' "$WORK/.t"; }
# Into a new VDI the default format (auto) sends only the data extents
# (`chunked`, the new VDI reads as zeros); raw sends every byte of the disk.
IMPORT="--target xen://root@127.0.0.1:$PORT/sr/$SR --fingerprint $FP"
OUT=$("$CBT" -r "$R" --json restore "$NEWEST" $IMPORT) || die "restore of $NEWEST failed"
grep -q '"chunked"' <<<"$OUT" || die "auto did not choose chunked: $OUT"
# Newest and first alternate, twice; the better time of each counts (this
# machine's timings swing with page-cache and host state).
best() { awk -v a="$1" -v b="$2" 'BEGIN { print (a < b ? a : b) }'; }
# Every timed step, cbtvault's and cp's alike, starts with the page cache
# dropped (needs root; otherwise every step runs warm).
cold() { sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true; }
cold; read -r T_NEW RSS_NEW < <(timed "$CBT" -r "$R" restore "$NEWEST" $IMPORT)
cold; read -r T_FULL RSS_FULL < <(timed "$CBT" -r "$R" restore "$FIRST" $IMPORT)
cold; read -r T2 _ < <(timed "$CBT" -r "$R" restore "$NEWEST" $IMPORT); T_NEW=$(best "$T_NEW" "$T2")
cold; read -r T2 _ < <(timed "$CBT" -r "$R" restore "$FIRST" $IMPORT); T_FULL=$(best "$T_FULL" "$T2")
cold
read -r T_RAW RSS_RAW < <(timed "$CBT" -r "$R" restore "$NEWEST" $IMPORT --import-format raw)
cold
read -r T_RAW_FULL _ < <(timed "$CBT" -r "$R" restore "$FIRST" $IMPORT --import-format raw)
"$CBT" -r "$R" -q restore "$NEWEST" --target "$WORK/image.raw"
# cp gets what cbtvault got: a cold cache, best of two.
cold; read -r T_CP _ < <(timed bash -c "cp '$WORK/image.raw' '$WORK/copy.raw' && sync")
rm -f "$WORK/copy.raw"
cold; read -r T2 _ < <(timed bash -c "cp '$WORK/image.raw' '$WORK/copy.raw' && sync"); T_CP=$(best "$T_CP" "$T2")
python3 - "$SIZE_MIB" "$COUNT" "$T_NEW" "$T_FULL" "$T_CP" "$RSS_NEW" "$RSS_FULL" "$T_RAW" "$T_RAW_FULL" "$RSS_RAW" <<'PY'
import sys
size, n = int(sys.argv[1]), int(sys.argv[2])
new, full, cp, rss_new, rss_full, raw, raw_full, rss_raw = map(float, sys.argv[3:11])
print(f"disk {size} MiB, chain of {n} snapshots, restore into a new VDI over /import_raw_vdi")
print("rates are disk MiB restored per second (chunked sends only the data extents)")
print(f"restore newest (depth {n}), default (chunked): {new:7.2f}s  {size/new:7.1f} MiB/s  peak RSS {rss_new:.0f} MiB")
print(f"restore first (full), default (chunked):      {full:7.2f}s  {size/full:7.1f} MiB/s  peak RSS {rss_full:.0f} MiB")
print(f"restore newest, --import-format raw:           {raw:7.2f}s  {size/raw:7.1f} MiB/s  peak RSS {rss_raw:.0f} MiB")
print(f"restore first, --import-format raw:            {raw_full:7.2f}s  {size/raw_full:7.1f} MiB/s")
print(f"cp + sync of the raw image:                    {cp:7.2f}s  {size/cp:7.1f} MiB/s")
print(f"newest / full: {new/full:.2f}x default, {raw/raw_full:.2f}x raw (target <= 1.1x)")
print(f"restore vs cp: {cp/new:.2f}x default, {cp/raw:.2f}x raw (target >= 0.7x)")
PY
