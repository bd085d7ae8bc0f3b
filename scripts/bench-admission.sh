#!/usr/bin/env bash
# Admission benchmarks: in-process decisions per second, then HTTP latency
# of POST /v1/admission at a fixed offered rate while the simulator ingests
# usage at another fixed rate. Uses the local stack (scripts/stack.sh), a
# database and topics of its own, and a release build.
#   RPS (10000), SECS (20), INGEST_RATE (5000), USERS (1000)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
RPS=${RPS:-10000}; SECS=${SECS:-20}; INGEST_RATE=${INGEST_RATE:-5000}; USERS=${USERS:-1000}
cargo build --release --locked --bin quota-engine
cargo bench --locked --bench bench --no-run
bench_bin=$(ls -t target/release/deps/bench-* | grep -v '\.d$' | head -1)

run() {
  local run_id="b$(date +%s)"
  export QUOTA_TOPIC_USAGE=$run_id.usage QUOTA_TOPIC_ERRORS=$run_id.errors QUOTA_TOPIC_CONTROL=$run_id.control QUOTA_TOPIC_DLQ=$run_id.dlq
  export DATABASE_URL="${DATABASE_URL%/*}/bench_$run_id" KAFKA_GROUP_ID=$run_id HTTP_ADDR=127.0.0.1:8091
  echo "== in-process decisions (one thread)"
  for k in 1000 100000; do "$bench_bin" decide --keys $k --secs 3; done
  target/release/quota-engine serve >"$repo/.stack/bench-serve.log" 2>&1 &
  serve_pid=$!
  trap 'kill $serve_pid 2>/dev/null; wait $serve_pid 2>/dev/null' EXIT
  target/release/quota-engine simulate --users "$USERS" --events 0 --run-id "$run_id" >/dev/null
  local token
  token=$(target/release/quota-engine token create --role gateway --name bench | tail -1)
  for _ in $(seq 1 300); do
    code=$(curl -s -o /dev/null -w '%{http_code}' -X POST "http://$HTTP_ADDR/v1/admission" -H "Authorization: Bearer $token" \
      -d "{\"api_key\":\"sk-$run_id-$((USERS - 1))\",\"client_ip\":\"203.0.113.7\",\"model\":\"gpt-4o\",\"path\":\"/v1/chat/completions\"}" || true)
    [ "$code" = 200 ] && break
    sleep 0.2
  done
  [ "$code" = 200 ] || { echo "registry never visible to admission"; exit 1; }
  echo "== HTTP admission at $RPS req/s for $SECS s, ingesting $INGEST_RATE usage events/s"
  target/release/quota-engine simulate --users "$USERS" --events $((INGEST_RATE * (SECS + 5))) --rate "$INGEST_RATE" --run-id "$run_id" --skip-control >"$repo/.stack/bench-sim.log" 2>&1 &
  local sim=$!
  sleep 2
  ps -eo comm,times >"$repo/.stack/cpu-before"
  ( sleep "$((SECS - 1))"; ps -eo comm,times >"$repo/.stack/cpu-after" ) &
  "$bench_bin" http --addr "$HTTP_ADDR" --token "$token" --key-prefix "sk-$run_id-" --keys "$USERS" --rps "$RPS" --secs "$SECS"
  kill $sim 2>/dev/null || true
  # Where the two cores went during the load: CPU seconds per program
  # (processes still running at the end; the load generator is `bench-*`).
  echo "== CPU seconds used in the first $((SECS - 1)) s of the load, by program"
  awk 'NR==FNR { if (FNR > 1) before[$1] += $2; next } FNR > 1 { after[$1] += $2 }
       END { for (c in after) { d = after[c] - before[c]; if (d >= 0.5) printf "  %-20s %6.1f s\n", c, d } }' \
    "$repo/.stack/cpu-before" "$repo/.stack/cpu-after" | sort -k2 -rn
  target/release/quota-engine status | awk 'NR==1 || /usage/'
}
export -f run
export bench_bin repo RPS SECS INGEST_RATE USERS
exec bash scripts/stack.sh run -- bash -c run
