#!/usr/bin/env bash
# A/B ingest benchmark: two builds of the `bench` binary (copied aside after
# `cargo bench --bench bench --no-run` at each commit) run alternately on one
# local stack, each run into a fresh database; the order flips every other
# round so neither build always runs second.
#   usage: scripts/bench-ingest-ab.sh BENCH_A BENCH_B
#   ROUNDS (6), EVENTS (100000), SINKS ("1 2"), BATCH (8000)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
[ $# -eq 2 ] || { echo "usage: $0 BENCH_A BENCH_B" >&2; exit 2; }
export A=$(realpath "$1") B=$(realpath "$2")
export ROUNDS=${ROUNDS:-6} EVENTS=${EVENTS:-100000} SINKS=${SINKS:-"1 2"} BATCH=${BATCH:-8000}
run() {
  for round in $(seq 1 "$ROUNDS"); do
    if [ $((round % 2)) -eq 1 ]; then order="A B"; else order="B A"; fi
    for which in $order; do
      bin=${!which}
      for k in $SINKS; do
        db="${DATABASE_URL%/*}/bench_ab_$(date +%s%N)_${which}_$k"
        printf '== round %s build %s sinks=%s: ' "$round" "$which" "$k"
        "$bin" ingest --database "$db" --events "$EVENTS" --users 1000 --resellers 8 --sinks "$k" --batch "$BATCH" 2>&1 \
          | grep -E "committed|balances" | tr '\n' ' '
        echo
        drop_bench_db "$db"
      done
    done
  done
}
source "$(dirname "${BASH_SOURCE[0]}")/bench-lib.sh"
export -f run drop_bench_db
exec bash scripts/stack.sh run -- bash -c run
