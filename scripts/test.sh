#!/usr/bin/env bash
# Runs every test: unit tests, property tests and the system tests against the real PostgreSQL,
# Redis and RabbitMQ (started, or installed and started, when absent).
# Usage: scripts/test.sh [--lint] [extra nextest/cargo test arguments]
set -euo pipefail
cd "$(dirname "$0")/.."

lint=0
if [ "${1:-}" = "--lint" ]; then lint=1; shift; fi

scripts/services.sh
# localstripe (PyPI) is the stateful fake Stripe some tests run against.
if ! command -v localstripe >/dev/null 2>&1; then
  python3 -m pip install --quiet --disable-pip-version-check localstripe >/dev/null 2>&1 \
    || echo "test.sh: could not install localstripe; its tests will skip (or fail under REQUIRE_LOCALSTRIPE)" >&2
fi

if [ $lint = 1 ]; then
  cargo fmt --all -- --check
  cargo clippy --workspace --all-targets --quiet -- -D warnings
fi

# promtool (from Debian's prometheus package) checks and unit-tests the alert rules. When absent,
# the package is downloaded and only promtool is unpacked into target/tools: installing it
# would also start a Prometheus server from the package's scripts.
promtool=$(command -v promtool || true)
if [ -z "$promtool" ]; then
  tools=${CARGO_TARGET_DIR:-target}/tools/prometheus
  if [ ! -x "$tools/usr/bin/promtool" ]; then
    mkdir -p "$tools"
    (cd "$tools" && { apt-get download prometheus >/dev/null 2>&1 \
        || { apt-get update -qq >/dev/null 2>&1 && apt-get download prometheus >/dev/null 2>&1; }; } \
        && dpkg-deb -x prometheus_*.deb . && rm -f prometheus_*.deb) || true
  fi
  # Absolute: the unit tests below run from ops/prometheus.
  [ -x "$tools/usr/bin/promtool" ] && promtool=$(realpath "$tools/usr/bin/promtool")
fi
if [ -n "$promtool" ]; then
  "$promtool" check rules ops/prometheus/alerts.yml
  (cd ops/prometheus && "$promtool" test rules alerts_test.yml)
else
  echo "test.sh: SKIPPED the alert rules check: promtool (Debian package prometheus) could not be installed" >&2
fi
python3 -m json.tool ops/grafana/stripe-entitlements.json >/dev/null

status=0
# The chaos suite (tests/chaos.rs) restarts servers of its own, never the shared ones; it runs
# alone, after the rest, against the binaries it drives.
cargo build --quiet -p ingress -p processor --bins
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast "$@" || status=$?
  cargo nextest run --test chaos --run-ignored only --no-capture --test-threads 1 "$@" || status=$?
else
  cargo test --workspace --no-fail-fast "$@" || status=$?
  cargo test --test chaos -- --ignored --nocapture --test-threads=1 "$@" || status=$?
fi
# The OpenAPI document against the served API (Schemathesis, user and admin tokens).
scripts/api-contract.sh || status=$?
# The README's quick start, run as printed against a stack of its own.
scripts/quickstart-check.sh || status=$?
exit $status
