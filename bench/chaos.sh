#!/usr/bin/env bash
# The long chaos run: ROUNDS rounds of about SIZE deliveries each (histories, duplicates and
# poison sent through ingress as Stripe does) while a worker is killed, the broker restarted
# with events in the delay queues, Postgres stopped, Redis black-holed and restarted, and a
# competing worker killed — on private servers, so it may run beside anything else.
# Prints one line per round and `chaos: N/N rounds clean`.
# Usage: bench/chaos.sh [rounds=10] [size=3000] [seed=1]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-10} size=${2:-3000} seed=${3:-1}
scripts/services.sh
cargo build --quiet --release -p ingress -p processor --bins
export CHAOS_ROUNDS=$rounds CHAOS_SIZE=$size CHAOS_SEED=$seed
export CHAOS_OUTAGE_SECONDS=${CHAOS_OUTAGE_SECONDS:-8} CHAOS_SECONDS=${CHAOS_SECONDS:-60}
echo "== chaos: $rounds rounds of ~$size deliveries, outages of ${CHAOS_OUTAGE_SECONDS}s over ${CHAOS_SECONDS}s each; load: $(cut -d' ' -f1-3 /proc/loadavg)"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --release --test chaos --run-ignored only --no-capture --no-fail-fast --test-threads 1 2>&1 | grep --line-buffered -E '^chaos:|panicked|not quiet|seed [0-9]+:|left:|right:|never reached|out of order'
else
  cargo test --release --test chaos -- --ignored --nocapture --test-threads=1 2>&1 | grep --line-buffered -E '^chaos:|panicked|not quiet|seed [0-9]+:|left:|right:|never reached|out of order'
fi
