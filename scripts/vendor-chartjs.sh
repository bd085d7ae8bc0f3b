#!/usr/bin/env bash
# Re-vendor Chart.js (the console's chart library) from the npm registry:
# the pinned version's tarball, checked against the registry's published
# integrity hash, its UMD build and licence copied into
# src/console/assets/. The build itself never fetches anything: the files
# are committed and compiled into the binary (include_bytes!).
#   scripts/vendor-chartjs.sh
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
version=4.5.1
integrity='sha512-GIjfiT9dbmHRiYi6Nl2yFCq7kkwdkp1W/lp2J99rX0yo9tgJGn3lKQATztIjb5tVtevcBtIdICNWqlq5+E8/Pw=='
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
curl -fsSL "https://registry.npmjs.org/chart.js/-/chart.js-$version.tgz" -o "$tmp/chart.tgz"
got="sha512-$(openssl dgst -sha512 -binary "$tmp/chart.tgz" | base64 -w0)"
if [ "$got" != "$integrity" ]; then
  echo "chart.js-$version.tgz: integrity $got, expected $integrity" >&2
  exit 1
fi
tar xzf "$tmp/chart.tgz" -C "$tmp"
cp "$tmp/package/dist/chart.umd.min.js" "$repo/src/console/assets/chart.umd.min.js"
cp "$tmp/package/LICENSE.md" "$repo/src/console/assets/chart.js-LICENSE.md"
echo "vendored chart.js $version"
