#!/usr/bin/env bash
# Spend reports over a month of usage (BENCHMARKS.md, "Spend reports"):
# fills a fresh database's rollup (spend_hourly, spend_daily) with exactly
# what EVENTS usage events spread over 30 days make (synthesised in SQL:
# 2,000 keys, 1,000 apps, 200 users, 20 resellers, 5 groups, 8 models with
# skewed popularity, 2 paths, 3 statuses), then times N sequential
# requests of each report through a release `serve` (curl's time_total)
# and, as the floor, the same SQL statement run by pgbench without our
# code (per-statement latencies from its log).
#   EVENTS (10000000), N (200); REPORTS_DB=<url>: time the reports of a
#   database an earlier run filled (the fill takes about 9 minutes here)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
export repo EVENTS=${EVENTS:-10000000} N=${N:-200} REPORTS_DB=${REPORTS_DB:-}
cargo build --release --locked --bin quota-engine

fill() {
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
INSERT INTO spend_hourly_dim
SELECT hour, v.dim, v.value, sum(charge), sum(requests), sum(input_tokens), sum(output_tokens), sum(cache_read_tokens), sum(cache_write_tokens)
FROM spend_hourly CROSS JOIN LATERAL (VALUES ('model', model), ('path', path), ('status', status), ('group', group_id), ('reseller', reseller_id)) AS v(dim, value)
GROUP BY 1, 2, 3;
VACUUM ANALYZE spend_hourly; VACUUM ANALYZE spend_daily; VACUUM ANALYZE spend_hourly_dim;
SQL
  echo "filled in $((SECONDS - t0)) s"
}

# The statement serve runs for a report (store/finance/spend.rs), with the
# period and zone written in: SOURCE is the table's select list and
# filter, DELTAS the deltas' time expression.
statement() {
  local source=$1 delta_time=$2 col=$3 zone=$4 bucket=$5 from=$6 to=$7
  local sums="charge, requests, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens"
  local scope="(NULL::text IS NULL OR reseller_id = NULL)"
  local groups
  groups=$(seq -s, 1 $(($(echo "$col" | tr -cd ',' | wc -c) + 2)))
  echo "SELECT date_trunc('$bucket', t, '$zone') AS b, $col, sum(charge), sum(requests)::bigint, sum(input_tokens), sum(output_tokens), sum(cache_read_tokens), sum(cache_write_tokens)
 FROM ($source UNION ALL SELECT $delta_time, $col, $sums FROM spend_deltas WHERE hour >= '$from' AND hour < '$to' AND $scope) x
 GROUP BY $groups ORDER BY $groups LIMIT 50001;" | tr '\n' ' '
}

pct() { awk -v p="$1" '{ a[NR] = $1 } END { i = int(NR * p / 100 + 0.999); if (i < 1) i = 1; if (i > NR) i = NR; printf "%.1f", a[i] * 1000 }'; }

run() {
  set -euo pipefail
  local run_id="r$(date +%s)"
  export QUOTA_TOPIC_USAGE=$run_id.usage QUOTA_TOPIC_ERRORS=$run_id.errors QUOTA_TOPIC_CONTROL=$run_id.control QUOTA_TOPIC_DLQ=$run_id.dlq
  export QUOTA_TOPIC_NOTIFICATIONS=$run_id.notifications
  export DATABASE_URL="${REPORTS_DB:-${DATABASE_URL%/*}/bench_$run_id}" KAFKA_GROUP_ID=$run_id HTTP_ADDR=127.0.0.1:8092
  target/release/quota-engine migrate >/dev/null
  if [ -z "$REPORTS_DB" ]; then fill; fi
  echo "rollup in $DATABASE_URL: $(psql -Atq "$DATABASE_URL" -c "SELECT (SELECT sum(requests) FROM spend_hourly) || ' events, ' || (SELECT count(*) FROM spend_hourly) || ' hourly rows, ' || (SELECT count(*) FROM spend_daily) || ' daily rows'")"
  target/release/quota-engine serve >"$repo/.stack/bench-reports-serve.log" 2>&1 &
  serve_pid=$!
  trap 'kill $serve_pid 2>/dev/null; wait $serve_pid 2>/dev/null; [ -n "$REPORTS_DB" ] || drop_bench_db "$DATABASE_URL"' EXIT
  for _ in $(seq 1 150); do curl -sf "http://$HTTP_ADDR/healthz" >/dev/null && break; sleep 0.2; done
  local token
  token=$(target/release/quota-engine token create --role finance --name bench | tail -1)
  local m0=2026-10-01T00:00:00Z m1=2026-10-31T00:00:00Z d0=2026-10-15T00:00:00Z d1=2026-10-16T00:00:00Z
  local sums="charge, requests, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens"
  local scope="(NULL::text IS NULL OR reseller_id = NULL)"
  # name | query | statement source | deltas' time | column | zone | bucket | from | to | requests
  while IFS='|' read -r name params source delta_time col zone bucket from to n; do
    local url="http://$HTTP_ADDR/v1/reports/spend?$params"
    local rows
    rows=$(curl -sf -H "Authorization: Bearer $token" "$url" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["rows"]))')
    local times
    times=$(for _ in $(seq 1 "$n"); do curl -s -o /dev/null -w '%{time_total}\n' -H "Authorization: Bearer $token" "$url"; done | sort -n)
    statement "$source" "$delta_time" "$col" "$zone" "$bucket" "$from" "$to" >"$repo/.stack/bench-reports.sql"
    rm -f "$repo"/.stack/pgbench_log.*
    (cd "$repo/.stack" && pgbench -n -f bench-reports.sql -t "$n" -l "$DATABASE_URL" >/dev/null 2>&1)
    local floor
    floor=$(cat "$repo"/.stack/pgbench_log.* | awk '{ print $3 / 1e6 }' | sort -n)
    echo "== $name: $params ($rows rows)"
    echo "   HTTP  p50 $(echo "$times" | pct 50) ms, p99 $(echo "$times" | pct 99) ms, max $(echo "$times" | pct 100) ms ($n requests)"
    echo "   floor p50 $(echo "$floor" | pct 50) ms, p99 $(echo "$floor" | pct 99) ms, max $(echo "$floor" | pct 100) ms (the same statement by pgbench)"
  done <<LIST
month by day x model|from=$m0&to=$m1&bucket=day&by=model|SELECT hour AS t, value AS model, $sums FROM spend_hourly_dim WHERE dim = 'model' AND hour >= '$m0' AND hour < '$m1' AND true|hour|model|UTC|day|$m0|$m1|$N
month by day x reseller|from=$m0&to=$m1&bucket=day&by=reseller|SELECT hour AS t, value AS reseller_id, $sums FROM spend_hourly_dim WHERE dim = 'reseller' AND hour >= '$m0' AND hour < '$m1' AND (NULL::text IS NULL OR value = NULL)|hour|reseller_id|UTC|day|$m0|$m1|$N
month by New York day x model|from=$m0&to=$m1&bucket=day&by=model&tz=America/New_York|SELECT hour AS t, value AS model, $sums FROM spend_hourly_dim WHERE dim = 'model' AND hour >= '$m0' AND hour < '$m1' AND true|hour|model|America/New_York|day|$m0|$m1|$N
month by day x model,reseller|from=$m0&to=$m1&bucket=day&by=model,reseller|SELECT day AS t, model, reseller_id, $sums FROM spend_daily WHERE day >= '$m0' AND day < '$m1' AND $scope|date_trunc('day', hour, 'UTC')|model, reseller_id|UTC|day|$m0|$m1|20
a day by hour x key|from=$d0&to=$d1&bucket=hour&by=key|SELECT hour AS t, key_id, $sums FROM spend_hourly WHERE hour >= '$d0' AND hour < '$d1' AND $scope|hour|key_id|UTC|hour|$d0|$d1|20
LIST
}
source "$repo/scripts/bench-lib.sh"
export -f run drop_bench_db fill statement pct
exec bash scripts/stack.sh run -- bash -c run
