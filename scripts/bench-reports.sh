#!/usr/bin/env bash
# Spend reports over a month of usage (BENCHMARKS.md, "Spend reports"):
# fills a fresh database's rollup (spend_hourly, spend_daily) with exactly
# what EVENTS usage events spread over 30 days make (synthesised in SQL:
# 2,000 keys, 1,000 apps, 200 users, 20 resellers, 5 groups, 8 models with
# skewed popularity, 2 paths, 3 statuses), then times N sequential
# requests of each report through a release `serve` (curl's time_total)
# and, as the floor, the same SQL statements run by pgbench without our
# code (per-statement latencies from its log).
#   EVENTS (10000000), N (200)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
export EVENTS=${EVENTS:-10000000} N=${N:-200}
cargo build --release --locked --bin quota-engine

run() {
  set -euo pipefail
  local run_id="r$(date +%s)"
  export QUOTA_TOPIC_USAGE=$run_id.usage QUOTA_TOPIC_ERRORS=$run_id.errors QUOTA_TOPIC_CONTROL=$run_id.control QUOTA_TOPIC_DLQ=$run_id.dlq
  export QUOTA_TOPIC_NOTIFICATIONS=$run_id.notifications
  export DATABASE_URL="${DATABASE_URL%/*}/bench_$run_id" KAFKA_GROUP_ID=$run_id HTTP_ADDR=127.0.0.1:8092
  target/release/quota-engine migrate >/dev/null
  echo "== filling the rollup with $EVENTS usage events (SQL)"
  local t0=$SECONDS
  psql -q "$DATABASE_URL" <<SQL
SET work_mem = '1GB';
SELECT setseed(0.42);
CREATE TEMP TABLE ev AS
SELECT timestamptz '2026-10-01 00:00Z' + (g::float8 / $EVENTS) * interval '30 days' AS t,
       (ARRAY['gpt-4o','gpt-4o-mini','claude-sonnet','claude-haiku','gemini-pro','gemini-flash','llama-70b','mistral-large'])[1 + floor(8 * random() ^ 2)::int] AS model,
       CASE WHEN random() < 0.8 THEN '/v1/chat/completions' ELSE '/v1/embeddings' END AS path,
       CASE WHEN r < 0.97 THEN 'success' WHEN r < 0.99 THEN 'aborted' ELSE 'failed' END AS status,
       k, floor(random() * 4000)::bigint AS input, floor(random() * 1000)::bigint AS output
FROM (SELECT g, random() AS r, floor(2000 * random() ^ 1.5)::int AS k FROM generate_series(1, $EVENTS) g) s;
INSERT INTO spend_hourly
SELECT hour, spend_digest(model, path, status, key_id, app_id, user_id, group_id, reseller_id), model, path, status, key_id, app_id, user_id, group_id, reseller_id,
       charge, requests, input, output, 0, 0
FROM (SELECT date_trunc('hour', t, 'UTC') AS hour, model, path, status, 'k' || k AS key_id, 'a' || k / 2 AS app_id, 'u' || k / 10 AS user_id,
             'g' || (k / 10) % 5 AS group_id, 'r' || k / 100 AS reseller_id,
             sum(CASE WHEN status = 'failed' THEN 0 ELSE input * 2.5 + output * 10 END) AS charge, count(*) AS requests, sum(input) AS input, sum(output) AS output
      FROM ev GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9) a;
INSERT INTO spend_daily
SELECT date_trunc('day', hour, 'UTC'), spend_digest(model, path, status, group_id, reseller_id), min(model), min(path), min(status), min(group_id), min(reseller_id),
       sum(charge), sum(requests), sum(input_tokens), sum(output_tokens), sum(cache_read_tokens), sum(cache_write_tokens)
FROM spend_hourly GROUP BY 1, 2;
ANALYZE spend_hourly; ANALYZE spend_daily;
SQL
  echo "filled in $((SECONDS - t0)) s: $(psql -Atq "$DATABASE_URL" -c "SELECT (SELECT sum(requests) FROM spend_hourly) || ' events, ' || (SELECT count(*) FROM spend_hourly) || ' hourly rows, ' || (SELECT count(*) FROM spend_daily) || ' daily rows'")"
  target/release/quota-engine serve >"$repo/.stack/bench-reports-serve.log" 2>&1 &
  local serve_pid=$!
  trap 'kill $serve_pid 2>/dev/null; wait $serve_pid 2>/dev/null' EXIT
  for _ in $(seq 1 150); do curl -sf "http://$HTTP_ADDR/healthz" >/dev/null && break; sleep 0.2; done
  local token
  token=$(target/release/quota-engine token create --role finance --name bench | tail -1)
  local month="from=2026-10-01T00:00:00Z&to=2026-10-31T00:00:00Z"
  local day_sql="SELECT date_trunc('day', day, 'UTC') AS b, %s, sum(charge), sum(requests)::bigint, sum(input_tokens), sum(output_tokens), sum(cache_read_tokens), sum(cache_write_tokens) FROM spend_daily WHERE day >= '2026-10-01T00:00:00Z' AND day < '2026-10-31T00:00:00Z' AND (NULL::text IS NULL OR reseller_id = NULL) GROUP BY 1, 2 ORDER BY 1, 2 LIMIT 50001;"
  local hour_sql="SELECT date_trunc('day', hour, 'America/New_York') AS b, %s, sum(charge), sum(requests)::bigint, sum(input_tokens), sum(output_tokens), sum(cache_read_tokens), sum(cache_write_tokens) FROM spend_hourly WHERE hour >= '2026-10-01T00:00:00Z' AND hour < '2026-10-31T00:00:00Z' AND (NULL::text IS NULL OR reseller_id = NULL) GROUP BY 1, 2 ORDER BY 1, 2 LIMIT 50001;"
  for q in "bucket=day&by=model|daily|model" "bucket=day&by=reseller|daily|reseller_id" "bucket=day&by=model&tz=America/New_York|hourly|model"; do
    IFS='|' read -r params table col <<<"$q"
    local url="http://$HTTP_ADDR/v1/reports/spend?$month&$params"
    curl -sf -H "Authorization: Bearer $token" "$url" >/dev/null   # warm
    local times
    times=$(for _ in $(seq 1 "$N"); do curl -s -o /dev/null -w '%{time_total}\n' -H "Authorization: Bearer $token" "$url"; done | sort -n)
    local sql
    if [ "$table" = daily ]; then sql=$(printf "$day_sql" "$col"); else sql=$(printf "$hour_sql" "$col"); fi
    echo "$sql" >"$repo/.stack/bench-reports.sql"
    rm -f "$repo"/.stack/pgbench_log.*
    (cd "$repo/.stack" && pgbench -n -f bench-reports.sql -t "$N" -l "$DATABASE_URL" >/dev/null 2>&1)
    local floor
    floor=$(cat "$repo"/.stack/pgbench_log.* | awk '{ print $3 / 1e6 }' | sort -n)
    pct() { awk -v p="$1" '{ a[NR] = $1 } END { i = int(NR * p / 100); if (i < 1) i = 1; if (i > NR) i = NR; printf "%.1f", a[i] * 1000 }'; }
    echo "== $params (rollup: spend_$table → $(curl -s -H "Authorization: Bearer $token" "$url" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["rows"]))') rows)"
    echo "   HTTP  p50 $(echo "$times" | pct 50) ms, p99 $(echo "$times" | pct 99) ms, max $(echo "$times" | pct 100) ms ($N requests)"
    echo "   floor p50 $(echo "$floor" | pct 50) ms, p99 $(echo "$floor" | pct 99) ms, max $(echo "$floor" | pct 100) ms (the same SQL by pgbench)"
  done
}
export -f run
exec bash scripts/stack.sh run -- bash -c run
