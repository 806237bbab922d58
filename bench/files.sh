#!/usr/bin/env bash
# bench/files.sh - file-level restore vs restoring the whole image first
# (issue 20's benchmark).
#
# Builds an ext4 image of BENCH_IMAGE_GIB GiB with `mkfs.ext4 -d` from a
# tree holding one random file of BENCH_FILE_MIB MiB (/big.bin) and
# BENCH_SMALL_FILES small random files (1-8 KiB, 100 per directory, under
# /small), plus BENCH_FILL_GIB GiB of other random files (/fill/NNN.bin,
# 256 MiB each: the rest of a used system disk, which a whole-image
# restore has to write and a file-level restore skips; 0 for a nearly
# empty image), backs it up once, then times, page cache dropped before
# each:
#   (a) `cbtvault dump latest /big.bin` to a file,
#   (b) `cbtvault restore latest --include '/small/**' --target DIR`,
#   (c) the way without file-level restore: `cbtvault restore latest
#       --target image.raw` (the whole image), then
#       `debugfs -R 'rdump /big.bin OUT'` and `debugfs -R 'rdump /small OUT'`.
# Every extraction is compared with the source tree. Targets: (a) at least
# 0.8x the throughput of the whole-image restore (bytes of data written per
# second: the file's size for (a), the image's allocated bytes for the
# restore, whose holes cost nothing), and (a) and (b) each at least 10x
# less time than (c) restore + its rdump.
#
# Environment:
#   BENCH_IMAGE_GIB=8  BENCH_FILE_MIB=1024  BENCH_SMALL_FILES=10000  BENCH_FILL_GIB=5
#   BENCH_DIR=<repo>/bench-work/files  BENCH_KEEP=0  BENCH_SEED=42
#   BENCH_DROP_CACHES=1  BENCH_BUILD=1  CBTVAULT=<repo>/target/release/cbtvault
#   BENCH_JSON_OUT=
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
IMAGE_GIB=${BENCH_IMAGE_GIB:-8}
FILE_MIB=${BENCH_FILE_MIB:-1024}
SMALL=${BENCH_SMALL_FILES:-10000}
FILL=${BENCH_FILL_GIB:-5}
WORK=${BENCH_DIR:-$ROOT/bench-work/files}
KEEP=${BENCH_KEEP:-0}
SEED=${BENCH_SEED:-42}
DROP=${BENCH_DROP_CACHES:-1}
BUILD=${BENCH_BUILD:-1}
CBT=${CBTVAULT:-$ROOT/target/release/cbtvault}
JSON_OUT=${BENCH_JSON_OUT:-}
MARKER=.files-bench

die() { echo "files-bench: error: $*" >&2; exit 1; }
log() { echo "== $*" >&2; }
BENCH_NAME=files-bench

for v in IMAGE_GIB FILE_MIB SMALL; do
  [[ ${!v} =~ ^[0-9]+$ && ${!v} -ge 1 ]] || die "BENCH_$v must be a positive integer"
done
[[ $FILL =~ ^[0-9]+$ ]] || die "BENCH_FILL_GIB must be a whole number"
(( FILE_MIB + SMALL * 8 / 1024 + FILL * 1024 + 256 < IMAGE_GIB * 1024 )) || die "the tree does not fit a ${IMAGE_GIB} GiB image"
export PATH=/usr/sbin:/sbin:$PATH
for t in python3 /usr/bin/time du openssl cmp diff mkfs.ext4 debugfs; do
  command -v "$t" >/dev/null || die "missing tool: $t (e2fsprogs for mkfs.ext4 and debugfs)"
done

# shellcheck source=bench/workdir.sh
. "$ROOT/bench/workdir.sh"
claim_workdir

RESULTS=$WORK/results.tsv
: >"$RESULTS"
put() { printf '%s\t%s\n' "$1" "$2" >>"$RESULTS"; }
# shellcheck source=bench/common.sh
. "$ROOT/bench/common.sh"

private_binary
export CBTVAULT_CACHE_DIR=$WORK/cache
put image_gib "$IMAGE_GIB"
put file_mib "$FILE_MIB"
put small_files "$SMALL"
put fill_gib "$FILL"
put git_rev "$(git_rev)"
put cbtvault_version "$("$CBT" --version | awk '{print $2}')"
put page_cache "$CACHES"
put loadavg_start "$(cut -d' ' -f1 /proc/loadavg)"

TREE=$WORK/tree
log "building the tree: ${FILE_MIB} MiB file and $SMALL small files"
mkdir -p "$TREE/small"
# Incompressible, deterministic: AES-128-CTR keystream (openssl ends on SIGPIPE).
{ openssl enc -aes-128-ctr -nosalt -pbkdf2 -pass "pass:files-$SEED" -in /dev/zero 2>/dev/null || true; } |
  head -c "$((FILE_MIB * 1024 * 1024))" >"$TREE/big.bin"
[[ $(stat -c %s "$TREE/big.bin") == $((FILE_MIB * 1024 * 1024)) ]] || die "could not generate $TREE/big.bin"
python3 - "$TREE/small" "$SMALL" "$SEED" <<'PY'
import os, random, sys
root, n, seed = sys.argv[1], int(sys.argv[2]), sys.argv[3]
rng = random.Random("small-" + seed)
for i in range(n):
    d = os.path.join(root, f"d{i // 100:04d}")
    if i % 100 == 0:
        os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"f{i:05d}.dat"), "wb") as f:
        f.write(rng.randbytes(rng.randint(1024, 8192)))
PY
if (( FILL > 0 )); then
  log "fill: $FILL GiB of other files"
  mkdir -p "$TREE/fill"
  for k in $(seq 1 $((FILL * 4))); do
    { openssl enc -aes-128-ctr -nosalt -pbkdf2 -pass "pass:fill-$SEED-$k" -in /dev/zero 2>/dev/null || true; } |
      head -c $((256 << 20)) >"$TREE/fill/$(printf %03d "$k").bin"
  done
fi
IMG=$WORK/image.raw
log "mkfs.ext4 -d: ${IMAGE_GIB} GiB image"
mkfs.ext4 -q -F -b 4096 -d "$TREE" "$IMG" "${IMAGE_GIB}G"
sync
put image_allocated.bytes "$(du -B1 "$IMG" | awk '{print $1}')"

REPO=$WORK/repo
"$CBT" -r "$REPO" init --json >"$WORK/out-init.txt"
log "backup of the image"
timed backup "$CBT" -r "$REPO" backup "$IMG" --json

log "(a) dump /big.bin"
timed dump "$CBT" -r "$REPO" dump latest /big.bin
cmp -s "$WORK/out-dump.txt" "$TREE/big.bin" && put dump.ok true || put dump.ok false
rm -f "$WORK/out-dump.txt"

log "(b) restore --include /small/**"
timed include "$CBT" -r "$REPO" restore latest --include '/small/**' --target "$WORK/files" --json
diff -rq "$TREE/small" "$WORK/files/p0/small" >/dev/null && put include.ok true || put include.ok false
rm -rf -- "$WORK/files"

log "(c) whole-image restore, then debugfs rdump"
timed image "$CBT" -r "$REPO" restore latest --target "$WORK/restored.raw" --json
mkdir -p "$WORK/rdump-big" "$WORK/rdump-small"
timed rdump_big debugfs -R "rdump /big.bin $WORK/rdump-big" "$WORK/restored.raw"
timed rdump_small debugfs -R "rdump /small $WORK/rdump-small" "$WORK/restored.raw"
cmp -s "$WORK/rdump-big/big.bin" "$TREE/big.bin" && put rdump_big.ok true || put rdump_big.ok false
diff -rq "$TREE/small" "$WORK/rdump-small/small" >/dev/null && put rdump_small.ok true || put rdump_small.ok false
rm -rf -- "$WORK/restored.raw" "$WORK/rdump-big" "$WORK/rdump-small"
put loadavg_end "$(cut -d' ' -f1 /proc/loadavg)"

python3 - "$RESULTS" "$JSON_OUT" <<'PY'
import json, sys
raw = {}
for line in open(sys.argv[1]):
    k, v = line.rstrip("\n").split("\t", 1)
    raw[k] = v
w = lambda s: float(raw[f"{s}.wall_s"])
gib, fmib, small = int(raw["image_gib"]), int(raw["file_mib"]), int(raw["small_files"])
fill, allocated = int(raw["fill_gib"]), int(raw["image_allocated.bytes"])
r = {"image_gib": gib, "file_mib": fmib, "small_files": small, "fill_gib": fill,
     "image_allocated_mib": allocated / 2**20, "git_rev": raw["git_rev"],
     "page_cache": raw["page_cache"], "loadavg_start": float(raw["loadavg_start"]),
     "loadavg_end": float(raw["loadavg_end"])}
for s in ("backup", "dump", "include", "image", "rdump_big", "rdump_small"):
    r[f"{s}_s"] = w(s)
    r[f"{s}_rss_mib"] = int(raw[f"{s}.rss_kib"]) / 1024
r["dump_mibs"] = fmib / w("dump")
r["image_mibs"] = allocated / 2**20 / w("image")
r["throughput_ratio"] = r["dump_mibs"] / r["image_mibs"]
r["big_speedup"] = (w("image") + w("rdump_big")) / w("dump")
r["small_speedup"] = (w("image") + w("rdump_small")) / w("include")
r["verified"] = all(raw[k] == "true" for k in ("dump.ok", "include.ok", "rdump_big.ok", "rdump_small.ok"))
mark = lambda ok: "PASS" if ok else "MISS"
print()
print(f'cbtvault {raw["cbtvault_version"]} ({r["git_rev"]}) | ext4 image {gib} GiB ({allocated / 2**30:.1f} GiB allocated): '
      f'{fmib} MiB file + {small} small files + {fill} GiB fill | '
      f'page cache {r["page_cache"]} | loadavg {r["loadavg_start"]:.2f} -> {r["loadavg_end"]:.2f}')
print(f'backup {r["backup_s"]:.1f} s; whole-image restore {r["image_s"]:.1f} s ({r["image_mibs"]:.0f} MiB/s of allocated data)')
print(f'{"extraction":<22} {"cbtvault":>10} {"restore+rdump":>14} {"speedup":>8}  target')
print(f'{"big file (dump)":<22} {r["dump_s"]:>8.2f} s {r["image_s"] + r["rdump_big_s"]:>12.2f} s {r["big_speedup"]:>7.1f}x  >= 10x  {mark(r["big_speedup"] >= 10)}')
print(f'{"small files (include)":<22} {r["include_s"]:>8.2f} s {r["image_s"] + r["rdump_small_s"]:>12.2f} s {r["small_speedup"]:>7.1f}x  >= 10x  {mark(r["small_speedup"] >= 10)}')
print(f'big file throughput {r["dump_mibs"]:.0f} MiB/s = {r["throughput_ratio"]:.2f}x the whole-image restore  >= 0.8x  {mark(r["throughput_ratio"] >= 0.8)}')
print(f'peak RSS: dump {r["dump_rss_mib"]:.0f} MiB, restore --include {r["include_rss_mib"]:.0f} MiB, image restore {r["image_rss_mib"]:.0f} MiB; '
      f'extractions verified: {"yes" if r["verified"] else "NO"}')
print(json.dumps(r))
if sys.argv[2]:
    with open(sys.argv[2], "w") as f:
        json.dump(r, f, indent=1)
PY
