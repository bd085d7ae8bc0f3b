#!/usr/bin/env bash
# Memory of a release `serve` with KEYS keys registered (KEYS/10 apps,
# KEYS/100 users, 10 resellers), written straight into the registry table
# of a fresh database (the same rows the consumers write; producing a
# million control events through tansu is not what is measured here). Prints
# how long the admission view took to load, serve's resident memory, and
# that a key is admitted.
#   KEYS (1000000)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
KEYS=${KEYS:-1000000}
cargo build --release --locked --bin quota-engine
run() {
  local run_id="m$(date +%s)"
  export QUOTA_TOPIC_USAGE=$run_id.usage QUOTA_TOPIC_ERRORS=$run_id.errors QUOTA_TOPIC_CONTROL=$run_id.control QUOTA_TOPIC_DLQ=$run_id.dlq
  export DATABASE_URL="${DATABASE_URL%/*}/mem_$run_id" KAFKA_GROUP_ID=$run_id HTTP_ADDR=127.0.0.1:8093
  target/release/quota-engine migrate >/dev/null
  local t="2026-01-01T00:00:00Z"
  psql -q "$DATABASE_URL" <<SQL
INSERT INTO registry_versions (kind, id, effective_from, event_id, payload, recorded_at)
SELECT 'reseller', 'r' || g, '$t', 'cr' || g, jsonb_build_object('event_id', 'cr' || g, 'type', 'reseller.upserted', 'schema_version', 1, 'occurred_at', '$t', 'id', 'r' || g,
       'status', 'enabled', 'quota_limited', false, 'quota_expires_at', null), now() FROM generate_series(0, 9) g;
INSERT INTO registry_versions (kind, id, effective_from, event_id, payload, recorded_at)
SELECT 'user', 'u' || g, '$t', 'cu' || g, jsonb_build_object('event_id', 'cu' || g, 'type', 'user.upserted', 'schema_version', 1, 'occurred_at', '$t', 'id', 'u' || g,
       'reseller_id', 'r' || (g % 10), 'status', 'enabled', 'quota_expires_at', null, 'groups', '[]'::jsonb), now() FROM generate_series(0, $KEYS / 100 - 1) g;
INSERT INTO registry_versions (kind, id, effective_from, event_id, payload, recorded_at)
SELECT 'app', 'a' || g, '$t', 'ca' || g, jsonb_build_object('event_id', 'ca' || g, 'type', 'app.upserted', 'schema_version', 1, 'occurred_at', '$t', 'id', 'a' || g,
       'user_id', 'u' || (g / 10), 'status', 'enabled', 'quota_limited', false, 'quota_expires_at', null, 'models', '[]'::jsonb, 'group_id', null,
       'ip_allow', '[]'::jsonb, 'ip_deny', '[]'::jsonb), now() FROM generate_series(0, $KEYS / 10 - 1) g;
INSERT INTO registry_versions (kind, id, effective_from, event_id, payload, recorded_at)
SELECT 'key', 'k' || g, '$t', 'ck' || g, jsonb_build_object('event_id', 'ck' || g, 'type', 'key.upserted', 'schema_version', 1, 'occurred_at', '$t', 'id', 'k' || g,
       'app_id', 'a' || (g / 10), 'key_hash', encode(sha256(('sk-mem-' || g)::bytea), 'hex'), 'status', 'enabled', 'quota_limited', false,
       'quota_expires_at', null, 'models', '[]'::jsonb, 'group_id', null, 'ip_allow', '[]'::jsonb, 'ip_deny', '[]'::jsonb), now() FROM generate_series(0, $KEYS - 1) g;
SQL
  echo "registered $KEYS keys"
  local start=$(date +%s.%N)
  target/release/quota-engine serve >"$repo/.stack/mem-serve.log" 2>&1 &
  serve_pid=$!
  trap 'kill $serve_pid 2>/dev/null; wait $serve_pid 2>/dev/null' EXIT
  for _ in $(seq 1 600); do
    curl -sf "http://$HTTP_ADDR/readyz" >/dev/null && break
    kill -0 $serve_pid 2>/dev/null || { tail "$repo/.stack/mem-serve.log"; exit 1; }
    sleep 0.2
  done
  echo "ready (view loaded) after $(echo "$(date +%s.%N) - $start" | bc) s"
  local token
  token=$(target/release/quota-engine token create --role gateway --name mem-bench | tail -1)
  curl -s -X POST -H "Authorization: Bearer $token" "http://$HTTP_ADDR/v1/admission" \
    -d "{\"api_key\":\"sk-mem-$((KEYS - 1))\",\"client_ip\":\"203.0.113.7\",\"model\":\"none\",\"path\":\"/v1/chat/completions\"}"
  echo
  echo "serve resident memory with $KEYS keys: $(awk '/VmRSS/ {print $2, $3}' /proc/$serve_pid/status) (peak $(awk '/VmHWM/ {print $2, $3}' /proc/$serve_pid/status))"
}
export -f run
export repo KEYS
exec bash scripts/stack.sh run -- bash -c run
