# Sourced by the benchmark scripts: each run makes a database of its own,
# dropped when the run ends (KEEP_DB=1 keeps it for a look afterwards).
# Hundreds of kept ones once filled this machine's disk (BENCHMARKS.md).
drop_bench_db() {
  local url=$1
  [ "${KEEP_DB:-0}" = 1 ] && { echo "kept ${url##*/} (KEEP_DB=1)"; return 0; }
  psql -qAt "${url%/*}/postgres" -c "DROP DATABASE IF EXISTS \"${url##*/}\" WITH (FORCE)" >/dev/null 2>&1 \
    || echo "could not drop ${url##*/}; drop it by hand" >&2
}
