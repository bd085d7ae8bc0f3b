#!/usr/bin/env bash
# The local stack: a private Postgres cluster and a tansu Kafka-protocol
# broker (SQLite storage), both on loopback, installed and started as
# needed, and stopped again by whoever started them.
#
#   scripts/stack.sh run -- CMD ARGS   start what is missing, run CMD with the
#                                      stack's environment, stop what it started
#   scripts/stack.sh up                start and leave running (prints the env)
#   scripts/stack.sh down              stop what `up` started
#
# Environment (all optional):
#   DATABASE_URL   use this Postgres instead of starting one
#   KAFKA_BROKERS  use this broker instead of starting one
#   STACK_DIR      where data and logs live (default: .stack in the repo)
#   PG_PORT        port of the private Postgres (default 5432)
#   KAFKA_PORT     port of the private broker (default 9092)
#   PG_OPTS        extra server options, e.g. "-c shared_preload_libraries=pg_stat_statements"
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STACK_DIR=${STACK_DIR:-$repo/.stack}
PG_PORT=${PG_PORT:-5432}
KAFKA_PORT=${KAFKA_PORT:-9092}
TANSU_VERSION=0.6.0
TANSU_ROOT=${TANSU_ROOT:-$HOME/.cache/quota-engine/tansu-$TANSU_VERSION}

log() { printf '[stack] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Run a command as the postgres user when we are root (the server refuses
# to run as root).
as_pg() {
  if [ "$(id -u)" = 0 ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

pg_dir() {
  # The postgres user must reach the data folder: the repo's .stack when it
  # can, a private folder under /tmp otherwise.
  local dir=$STACK_DIR/pg
  mkdir -p "$dir"
  if [ "$(id -u)" = 0 ]; then
    chown postgres "$dir"
    if ! runuser -u postgres -- test -w "$dir" 2>/dev/null; then
      dir=/tmp/quota-engine-pg-$(echo "$STACK_DIR" | cksum | cut -d' ' -f1)
      mkdir -p "$dir" && chown postgres "$dir" && chmod 700 "$dir"
    fi
  fi
  echo "$dir"
}

start_postgres() {
  if [ -n "${DATABASE_URL:-}" ]; then
    log "using DATABASE_URL as given"
    return
  fi
  export DATABASE_URL="postgres://postgres@127.0.0.1:$PG_PORT/quota_engine"
  if port_open "$PG_PORT"; then
    log "Postgres already listening on 127.0.0.1:$PG_PORT; using it"
    return
  fi
  command -v initdb >/dev/null || die "PostgreSQL server binaries (initdb, pg_ctl) are not on PATH; install PostgreSQL 15"
  local dir
  dir=$(pg_dir)
  if [ ! -f "$dir/data/PG_VERSION" ]; then
    log "initdb in $dir/data"
    as_pg initdb -D "$dir/data" -U postgres --auth=trust --encoding=UTF8 --locale=C >"$dir/initdb.log" 2>&1 || { cat "$dir/initdb.log" >&2; die "initdb failed"; }
  fi
  log "starting Postgres on 127.0.0.1:$PG_PORT"
  as_pg pg_ctl -D "$dir/data" -l "$dir/postgres.log" -w -t 60 \
    -o "-p $PG_PORT -c listen_addresses=127.0.0.1 -k $dir -c max_connections=200 -c fsync=on -c shared_buffers=256MB ${PG_OPTS:-}" start >/dev/null \
    || { tail -20 "$dir/postgres.log" >&2; die "Postgres did not start"; }
  echo "$dir/data" >"$STACK_DIR/pg.started"
  STARTED_PG=1
}

stop_postgres() {
  if [ -f "$STACK_DIR/pg.started" ]; then
    local data
    data=$(cat "$STACK_DIR/pg.started")
    log "stopping Postgres"
    as_pg pg_ctl -D "$data" -m fast -w stop >/dev/null 2>&1 || true
    rm -f "$STACK_DIR/pg.started"
  fi
}

tansu_bin() {
  if command -v tansu >/dev/null; then command -v tansu; return; fi
  if [ ! -x "$TANSU_ROOT/bin/tansu" ]; then
    log "installing tansu $TANSU_VERSION into $TANSU_ROOT (about 10 minutes, once)"
    cargo install "tansu@$TANSU_VERSION" --locked --features dynostore,libsql --root "$TANSU_ROOT" >&2 \
      || die "cargo install tansu failed"
  fi
  echo "$TANSU_ROOT/bin/tansu"
}

start_broker() {
  if [ -n "${KAFKA_BROKERS:-}" ]; then
    log "using KAFKA_BROKERS as given"
    return
  fi
  export KAFKA_BROKERS="127.0.0.1:$KAFKA_PORT"
  if port_open "$KAFKA_PORT"; then
    log "a broker is already listening on 127.0.0.1:$KAFKA_PORT; using it"
    return
  fi
  local bin
  bin=$(tansu_bin)
  mkdir -p "$STACK_DIR/kafka"
  log "starting tansu on 127.0.0.1:$KAFKA_PORT (SQLite storage in $STACK_DIR/kafka)"
  # The SQLite path is relative to the broker's working directory.
  (cd "$STACK_DIR/kafka" && exec "$bin" broker \
      --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
      --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
      --storage-engine "sqlite://tansu.db" >>tansu.log 2>&1) &
  echo $! >"$STACK_DIR/kafka.pid"
  STARTED_KAFKA=1
  for _ in $(seq 1 100); do
    port_open "$KAFKA_PORT" && return
    kill -0 "$(cat "$STACK_DIR/kafka.pid")" 2>/dev/null || { tail -20 "$STACK_DIR/kafka/tansu.log" >&2; die "tansu exited"; }
    sleep 0.1
  done
  die "tansu did not open port $KAFKA_PORT"
}

stop_broker() {
  if [ -f "$STACK_DIR/kafka.pid" ]; then
    log "stopping tansu"
    local pid
    pid=$(cat "$STACK_DIR/kafka.pid")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$STACK_DIR/kafka.pid"
  fi
}

up() {
  mkdir -p "$STACK_DIR"
  start_postgres
  start_broker
  export TANSU_BIN
  TANSU_BIN=$(tansu_bin 2>/dev/null || true)
}

down() {
  stop_broker
  stop_postgres
}

# Stop only what this invocation started.
down_started() {
  [ -n "${STARTED_KAFKA:-}" ] && stop_broker
  [ -n "${STARTED_PG:-}" ] && stop_postgres
  return 0
}

case "${1:-}" in
  run)
    shift
    [ "${1:-}" = "--" ] && shift
    [ $# -gt 0 ] || die "usage: stack.sh run -- CMD ARGS"
    trap down_started EXIT
    trap 'exit 130' INT TERM
    up
    "$@"
    ;;
  up)
    up
    echo "export DATABASE_URL=$DATABASE_URL KAFKA_BROKERS=$KAFKA_BROKERS"
    ;;
  down)
    down
    ;;
  stop)
    # stop postgres|broker: for fault tests on a private stack.
    case "${2:-}" in
      postgres) stop_postgres ;;
      broker) stop_broker ;;
      *) die "usage: stack.sh stop postgres|broker" ;;
    esac
    ;;
  *)
    echo "usage: $0 run -- CMD ARGS | up | down | stop postgres|broker" >&2
    exit 2
    ;;
esac
