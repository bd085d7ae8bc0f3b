#!/usr/bin/env bash
# The hostile-stream test (tests/e2e/hostile.rs) as long as you like: a
# random seed each round (printed first, so a failure can be replayed with
# HOSTILE_SEED=<seed>), HOSTILE_EVENTS valid usage events per round.
#
#   scripts/hostile.sh [ROUNDS]      default 5 rounds of 2,000 events
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
rounds=${1:-5}
export HOSTILE_EVENTS=${HOSTILE_EVENTS:-2000}
cargo build --tests --locked
for round in $(seq 1 "$rounds"); do
  seed=${HOSTILE_SEED:-$(od -An -N8 -tu8 /dev/urandom | tr -d ' ')}
  echo "round $round/$rounds: HOSTILE_SEED=$seed HOSTILE_EVENTS=$HOSTILE_EVENTS"
  log=$(mktemp)
  if ! HOSTILE_SEED=$seed bash scripts/stack.sh run -- \
      cargo test --locked --test e2e hostile -- --nocapture >"$log" 2>&1; then
    tail -60 "$log"
    echo "failed with HOSTILE_SEED=$seed (log: $log)"
    exit 1
  fi
  grep -E '^ +[0-9]+ +(Applied|Duplicate|Rejected|Waiting)|test result' "$log"
  rm -f "$log"
done
