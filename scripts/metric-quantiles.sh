#!/usr/bin/env bash
# Print a histogram of a running `serve` from its /metrics: count, mean, and
# the bucket holding p50, p90, p99 and p99.9.
#   usage: metric-quantiles.sh HOST:PORT TOKEN [METRIC]
#   METRIC: quota_visible_lag_seconds (default: produce → visible to
#   admission, per batch) or quota_admission_seconds (the service's own
#   time per admission request)
set -euo pipefail
m=${3:-quota_visible_lag_seconds}
curl -s -H "Authorization: Bearer $2" "http://$1/metrics" | awk -v m="$m" '
  $1 ~ "^" m "_bucket" { split($1, a, "\""); le[n] = a[2]; c[n] = $2; n++ }
  $1 == m "_count" { total = $2 }
  $1 == m "_sum" { sum = $2 }
  END {
    printf "%s: %d observed, mean %.3f ms\n", m, total, total ? 1000 * sum / total : 0
    if (!total) exit
    split("0.5 0.9 0.99 0.999", qs, " ")
    for (q = 1; q <= 4; q++) { for (i = 0; i < n; i++) if (c[i] >= qs[q] * total) { printf "  p%s <= %s s\n", qs[q] * 100, le[i]; break } }
  }'
