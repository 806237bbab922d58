#!/usr/bin/env bash
# bench/prune.sh - cbtvault retention benchmark (forget + prune), side by side with restic.
#
# VERSIONS versions of one generated raw image (2% of the 64 KiB blocks rewritten
# per version, at seeded random positions), each backed up by cbtvault (CBT
# bitmap) and by restic; then all but the KEEP_LAST newest are forgotten and the
# repository pruned: `cbtvault forget --keep-last N` + `cbtvault prune`, and
# `restic forget --keep-last N --prune`. Reports wall time, peak RSS (/usr/bin/time
# -v), repository size before/after, and cbtvault's bytes rewritten vs reclaimed.
# Targets (issue 13): rewritten <= 2x reclaimed at the default --max-unused,
# peak RSS < 300 MiB. See bench/README.md.
#
# Environment (BENCH_-prefixed names work too):
#   SIZE_MIB=4096           image size in MiB
#   VERSIONS=100            number of image versions (snapshots)
#   KEEP_LAST=10            snapshots kept
#   CHANGE_PCT=2            percentage of blocks rewritten per version
#   MAX_UNUSED=             --max-unused for cbtvault prune (default: prune's own, 10%)
#   SEED=42                 seed of the data and of the changed positions
#   BENCH_DIR=<repo>/bench-work-prune   work dir (new, or a previous one: wiped)
#   BENCH_KEEP=0            1 = keep the work dir
#   SKIP_RESTIC=0           1 = skip restic
#   BENCH_BUILD=1           0 = do not run `cargo build --release`
#   CBTVAULT=<repo>/target/release/cbtvault   binary to benchmark
#   BENCH_JSON_OUT=         also write the final JSON line to this file
# A quick run: SIZE_MIB=64 VERSIONS=12 KEEP_LAST=3 bench/prune.sh
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SIZE_MIB=${SIZE_MIB:-${BENCH_SIZE_MIB:-4096}}
VERSIONS=${VERSIONS:-${BENCH_VERSIONS:-100}}
KEEP_LAST=${KEEP_LAST:-${BENCH_KEEP_LAST:-10}}
CHANGE_PCT=${CHANGE_PCT:-${BENCH_CHANGE_PCT:-2}}
MAX_UNUSED=${MAX_UNUSED:-${BENCH_MAX_UNUSED:-}}
SEED=${SEED:-${BENCH_SEED:-42}}
WORK=${BENCH_DIR:-$ROOT/bench-work-prune}
KEEP=${BENCH_KEEP:-0}
SKIP_RESTIC=${SKIP_RESTIC:-${BENCH_SKIP_RESTIC:-0}}
BUILD=${BENCH_BUILD:-1}
CBT=${CBTVAULT:-$ROOT/target/release/cbtvault}
JSON_OUT=${BENCH_JSON_OUT:-}
MARKER=.prune-bench

die() { echo "prune-bench: error: $*" >&2; exit 1; }
log() { echo "== $*" >&2; }

for v in SIZE_MIB VERSIONS KEEP_LAST; do
  [[ ${!v} =~ ^[0-9]+$ && ${!v} -ge 1 ]] || die "$v must be a positive integer"
done
[[ $KEEP_LAST -le $VERSIONS ]] || die "KEEP_LAST must not exceed VERSIONS"
[[ $CHANGE_PCT =~ ^[0-9]+([.][0-9]+)?$ ]] || die "CHANGE_PCT must be a number"
for t in python3 /usr/bin/time du openssl; do
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

# ---------------------------------------------------------------- build / tools
private_binary

RESTIC_VER=null
if [[ $SKIP_RESTIC != 1 ]]; then
  if ! command -v restic >/dev/null; then
    log "restic missing: apt-get install -y restic"
    apt-get install -y -qq restic >/dev/null 2>&1 ||
      { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq restic >/dev/null 2>&1; } || true
  fi
  if command -v restic >/dev/null; then
    RESTIC_VER=$(restic version | awk '{print $2; exit}')
    export RESTIC_PASSWORD=bench RESTIC_REPOSITORY=$RREPO RESTIC_CACHE_DIR=$WORK/restic-cache
  else
    echo "prune-bench: warning: restic could not be installed; its columns will be empty" >&2
    SKIP_RESTIC=1
  fi
fi

# timed NAME CMD...: CMD under /usr/bin/time -v (stdout -> out-NAME, stderr ->
# err-NAME), then `sync`. Records NAME.wall_s and NAME.rss_kib.
timed() {
  local name=$1; shift
  local t0 t1
  sync
  t0=$(date +%s%N)
  if ! /usr/bin/time -v -o "$WORK/time-$name.txt" "$@" >"$WORK/out-$name.txt" 2>"$WORK/err-$name.txt"; then
    echo "prune-bench: step '$name' failed: $*" >&2
    tail -n 30 "$WORK/err-$name.txt" >&2 || true
    exit 1
  fi
  sync
  t1=$(date +%s%N)
  put "$name.wall_s" "$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.3f", (b-a)/1e9}')"
  put "$name.rss_kib" "$(awk -F': ' '/Maximum resident set size/{print $2}' "$WORK/time-$name.txt")"
}
dusize() { du -sb "$1" | awk '{print $1}'; }
lastjson() { grep '^{' "$WORK/out-$1.txt" | tail -n 1; }

put size_mib "$SIZE_MIB"
put versions "$VERSIONS"
put keep_last "$KEEP_LAST"
put change_pct "$CHANGE_PCT"
put restic_version "$RESTIC_VER"
put cbtvault_version "$("$CBT" --version | awk '{print $2}')"
put git_rev "$(cd "$ROOT" && { git rev-parse --short HEAD 2>/dev/null || echo unknown; })"

# ---------------------------------------------------------------- image
log "generating ${SIZE_MIB} MiB image (64 KiB blocks, i%5<3 random, else holes)"
python3 - "$IMG" "$SIZE_MIB" "$SEED" <<'PY'
import os, subprocess, sys
path, size_mib, seed = sys.argv[1], int(sys.argv[2]), sys.argv[3]
BS = 65536
n = size_mib * 1024 * 1024 // BS
p = subprocess.Popen(["openssl", "enc", "-aes-128-ctr", "-nosalt", "-pbkdf2",
                      "-pass", "pass:prune-" + seed, "-in", "/dev/zero"],
                     stdout=subprocess.PIPE, bufsize=1 << 20)
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
i = 0
while i < n:
    if i % 5 < 3:
        k = min(3 - i % 5, n - i)
        buf = p.stdout.read(k * BS)
        assert len(buf) == k * BS
        os.write(fd, buf)
    else:
        k = min(5 - i % 5, n - i)
        os.lseek(fd, k * BS, os.SEEK_CUR)
    i += k
os.ftruncate(fd, n * BS)
os.close(fd)
p.kill(); p.wait()
PY

# change V: rewrites CHANGE_PCT% of the blocks (seeded positions and data) and
# writes the XenServer-style bitmap to $WORK/changed.b64.
change() {
  python3 - "$IMG" "$WORK/changed.b64" "$CHANGE_PCT" "$SEED" "$1" <<'PY'
import base64, os, random, sys
path, bmp, pct, seed, v = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4], sys.argv[5]
BS = 65536
n = os.stat(path).st_size // BS
k = max(1, round(n * pct / 100))
rng = random.Random(f"prune-{seed}-{v}")
idx = sorted(rng.sample(range(n), k))
fd = os.open(path, os.O_WRONLY)
bitmap = bytearray((n + 7) // 8)
for i in idx:
    os.pwrite(fd, rng.randbytes(BS), i * BS)
    bitmap[i // 8] |= 0x80 >> (i % 8)
os.close(fd)
with open(bmp, "w") as f:
    f.write(base64.b64encode(bytes(bitmap)).decode())
PY
}

# ---------------------------------------------------------------- versions
"$CBT" -r "$CREPO" init >/dev/null
[[ $SKIP_RESTIC == 1 ]] || restic init -q >/dev/null
t_cbt=0; t_restic=0
for v in $(seq 1 "$VERSIONS"); do
  log "version $v/$VERSIONS"
  extra=()
  if [[ $v -gt 1 ]]; then
    change "$v"
    extra=(--changed-blocks "$WORK/changed.b64")
  fi
  t0=$(date +%s%N)
  "$CBT" -r "$CREPO" --quiet backup "$IMG" "${extra[@]}" >/dev/null
  t1=$(date +%s%N)
  t_cbt=$(( t_cbt + t1 - t0 ))
  if [[ $SKIP_RESTIC != 1 ]]; then
    restic backup -q "$IMG" >/dev/null
    t_restic=$(( t_restic + $(date +%s%N) - t1 ))
  fi
done
put cbt_backups_s "$(awk -v a="$t_cbt" 'BEGIN{printf "%.3f", a/1e9}')"
put restic_backups_s "$(awk -v a="$t_restic" 'BEGIN{printf "%.3f", a/1e9}')"
put cbt_repo_before_bytes "$(dusize "$CREPO")"
[[ $SKIP_RESTIC == 1 ]] || put restic_repo_before_bytes "$(dusize "$RREPO")"
H_IMG=$($HASH "$IMG" | awk '{print $1}')

# ---------------------------------------------------------------- forget + prune
log "cbtvault forget --keep-last $KEEP_LAST"
timed cbt_forget "$CBT" -r "$CREPO" --json forget --keep-last "$KEEP_LAST"
log "cbtvault prune"
prune_args=(prune)
[[ -z $MAX_UNUSED ]] || prune_args+=(--max-unused "$MAX_UNUSED")
timed cbt_prune "$CBT" -r "$CREPO" --json "${prune_args[@]}"
put cbt_prune.json "$(lastjson cbt_prune)"
put cbt_repo_after_bytes "$(dusize "$CREPO")"
put cbt_snapshots_after "$("$CBT" -r "$CREPO" --json snapshots | python3 -c 'import json,sys; print(json.loads(sys.stdin.read().splitlines()[-1])["snapshot_count"])')"

log "cbtvault check + restore latest"
timed cbt_check "$CBT" -r "$CREPO" --json check
timed cbt_restore "$CBT" -r "$CREPO" restore latest --target "$WORK/restored.raw"
H_RES=$($HASH "$WORK/restored.raw" | awk '{print $1}')
rm -f -- "$WORK/restored.raw"
[[ $H_IMG == "$H_RES" ]] || die "restored image differs from the source after prune"

if [[ $SKIP_RESTIC != 1 ]]; then
  log "restic forget --keep-last $KEEP_LAST --prune"
  timed restic_prune restic forget --keep-last "$KEEP_LAST" --prune
  put restic_repo_after_bytes "$(dusize "$RREPO")"
fi

# ---------------------------------------------------------------- report
python3 - "$RESULTS" "$JSON_OUT" <<'PY'
import json, sys
raw = {}
for line in open(sys.argv[1]):
    k, _, v = line.rstrip("\n").partition("\t")
    raw[k] = v
MiB = 1024 * 1024
def f(k):
    v = raw.get(k)
    return None if v in (None, "", "null") else float(v)
p = json.loads(raw["cbt_prune.json"])
have_restic = "restic_prune.wall_s" in raw
r = {
    "size_mib": int(f("size_mib")), "versions": int(f("versions")),
    "keep_last": int(f("keep_last")), "change_pct": f("change_pct"),
    "cbtvault_version": raw["cbtvault_version"], "git_rev": raw["git_rev"],
    "restic_version": None if raw["restic_version"] == "null" else raw["restic_version"],
    "cbt_backups_s": f("cbt_backups_s"),
    "restic_backups_s": f("restic_backups_s") if have_restic else None,
    "cbt_forget_s": f("cbt_forget.wall_s"), "cbt_forget_rss_mib": f("cbt_forget.rss_kib") / 1024,
    "cbt_prune_s": f("cbt_prune.wall_s"), "cbt_prune_rss_mib": f("cbt_prune.rss_kib") / 1024,
    "cbt_bytes_deleted": p["deleted_bytes"], "cbt_bytes_rewritten": p["rewritten_bytes"],
    "cbt_bytes_reclaimed": p["reclaimed_bytes"],
    "cbt_packs_deleted": p["packs_deleted"], "cbt_packs_repacked": p["packs_repacked"],
    "cbt_repo_before_mib": f("cbt_repo_before_bytes") / MiB,
    "cbt_repo_after_mib": f("cbt_repo_after_bytes") / MiB,
    "cbt_snapshots_after": int(f("cbt_snapshots_after")),
    "restic_prune_s": f("restic_prune.wall_s") if have_restic else None,
    "restic_prune_rss_mib": f("restic_prune.rss_kib") / 1024 if have_restic else None,
    "restic_repo_before_mib": f("restic_repo_before_bytes") / MiB if have_restic else None,
    "restic_repo_after_mib": f("restic_repo_after_bytes") / MiB if have_restic else None,
    "restore_verified": True,
}
rec = r["cbt_bytes_reclaimed"]
r["rewritten_per_reclaimed"] = None if rec == 0 else r["cbt_bytes_rewritten"] / rec
def mark(ok): return "n/a" if ok is None else ("PASS" if ok else "MISS")
def num(v, t="{:.2f}"): return "n/a" if v is None else t.format(v)
rows = [
    ("forget + prune wall s (cbtvault | restic)",
     num(r["cbt_forget_s"] + r["cbt_prune_s"]) + " | " + num(r["restic_prune_s"]), "", ""),
    ("prune peak RSS MiB (cbtvault | restic)",
     num(r["cbt_prune_rss_mib"], "{:.1f}") + " | " + num(r["restic_prune_rss_mib"], "{:.1f}"),
     "< 300 MiB", mark(max(r["cbt_prune_rss_mib"], r["cbt_forget_rss_mib"]) < 300)),
    ("bytes rewritten / reclaimed (cbtvault)",
     f'{r["cbt_bytes_rewritten"]/MiB:.1f} MiB / {rec/MiB:.1f} MiB = ' + num(r["rewritten_per_reclaimed"], "{:.3f}x"),
     "<= 2x", mark(None if r["rewritten_per_reclaimed"] is None else r["rewritten_per_reclaimed"] <= 2)),
    ("repo MiB before -> after (cbtvault)",
     f'{r["cbt_repo_before_mib"]:.1f} -> {r["cbt_repo_after_mib"]:.1f}', "", ""),
    ("repo MiB before -> after (restic)",
     num(r["restic_repo_before_mib"], "{:.1f}") + " -> " + num(r["restic_repo_after_mib"], "{:.1f}"), "", ""),
    ("backups wall s, all versions (cbtvault | restic)",
     num(r["cbt_backups_s"]) + " | " + num(r["restic_backups_s"]), "", ""),
    ("snapshots left (cbtvault)", str(r["cbt_snapshots_after"]), str(r["keep_last"]),
     mark(r["cbt_snapshots_after"] == r["keep_last"])),
    ("latest restores bit-exact after prune", "yes", "must match", "PASS"),
]
print()
print(f'cbtvault {r["cbtvault_version"]} ({r["git_rev"]}) vs restic {r["restic_version"] or "n/a"} | '
      f'image {r["size_mib"]} MiB, {r["versions"]} versions, {r["change_pct"]}% changed each, keep last {r["keep_last"]}')
w0 = max(len(x[0]) for x in rows); w1 = max(len(x[1]) for x in rows); w2 = max(len(x[2]) for x in rows)
print(f'{"metric":<{w0}}  {"value":<{w1}}  {"target":<{w2}}  result')
print("-" * (w0 + w1 + w2 + 14))
for a, b, c, d in rows:
    print(f"{a:<{w0}}  {b:<{w1}}  {c:<{w2}}  {d}")
print()
line = json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}, separators=(",", ":"))
print(line)
if sys.argv[2]:
    with open(sys.argv[2], "w") as fh:
        fh.write(line + "\n")
PY
