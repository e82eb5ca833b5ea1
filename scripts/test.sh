#!/usr/bin/env bash
# The project's test command: formatting, lints, and every test.
# Installs what the tests need that cargo does not fetch (Helm's engine for the
# chart tests, from the PyPI package helm-sdkpy) when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! python3 -c 'import helm_sdkpy' >/dev/null 2>&1; then
  echo "== installing helm-sdkpy (Helm's engine, for the chart tests)"
  python3 -m pip install --quiet --disable-pip-version-check --ignore-requires-python helm-sdkpy
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --quiet -- -D warnings

echo "== cargo test"
cargo test --all-targets --quiet
