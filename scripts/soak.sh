#!/usr/bin/env bash
# Soak: a release `serve` under a steady simulated load (RATE usage events
# per second through the broker) for SECS seconds. Every STEP seconds a row:
# serve's resident memory, events applied so far and in the interval, the
# produce → visible lag of the interval's batches (mean and p99 bucket, from
# the service's histogram), readiness, and WARN/ERROR lines logged. At the
# end: counts, reconcile and the simulator's own balance check.
#   RATE (1000), SECS (1800), STEP (60), USERS (2000)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
RATE=${RATE:-1000}; SECS=${SECS:-1800}; STEP=${STEP:-60}; USERS=${USERS:-2000}
cargo build --release --locked --bin quota-engine
run() {
  local run_id="s$(date +%s)"
  export QUOTA_TOPIC_USAGE=$run_id.usage QUOTA_TOPIC_ERRORS=$run_id.errors QUOTA_TOPIC_CONTROL=$run_id.control QUOTA_TOPIC_DLQ=$run_id.dlq
  export DATABASE_URL="${DATABASE_URL%/*}/soak_$run_id" KAFKA_GROUP_ID=$run_id HTTP_ADDR=127.0.0.1:8094
  local log="$repo/.stack/soak-serve.log"
  target/release/quota-engine serve >"$log" 2>&1 &
  serve_pid=$!
  sim_pid=""
  trap 'kill $serve_pid $sim_pid 2>/dev/null; wait $serve_pid 2>/dev/null' EXIT
  for _ in $(seq 1 150); do curl -sf "http://$HTTP_ADDR/healthz" >/dev/null && break; sleep 0.2; done
  local token
  token=$(target/release/quota-engine token create --role finance --name soak | tail -1)
  target/release/quota-engine simulate --users "$USERS" --events $((RATE * SECS)) --rate "$RATE" --duration-secs "$SECS" --run-id "$run_id" \
    --check "$HTTP_ADDR" --check-timeout-secs 300 >"$repo/.stack/soak-sim.log" 2>&1 &
  sim_pid=$!
  echo "| minute | RSS (MiB) | applied | applied in step (/s) | lag mean (ms) | lag p99 bucket (s) | ready | WARN/ERROR lines |"
  echo "|---|---|---|---|---|---|---|---|"
  local start=$(date +%s) prev_applied=0 prev_sum=0 prev_count=0
  declare -a prev_b=()
  while kill -0 $sim_pid 2>/dev/null && [ $(( $(date +%s) - start )) -lt $((SECS + 60)) ]; do
    sleep "$STEP"
    local m; m=$(curl -s -H "Authorization: Bearer $token" "http://$HTTP_ADDR/metrics")
    local applied; applied=$(echo "$m" | awk -v t="$QUOTA_TOPIC_USAGE" 'index($0, "quota_events_applied_total{topic=\"" t "\"") == 1 { s += $2 } END { print s + 0 }')
    local sum count; sum=$(echo "$m" | awk '/^quota_visible_lag_seconds_sum/ {print $2}'); count=$(echo "$m" | awk '/^quota_visible_lag_seconds_count/ {print $2}')
    mapfile -t b < <(echo "$m" | awk '/^quota_visible_lag_seconds_bucket/ {print $2}')
    mapfile -t le < <(echo "$m" | awk -F'"' '/^quota_visible_lag_seconds_bucket/ {print $2}')
    local dcount=$((count - prev_count)) p99="-"
    if [ "$dcount" -gt 0 ]; then
      for i in "${!b[@]}"; do
        local d=$(( b[i] - ${prev_b[i]:-0} ))
        if [ $((d * 100)) -ge $((dcount * 99)) ]; then p99=${le[i]}; break; fi
      done
    fi
    local mean; mean=$(awk -v s="$sum" -v ps="$prev_sum" -v c="$dcount" 'BEGIN { if (c > 0) printf "%.0f", 1000 * (s - ps) / c; else print "-" }')
    local rss; rss=$(awk '/VmRSS/ {printf "%.0f", $2 / 1024}' /proc/$serve_pid/status)
    local ready; ready=$(curl -s -o /dev/null -w '%{http_code}' "http://$HTTP_ADDR/readyz")
    local errs; errs=$(grep -cE 'WARN|ERROR' "$log" || true)
    echo "| $(( ($(date +%s) - start) / 60 )) | $rss | $applied | $(( (applied - prev_applied) / STEP )) | $mean | $p99 | $ready | $errs |"
    prev_applied=$applied; prev_sum=$sum; prev_count=$count; prev_b=("${b[@]}")
  done
  wait $sim_pid || true
  echo
  tail -3 "$repo/.stack/soak-sim.log"
  target/release/quota-engine status | awk 'NR == 1 || /usage|control/'
  target/release/quota-engine reconcile >/dev/null && echo "reconcile: ok" || echo "reconcile: PROBLEMS"
}
export -f run
export repo RATE SECS STEP USERS
exec bash scripts/stack.sh run -- bash -c run
