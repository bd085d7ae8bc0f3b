#!/usr/bin/env bash
# The README's screenshot of the console overview: signs in to a running
# `serve` with a token through headless Chromium (chromedriver, the W3C
# WebDriver protocol over curl) and saves the overview of a period.
#   scripts/console-screenshot.sh ADDR TOKEN OUT.png [QUERY]
# e.g. after scripts/demo.sh: scripts/console-screenshot.sh 127.0.0.1:8080 <token> docs/console-overview.png
set -euo pipefail
addr=$1 token=$2 out=$3 query=${4:-}
port=9515
chromedriver --port=$port >/dev/null 2>&1 &
driver=$!
profile=$(mktemp -d)
trap 'kill $driver 2>/dev/null; rm -rf "$profile"' EXIT
for _ in $(seq 1 50); do curl -sf "http://127.0.0.1:$port/status" >/dev/null && break; sleep 0.1; done
wd() { curl -sf -X "$1" "http://127.0.0.1:$port$2" -H 'Content-Type: application/json' ${3:+-d "$3"}; }
json() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }
caps=$(python3 -c "import json; print(json.dumps({'capabilities': {'alwaysMatch': {'browserName': 'chrome', 'goog:chromeOptions': {'binary': '/usr/bin/chromium', 'args': ['--headless=new', '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--window-size=1280,1000', '--user-data-dir=$profile']}}}}))")
session=$(wd POST /session "$caps" | json "['value']['sessionId']")
s=/session/$session
find() { wd POST "$s/element" "{\"using\": \"css selector\", \"value\": \"$1\"}" | json "['value']['element-6066-11e4-a52e-4f735466cecf']"; }
wd POST "$s/url" "{\"url\": \"http://$addr/console/sign-in\"}" >/dev/null
wd POST "$s/element/$(find '#token')/value" "{\"text\": \"$token\"}" >/dev/null
wd POST "$s/element/$(find 'button[type=submit]')/click" '{}' >/dev/null
wd POST "$s/url" "{\"url\": \"http://$addr/console/$query\"}" >/dev/null
find '#spend-chart' >/dev/null
sleep 1
wd GET "$s/screenshot" | json "['value']" | base64 -d >"$out"
wd DELETE "$s" >/dev/null
echo "saved $out"
