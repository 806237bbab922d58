# bench/common.sh - sourced by repo-core.sh and s3.sh: the bench image, the
# changed-block rounds, the page-cache policy and the timed-step wrapper.
# The sourcing script sets BENCH_NAME (prefix of messages), WORK, DROP, and
# defines put KEY VALUE (appends to its results) and die MESSAGE.

# gen_image PATH SIZE_MIB ZEROS SEED: 64 KiB blocks, block i random if i%5<3
# (AES-128-CTR keystream, deterministic from SEED), else zero: a hole
# (ZEROS=hole) or written zeros (ZEROS=data).
gen_image() {
  python3 - "$1" "$2" "$3" "$4" <<'PY'
import os, subprocess, sys
path, size_mib, zeros, seed = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
BS = 65536
n = size_mib * 1024 * 1024 // BS
# Deterministic, incompressible stream: AES-128-CTR keystream over /dev/zero.
p = subprocess.Popen(["openssl", "enc", "-aes-128-ctr", "-nosalt", "-pbkdf2",
                      "-pass", "pass:repo-core-" + seed, "-in", "/dev/zero"],
                     stdout=subprocess.PIPE, bufsize=1 << 20)
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
zero = bytes(BS)
i = 0
while i < n:
    if i % 5 < 3:
        k = min(3 - i % 5, n - i)            # run of random blocks
        buf = p.stdout.read(k * BS)
        assert len(buf) == k * BS
        os.write(fd, buf)
        i += k
    else:
        k = min(5 - i % 5, n - i)            # run of zero blocks
        if zeros == "data":
            os.write(fd, zero * k)
        else:
            os.lseek(fd, k * BS, os.SEEK_CUR)
        i += k
os.ftruncate(fd, n * BS)
os.close(fd)
p.kill(); p.wait()
PY
  sync
}

# change_blocks IMAGE BITMAP PCT SEED: rewrites PCT% of the 64 KiB blocks
# (chosen with SEED) with fresh random data, writes the XenServer-style
# changed-block bitmap (base64) to BITMAP, prints the number of blocks.
change_blocks() {
  python3 - "$1" "$2" "$3" "$4" <<'PY'
import base64, os, random, sys
path, bmp, pct, seed = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
BS = 65536
n = os.stat(path).st_size // BS
k = max(1, round(n * pct / 100))
idx = sorted(random.Random("changes-" + seed).sample(range(n), k))
fd = os.open(path, os.O_WRONLY)
bitmap = bytearray((n + 7) // 8)
for i in idx:
    data = os.urandom(BS)
    os.pwrite(fd, data, i * BS)
    bitmap[i // 8] |= 0x80 >> (i % 8)
os.close(fd)
with open(bmp, "w") as f:
    f.write(base64.b64encode(bytes(bitmap)).decode())
print(k)
PY
  sync
}

# Page cache: dropped before every timed step (all tools alike) if we may.
CACHES=warm
if [[ $DROP == 1 ]] && sync && (echo 3 >/proc/sys/vm/drop_caches) 2>/dev/null; then
  CACHES=dropped
fi
drop_caches() {
  sync
  if [[ $CACHES == dropped ]]; then echo 3 >/proc/sys/vm/drop_caches; fi
}

# timed NAME CMD...: drop caches, run CMD under /usr/bin/time -v (stdout -> out-NAME,
# stderr -> err-NAME), then `sync`. Wall time includes the sync (data on disk).
# Records NAME.wall_s, NAME.rss_kib, NAME.user_s, NAME.sys_s.
timed() {
  local name=$1; shift
  drop_caches
  local t0 t1
  t0=$(date +%s%N)
  if ! /usr/bin/time -v -o "$WORK/time-$name.txt" "$@" >"$WORK/out-$name.txt" 2>"$WORK/err-$name.txt"; then
    echo "$BENCH_NAME: step '$name' failed: $*" >&2
    tail -n 30 "$WORK/err-$name.txt" >&2 || true
    exit 1
  fi
  sync
  t1=$(date +%s%N)
  put "$name.wall_s" "$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.3f", (b-a)/1e9}')"
  put "$name.rss_kib" "$(awk -F': ' '/Maximum resident set size/{print $2}' "$WORK/time-$name.txt")"
  put "$name.user_s" "$(awk -F': ' '/User time/{print $2}' "$WORK/time-$name.txt")"
  put "$name.sys_s" "$(awk -F': ' '/System time/{print $2}' "$WORK/time-$name.txt")"
}
dusize() { du -sb "$1" | awk '{print $1}'; }
# last JSON object printed on a step's stdout
lastjson() { grep '^{' "$WORK/out-$1.txt" | tail -n 1; }

# git revision of the tree, -dirty when src/, Cargo.toml or Cargo.lock differ from HEAD
git_rev() {
  local r
  r=$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null) || r=unknown
  (cd "$ROOT" && git diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null) || r+=-dirty
  echo "$r"
}

# ensure_restic: installs restic with apt if missing; sets RESTIC_VER (or null and SKIP_RESTIC=1)
ensure_restic() {
  RESTIC_VER=null
  if ! command -v restic >/dev/null; then
    log "restic missing: apt-get install -y restic"
    apt-get install -y -qq restic >/dev/null 2>&1 ||
      { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq restic >/dev/null 2>&1; } || true
  fi
  if command -v restic >/dev/null; then
    RESTIC_VER=$(restic version | awk '{print $2; exit}')
  else
    echo "$BENCH_NAME: warning: restic could not be installed; its columns will be empty" >&2
    SKIP_RESTIC=1
  fi
}
