#!/usr/bin/env bash
# Regenerates crds/ from the Rust types and copies the files into the Helm chart.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -f crds/*.yaml
cargo run --quiet -- crd --out-dir crds
mkdir -p charts/multisite-operator/crds
rm -f charts/multisite-operator/crds/*.yaml
cp crds/*.yaml charts/multisite-operator/crds/
