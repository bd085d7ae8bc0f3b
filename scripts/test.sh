#!/usr/bin/env bash
# The whole test suite: brings up Postgres and the broker when they are not
# running (scripts/stack.sh), runs every test, and stops what it started.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
# Build first, outside the stack, so a slow compile holds no servers.
cargo build --workspace --tests --locked
exec bash scripts/stack.sh run -- cargo test --workspace --locked "$@"
