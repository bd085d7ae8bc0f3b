#!/usr/bin/env bash
# Print the produce → visible lag of a running `serve` from its /metrics
# histogram (quota_visible_lag_seconds): batches, mean, and the bucket
# holding p50, p90 and p99.   usage: lag-quantiles.sh HOST:PORT TOKEN
set -euo pipefail
curl -s -H "Authorization: Bearer $2" "http://$1/metrics" | awk '
  /^quota_visible_lag_seconds_bucket/ { split($1, a, "\""); le[n] = a[2]; c[n] = $2; n++ }
  /^quota_visible_lag_seconds_count/ { total = $2 }
  /^quota_visible_lag_seconds_sum/ { sum = $2 }
  END {
    printf "batches: %d, mean lag %.1f ms\n", total, total ? 1000 * sum / total : 0
    split("0.5 0.9 0.99", qs, " ")
    for (q = 1; q <= 3; q++) { for (i = 0; i < n; i++) if (c[i] >= qs[q] * total) { printf "p%s <= %s s\n", qs[q] * 100, le[i]; break } }
  }'
