#!/usr/bin/env bash
# bench/encryption.sh - what encryption costs (issue 15's benchmark).
#
# One run, the bench image of repo-core.sh (60% random, 40% zero blocks):
# a full backup into a plain repository and into an encrypted one, then a
# restore of each to a file, BENCH_REPEAT times in alternation (plain,
# encrypted, plain, ...), page cache dropped before every step. Reports the
# median throughput of each and the encrypted/plain ratios (target: at
# least 0.9, i.e. encryption costs at most 10%). Every restore is compared
# with the image.
#
# Environment (as repo-core.sh):
#   BENCH_SIZE_MIB=4096  BENCH_REPEAT=3  BENCH_DIR=<repo>/bench-work/encryption
#   BENCH_KEEP=0  BENCH_ZEROS=hole  BENCH_SEED=42  BENCH_DROP_CACHES=1
#   BENCH_BUILD=1  CBTVAULT=<repo>/target/release/cbtvault  BENCH_JSON_OUT=
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SIZE_MIB=${BENCH_SIZE_MIB:-4096}
REPEAT=${BENCH_REPEAT:-3}
WORK=${BENCH_DIR:-$ROOT/bench-work/encryption}
KEEP=${BENCH_KEEP:-0}
ZEROS=${BENCH_ZEROS:-hole}
SEED=${BENCH_SEED:-42}
DROP=${BENCH_DROP_CACHES:-1}
BUILD=${BENCH_BUILD:-1}
CBT=${CBTVAULT:-$ROOT/target/release/cbtvault}
JSON_OUT=${BENCH_JSON_OUT:-}
MARKER=.encryption-bench

die() { echo "encryption-bench: error: $*" >&2; exit 1; }
log() { echo "== $*" >&2; }
BENCH_NAME=encryption-bench

[[ $SIZE_MIB =~ ^[0-9]+$ && $SIZE_MIB -ge 1 ]] || die "BENCH_SIZE_MIB must be a positive integer"
[[ $REPEAT =~ ^[0-9]+$ && $REPEAT -ge 1 ]] || die "BENCH_REPEAT must be a positive integer"
for t in python3 /usr/bin/time du openssl cmp; do
  command -v "$t" >/dev/null || die "missing tool: $t"
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
printf 'bench password\n' >"$WORK/password"
export CBTVAULT_PASSWORD_FILE=$WORK/password

IMG=$WORK/image.raw
put size_mib "$SIZE_MIB"
put repeat "$REPEAT"
put git_rev "$(git_rev)"
put cbtvault_version "$("$CBT" --version | awk '{print $2}')"
put page_cache "$CACHES"
put loadavg_start "$(cut -d' ' -f1 /proc/loadavg)"
log "generating ${SIZE_MIB} MiB image"
gen_image "$IMG" "$SIZE_MIB" "$ZEROS" "$SEED"

verified=true
for round in $(seq "$REPEAT"); do
  for kind in plain encrypted; do
    repo=$WORK/repo-$kind
    rm -rf -- "$repo" "$WORK/cache"
    if [[ $kind == encrypted ]]; then
      "$CBT" -r "$repo" init --encrypt --json >"$WORK/out-init.txt"   # default Argon2id cost
    else
      "$CBT" -r "$repo" init --json >"$WORK/out-init.txt"
    fi
    log "round $round: $kind full backup"
    timed "backup_${kind}_$round" "$CBT" -r "$repo" backup "$IMG" --json
    put "repo_${kind}_$round.bytes" "$(dusize "$repo")"
    # Opening alone (key derivation for the encrypted one): `snapshots`.
    timed "open_${kind}_$round" "$CBT" -r "$repo" snapshots --json
    log "round $round: $kind restore"
    rm -f "$WORK/restored.raw"
    timed "restore_${kind}_$round" "$CBT" -r "$repo" restore latest --target "$WORK/restored.raw" --json
    if ! cmp -s "$IMG" "$WORK/restored.raw"; then
      echo "encryption-bench: $kind restore of round $round differs from the image" >&2
      verified=false
    fi
  done
done
rm -f "$WORK/restored.raw"
put loadavg_end "$(cut -d' ' -f1 /proc/loadavg)"
put verified "$verified"

python3 - "$RESULTS" "$JSON_OUT" <<'PY'
import json, os, statistics, sys
raw = {}
for line in open(sys.argv[1]):
    k, v = line.rstrip("\n").split("\t", 1)
    raw[k] = v
size = int(raw["size_mib"]); n = int(raw["repeat"])
def med(step):
    return statistics.median(float(raw[f"{step}_{i}.wall_s"]) for i in range(1, n + 1))
def rss(step):
    return max(int(raw[f"{step}_{i}.rss_kib"]) for i in range(1, n + 1)) / 1024
def cpu(step):
    return statistics.median(float(raw[f"{step}_{i}.user_s"]) + float(raw[f"{step}_{i}.sys_s"]) for i in range(1, n + 1))
r = {"size_mib": size, "repeat": n, "git_rev": raw["git_rev"], "page_cache": raw["page_cache"],
     "loadavg_start": float(raw["loadavg_start"]), "loadavg_end": float(raw["loadavg_end"])}
for kind in ("plain", "encrypted"):
    for op in ("backup", "restore"):
        s = med(f"{op}_{kind}")
        r[f"{op}_{kind}_s"] = s
        r[f"{op}_{kind}_mibs"] = size / s
        r[f"{op}_{kind}_cpu_s"] = cpu(f"{op}_{kind}")
        r[f"{op}_{kind}_rss_mib"] = rss(f"{op}_{kind}")
    r[f"repo_{kind}_mib"] = int(raw[f"repo_{kind}_1.bytes"]) / 2**20
for kind in ("plain", "encrypted"):
    r[f"open_{kind}_s"] = med(f"open_{kind}")
# What opening an encrypted repository adds once per command (Argon2id).
r["key_open_s"] = max(0.0, r["open_encrypted_s"] - r["open_plain_s"])
r["backup_ratio"] = r["backup_encrypted_mibs"] / r["backup_plain_mibs"]
r["restore_ratio"] = r["restore_encrypted_mibs"] / r["restore_plain_mibs"]
# The same without that one-off cost: the cost per byte.
for op in ("backup", "restore"):
    r[f"{op}_ratio_streaming"] = r[f"{op}_plain_s"] / max(1e-9, r[f"{op}_encrypted_s"] - r["key_open_s"])
r["verified"] = raw["verified"] == "true"
mark = lambda ok: "PASS" if ok else "MISS"
print()
print(f'cbtvault {raw["cbtvault_version"]} ({r["git_rev"]}) | image {size} MiB, median of {n} | page cache {r["page_cache"]} | '
      f'loadavg {r["loadavg_start"]:.2f} -> {r["loadavg_end"]:.2f}')
print(f'{"step":<10} {"plain":>22} {"encrypted":>22} {"ratio":>7}  target')
for op in ("backup", "restore"):
    p, e = r[f"{op}_plain_mibs"], r[f"{op}_encrypted_mibs"]
    print(f'{op:<10} {p:>9.1f} MiB/s {r[f"{op}_plain_cpu_s"]:>5.1f} cpu-s {e:>9.1f} MiB/s {r[f"{op}_encrypted_cpu_s"]:>5.1f} cpu-s {e / p:>6.3f}x  >= 0.9x  {mark(e / p >= 0.9)}')
print(f'per byte, without opening the key ({r["key_open_s"]:.2f} s per command): backup {r["backup_ratio_streaming"]:.3f}x, '
      f'restore {r["restore_ratio_streaming"]:.3f}x')
print(f'repository: plain {r["repo_plain_mib"]:.1f} MiB, encrypted {r["repo_encrypted_mib"]:.1f} MiB; '
      f'peak RSS backup {r["backup_plain_rss_mib"]:.0f} / {r["backup_encrypted_rss_mib"]:.0f} MiB; '
      f'restores verified: {"yes" if r["verified"] else "NO"}')
ncpu = os.cpu_count() or 1
if max(r["loadavg_start"], r["loadavg_end"]) > 0.5 * ncpu:
    print(f"note: load average reached {max(r['loadavg_start'], r['loadavg_end']):.2f} on {ncpu} CPUs: timings are noisy")
line = json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}, separators=(",", ":"))
print(line)
if sys.argv[2]:
    open(sys.argv[2], "w").write(line + "\n")
PY
