#!/usr/bin/env bash
# The HTTP fuzzer (tests/e2e/fuzz_http.rs) for longer than CI runs it:
#   scripts/schemathesis.sh [SEED] [EXAMPLES]   defaults: a random seed, 300
# Prints the seed first; the junit report lands in target/test-logs.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
seed=${1:-$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}
echo "SCHEMATHESIS_SEED=$seed"
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "schemathesis==4.32.5"
cargo build --tests --locked
SCHEMATHESIS_SEED=$seed SCHEMATHESIS_EXAMPLES=${2:-300} bash scripts/stack.sh run -- \
  cargo test --locked --test e2e fuzz_http -- --nocapture
