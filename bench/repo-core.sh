#!/usr/bin/env bash
# bench/repo-core.sh - cbtvault core benchmark, side by side with restic, cp and zstd.
#
# One run, one disk, one generated raw image:
#   full backup, CBT-driven incremental backup, restore + checksum, compared with
#   restic (full + second run), `cp` (restore peer) and `zstd -3 -T1` (size peer).
# See bench/README.md for what is measured and how to read the output.
#
# Environment:
#   BENCH_SIZE_MIB=4096     image size in MiB (multiple of 64 KiB by construction)
#   BENCH_DIR=<repo>/bench-work   work dir (image, repos, copies); must be new or a
#                           previous bench work dir; removed at the end unless BENCH_KEEP=1
#   BENCH_KEEP=0            1 = keep the work dir
#   BENCH_ZEROS=hole        how the 40% zero blocks are stored: hole (sparse file) | data (written zeros)
#   BENCH_CHANGE_PCT=2      percentage of blocks rewritten before the incremental run
#   BENCH_SEED=42           seed for the random data stream and the choice of changed blocks
#   BENCH_DROP_CACHES=1     0 = never drop the page cache (otherwise dropped before each timed step if possible)
#   BENCH_SKIP_RESTIC=0     1 = skip restic
#   BENCH_BUILD=1           0 = do not run `cargo build --release`
#   CBTVAULT=<repo>/target/release/cbtvault   binary to benchmark
#   BENCH_JSON_OUT=         also write the final JSON line to this file
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SIZE_MIB=${BENCH_SIZE_MIB:-4096}
WORK=${BENCH_DIR:-$ROOT/bench-work}
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
MARKER=.repo-core-bench

die() { echo "repo-core: error: $*" >&2; exit 1; }
log() { echo "== $*" >&2; }
BENCH_NAME=repo-core

[[ $SIZE_MIB =~ ^[0-9]+$ && $SIZE_MIB -ge 1 ]] || die "BENCH_SIZE_MIB must be a positive integer"
[[ $ZEROS == hole || $ZEROS == data ]] || die "BENCH_ZEROS must be hole or data"
[[ $CHANGE_PCT =~ ^[0-9]+([.][0-9]+)?$ ]] || die "BENCH_CHANGE_PCT must be a number"
for t in python3 /usr/bin/time zstd du cp openssl; do
  command -v "$t" >/dev/null || die "missing tool: $t"
done
if command -v b3sum >/dev/null; then HASH=b3sum; else HASH=sha256sum; fi

# ---------------------------------------------------------------- work dir
# shellcheck source=bench/workdir.sh
. "$ROOT/bench/workdir.sh"
claim_workdir

IMG=$WORK/image.raw
CREPO=$WORK/cbtvault-repo
RREPO=$WORK/restic-repo
RESULTS=$WORK/results.tsv
: >"$RESULTS"
put() { printf '%s\t%s\n' "$1" "$2" >>"$RESULTS"; }
# shellcheck source=bench/common.sh
. "$ROOT/bench/common.sh"

# ---------------------------------------------------------------- build / tools
private_binary

if [[ $SKIP_RESTIC != 1 ]]; then ensure_restic; else RESTIC_VER=null; fi

put size_mib "$SIZE_MIB"
put zeros "$ZEROS"
put caches "$CACHES"
put hash "$HASH"
put restic_version "$RESTIC_VER"
put cbtvault_version "$("$CBT" --version | awk '{print $2}')"
put change_pct "$CHANGE_PCT"
put git_rev "$(git_rev)"
put loadavg_start "$(cut -d' ' -f1 /proc/loadavg)"

# ---------------------------------------------------------------- 1. image
log "generating ${SIZE_MIB} MiB image (64 KiB blocks, i%5<3 random, else zero as $ZEROS)"
gen_image "$IMG" "$SIZE_MIB" "$ZEROS" "$SEED"
IMG_BYTES=$(stat -c %s "$IMG")
put image_bytes "$IMG_BYTES"
put image_alloc_bytes "$(( $(stat -c %b "$IMG") * $(stat -c %B "$IMG") ))"
put blocks "$(( IMG_BYTES / BS ))"
put nonzero_blocks "$(python3 -c "n=$IMG_BYTES//$BS; print(sum(1 for i in range(n) if i%5<3))")"

# ---------------------------------------------------------------- zstd reference
log "zstd -3 -T1 of the image (size reference)"
timed zstd sh -c 'zstd -3 -T1 -q -c "$1" | wc -c' sh "$IMG"
put zstd_bytes "$(tr -d ' \n' <"$WORK/out-zstd.txt")"

# ---------------------------------------------------------------- 2. cbtvault full
log "cbtvault full backup"
"$CBT" -r "$CREPO" init --json >"$WORK/out-cbt_init.txt"
put cbt_repo_init_bytes "$(dusize "$CREPO")"
timed cbt_full "$CBT" -r "$CREPO" backup "$IMG" --json
put cbt_full.json "$(lastjson cbt_full)"
put cbt_repo_full_bytes "$(dusize "$CREPO")"

# ---------------------------------------------------------------- 5a. restic full
if [[ $SKIP_RESTIC != 1 ]]; then
  log "restic full backup"
  export RESTIC_PASSWORD=bench RESTIC_REPOSITORY=$RREPO RESTIC_CACHE_DIR=$WORK/restic-cache
  restic init -q >/dev/null
  put restic_repo_version "$(restic cat config | python3 -c 'import json,sys; print(json.load(sys.stdin)["version"])')"
  put restic_repo_init_bytes "$(dusize "$RREPO")"
  timed restic_full restic backup --json "$IMG"
  put restic_full.json "$(lastjson restic_full)"
  put restic_repo_full_bytes "$(dusize "$RREPO")"
fi

# ---------------------------------------------------------------- 3. modify + CBT bitmap
log "rewriting ${CHANGE_PCT}% of the blocks with random data, writing the CBT bitmap"
CHANGED=$(change_blocks "$IMG" "$WORK/changed.b64" "$CHANGE_PCT" "$SEED")
put changed_blocks "$CHANGED"
put changed_bytes "$(( CHANGED * BS ))"

# ---------------------------------------------------------------- 3b. cbtvault incremental
log "cbtvault incremental backup (--changed-blocks)"
timed cbt_incr "$CBT" -r "$CREPO" backup "$IMG" --changed-blocks "$WORK/changed.b64" --json
put cbt_incr.json "$(lastjson cbt_incr)"
put cbt_repo_incr_bytes "$(dusize "$CREPO")"

# ---------------------------------------------------------------- 5b. restic second run
if [[ $SKIP_RESTIC != 1 ]]; then
  log "restic second backup"
  timed restic_incr restic backup --json "$IMG"
  put restic_incr.json "$(lastjson restic_incr)"
  put restic_repo_incr_bytes "$(dusize "$RREPO")"
fi

# ---------------------------------------------------------------- 4. cbtvault restore
log "cbtvault restore latest"
timed cbt_restore "$CBT" -r "$CREPO" restore latest --target "$WORK/restored.raw" --json
put cbt_restore.json "$(lastjson cbt_restore)"
put restored_alloc_bytes "$(( $(stat -c %b "$WORK/restored.raw") * $(stat -c %B "$WORK/restored.raw") ))"
log "checksums ($HASH)"
H_IMG=$($HASH "$IMG" | awk '{print $1}')
H_RES=$($HASH "$WORK/restored.raw" | awk '{print $1}')
put image_hash "$H_IMG"
put restored_hash "$H_RES"
if [[ $H_IMG != "$H_RES" ]]; then
  die "restored image differs from the source ($HASH $H_RES != $H_IMG)"
fi

# ---------------------------------------------------------------- 6. cp peer
log "cp image copy; sync"
timed cp cp "$IMG" "$WORK/copy.raw"
put copy_alloc_bytes "$(( $(stat -c %b "$WORK/copy.raw") * $(stat -c %B "$WORK/copy.raw") ))"
rm -f -- "$WORK/copy.raw"

put loadavg_end "$(cut -d' ' -f1 /proc/loadavg)"

# ---------------------------------------------------------------- 7. report
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

size = f("image_bytes")
have_restic = "restic_full.wall_s" in raw
r = {
    "size_mib": int(f("size_mib")),
    "zero_blocks_as": raw["zeros"],
    "page_cache": raw["caches"],
    "cbtvault_version": raw["cbtvault_version"],
    "git_rev": raw["git_rev"],
    "loadavg_start": f("loadavg_start"),
    "loadavg_end": f("loadavg_end"),
    "restic_version": None if raw["restic_version"] == "null" else raw["restic_version"],
    "restic_repo_version": raw.get("restic_repo_version"),
    "changed_blocks": int(f("changed_blocks")),
    "changed_mib": f("changed_bytes") / MiB,
}
r["cbt_full_s"] = f("cbt_full.wall_s")
r["cbt_full_mibs"] = div(size / MiB, r["cbt_full_s"])
r["restic_full_s"] = f("restic_full.wall_s") if have_restic else None
r["restic_full_mibs"] = div(size / MiB, r["restic_full_s"])
r["full_ratio_vs_restic"] = div(r["cbt_full_mibs"], r["restic_full_mibs"])
r["cbt_incr_s"] = f("cbt_incr.wall_s")
r["cbt_incr_pct_of_full"] = 100 * div(r["cbt_incr_s"], r["cbt_full_s"])
r["restic_incr_s"] = f("restic_incr.wall_s") if have_restic else None
r["restic_incr_pct_of_full"] = None if not have_restic else 100 * div(r["restic_incr_s"], r["restic_full_s"])
chg = f("changed_bytes")
r["cbt_growth_mib"] = (f("cbt_repo_incr_bytes") - f("cbt_repo_full_bytes")) / MiB
r["cbt_growth_per_changed"] = div(r["cbt_growth_mib"] * MiB, chg)
if have_restic:
    r["restic_growth_mib"] = (f("restic_repo_incr_bytes") - f("restic_repo_full_bytes")) / MiB
    r["restic_growth_per_changed"] = div(r["restic_growth_mib"] * MiB, chg)
else:
    r["restic_growth_mib"] = r["restic_growth_per_changed"] = None
r["cbt_restore_s"] = f("cbt_restore.wall_s")
r["cbt_restore_mibs"] = div(size / MiB, r["cbt_restore_s"])
r["cp_s"] = f("cp.wall_s")
r["cp_mibs"] = div(size / MiB, r["cp_s"])
r["restore_ratio_vs_cp"] = div(r["cbt_restore_mibs"], r["cp_mibs"])
for step in ("cbt_full", "cbt_incr", "cbt_restore"):
    r[step + "_rss_mib"] = f(step + ".rss_kib") / 1024
if have_restic:
    r["restic_full_rss_mib"] = f("restic_full.rss_kib") / 1024
r["cbt_repo_full_mib"] = f("cbt_repo_full_bytes") / MiB
r["zstd3_mib"] = f("zstd_bytes") / MiB
r["zstd3_s"] = f("zstd.wall_s")
r["repo_ratio_vs_zstd3"] = div(f("cbt_repo_full_bytes"), f("zstd_bytes"))
if have_restic:
    r["restic_repo_full_mib"] = f("restic_repo_full_bytes") / MiB
r["restore_verified"] = raw["image_hash"] == raw["restored_hash"]
r["hash"] = raw["hash"]

def mark(ok):
    return "n/a" if ok is None else ("PASS" if ok else "MISS")
def cell(template, *vals):
    return "n/a" if any(v is None for v in vals) else template.format(*vals)
maxrss = max(r[s + "_rss_mib"] for s in ("cbt_full", "cbt_incr", "cbt_restore"))
rows = [
    ("full backup MiB/s (cbtvault | restic)",
     cell("{:.1f} | ", r["cbt_full_mibs"]) + cell("{:.1f}  ratio {:.2f}x", r["restic_full_mibs"], r["full_ratio_vs_restic"]),
     ">= 2x restic", mark(None if r["full_ratio_vs_restic"] is None else r["full_ratio_vs_restic"] >= 2)),
    ("full backup wall s (cbtvault | restic)",
     cell("{:.2f} | ", r["cbt_full_s"]) + cell("{:.2f}", r["restic_full_s"]), "", ""),
    ("incremental wall s, % of full (cbtvault)",
     cell("{:.2f} s  {:.1f}%", r["cbt_incr_s"], r["cbt_incr_pct_of_full"]),
     "<= 5% of full", mark(r["cbt_incr_pct_of_full"] <= 5)),
    ("restic 2nd run wall s, % of its full",
     cell("{:.2f} s  {:.1f}%", r["restic_incr_s"], r["restic_incr_pct_of_full"]), "(reference)", ""),
    ("repo growth / changed data (cbtvault)",
     cell("{:.1f} MiB / {:.1f} MiB = {:.3f}x", r["cbt_growth_mib"], r["changed_mib"], r["cbt_growth_per_changed"]),
     "<= 1.1x", mark(r["cbt_growth_per_changed"] <= 1.1)),
    ("repo growth / changed data (restic)",
     cell("{:.1f} MiB / {:.1f} MiB = {:.3f}x", r["restic_growth_mib"], r["changed_mib"], r["restic_growth_per_changed"]),
     "(reference)", ""),
    ("restore MiB/s vs cp MiB/s",
     cell("{:.1f} | {:.1f}  ratio {:.2f}x", r["cbt_restore_mibs"], r["cp_mibs"], r["restore_ratio_vs_cp"]),
     ">= 0.7x cp", mark(r["restore_ratio_vs_cp"] >= 0.7)),
    ("peak RSS MiB full | incr | restore",
     cell("{:.1f} | {:.1f} | {:.1f}", r["cbt_full_rss_mib"], r["cbt_incr_rss_mib"], r["cbt_restore_rss_mib"]),
     "< 300 MiB", mark(maxrss < 300)),
    ("repo after full vs zstd -3 -T1 of image",
     cell("{:.1f} MiB vs {:.1f} MiB  ratio {:.4f}", r["cbt_repo_full_mib"], r["zstd3_mib"], r["repo_ratio_vs_zstd3"]),
     "<= 1.02", mark(r["repo_ratio_vs_zstd3"] <= 1.02)),
    ("restore verified (" + r["hash"] + ")", "yes" if r["restore_verified"] else "NO", "must match",
     mark(r["restore_verified"])),
]
print()
print(f'cbtvault {r["cbtvault_version"]} ({r["git_rev"]}) vs restic {r["restic_version"] or "n/a"} (repo v{r["restic_repo_version"] or "?"}) | '
      f'image {r["size_mib"]} MiB, 60% random / 40% zero blocks (zeros as {r["zero_blocks_as"]}), '
      f'{r["changed_blocks"]} blocks changed | page cache {r["page_cache"]} before each step | '
      f'loadavg {r["loadavg_start"]:.2f} -> {r["loadavg_end"]:.2f}')
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
