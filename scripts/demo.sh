#!/usr/bin/env bash
# The service end to end on local defaults: the stack (Postgres + tansu),
# `quota-engine serve`, a simulated gateway producing control and usage
# events (asking for admission with a hold before each request), and a
# summary of balances checked against what the simulator computed (and
# nothing left held). Then the service keeps running until Ctrl-C (DEMO_WAIT=0 to
# stop right after the summary); everything started here is stopped.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
cargo build --release --locked --bin quota-engine
bin=$repo/target/release/quota-engine

demo() {
  local addr=${HTTP_ADDR:-127.0.0.1:8080}
  "$bin" serve --http-addr "$addr" >"$repo/.stack/serve.log" 2>&1 &
  serve_pid=$!
  trap 'kill $serve_pid 2>/dev/null; wait $serve_pid 2>/dev/null' EXIT
  for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/${addr%:*}/${addr#*:}") 2>/dev/null && break
    kill -0 $serve_pid 2>/dev/null || { cat "$repo/.stack/serve.log"; exit 1; }
    sleep 0.2
  done
  echo "quota-engine serve is up on http://$addr (log: .stack/serve.log)"
  local checked=0
  # As a gateway with holds (DEMO_HOLDS=0: without): admission with a hold
  # per request, the usage event naming it, failed requests released.
  local holds=--holds
  [ "${DEMO_HOLDS:-1}" = 1 ] || holds=
  "$bin" simulate --users "${DEMO_USERS:-12}" --events "${DEMO_EVENTS:-5000}" --check "$addr" $holds || checked=$?
  if ! kill -0 $serve_pid 2>/dev/null; then
    echo "quota-engine serve has stopped; the end of its log (.stack/serve.log):"
    tail -3 "$repo/.stack/serve.log"
    exit 1
  fi
  echo
  "$bin" status
  echo
  local token
  token=$("$bin" token create --role admin --name demo 2>/dev/null | tail -1)
  echo "An admin token for trying the API: $token"
  echo "Try: curl -s -H \"Authorization: Bearer $token\" http://$addr/v1/balances/user/<id from the table>"
  echo "     curl -s -H \"Authorization: Bearer $token\" http://$addr/v1/ledger/user/<id>?format=csv"
  echo "     curl -s -H \"Authorization: Bearer $token\" http://$addr/v1/reconcile"
  echo "     curl -s -H \"Authorization: Bearer $token\" http://$addr/v1/notifications   # every fifth app renews hourly and is watched"
  echo "     curl -s -H \"Authorization: Bearer $token\" \"http://$addr/v1/reports/spend?from=$(date -u +%Y-%m-%dT00:00:00Z)&to=$(date -u -d tomorrow +%Y-%m-%dT00:00:00Z)&bucket=hour&by=model\""
  echo "     curl -s -H \"Authorization: Bearer $token\" http://$addr/openapi.json"
  echo "The finance console: http://$addr/console/ (sign in with the token above)"
  [ "$checked" = 0 ] || exit "$checked"
  if [ "${DEMO_WAIT:-1}" = 1 ]; then
    echo "The service keeps running; Ctrl-C stops it and the stack."
    wait $serve_pid
  fi
}

mkdir -p "$repo/.stack"
export -f demo
export bin repo
exec bash scripts/stack.sh run -- bash -c demo
