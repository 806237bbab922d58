#!/usr/bin/env bash
# bench/xen.sh - XenServer backup against the simulator on loopback.
#
# `cbtvault sim` serves one VM with a BENCH_SIZE_MIB disk; the guest writes
# random data into half of it (4 MiB on, 4 MiB off). Then BENCH_ROUNDS
# rounds (default 3) of, alternately:
#   1. nbdcopy of the VDI's NBD export (as VDI.get_nbd_info gives it: TLS,
#      export name with the session) to /dev/null (the issue's peer), and to
#      null: (the pure read ceiling);
#   2. cbtvault backup xen://.../vm/UUID into a new repository: full VM
#      backup (enable CBT, VM.snapshot, NBD read, hash, compress, store,
#      data_destroy);
# then BENCH_ROUNDS rounds of:
#   3. the guest rewrites 1% of the 64 KiB blocks, spread over the disk
#      (other blocks each round);
#   4. the incremental VM backup (list_changed_blocks, only those blocks).
# Medians and every run are printed; targets (issue 5): incremental <= 5% of
# the full, full at least as fast as nbdcopy of the same export.
#
# Environment:
#   BENCH_SIZE_MIB=4096   disk size
#   BENCH_ROUNDS=3        alternating rounds
#   BENCH_DIR=<repo>/bench-work-xen   work dir (removed unless BENCH_KEEP=1)
#   BENCH_KEEP=0
#   BENCH_BUILD=1         0 = skip `cargo build --release`
#   CBTVAULT=<repo>/target/release/cbtvault
source "$(dirname "${BASH_SOURCE[0]}")/xen-common.sh"

log "guest writes random data into half of the disk"
# sync: the fill's writeback must not land in the first timed round.
t0=$(date +%s.%N); HELP fill "$SIZE_MIB"; sync; t1=$(date +%s.%N)
log "  $(python3 -c "print(f'{$t1-$t0:.1f}s')")"

now() { date +%s.%N; }
secs() { python3 -c "print(f'{$2-$1:.2f}')"; }
ROUNDS=${BENCH_ROUNDS:-3}
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "BENCH_ROUNDS must be a positive integer"

URI=$(HELP nbd "$SIZE_MIB" "$WORK/tls")
SRC="xen://root@127.0.0.1:$PORT/vm/$VM"
backup() { "$CBT" -r "$1" --json backup "$SRC" --fingerprint "$FP" --nbd-connections 4; }
# expect FILE full|BLOCKS: each disk of the VM backup was a full read, or an
# incremental that read exactly BLOCKS blocks.
expect() {
  python3 - "$1" "$2" <<'PY' || die "the backup did not do what was measured: $(cat "$1")"
import json, sys
disks = json.load(open(sys.argv[1]))["disks"]
want = sys.argv[2]
ok = disks and all(d["full"] if want == "full" else (not d["full"] and d["blocks_read"] == int(want)) for d in disks)
sys.exit(0 if ok else 1)
PY
}

# Rounds alternate the peer and cbtvault on the same export, so a slow spell
# of this machine hits both; medians are compared, every run is printed.
FULLS=(); NBDS=(); NULLS=()
for r in $(seq "$ROUNDS"); do
  log "round $r/$ROUNDS: nbdcopy of the NBD export to /dev/null (the issue's peer)"
  sync; t0=$(now); nbdcopy --request-size=2097152 "$URI" /dev/null; t1=$(now)
  NBDS+=("$(secs "$t0" "$t1")")
  log "round $r/$ROUNDS: nbdcopy of the NBD export to null: (pure read ceiling)"
  t0=$(now); nbdcopy --request-size=2097152 "$URI" null:; t1=$(now)
  NULLS+=("$(secs "$t0" "$t1")")
  # Every round's full goes into a new repository (the last one is kept
  # for the incrementals).
  rm -rf "$WORK/repo"; "$CBT" -r "$WORK/repo" init >/dev/null
  log "round $r/$ROUNDS: full VM backup"
  sync; t0=$(now); backup "$WORK/repo" >"$WORK/full.txt"; t1=$(now)
  FULLS+=("$(secs "$t0" "$t1")"); expect "$WORK/full.txt" full
done

INCS=(); CHANGED=0
for r in $(seq "$ROUNDS"); do
  log "round $r/$ROUNDS: the guest rewrites 1% of the blocks (other blocks each round)"
  CHANGED=$(HELP change "$SIZE_MIB" "$r")
  log "round $r/$ROUNDS: incremental VM backup ($CHANGED blocks changed)"
  sync; t0=$(now); backup "$WORK/repo" >"$WORK/inc.txt"; t1=$(now)
  INCS+=("$(secs "$t0" "$t1")"); expect "$WORK/inc.txt" "$CHANGED"
done

python3 - "$SIZE_MIB" "$CHANGED" "${NBDS[*]}" "${NULLS[*]}" "${FULLS[*]}" "${INCS[*]}" <<'PY'
import statistics, sys
size, changed = int(sys.argv[1]), int(sys.argv[2])
nbd, null, full, inc = ([float(x) for x in a.split()] for a in sys.argv[3:7])
med = statistics.median
runs = lambda v: " / ".join(f"{x:.2f}" for x in v)
print(f"disk {size} MiB (half random data, half never written), 1% = {changed} blocks changed per round")
print(f"medians of {len(full)} alternating rounds (every run: in brackets)")
print(f"nbdcopy of the NBD export to /dev/null: {med(nbd):7.2f}s  {size/med(nbd):7.1f} MiB/s  [{runs(nbd)}]")
print(f"nbdcopy of the NBD export to null:      {med(null):7.2f}s  {size/med(null):7.1f} MiB/s  [{runs(null)}] (read ceiling)")
print(f"cbtvault full VM backup:            {med(full):7.2f}s  {size/med(full):7.1f} MiB/s  [{runs(full)}]")
print(f"  speed {med(nbd)/med(full):.2f}x nbdcopy /dev/null (target >= 1.0x; per round {' / '.join(f'{n/f:.2f}' for n, f in zip(nbd, full))}); {med(null)/med(full):.2f}x null:")
print(f"cbtvault incremental (1% changed):  {med(inc):7.2f}s  [{runs(inc)}]  ({100*med(inc)/med(full):.1f}% of the full; target <= 5%)")
PY
