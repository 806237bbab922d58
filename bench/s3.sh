#!/usr/bin/env bash
# bench/s3.sh - cbtvault on a local S3 server (issue 14's benchmark).
#
# One run, one local S3 server on a loopback port, the bench image of repo-core.sh:
#   1. full backup of the image straight to S3 vs to a local repository;
#   2. `cbtvault copy` of a local repository holding that image and
#      BENCH_INCREMENTALS CBT incrementals to S3, vs `restic copy` of the
#      equivalent restic repository (same image, backed up as often) to the same server.
# Both S3 results are restored and compared with the image. See bench/README.md.
#
# Environment (the common ones as in repo-core.sh):
#   BENCH_SIZE_MIB=4096     image size in MiB
#   BENCH_INCREMENTALS=10   incremental backups in the repositories copied
#   BENCH_CHANGE_PCT=2      percentage of blocks rewritten before each incremental
#   BENCH_S3=s3s-fs         S3 server: s3s-fs (files in the work dir, SigV4 enforced) | moto (in memory)
#   BENCH_DIR=<repo>/bench-work/s3   work dir; must be new or a previous s3 bench work dir;
#                           removed at the end unless BENCH_KEEP=1
#   BENCH_KEEP=0            1 = keep the work dir
#   BENCH_ZEROS=hole        zero blocks as hole (sparse file) | data (written zeros)
#   BENCH_SEED=42           seed for the data and the changed blocks
#   BENCH_DROP_CACHES=1     0 = never drop the page cache
#   BENCH_SKIP_RESTIC=0     1 = skip restic
#   BENCH_BUILD=1           0 = do not run `cargo build --release`
#   CBTVAULT=<repo>/target/release/cbtvault   binary to benchmark
#   BENCH_JSON_OUT=         also write the final JSON line to this file
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SIZE_MIB=${BENCH_SIZE_MIB:-4096}
INCR=${BENCH_INCREMENTALS:-10}
SERVER=${BENCH_S3:-s3s-fs}
WORK=${BENCH_DIR:-$ROOT/bench-work/s3}
KEEP=${BENCH_KEEP:-0}
ZEROS=${BENCH_ZEROS:-hole}
CHANGE_PCT=${BENCH_CHANGE_PCT:-2}
SEED=${BENCH_SEED:-42}
DROP=${BENCH_DROP_CACHES:-1}
SKIP_RESTIC=${BENCH_SKIP_RESTIC:-0}
BUILD=${BENCH_BUILD:-1}
CBT=${CBTVAULT:-$ROOT/target/release/cbtvault}
JSON_OUT=${BENCH_JSON_OUT:-}
BS=65536
MARKER=.s3-bench
BUCKET=bench

die() { echo "s3-bench: error: $*" >&2; exit 1; }
log() { echo "== $*" >&2; }
BENCH_NAME=s3-bench

[[ $SIZE_MIB =~ ^[0-9]+$ && $SIZE_MIB -ge 1 ]] || die "BENCH_SIZE_MIB must be a positive integer"
[[ $INCR =~ ^[0-9]+$ ]] || die "BENCH_INCREMENTALS must be a non-negative integer"
[[ $ZEROS == hole || $ZEROS == data ]] || die "BENCH_ZEROS must be hole or data"
[[ $CHANGE_PCT =~ ^[0-9]+([.][0-9]+)?$ ]] || die "BENCH_CHANGE_PCT must be a number"
case $SERVER in
  s3s-fs) SERVER_BIN=$(command -v s3s-fs || echo "$HOME/.cargo/bin/s3s-fs")
          [[ -x $SERVER_BIN ]] || die "s3s-fs not found: cargo install s3s-fs@0.14.1 --features binary --locked (or BENCH_S3=moto)" ;;
  moto)   SERVER_BIN=$(command -v moto_server) || die "moto_server not found: pip install 'moto[server]'" ;;
  *)      die "BENCH_S3 must be s3s-fs or moto" ;;
esac
for t in python3 /usr/bin/time du cp openssl; do
  command -v "$t" >/dev/null || die "missing tool: $t"
done
if command -v b3sum >/dev/null; then HASH=b3sum; else HASH=sha256sum; fi

# ---------------------------------------------------------------- work dir
# shellcheck source=bench/workdir.sh
. "$ROOT/bench/workdir.sh"
SERVER_PID=
bench_cleanup_extra() {
  if [[ -n $SERVER_PID ]]; then
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
}
claim_workdir

IMG=$WORK/image.raw
LREPO=$WORK/cbtvault-local        # full backup only (the local reference of step 1)
CREPO=$WORK/cbtvault-chain        # full + incrementals, source of `cbtvault copy`
RREPO=$WORK/restic-local          # restic's equivalent, source of `restic copy`
S3ROOT=$WORK/s3                   # s3s-fs's folder
RESULTS=$WORK/results.tsv
: >"$RESULTS"
put() { printf '%s\t%s\n' "$1" "$2" >>"$RESULTS"; }
# shellcheck source=bench/common.sh
. "$ROOT/bench/common.sh"

# ---------------------------------------------------------------- build / tools
private_binary
if [[ $SKIP_RESTIC != 1 ]]; then ensure_restic; else RESTIC_VER=null; fi

# ---------------------------------------------------------------- S3 server
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export AWS_ACCESS_KEY_ID=benchaccess AWS_SECRET_ACCESS_KEY=benchsecret-0123456789 AWS_REGION=us-east-1
unset AWS_SESSION_TOKEN AWS_PROFILE AWS_DEFAULT_REGION
export CBTVAULT_S3_ENDPOINT=http://127.0.0.1:$PORT
export CBTVAULT_CACHE_DIR=$WORK/cbtvault-cache
export RESTIC_PASSWORD=bench RESTIC_CACHE_DIR=$WORK/restic-cache
unset RESTIC_REPOSITORY
log "starting $SERVER on 127.0.0.1:$PORT"
if [[ $SERVER == s3s-fs ]]; then
  mkdir -p "$S3ROOT"
  "$SERVER_BIN" --host 127.0.0.1 --port "$PORT" --access-key "$AWS_ACCESS_KEY_ID" \
    --secret-key "$AWS_SECRET_ACCESS_KEY" "$S3ROOT" >"$WORK/server.log" 2>&1 &
else
  "$SERVER_BIN" -H 127.0.0.1 -p "$PORT" >"$WORK/server.log" 2>&1 &
fi
SERVER_PID=$!
for _ in $(seq 200); do
  kill -0 "$SERVER_PID" 2>/dev/null || { tail -n 20 "$WORK/server.log" >&2; die "$SERVER exited at start"; }
  python3 -c 'import socket,sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 0.2).close()' "$PORT" 2>/dev/null && break
  sleep 0.1
done
python3 -c 'import socket,sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 0.2).close()' "$PORT" 2>/dev/null ||
  die "$SERVER does not listen on port $PORT"
S3=s3://$BUCKET
RS3=s3:http://127.0.0.1:$PORT/$BUCKET

# s3size PREFIX: bytes stored under the bucket's PREFIX/ (sum of the listing's sizes).
s3size() {
  python3 - "$CBTVAULT_S3_ENDPOINT" "$BUCKET" "$1/" <<'PY'
import sys
try:
    import boto3
except ImportError:
    print("null"); sys.exit(0)
c = boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1")
total, token = 0, None
while True:
    kw = {"Bucket": sys.argv[2], "Prefix": sys.argv[3]}
    if token:
        kw["ContinuationToken"] = token
    r = c.list_objects_v2(**kw)
    total += sum(o["Size"] for o in r.get("Contents", []))
    if not r.get("IsTruncated"):
        break
    token = r["NextContinuationToken"]
print(total)
PY
}
# loopback traffic counter (both directions of every loopback connection of the machine)
lo_bytes() { cat /sys/class/net/lo/statistics/tx_bytes 2>/dev/null || echo 0; }
# hashcmp NAME FILE EXPECTED: FILE's hash must be EXPECTED (the image's)
hashcmp() {
  local h
  h=$($HASH "$2" | awk '{print $1}')
  put "$1_hash" "$h"
  [[ $h == "$3" ]] || die "$1: restored image differs from the source ($HASH $h != $3)"
}

put size_mib "$SIZE_MIB"
put zeros "$ZEROS"
put caches "$CACHES"
put hash "$HASH"
put server "$SERVER"
put restic_version "$RESTIC_VER"
put cbtvault_version "$("$CBT" --version | awk '{print $2}')"
put change_pct "$CHANGE_PCT"
put incrementals "$INCR"
put git_rev "$(git_rev)"
put loadavg_start "$(cut -d' ' -f1 /proc/loadavg)"

# ---------------------------------------------------------------- 1. image
log "generating ${SIZE_MIB} MiB image (64 KiB blocks, i%5<3 random, else zero as $ZEROS)"
gen_image "$IMG" "$SIZE_MIB" "$ZEROS" "$SEED"
IMG_BYTES=$(stat -c %s "$IMG")
put image_bytes "$IMG_BYTES"
H_FULL=$($HASH "$IMG" | awk '{print $1}')
put image_full_hash "$H_FULL"

# ---------------------------------------------------------------- 2. full backup: local vs S3
log "cbtvault full backup to a local repository"
"$CBT" -r "$LREPO" init --json >"$WORK/out-local_init.txt"
timed local_full "$CBT" -r "$LREPO" backup "$IMG" --json
put local_full.json "$(lastjson local_full)"
put local_repo_bytes "$(dusize "$LREPO")"

log "cbtvault full backup straight to S3 ($S3/direct)"
"$CBT" -r "$S3/direct" init --json >"$WORK/out-s3_init.txt"
timed s3_full "$CBT" -r "$S3/direct" backup "$IMG" --json
put s3_full.json "$(lastjson s3_full)"
put s3_direct_bytes "$(s3size direct)"

log "restore from S3 and compare"
timed s3_restore "$CBT" -r "$S3/direct" restore latest --target "$WORK/restored.raw" --json
hashcmp s3_restore "$WORK/restored.raw" "$H_FULL"
rm -f -- "$WORK/restored.raw"

# ---------------------------------------------------------------- 3. the repositories to copy
log "source repositories: full + $INCR incrementals of ${CHANGE_PCT}% (cbtvault with --changed-blocks, restic rereading)"
cp -a "$LREPO" "$CREPO"          # the same full backup, then the chain
if [[ $SKIP_RESTIC != 1 ]]; then
  restic -r "$RREPO" init -q >/dev/null
  put restic_repo_version "$(restic -r "$RREPO" cat config | python3 -c 'import json,sys; print(json.load(sys.stdin)["version"])')"
  restic -r "$RREPO" backup -q "$IMG" >/dev/null
fi
CHANGED_TOTAL=0
for round in $(seq "$INCR"); do
  n=$(change_blocks "$IMG" "$WORK/changed.b64" "$CHANGE_PCT" "$SEED-$round")
  CHANGED_TOTAL=$(( CHANGED_TOTAL + n ))
  "$CBT" -r "$CREPO" backup "$IMG" --changed-blocks "$WORK/changed.b64" --json >"$WORK/out-chain-$round.txt"
  if [[ $SKIP_RESTIC != 1 ]]; then
    restic -r "$RREPO" backup -q "$IMG" >/dev/null
  fi
  log "round $round/$INCR: $n blocks changed"
done
put changed_blocks_total "$CHANGED_TOTAL"
H_LAST=$($HASH "$IMG" | awk '{print $1}')
put image_last_hash "$H_LAST"
put chain_repo_bytes "$(dusize "$CREPO")"
[[ $SKIP_RESTIC == 1 ]] || put restic_local_bytes "$(dusize "$RREPO")"

# ---------------------------------------------------------------- 4. copy to S3: cbtvault vs restic
log "cbtvault copy --all to $S3/copy"
"$CBT" -r "$S3/copy" init --json >"$WORK/out-copy_init.txt"
lo0=$(lo_bytes)
timed cbt_copy "$CBT" copy --from "$CREPO" --to "$S3/copy" --all --json
put cbt_copy.lo_bytes "$(( $(lo_bytes) - lo0 ))"
put cbt_copy.json "$(lastjson cbt_copy)"
put cbt_copy_s3_bytes "$(s3size copy)"

log "restore latest from the S3 copy and compare"
timed copy_restore "$CBT" -r "$S3/copy" restore latest --target "$WORK/restored.raw" --json
hashcmp copy_restore "$WORK/restored.raw" "$H_LAST"
rm -f -- "$WORK/restored.raw"

if [[ $SKIP_RESTIC != 1 ]]; then
  log "restic copy to $RS3/restic"
  restic -r "$RS3/restic" init -q --copy-chunker-params --from-repo "$RREPO" \
    --from-password-file <(echo "$RESTIC_PASSWORD") >/dev/null
  lo0=$(lo_bytes)
  timed restic_copy restic -r "$RS3/restic" copy --from-repo "$RREPO" \
    --from-password-file <(echo "$RESTIC_PASSWORD")
  put restic_copy.lo_bytes "$(( $(lo_bytes) - lo0 ))"
  put restic_copy_s3_bytes "$(s3size restic)"
  put restic_copy_snapshots "$(restic -r "$RS3/restic" snapshots --json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')"
fi
if [[ $SERVER == s3s-fs ]]; then
  put s3_folder_bytes "$(dusize "$S3ROOT")"
fi

put loadavg_end "$(cut -d' ' -f1 /proc/loadavg)"

# ---------------------------------------------------------------- 5. report
python3 - "$RESULTS" "$JSON_OUT" <<'PY'
import json, os, sys
raw = {}
for line in open(sys.argv[1]):
    k, _, v = line.rstrip("\n").partition("\t")
    raw[k] = v
MiB = 1024 * 1024
def f(k):
    v = raw.get(k)
    return None if v in (None, "", "null") else float(v)
def j(k):
    v = raw.get(k)
    return json.loads(v) if v else None
def div(a, b):
    return None if a is None or b in (None, 0) else a / b
def mib(k):
    v = f(k)
    return None if v is None else v / MiB

size = f("image_bytes")
have_restic = "restic_copy.wall_s" in raw
cj = j("cbt_copy.json") or {}
r = {
    "size_mib": int(f("size_mib")),
    "zero_blocks_as": raw["zeros"],
    "page_cache": raw["caches"],
    "s3_server": raw["server"],
    "cbtvault_version": raw["cbtvault_version"],
    "git_rev": raw["git_rev"],
    "loadavg_start": f("loadavg_start"),
    "loadavg_end": f("loadavg_end"),
    "restic_version": None if raw["restic_version"] == "null" else raw["restic_version"],
    "restic_repo_version": raw.get("restic_repo_version"),
    "incrementals": int(f("incrementals")),
    "change_pct": f("change_pct"),
    "changed_blocks_total": int(f("changed_blocks_total")),
}
r["local_full_s"] = f("local_full.wall_s")
r["local_full_mibs"] = div(size / MiB, r["local_full_s"])
r["s3_full_s"] = f("s3_full.wall_s")
r["s3_full_mibs"] = div(size / MiB, r["s3_full_s"])
r["s3_vs_local"] = div(r["s3_full_mibs"], r["local_full_mibs"])
r["s3_restore_s"] = f("s3_restore.wall_s")
r["s3_restore_mibs"] = div(size / MiB, r["s3_restore_s"])
r["local_full_rss_mib"] = f("local_full.rss_kib") / 1024
r["s3_full_rss_mib"] = f("s3_full.rss_kib") / 1024
r["local_repo_mib"] = mib("local_repo_bytes")
r["s3_direct_mib"] = mib("s3_direct_bytes")
r["chain_repo_mib"] = mib("chain_repo_bytes")
r["cbt_copy_s"] = f("cbt_copy.wall_s")
r["cbt_copy_sent_stored_mib"] = None if "sent_stored_bytes" not in cj else cj["sent_stored_bytes"] / MiB
r["cbt_copy_snapshots"] = len(cj.get("copied_snapshot_ids", [])) if cj else None
r["cbt_copy_lo_mib"] = mib("cbt_copy.lo_bytes")
r["cbt_copy_s3_mib"] = mib("cbt_copy_s3_bytes")
r["cbt_copy_rss_mib"] = f("cbt_copy.rss_kib") / 1024
r["copy_restore_s"] = f("copy_restore.wall_s")
if have_restic:
    r["restic_local_mib"] = mib("restic_local_bytes")
    r["restic_copy_s"] = f("restic_copy.wall_s")
    r["restic_copy_lo_mib"] = mib("restic_copy.lo_bytes")
    r["restic_copy_s3_mib"] = mib("restic_copy_s3_bytes")
    r["restic_copy_rss_mib"] = f("restic_copy.rss_kib") / 1024
    r["restic_copy_snapshots"] = int(f("restic_copy_snapshots"))
else:
    for k in ("restic_local_mib", "restic_copy_s", "restic_copy_lo_mib", "restic_copy_s3_mib",
              "restic_copy_rss_mib", "restic_copy_snapshots"):
        r[k] = None
r["copy_time_ratio_vs_restic"] = div(r["cbt_copy_s"], r["restic_copy_s"])
r["s3_folder_mib"] = mib("s3_folder_bytes")
r["restores_verified"] = (raw["s3_restore_hash"] == raw["image_full_hash"]
                          and raw["copy_restore_hash"] == raw["image_last_hash"])
r["hash"] = raw["hash"]

def mark(ok):
    return "n/a" if ok is None else ("PASS" if ok else "MISS")
def cell(template, *vals):
    return "n/a" if any(v is None for v in vals) else template.format(*vals)
rows = [
    ("full backup MiB/s (S3 | local)",
     cell("{:.1f} | {:.1f}  ratio {:.2f}x", r["s3_full_mibs"], r["local_full_mibs"], r["s3_vs_local"]),
     ">= 0.8x local", mark(None if r["s3_vs_local"] is None else r["s3_vs_local"] >= 0.8)),
    ("full backup wall s (S3 | local)",
     cell("{:.2f} | {:.2f}", r["s3_full_s"], r["local_full_s"]), "", ""),
    ("peak RSS MiB full backup (S3 | local)",
     cell("{:.1f} | {:.1f}", r["s3_full_rss_mib"], r["local_full_rss_mib"]), "", ""),
    ("restore from S3 MiB/s",
     cell("{:.1f}", r["s3_restore_mibs"]), "", ""),
    ("copy wall s (cbtvault | restic)",
     cell("{:.2f} | ", r["cbt_copy_s"]) + cell("{:.2f}  ratio {:.2f}x", r["restic_copy_s"], r["copy_time_ratio_vs_restic"]),
     "<= 1x restic", mark(None if r["copy_time_ratio_vs_restic"] is None else r["copy_time_ratio_vs_restic"] <= 1)),
    ("copy snapshots (cbtvault | restic)",
     cell("{} | ", r["cbt_copy_snapshots"]) + cell("{}", r["restic_copy_snapshots"]), "", ""),
    ("copy loopback MiB (cbtvault | restic)",
     cell("{:.1f} | ", r["cbt_copy_lo_mib"]) + cell("{:.1f}", r["restic_copy_lo_mib"]), "", ""),
    ("copy sent to packs MiB (cbtvault)",
     cell("{:.1f}", r["cbt_copy_sent_stored_mib"]), "", ""),
    ("source repo MiB (cbtvault | restic)",
     cell("{:.1f} | ", r["chain_repo_mib"]) + cell("{:.1f}", r["restic_local_mib"]), "", ""),
    ("repo in S3 after copy MiB (cbtvault | restic)",
     cell("{:.1f} | ", r["cbt_copy_s3_mib"]) + cell("{:.1f}", r["restic_copy_s3_mib"]), "", ""),
    ("full backup in S3 MiB | local repo MiB",
     cell("{:.1f} | {:.1f}", r["s3_direct_mib"], r["local_repo_mib"]), "", ""),
    ("peak RSS MiB copy (cbtvault | restic)",
     cell("{:.1f} | ", r["cbt_copy_rss_mib"]) + cell("{:.1f}", r["restic_copy_rss_mib"]), "", ""),
    ("restores verified (" + r["hash"] + ": S3 backup, S3 copy)", "yes" if r["restores_verified"] else "NO",
     "must match", mark(r["restores_verified"])),
]
print()
print(f'cbtvault {r["cbtvault_version"]} ({r["git_rev"]}) vs restic {r["restic_version"] or "n/a"} (repo v{r["restic_repo_version"] or "?"}) | '
      f'S3 server {r["s3_server"]} on loopback | image {r["size_mib"]} MiB, 60% random / 40% zero blocks (zeros as {r["zero_blocks_as"]}), '
      f'{r["incrementals"]} incrementals of {r["change_pct"]:g}% ({r["changed_blocks_total"]} blocks) | '
      f'page cache {r["page_cache"]} before each step | loadavg {r["loadavg_start"]:.2f} -> {r["loadavg_end"]:.2f}')
w0 = max(len(x[0]) for x in rows); w1 = max(len(x[1]) for x in rows); w2 = max(len(x[2]) for x in rows)
print(f'{"metric":<{w0}}  {"value":<{w1}}  {"target":<{w2}}  result')
print("-" * (w0 + w1 + w2 + 14))
for a, b, c, d in rows:
    print(f"{a:<{w0}}  {b:<{w1}}  {c:<{w2}}  {d}")
ncpu = os.cpu_count() or 1
if max(r["loadavg_start"], r["loadavg_end"]) > 0.5 * ncpu:
    print(f"note: load average reached {max(r['loadavg_start'], r['loadavg_end']):.2f} on {ncpu} CPUs: "
          "other work was running, timings are noisy")
print()
line = json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}, separators=(",", ":"))
print(line)
if sys.argv[2]:
    with open(sys.argv[2], "w") as fh:
        fh.write(line + "\n")
PY
