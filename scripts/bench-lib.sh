# Sourced by the benchmark scripts: each run makes a database of its own,
# dropped when the run ends (KEEP_DB=1 keeps it for a look afterwards).
# Hundreds of kept ones once filled this machine's disk (BENCHMARKS.md).
drop_bench_db() {
  local url=$1
  [ "${KEEP_DB:-0}" = 1 ] && { echo "kept ${url##*/} (KEEP_DB=1)"; return 0; }
  psql -qAt "${url%/*}/postgres" -c "DROP DATABASE IF EXISTS \"${url##*/}\" WITH (FORCE)" >/dev/null 2>&1 \
    || echo "could not drop ${url##*/}; drop it by hand" >&2
}

# CPU time of every process so far: pid, program, clock ticks (`getconf
# CLK_TCK` a second, 100 here; `ps -o times` rounds to whole seconds, too
# coarse for a 10 s load).
cpu_snapshot() {
  for f in /proc/[0-9]*/stat; do cat "$f" 2>/dev/null && echo; done | awk '
    NF { match($0, /\(.*\)/); comm = substr($0, RSTART + 1, RLENGTH - 2); gsub(/ /, "_", comm)
         split(substr($0, RSTART + RLENGTH + 1), f, " "); print $1, comm, f[12] + f[13] }' >"$1"
}

# CPU seconds each program used between two snapshots, the busiest first;
# with a count of requests, also the milliseconds per request. Counted per
# process and summed by program: a process that ended between them is not
# counted, one that started is counted whole. The kernel's workers take
# the name of the work they run (`kworker/u8:1-writeback`), so they are
# matched by pid and reported together as `kworker`.
cpu_report() {
  awk -v n="${3:-0}" -v tck="$(getconf CLK_TCK)" 'NR==FNR { before[$1] = $3; next }
       { c = $2; if (c ~ /^kworker\//) c = "kworker"; t[c] += ($3 - before[$1]) / tck }
       END { for (c in t) if (t[c] >= 0.05) { printf "  %-20s %6.2f s", c, t[c]; if (n > 0) printf "  %.3f ms per request", t[c] * 1000 / n; print "" } }' \
    "$1" "$2" | sort -k2 -rn
}
