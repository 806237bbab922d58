#!/usr/bin/env bash
# bench/xen.sh - XenServer backup against the simulator on loopback.
#
# `cbtvault sim` serves one VM with a BENCH_SIZE_MIB disk; the guest writes
# random data into half of it (4 MiB on, 4 MiB off). Then:
#   1. nbdcopy of the VDI's NBD export (as VDI.get_nbd_info gives it: TLS,
#      export name with the session) to /dev/null (the issue's peer), and to
#      null: (the pure read ceiling);
#   2. cbtvault backup xen://.../vm/UUID: full VM backup (enable CBT,
#      VM.snapshot, NBD read, hash, compress, store, data_destroy);
#   3. the guest rewrites 1% of the 64 KiB blocks, spread over the disk;
#   4. the incremental VM backup (list_changed_blocks, only those blocks).
# Wall times are printed; targets (issue 5): incremental <= 5% of the full,
# full at least as fast as nbdcopy of the same export.
#
# Environment:
#   BENCH_SIZE_MIB=4096   disk size
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

URI=$(HELP nbd "$SIZE_MIB" "$WORK/tls")
# The issue's peer: nbdcopy to /dev/null; null: (no writes at all) is the
# pure read ceiling, shown for reference.
log "nbdcopy of the NBD export to /dev/null"
t0=$(now); nbdcopy --request-size=2097152 "$URI" /dev/null ; t1=$(now)
NBDCOPY=$(secs "$t0" "$t1")
log "  nbdcopy: ${NBDCOPY}s"
log "nbdcopy of the NBD export to null:"
t0=$(now); nbdcopy --request-size=2097152 "$URI" null: ; t1=$(now)
NBDNULL=$(secs "$t0" "$t1")
log "  nbdcopy null: ${NBDNULL}s"

"$CBT" -r "$WORK/repo" init >/dev/null
SRC="xen://root@127.0.0.1:$PORT/vm/$VM"
log "full VM backup"
t0=$(now); "$CBT" -r "$WORK/repo" backup "$SRC" --fingerprint "$FP" --nbd-connections 4 >"$WORK/full.txt"; t1=$(now)
FULL=$(secs "$t0" "$t1"); cat "$WORK/full.txt" >&2

log "guest rewrites 1% of the blocks"
CHANGED=$(HELP change "$SIZE_MIB")
log "incremental VM backup ($CHANGED blocks changed)"
t0=$(now); "$CBT" -r "$WORK/repo" backup "$SRC" --fingerprint "$FP" --nbd-connections 4 >"$WORK/inc.txt"; t1=$(now)
INC=$(secs "$t0" "$t1"); cat "$WORK/inc.txt" >&2

python3 - "$SIZE_MIB" "$NBDCOPY" "$FULL" "$INC" "$CHANGED" "$NBDNULL" <<'PY'
import sys
size, nbd, full, inc, changed = int(sys.argv[1]), *map(float, sys.argv[2:5]), int(sys.argv[5])
null = float(sys.argv[6])
print(f"disk {size} MiB (half random data, half never written), 1% = {changed} blocks changed")
print(f"nbdcopy of the NBD export to /dev/null: {nbd:7.2f}s  {size/nbd:7.1f} MiB/s")
print(f"nbdcopy of the NBD export to null:      {null:7.2f}s  {size/null:7.1f} MiB/s (read ceiling)")
print(f"cbtvault full VM backup:            {full:7.2f}s  {size/full:7.1f} MiB/s  (speed {nbd/full:.2f}x nbdcopy /dev/null, target >= 1.0x; {null/full:.2f}x null:)")
print(f"cbtvault incremental (1% changed):  {inc:7.2f}s  ({100*inc/full:.1f}% of the full; target <= 5%)")
PY
