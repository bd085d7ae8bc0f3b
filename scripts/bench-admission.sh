#!/usr/bin/env bash
# Admission benchmarks: in-process decisions per second, then HTTP latency
# of POST /v1/admission at a fixed offered rate while usage is ingested at
# another fixed rate. Uses the local stack (scripts/stack.sh), a database
# (and topics) of its own, and a release build.
#   RPS (10000), SECS (20), INGEST_RATE (5000), USERS (1000)
#   INGEST: how usage arrives during the load
#     sink   (default) `bench ingest --rate`: the service's batch sink fed
#            from memory in another process, 50 ms batches committed to the
#            same Postgres and notified to serve's admission view; the
#            broker is left out (tansu's SQLite fetch reads a partition's
#            whole backlog on every fetch, see BENCHMARKS.md)
#     broker `quota-engine simulate --rate` through tansu into serve's own
#            consumers (LINGER_MS: the simulator's producer linger, 5)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
RPS=${RPS:-10000}; SECS=${SECS:-20}; INGEST_RATE=${INGEST_RATE:-5000}; USERS=${USERS:-1000}
INGEST=${INGEST:-sink}; LINGER_MS=${LINGER_MS:-5}
case "$INGEST" in sink|broker) ;; *) echo "INGEST must be sink or broker" >&2; exit 2 ;; esac
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
  feeder_pid=
  trap 'kill $serve_pid $feeder_pid 2>/dev/null; wait $serve_pid 2>/dev/null; drop_bench_db "$DATABASE_URL"' EXIT
  for _ in $(seq 1 150); do curl -sf "http://$HTTP_ADDR/healthz" >/dev/null && break; sleep 0.2; done
  local prefix
  if [ "$INGEST" = sink ]; then
    # Registers the simulator's world, then applies usage at the rate for
    # the load's length and then some (keys sk-bench-<i>).
    prefix="sk-bench-"
    "$bench_bin" ingest --database "$DATABASE_URL" --users "$USERS" --events $((INGEST_RATE * (SECS + 8))) --rate "$INGEST_RATE" \
      >"$repo/.stack/bench-feeder.log" 2>&1 &
    feeder_pid=$!
  else
    prefix="sk-$run_id-"
    target/release/quota-engine simulate --users "$USERS" --events 0 --run-id "$run_id" >/dev/null
  fi
  local token
  token=$(target/release/quota-engine token create --role admin --name bench | tail -1)
  for _ in $(seq 1 300); do
    code=$(curl -s -o /dev/null -w '%{http_code}' -X POST "http://$HTTP_ADDR/v1/admission" -H "Authorization: Bearer $token" \
      -d "{\"api_key\":\"$prefix$((USERS - 1))\",\"client_ip\":\"203.0.113.7\",\"model\":\"gpt-4o\",\"path\":\"/v1/chat/completions\"}" || true)
    [ "$code" = 200 ] && break
    sleep 0.2
  done
  [ "$code" = 200 ] || { echo "registry never visible to admission"; exit 1; }
  echo "== HTTP admission at $RPS req/s for $SECS s, ingesting $INGEST_RATE usage events/s ($INGEST)"
  if [ "$INGEST" = broker ]; then
    target/release/quota-engine simulate --users "$USERS" --events $((INGEST_RATE * (SECS + 5))) --rate "$INGEST_RATE" --run-id "$run_id" \
      --skip-control --linger-ms "$LINGER_MS" >"$repo/.stack/bench-sim.log" 2>&1 &
    feeder_pid=$!
  fi
  sleep 2
  cpu_snapshot "$repo/.stack/cpu-before"
  ( sleep "$((SECS - 1))"; cpu_snapshot "$repo/.stack/cpu-after" ) &
  "$bench_bin" http --addr "$HTTP_ADDR" --token "$token" --key-prefix "$prefix" --keys "$USERS" --rps "$RPS" --secs "$SECS"
  # Where the two cores went during the load: CPU seconds per program (of
  # processes alive at both ends; `bench-*` is the load generator and, with
  # INGEST=sink, the feeder; `quota-engine` with INGEST=broker includes the
  # simulator).
  echo "== CPU seconds used in the first $((SECS - 1)) s of the load, by program"
  cpu_report "$repo/.stack/cpu-before" "$repo/.stack/cpu-after"
  if [ "$INGEST" = sink ]; then
    wait "$feeder_pid" || true
    feeder_pid=
    grep -E "committed|balances" "$repo/.stack/bench-feeder.log" || tail -5 "$repo/.stack/bench-feeder.log"
  else
    kill "$feeder_pid" 2>/dev/null || true
    target/release/quota-engine status | awk 'NR==1 || /usage/'
  fi
  echo "== due (sink) or produced (broker) → visible to serve's admission view"
  bash scripts/metric-quantiles.sh "$HTTP_ADDR" "$token"
  echo "== the service's own time per admission request (routing to answer)"
  bash scripts/metric-quantiles.sh "$HTTP_ADDR" "$token" quota_admission_seconds
}
source "$repo/scripts/bench-lib.sh"
export -f run drop_bench_db cpu_snapshot cpu_report
export bench_bin repo RPS SECS INGEST_RATE USERS INGEST LINGER_MS
exec bash scripts/stack.sh run -- bash -c run
