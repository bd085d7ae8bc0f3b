#!/usr/bin/env bash
# The whole test suite: brings up Postgres and the broker when they are not
# running (scripts/stack.sh), runs every test, stops what it started, and
# closes with one line: "N passed, N failed".
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
# The HTTP fuzzer the end-to-end suite runs (tests/e2e/fuzz_http.rs).
SCHEMATHESIS_VERSION=4.32.5
if ! schemathesis --version 2>/dev/null | grep -q "$SCHEMATHESIS_VERSION"; then
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "schemathesis==$SCHEMATHESIS_VERSION" \
    || { echo "cannot install schemathesis $SCHEMATHESIS_VERSION from PyPI" >&2; exit 1; }
fi
# The console's browser test (tests/e2e/console.rs) drives Debian's
# Chromium through chromedriver.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  apt_get() { if [ "$(id -u)" = 0 ]; then apt-get "$@"; else sudo apt-get "$@"; fi; }
  { apt_get update -qq && DEBIAN_FRONTEND=noninteractive apt_get install -y -qq chromium chromium-driver >/dev/null; } \
    || { echo "cannot install chromium and chromium-driver from Debian's packages" >&2; exit 1; }
fi
# Build first, outside the stack, so a slow compile holds no servers.
cargo build --workspace --tests --locked
out=$(mktemp)
trap 'rm -f "$out"' EXIT
status=0
bash scripts/stack.sh run -- cargo test --workspace --locked "$@" 2>&1 | tee "$out" || status=$?
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i) ~ /^passed/) p += $(i-1); if ($(i) ~ /^failed/) f += $(i-1) } }
     END { printf "%d passed, %d failed\n", p, f }' "$out"
exit "$status"
