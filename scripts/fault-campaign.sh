#!/usr/bin/env bash
# Fault campaign (minutes; not in CI). On a private stack (its own Postgres
# and broker, ports PG_PORT/KAFKA_PORT, data in STACK_DIR), each scenario
# runs release `serve` processes under simulated load (the simulator's
# non-idempotent producer with retries, as a gateway would), injects its
# faults while the events flow, and then requires: the simulator's own
# check (every user and reseller balance equals what it priced, so nothing
# was lost or applied twice), `quota-engine reconcile` clean, and the counts
# adding up. Prints a markdown table for RELIABILITY.md.
#   EVENTS (20000), RATE (1000), SCENARIOS ("kill9 rebalance postgres broker diskfull")
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
EVENTS=${EVENTS:-20000}; RATE=${RATE:-1000}
SCENARIOS=${SCENARIOS:-"kill9 rebalance postgres broker diskfull"}
export STACK_DIR=${STACK_DIR:-/tmp/qe-faults} PG_PORT=${PG_PORT:-5477} KAFKA_PORT=${KAFKA_PORT:-9477}
cargo build --release --locked --bin quota-engine
bin=$repo/target/release/quota-engine
mkdir -p "$STACK_DIR"
eval "$(env -u DATABASE_URL -u KAFKA_BROKERS bash scripts/stack.sh up | tail -1)"
trap 'for p in "${pids[@]:-}"; do kill -9 $p 2>/dev/null || true; done; bash scripts/stack.sh down >/dev/null 2>&1 || true' EXIT
declare -a pids=()
base_url=$DATABASE_URL

start_serve() { # port
  HTTP_ADDR=127.0.0.1:$1 QUOTA_STALL_SECS=15 "$bin" serve >>"$STACK_DIR/serve-$run_id-$1.log" 2>&1 &
  echo $!
}

wait_http() { for _ in $(seq 1 150); do curl -sf "http://127.0.0.1:$1/healthz" >/dev/null && return 0; sleep 0.2; done; return 1; }

echo "| scenario | usage events | faults injected | simulator's balance check | reconcile | counts add up | duplicates skipped | wall time (s) |"
echo "|---|---|---|---|---|---|---|---|"
for s in $SCENARIOS; do
  run_id="f$(date +%s)$s"
  export QUOTA_TOPIC_USAGE=$run_id.usage QUOTA_TOPIC_ERRORS=$run_id.errors QUOTA_TOPIC_CONTROL=$run_id.control QUOTA_TOPIC_DLQ=$run_id.dlq
  export DATABASE_URL="${base_url%/*}/fc_$run_id" KAFKA_GROUP_ID=$run_id
  started=$(date +%s)
  a=$(start_serve 8201); pids+=("$a"); wait_http 8201
  b=""
  if [ "$s" = kill9 ] || [ "$s" = rebalance ]; then b=$(start_serve 8202); pids+=("$b"); wait_http 8202; fi
  "$bin" simulate --users 300 --events "$EVENTS" --rate "$RATE" --run-id "$run_id" --not-idempotent --check 127.0.0.1:8201 --check-timeout-secs 400 \
    >"$STACK_DIR/sim-$run_id.log" 2>&1 &
  sim=$!
  faults=""
  sleep 5
  case $s in
    kill9)
      for i in 1 2 3; do
        kill -9 "$b"; sleep 3; b=$(start_serve 8202); pids+=("$b"); sleep 4
        kill -9 "$a"; sleep 3; a=$(start_serve 8201); pids+=("$a"); wait_http 8201; sleep 4
      done
      faults="6 × kill -9 of one of two consumers" ;;
    rebalance)
      for i in 1 2 3 4; do
        c=$(start_serve 8203); pids+=("$c"); sleep 4; kill -TERM "$c"; wait "$c" 2>/dev/null || true; sleep 2
      done
      faults="a third consumer joined and left 4 ×" ;;
    postgres)
      for i in 1 2; do bash scripts/stack.sh stop postgres >/dev/null; sleep 5; env -u DATABASE_URL -u KAFKA_BROKERS bash scripts/stack.sh up >/dev/null; sleep 5; done
      faults="Postgres stopped 5 s, 2 ×" ;;
    broker)
      for i in 1 2; do bash scripts/stack.sh stop broker >/dev/null; sleep 5; env -u DATABASE_URL -u KAFKA_BROKERS bash scripts/stack.sh up >/dev/null; sleep 5; done
      faults="broker stopped 5 s, 2 ×" ;;
    diskfull)
      # A 16 MiB tmpfs tablespace for the ledger entries: inserts fail with
      # "No space left on device" until the table moves back.
      mnt=$STACK_DIR/full
      mkdir -p "$mnt"
      if mount -t tmpfs -o size=16m tmpfs "$mnt" 2>/dev/null; then
        chown postgres "$mnt" 2>/dev/null || true
        psql -q "$DATABASE_URL" -c "CREATE TABLESPACE qe_full_$run_id LOCATION '$mnt'" -c "ALTER TABLE usage_postings SET TABLESPACE qe_full_$run_id" 2>>"$STACK_DIR/diskfull.log" || true
        sleep 25
        psql -q "$DATABASE_URL" -c "ALTER TABLE usage_postings SET TABLESPACE pg_default" -c "DROP TABLESPACE qe_full_$run_id" 2>>"$STACK_DIR/diskfull.log" || true
        full=$(grep -c "No space left" "$STACK_DIR/serve-$run_id-8201.log" || true)
        faults="ledger on a 16 MiB tablespace for 25 s ($full disk-full errors logged)"
      else
        faults="not run: tmpfs mount refused here"
      fi ;;
  esac
  if wait $sim; then check=pass; else check=FAIL; fi
  if "$bin" reconcile >"$STACK_DIR/reconcile-$run_id.json" 2>/dev/null; then rec=clean; else rec=PROBLEMS; fi
  if "$bin" status >"$STACK_DIR/status-$run_id.txt"; then counts=yes; else counts=NO; fi
  dups=$(awk -v t="$QUOTA_TOPIC_USAGE" '$1 == t { d += $6 } END { print d + 0 }' "$STACK_DIR/status-$run_id.txt")
  applied=$(awk -v t="$QUOTA_TOPIC_USAGE" '$1 == t { d += $5 } END { print d + 0 }' "$STACK_DIR/status-$run_id.txt")
  echo "| $s | $applied applied of $EVENTS | $faults | $check | $rec | $counts | $dups | $(( $(date +%s) - started )) |"
  for p in $a $b; do kill -TERM "$p" 2>/dev/null || true; done
  for p in $a $b; do wait "$p" 2>/dev/null || true; done
  [ "$s" = diskfull ] && umount "$STACK_DIR/full" 2>/dev/null || true
done
