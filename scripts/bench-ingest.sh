#!/usr/bin/env bash
# Ingest benchmark: the batch sink alone, fed simulated usage from memory
# (the broker is not what is measured), against the local stack's Postgres,
# each run in a fresh database. Release build.
#   EVENTS (200000), USERS (1000), RESELLERS (8), SINKS ("1 2"), BATCH (8000, the service default)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
EVENTS=${EVENTS:-200000}; USERS=${USERS:-1000}; RESELLERS=${RESELLERS:-8}; SINKS=${SINKS:-"1 2"}; BATCH=${BATCH:-8000}
cargo bench --locked --bench bench --no-run
bench_bin=$(ls -t target/release/deps/bench-* | grep -v '\.d$' | head -1)
run() {
  for k in $SINKS; do
    local db="${DATABASE_URL%/*}/bench_ingest_$(date +%s)_$k"
    echo "== $EVENTS usage events, $k concurrent sink(s), batches of $BATCH ($db)"
    "$bench_bin" ingest --database "$db" --events "$EVENTS" --users "$USERS" --resellers "$RESELLERS" --sinks "$k" --batch "$BATCH"
    drop_bench_db "$db"
  done
}
source "$(dirname "${BASH_SOURCE[0]}")/bench-lib.sh"
export -f run drop_bench_db
export bench_bin EVENTS USERS RESELLERS SINKS BATCH
exec bash scripts/stack.sh run -- bash -c run
