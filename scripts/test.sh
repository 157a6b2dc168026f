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

# The chaos suite (tests/chaos.rs) restarts servers of its own, never the shared ones; it runs
# alone, after the rest, against the binaries it drives.
cargo build --quiet -p ingress -p processor --bins
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast "$@"
  cargo nextest run --test chaos --run-ignored only --no-capture "$@"
else
  cargo test --workspace --no-fail-fast "$@"
  cargo test --test chaos -- --ignored --nocapture "$@"
fi
