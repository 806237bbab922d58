#!/usr/bin/env bash
# bench/torture.sh - the long run of the torture test (issue 22): many seeds,
# thousands of steps each, for hours, with a release build.
#
# Each round runs tests/integration/torture.rs (the CLI harness and the
# power-loss mode) with a new seed, logs it, and keeps the log of every
# failure. A failure prints its seed and step; replay one with
#   CBTVAULT_TORTURE_SEED=N CBTVAULT_TORTURE_STEPS=M \
#     cargo test --locked --test integration torture -- --nocapture
# See bench/README.md.
#
# The fault hooks (CBTVAULT_TEST_FAULTS, the power-loss backend) exist only
# in builds with debug assertions, so the release build here turns them on
# (`profile.release.debug-assertions=true`); nothing else changes.
#
# Environment:
#   TORTURE_HOURS=4        how long to keep starting new rounds
#   TORTURE_STEPS=3000     steps per round (the power-loss mode runs a tenth)
#   TORTURE_SEED=          first seed (default: random); later rounds add 1
#   TORTURE_STOP=0         1 = stop at the first failing round
#   TORTURE_DIR=<repo>/bench-work/torture   logs (kept)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HOURS=${TORTURE_HOURS:-4}
STEPS=${TORTURE_STEPS:-3000}
SEED=${TORTURE_SEED:-$(od -An -N4 -tu4 /dev/urandom | tr -d " ")}
STOP=${TORTURE_STOP:-0}
DIR=${TORTURE_DIR:-$ROOT/bench-work/torture}
mkdir -p "$DIR"
cd "$ROOT"

CARGO=(cargo test --locked --release --config profile.release.debug-assertions=true
       --test integration torture)
echo "torture.sh: building (release, debug assertions on)"
"${CARGO[@]}" --no-run

end=$(( $(date +%s) + HOURS * 3600 ))
rounds=0
failed=0
while [ "$(date +%s)" -lt "$end" ]; do
    log="$DIR/seed-$SEED.log"
    start=$(date +%s)
    if CBTVAULT_TORTURE_SEED=$SEED CBTVAULT_TORTURE_STEPS=$STEPS \
        "${CARGO[@]}" -- --nocapture --test-threads=1 >"$log" 2>&1; then
        echo "seed $SEED: ok in $(( $(date +%s) - start )) s"
        rm -f "$log"
    else
        failed=$(( failed + 1 ))
        echo "seed $SEED: FAILED in $(( $(date +%s) - start )) s; log: $log"
        grep -m1 -E "failure at step" "$log" || tail -n 20 "$log"
        if [ "$STOP" = 1 ]; then
            break
        fi
    fi
    rounds=$(( rounds + 1 ))
    SEED=$(( SEED + 1 ))
done
echo "torture.sh: $rounds rounds of $STEPS steps, $failed failed (logs of failures in $DIR)"
[ "$failed" -eq 0 ]
