#!/usr/bin/env bash
# Where the CPU of a webhook goes inside ingress, grouped by what the code does (HTTP, HMAC,
# envelope parse, publish, metrics, logging, allocation, kernel).
#   bench/ingress_profile.sh perf [seconds=10]       perf record of the ingress process under wrk at
#                                                    64 connections: share of its real CPU
#   bench/ingress_profile.sh callgrind [seconds=20]  valgrind --tool=callgrind, counters zeroed after
#                                                    a warm-up, wrk at 8 connections: instructions
#                                                    per request, repeatable on a loaded machine
#                                                    (no kernel; SHA-256 runs without SHA-NI there)
# INGRESS_BIN=path profiles another build (default: the release build, built first); RUST_LOG as
# the service's default (info). Needs wrk, perf or valgrind, python3 and the local RabbitMQ.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-perf}
PORT=${BENCH_PORT:-18090}
BASE="bench.profile.$$"
SECRET=whsec_bench_secret
export RUST_LOG=${RUST_LOG:-info}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
if [ -z "${INGRESS_BIN:-}" ]; then
  cargo build --release -q -p ingress --bin ingress
  INGRESS_BIN=$CARGO_TARGET_DIR/release/ingress
fi

work=$(mktemp -d)
PID=
cleanup() {
  [ -n "$PID" ] && kill "$PID" 2>/dev/null || true
  scripts/delete-queues.sh "$BASE" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
bench/ingress_wrk.py "$SECRET" "$work/post.lua"
URL="http://127.0.0.1:$PORT/webhooks/stripe"

start() {
  STRIPE_WEBHOOK_SECRET=$SECRET STRIPE_WEBHOOK_TOLERANCE_SECONDS=86400 INGRESS_ADDR=127.0.0.1:$PORT \
    AMQP_TOPOLOGY_BASE=$BASE "$@" 2>"$work/server.log" &
  PID=$!
  for _ in $(seq 600); do curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null && return; sleep 0.1; done
  echo "ingress did not become ready"; cat "$work/server.log"; exit 1
}

echo "RESULT load_before $(cut -d' ' -f1-3 /proc/loadavg | tr ' ' '/') mode=$MODE RUST_LOG=$RUST_LOG"
case $MODE in
  perf)
    SECONDS_PER_RUN=${2:-10}
    start "$INGRESS_BIN"
    wrk -t2 -c64 -d"$((SECONDS_PER_RUN + 2))s" -s "$work/post.lua" "$URL" > "$work/wrk.txt" &
    WRK=$!
    sleep 1
    perf record -q -F 2999 -p "$PID" -o "$work/perf.data" -- sleep "$SECONDS_PER_RUN" >/dev/null 2>&1
    wait $WRK
    echo "RESULT $(sed -n 's/^WRK //p' "$work/wrk.txt") (while profiled)"
    bench/profile_groups.py perf "$work/perf.data"
    ;;
  callgrind)
    SECONDS_PER_RUN=${2:-20}
    start valgrind --tool=callgrind --callgrind-out-file="$work/cg.%p" "$INGRESS_BIN"
    wrk -t1 -c8 -d3s -s "$work/post.lua" "$URL" >/dev/null
    callgrind_control -z "$PID" >/dev/null 2>&1
    wrk -t1 -c8 -d"${SECONDS_PER_RUN}s" -s "$work/post.lua" "$URL" > "$work/wrk.txt"
    callgrind_control -d "$PID" >/dev/null 2>&1
    requests=$(sed -n 's/^WRK .*requests=\([0-9]*\).*/\1/p' "$work/wrk.txt")
    echo "RESULT requests=$requests (under valgrind)"
    bench/profile_groups.py callgrind "$(ls "$work"/cg.*.1)" "$requests"
    ;;
  *) echo "usage: $0 perf|callgrind [seconds]"; exit 2 ;;
esac
kill -TERM "$PID"; wait "$PID" 2>/dev/null || true
PID=
echo "RESULT load_after $(cut -d' ' -f1-3 /proc/loadavg | tr ' ' '/')"
