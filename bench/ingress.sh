#!/usr/bin/env bash
# Ingress benchmark. In one invocation, one after the other on the same machine:
#   1. broker limit: a plain lapin program publishing the same persistent 2 KB messages to the same
#      kind of quorum queue, 64 confirms in flight on one channel, as ingress publishes;
#   2. no-broker reference: the same ingress router and listener (limits, signature, envelope,
#      properties, metrics, logging) answering 200 without publishing (ingress/examples/no_broker.rs);
#   3. ingress: POST /webhooks/stripe with a valid, pre-signed 2 KB event, each one published with
#      a confirm before its 200.
# wrk drives 2 and 3 at 64 connections. Prints RESULT lines: each figure, the ratios
# ingress/broker and ingress/no-broker, and the load average before and after. Beside each
# figure, the CPU time per message of each process involved (cpu_us_*: the program measured,
# RabbitMQ's beam.smp, wrk), read from /proc: on shared cores this shows where the CPU goes
# (RabbitMQ's share includes whatever else uses the broker at the time).
# Usage: bench/ingress.sh [seconds=20]   (needs wrk, curl, python3, cargo and the local RabbitMQ)
# Where the CPU goes inside ingress: bench/ingress_profile.sh.
# Environment: WRK_THREADS (2), BENCH_PORT (18080; the reference uses the next port),
#   RUST_LOG (info, the service's default; logs go to a scratch file),
#   COMPARE_BIN=path/to/another/ingress — also measures that binary, last, as "compare"
#   (a before/after in the same run).
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_RUN=${1:-20}
CONNS=64
WRK_THREADS=${WRK_THREADS:-2}
PORT=${BENCH_PORT:-18080}
NO_BROKER_PORT=$((PORT + 1))
BASE="bench.ingress.$$"
SECRET=whsec_bench_secret
export RUST_LOG=${RUST_LOG:-info}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}

command -v wrk >/dev/null || { echo "wrk is required (apt-get install wrk)"; exit 2; }
cargo build --release -q -p ingress --bin ingress --example broker_limit --example no_broker

work=$(mktemp -d)
SERVER_PID=
cleanup() {
  [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null || true
  scripts/delete-queues.sh "$BASE" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

bench/ingress_wrk.py "$SECRET" "$work/post.lua"

load() { cut -d' ' -f1-3 /proc/loadavg | tr ' ' '/'; }
# CPU time (user + system, clock ticks) a process has used so far; 0 when there is none.
ticks() { [ -n "$1" ] && [ -r "/proc/$1/stat" ] && awk '{print $14 + $15}' "/proc/$1/stat" || echo 0; }
TICK_US=$((1000000 / $(getconf CLK_TCK)))
RABBIT_PID=$(pgrep -x beam.smp | head -1 || true)
# per_msg TICKS COUNT: microseconds of CPU per message.
per_msg() { python3 -c "print(round($1 * $TICK_US / max($2, 1)))"; }

# measure NAME BINARY PORT: start BINARY on PORT, wait for /readyz, run wrk, stop it.
# Leaves "$work/NAME.wrk" (wrk's output) and "$work/NAME.rss" (peak RSS in MB).
measure() {
  local name=$1 bin=$2 port=$3
  STRIPE_WEBHOOK_SECRET=$SECRET STRIPE_WEBHOOK_TOLERANCE_SECONDS=86400 INGRESS_ADDR=127.0.0.1:$port \
    AMQP_TOPOLOGY_BASE=$BASE "$bin" 2>"$work/$name.log" &
  SERVER_PID=$!
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.1; done
  curl -sf "http://127.0.0.1:$port/readyz" >/dev/null || { echo "$name did not become ready"; cat "$work/$name.log"; exit 1; }
  local server0 rabbit0 server1 rabbit1 requests
  server0=$(ticks "$SERVER_PID"); rabbit0=$(ticks "$RABBIT_PID")
  /usr/bin/time -f "%U %S" -o "$work/$name.time" \
    wrk -t"$WRK_THREADS" -c$CONNS -d"${SECONDS_PER_RUN}s" --latency -s "$work/post.lua" \
    "http://127.0.0.1:$port/webhooks/stripe" > "$work/$name.wrk"
  server1=$(ticks "$SERVER_PID"); rabbit1=$(ticks "$RABBIT_PID")
  awk '/VmHWM/ {print int($2 / 1024)}' "/proc/$SERVER_PID/status" > "$work/$name.rss"
  kill -TERM "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=
  grep -q "^WRK .*errors=0$" "$work/$name.wrk" || { echo "$name: wrk saw errors"; cat "$work/$name.wrk"; exit 1; }
  if grep -q "Non-2xx" "$work/$name.wrk"; then echo "$name: answers other than 2xx"; cat "$work/$name.wrk"; exit 1; fi
  requests=$(sed -n 's/^WRK .*requests=\([0-9]*\).*/\1/p' "$work/$name.wrk")
  echo "RESULT $name $(sed -n 's/^WRK //p' "$work/$name.wrk") peak_rss_mb=$(cat "$work/$name.rss")" \
    "cpu_us_server=$(per_msg $((server1 - server0)) "$requests")" \
    "cpu_us_rabbitmq=$(per_msg $((rabbit1 - rabbit0)) "$requests")" \
    "cpu_us_wrk=$(awk -v n="$requests" '{printf "%d", ($1 + $2) * 1e6 / n}' "$work/$name.time")"
}

echo "RESULT load_before $(load) cores=$(nproc) seconds=$SECONDS_PER_RUN connections=$CONNS wrk_threads=$WRK_THREADS RUST_LOG=$RUST_LOG"
echo "== broker limit (plain lapin, $CONNS confirms in flight, persistent 2 KB, quorum queue)"
rabbit0=$(ticks "$RABBIT_PID")
/usr/bin/time -f "%U %S" -o "$work/broker.time" \
  "$CARGO_TARGET_DIR/release/examples/broker_limit" --base "$BASE.broker" --seconds "$SECONDS_PER_RUN" \
  --inflight $CONNS --size 2048 > "$work/broker.txt"
rabbit1=$(ticks "$RABBIT_PID")
messages=$(sed -n 's/.*messages=\([0-9]*\).*/\1/p' "$work/broker.txt")
echo "RESULT $(cat "$work/broker.txt")" \
  "cpu_us_client=$(awk -v n="$messages" '{printf "%d", ($1 + $2) * 1e6 / n}' "$work/broker.time")" \
  "cpu_us_rabbitmq=$(per_msg $((rabbit1 - rabbit0)) "$messages")"
echo "== no-broker reference (ingress router answering without publishing; wrk, $CONNS connections)"
measure no_broker "$CARGO_TARGET_DIR/release/examples/no_broker" "$NO_BROKER_PORT"
echo "== ingress (wrk, $CONNS connections, $WRK_THREADS threads, valid signed 2 KB events)"
measure ingress "$CARGO_TARGET_DIR/release/ingress" "$PORT"
if [ -n "${COMPARE_BIN:-}" ]; then
  echo "== compare: $COMPARE_BIN"
  measure compare "$COMPARE_BIN" "$PORT"
fi
echo "RESULT load_after $(load)"

rps() { sed -n 's/^WRK rps=\([0-9]*\).*/\1/p' "$work/$1.wrk"; }
broker=$(sed -n 's/.*msgs_per_sec=\([0-9]*\).*/\1/p' "$work/broker.txt")
ratio() { python3 -c "print(f'{$1/$2:.2f}')"; }
summary="ingress/broker=$(ratio "$(rps ingress)" "$broker") ingress/no_broker=$(ratio "$(rps ingress)" "$(rps no_broker)")"
if [ -n "${COMPARE_BIN:-}" ]; then
  summary="$summary compare/broker=$(ratio "$(rps compare)" "$broker")"
fi
echo "RESULT ratios $summary"
