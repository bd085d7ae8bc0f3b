#!/usr/bin/env bash
# End-to-end lag: the simulator produces usage at a steady RATE for SECS
# seconds through the broker (tansu, SQLite storage) to a release `serve`;
# the service's own histogram (quota_visible_lag_seconds: Kafka timestamp of
# each batch's oldest record → the batch visible to admission) is scraped at
# the end. Also prints serve's resident memory.
#   RATE (5000), SECS (60), USERS (1000), LINGER_MS (5: the simulator's producer linger)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
RATE=${RATE:-5000}; SECS=${SECS:-60}; USERS=${USERS:-1000}
cargo build --release --locked --bin quota-engine
run() {
  local run_id="l$(date +%s)"
  export QUOTA_TOPIC_USAGE=$run_id.usage QUOTA_TOPIC_ERRORS=$run_id.errors QUOTA_TOPIC_CONTROL=$run_id.control QUOTA_TOPIC_DLQ=$run_id.dlq
  export DATABASE_URL="${DATABASE_URL%/*}/lag_$run_id" KAFKA_GROUP_ID=$run_id HTTP_ADDR=127.0.0.1:8092
  target/release/quota-engine serve >"$repo/.stack/lag-serve.log" 2>&1 &
  serve_pid=$!
  trap 'kill $serve_pid 2>/dev/null; wait $serve_pid 2>/dev/null' EXIT
  for _ in $(seq 1 150); do curl -sf "http://$HTTP_ADDR/healthz" >/dev/null && break; sleep 0.2; done
  local token
  token=$(target/release/quota-engine token create --role finance --name lag-bench | tail -1)
  target/release/quota-engine simulate --users "$USERS" --events $((RATE * SECS)) --rate "$RATE" --duration-secs "$SECS" --run-id "$run_id" --linger-ms "${LINGER_MS:-5}"
  # Let the last batches land.
  for _ in $(seq 1 60); do
    behind=$(target/release/quota-engine status | awk -v t="$QUOTA_TOPIC_USAGE" '$1 == t { c += $4 } END { print c }')
    [ "$behind" -ge $((RATE * SECS)) ] 2>/dev/null && break
    sleep 1
  done
  target/release/quota-engine status | awk 'NR == 1 || /usage/'
  echo "serve resident memory: $(awk '/VmRSS/ {print $2, $3}' /proc/$serve_pid/status)"
  bash scripts/metric-quantiles.sh "$HTTP_ADDR" "$token"
}
export -f run
export repo RATE SECS USERS
exec bash scripts/stack.sh run -- bash -c run
