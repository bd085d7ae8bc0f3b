#!/usr/bin/env bash
# Hold admissions (contract, "Holds") through two `serve` processes on one
# database, every user under one hot reseller and one limited group, so
# every hold locks the same two totals rows. Open-loop HTTP load at RPS for
# SECS, spread over both processes; then plain admissions at the same rate
# for comparison; then the floor: the same Postgres, pgbench running one
# transaction per hold (lock the two hot rows, insert the hold, commit) at
# the same rate from two clients, i.e. the naive design without our code.
# Beside the hold load's latency it prints each program's CPU (the load
# generator's too), the WAL written and the hold tables' row writes (HOT
# or not).
#   RPS (2000), SECS (20), USERS (1000); QE_BIN (the build to measure,
#   target/release/quota-engine: set it to a copy of another commit's build
#   for an A/B on one stack); QUOTA_FETCH_WAIT_MS (500 here, the service's
#   default is 50): the consumers' idle fetches, which tansu answers only
#   after a full pass over their partitions in SQLite, cost this 2-core
#   machine about 15 % at 50 (BENCHMARKS.md, "Fourteenth session"); a
#   Kafka broker runs elsewhere and answers an idle long poll for nothing.
#   Set it to 50 to measure with the default.
# Uses the local stack (scripts/stack.sh), a database and topics of its own,
# and a release build.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
RPS=${RPS:-2000}; SECS=${SECS:-20}; USERS=${USERS:-1000}
export QUOTA_FETCH_WAIT_MS=${QUOTA_FETCH_WAIT_MS:-500}
cargo build --release --locked --bin quota-engine
cargo bench --locked --bench bench --no-run
bench_bin=$(ls -t target/release/deps/bench-* | grep -v '\.d$' | head -1)
QE_BIN=${QE_BIN:-target/release/quota-engine}

run() {
  local run_id="h$(date +%s)"
  export QUOTA_TOPIC_USAGE=$run_id.usage QUOTA_TOPIC_ERRORS=$run_id.errors QUOTA_TOPIC_CONTROL=$run_id.control QUOTA_TOPIC_DLQ=$run_id.dlq
  export DATABASE_URL="${DATABASE_URL%/*}/bench_$run_id" KAFKA_GROUP_ID=$run_id
  local a=127.0.0.1:8093 b=127.0.0.1:8094
  HTTP_ADDR=$a RUST_LOG=info,quota_engine::store::holds=debug "$QE_BIN" serve >"$repo/.stack/bench-holds-a.log" 2>&1 &
  pid_a=$!
  trap 'kill $pid_a $pid_b 2>/dev/null; wait $pid_a $pid_b 2>/dev/null; drop_bench_db "$DATABASE_URL"' EXIT
  for _ in $(seq 1 150); do curl -sf "http://$a/healthz" >/dev/null && break; sleep 0.2; done
  HTTP_ADDR=$b "$QE_BIN" serve >"$repo/.stack/bench-holds-b.log" 2>&1 &
  pid_b=$!
  for _ in $(seq 1 150); do curl -sf "http://$b/healthz" >/dev/null && break; sleep 0.2; done
  "$QE_BIN" simulate --users "$USERS" --events 0 --one-tenant --run-id "$run_id" >/dev/null
  local token prefix="sk-$run_id-"
  token=$("$QE_BIN" token create --role admin --name bench | tail -1)
  for addr in $a $b; do
    for _ in $(seq 1 300); do
      code=$(curl -s -o /dev/null -w '%{http_code}' -X POST "http://$addr/v1/admission" -H "Authorization: Bearer $token" \
        -d "{\"api_key\":\"$prefix$((USERS - 1))\",\"client_ip\":\"203.0.113.7\",\"model\":\"gpt-4o\",\"path\":\"/v1/chat/completions\"}" || true)
      [ "$code" = 200 ] && break
      sleep 0.2
    done
    [ "$code" = 200 ] || { echo "registry never visible to admission on $addr"; exit 1; }
  done
  echo "== hold admissions at $RPS/s for $SECS s through two processes (one hot reseller and group; consumers' fetch wait $QUOTA_FETCH_WAIT_MS ms)"
  psql -qAt "$DATABASE_URL" -c "SELECT pg_stat_reset_shared('wal'), pg_stat_reset()" >/dev/null
  cpu_snapshot "$repo/.stack/cpu-before"
  local TIMEFORMAT="  load generator       %U s user, %S s system (it has exited, so is not in the snapshots)"
  { time "$bench_bin" http --addr "$a,$b" --token "$token" --key-prefix "$prefix" --keys "$USERS" --rps "$RPS" --secs "$SECS" --hold 1 2>&3; } 3>&2 2>"$repo/.stack/loadgen-time"
  cpu_snapshot "$repo/.stack/cpu-after"
  echo "CPU seconds during the hold load, by program:"
  cpu_report "$repo/.stack/cpu-before" "$repo/.stack/cpu-after" $((RPS * SECS))
  cat "$repo/.stack/loadgen-time"
  sleep 11 # an idle connection reports its statistics within 10 s (Postgres 15, PGSTAT_IDLE_INTERVAL)
  psql -qAt "$DATABASE_URL" -c "SELECT 'WAL during the hold load: ' || wal_records || ' records (' || wal_fpi || ' full pages), ' || pg_size_pretty(wal_bytes) || ', ' || wal_sync || ' syncs' FROM pg_stat_wal"
  psql -qAt "$DATABASE_URL" -c "SELECT 'row writes: ' || string_agg(relname || ' ' || n_tup_ins || ' inserted, ' || n_tup_upd || ' updated (' || n_tup_hot_upd || ' HOT)', '; ' ORDER BY relname) FROM pg_stat_user_tables WHERE relname IN ('holds', 'hold_totals', 'hold_leases')"
  grep -h "hold batch" "$repo/.stack/bench-holds-a.log" | tail -3 || true
  psql -qAt "$DATABASE_URL" -c "SELECT 'holds placed: ' || count(*) || ', active: ' || count(*) FILTER (WHERE state = 'active') FROM holds"
  psql -qAt "$DATABASE_URL" -c "SELECT 'hot rows: ' || string_agg(kind || ' ' || id || ' in flight ' || in_flight || ' held ' || held, '; ') FROM hold_totals WHERE kind IN ('group', 'reseller') AND in_flight > 0"
  echo "== plain admissions at $RPS/s for $SECS s through the same two processes"
  "$bench_bin" http --addr "$a,$b" --token "$token" --key-prefix "$prefix" --keys "$USERS" --rps "$RPS" --secs "$SECS"
  echo "== floor: one transaction per hold (lock both hot rows, insert the hold, commit), pgbench at $RPS/s from 2 clients"
  psql -q "$DATABASE_URL" -c "CREATE TABLE floor_totals (kind text, id text, held numeric, in_flight int, PRIMARY KEY (kind, id)); INSERT INTO floor_totals VALUES ('group', 'g', 0, 0), ('reseller', 'r', 0, 0); CREATE TABLE floor_holds (hold_id bigserial PRIMARY KEY, amount numeric, scopes jsonb, created_at timestamptz, expires_at timestamptz)"
  cat >"$repo/.stack/floor.sql" <<'SQL'
BEGIN;
SELECT held, in_flight FROM floor_totals WHERE (kind, id) IN (('group', 'g'), ('reseller', 'r')) ORDER BY kind, id FOR UPDATE;
INSERT INTO floor_holds (amount, scopes, created_at, expires_at) VALUES (1, '[{"kind":"group","id":"g"},{"kind":"reseller","id":"r"}]', now(), now() + interval '60 seconds');
UPDATE floor_totals SET held = held + 1, in_flight = in_flight + 1 WHERE (kind, id) IN (('group', 'g'), ('reseller', 'r'));
COMMIT;
SQL
  rm -f "$repo"/.stack/floor_log*
  (cd "$repo/.stack" && pgbench -n -f floor.sql -c 2 -j 2 -R "$RPS" -T "$SECS" -l --log-prefix=floor_log "$DATABASE_URL" | grep -E "tps|latency average|lag")
  cat "$repo"/.stack/floor_log* | awk '{ print $3 }' | sort -n | awk '{ v[NR] = $1 } END { printf "floor latency ms: p50 %.3f p99 %.3f p99.9 %.3f max %.3f (%d transactions)\n", v[int(NR*0.5)]/1000, v[int(NR*0.99)]/1000, v[int(NR*0.999)]/1000, v[NR]/1000, NR }'
  echo "== the service's own time per admission request, process A (both loads)"
  bash scripts/metric-quantiles.sh "$a" "$token" quota_admission_seconds
}
source "$repo/scripts/bench-lib.sh"
export -f run drop_bench_db cpu_snapshot cpu_report
export bench_bin repo RPS SECS USERS QE_BIN
exec bash scripts/stack.sh run -- bash -c run
