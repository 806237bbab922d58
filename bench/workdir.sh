# bench/workdir.sh - sourced by every bench script before its work starts.
#
# claim_workdir: makes $WORK a fresh work dir marked with $MARKER, refusing a
# non-empty folder that is not a previous work dir of the same bench, sets
# WORK to its absolute path, and traps EXIT to remove it unless KEEP=1. A
# script that started processes defines bench_cleanup_extra (called first).
# Uses the script's die and BENCH_NAME.
claim_workdir() {
  if [[ -e $WORK ]]; then
    [[ -d $WORK ]] || die "$WORK exists and is not a directory"
    if [[ -n $(ls -A "$WORK") && ! -e $WORK/$MARKER ]]; then
      die "$WORK is not empty and is not a previous bench work dir; refusing to wipe it"
    fi
    rm -rf -- "$WORK"
  fi
  mkdir -p "$WORK"
  touch "$WORK/$MARKER"
  WORK=$(cd "$WORK" && pwd)
  trap bench_workdir_cleanup EXIT
  trap 'exit 130' INT TERM
}

bench_workdir_cleanup() {
  local rc=$?
  if declare -F bench_cleanup_extra >/dev/null; then bench_cleanup_extra; fi
  if [[ $KEEP == 1 ]]; then
    echo "$BENCH_NAME: work dir kept: $WORK" >&2
  elif [[ -e $WORK/$MARKER ]]; then
    rm -rf -- "$WORK"
    rmdir -- "$(dirname "$WORK")" 2>/dev/null || true
  fi
  exit $rc
}

# private_binary: builds the release binary unless BUILD=0 or CBTVAULT names
# one, checks $CBT, and benchmarks a private copy in $WORK (the work tree may
# be rebuilt by someone else mid-run): CBT points at the copy.
private_binary() {
  if [[ $BUILD == 1 && -z ${CBTVAULT:-} ]]; then
    log "cargo build --release"
    (cd "$ROOT" && cargo build --release --quiet)
  fi
  [[ -x $CBT ]] || die "cbtvault binary not found: $CBT"
  cp "$CBT" "$WORK/cbtvault"
  CBT=$WORK/cbtvault
}
