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
#
# Usage: bench/ingress.sh [seconds=20]
#        bench/ingress.sh profile perf [seconds=10]       where ingress's CPU goes: perf record of
#                                                         the ingress process under wrk at 64
#                                                         connections, grouped by what the code does
#        bench/ingress.sh profile callgrind [seconds=20]  the same as instructions per request
#                                                         (valgrind, wrk at 8 connections):
#                                                         repeatable on a loaded machine, no kernel,
#                                                         SHA-256 without SHA-NI
# Needs wrk, curl, python3, cargo, the local RabbitMQ, and perf or valgrind for a profile.
# Environment: WRK_THREADS (2), BENCH_PORT (18080), BENCH_NO_BROKER_PORT (18088),
#   RUST_LOG (info, the service's default; logs go to a scratch file),
#   COMPARE_BIN=path/to/another/ingress — the benchmark also measures that binary, last, as
#   "compare" (a before/after in one run); a profile profiles it instead of the release build.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = profile ]; then
  MODE=${2:-perf}
  case $MODE in
    perf) SECONDS_PER_RUN=${3:-10} ;;
    callgrind) SECONDS_PER_RUN=${3:-20} ;;
    *) echo "usage: $0 profile perf|callgrind [seconds]"; exit 2 ;;
  esac
else
  MODE=bench
  SECONDS_PER_RUN=${1:-20}
fi
CONNS=64
WRK_THREADS=${WRK_THREADS:-2}
PORT=${BENCH_PORT:-18080}
NO_BROKER_PORT=${BENCH_NO_BROKER_PORT:-18088}
BASE="bench.ingress.$$"
SECRET=whsec_$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
export RUST_LOG=${RUST_LOG:-info}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}

source bench/lib/tools.sh
need wrk
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

# start NAME PORT COMMAND…: runs COMMAND as an ingress on PORT (its log in "$work/NAME.log")
# and waits for /readyz; SERVER_PID is the process.
start() {
  local name=$1 port=$2
  shift 2
  # Another program on the port (bench/api.sh uses 18081) would answer /readyz in our stead.
  if curl -s -o /dev/null "http://127.0.0.1:$port/"; then
    echo "port $port is taken by another program; set BENCH_PORT / BENCH_NO_BROKER_PORT"; exit 1
  fi
  STRIPE_WEBHOOK_SECRET=$SECRET STRIPE_WEBHOOK_TOLERANCE_SECONDS=86400 INGRESS_ADDR=127.0.0.1:$port \
    AMQP_TOPOLOGY_BASE=$BASE "$@" 2>"$work/$name.log" &
  SERVER_PID=$!
  for _ in $(seq 600); do
    kill -0 "$SERVER_PID" 2>/dev/null || break
    curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && return
    sleep 0.1
  done
  echo "$name did not become ready"; cat "$work/$name.log"; exit 1
}

stop() {
  kill -TERM "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=
}

# measure NAME BINARY PORT: start BINARY on PORT, run wrk, stop it; prints its RESULT line.
measure() {
  local name=$1 bin=$2 port=$3
  start "$name" "$port" "$bin"
  local server0 rabbit0 server1 rabbit1 requests
  server0=$(ticks "$SERVER_PID"); rabbit0=$(ticks "$RABBIT_PID")
  /usr/bin/time -f "%U %S" -o "$work/$name.time" \
    wrk -t"$WRK_THREADS" -c$CONNS -d"${SECONDS_PER_RUN}s" --latency -s "$work/post.lua" \
    "http://127.0.0.1:$port/webhooks/stripe" > "$work/$name.wrk"
  server1=$(ticks "$SERVER_PID"); rabbit1=$(ticks "$RABBIT_PID")
  awk '/VmHWM/ {print int($2 / 1024)}' "/proc/$SERVER_PID/status" > "$work/$name.rss"
  stop
  grep -q "^WRK .*errors=0$" "$work/$name.wrk" || { echo "$name: wrk saw errors"; cat "$work/$name.wrk"; exit 1; }
  if grep -q "Non-2xx" "$work/$name.wrk"; then echo "$name: answers other than 2xx"; cat "$work/$name.wrk"; exit 1; fi
  requests=$(sed -n 's/^WRK .*requests=\([0-9]*\).*/\1/p' "$work/$name.wrk")
  echo "RESULT $name $(sed -n 's/^WRK //p' "$work/$name.wrk") peak_rss_mb=$(cat "$work/$name.rss")" \
    "cpu_us_server=$(per_msg $((server1 - server0)) "$requests")" \
    "cpu_us_rabbitmq=$(per_msg $((rabbit1 - rabbit0)) "$requests")" \
    "cpu_us_wrk=$(awk -v n="$requests" '{printf "%d", ($1 + $2) * 1e6 / n}' "$work/$name.time")"
}

# profile perf|callgrind: where the CPU of the ingress process goes, grouped.
profile() {
  local bin=${COMPARE_BIN:-$CARGO_TARGET_DIR/release/ingress}
  local url="http://127.0.0.1:$PORT/webhooks/stripe"
  echo "RESULT load_before $(load) mode=$MODE seconds=$SECONDS_PER_RUN RUST_LOG=$RUST_LOG binary=$bin"
  if [ "$MODE" = perf ]; then
    start ingress "$PORT" "$bin"
    wrk -t"$WRK_THREADS" -c$CONNS -d"$((SECONDS_PER_RUN + 2))s" -s "$work/post.lua" "$url" > "$work/wrk.txt" &
    local wrk_pid=$!
    sleep 1
    perf record -q -F 2999 -p "$SERVER_PID" -o "$work/perf.data" -- sleep "$SECONDS_PER_RUN" >/dev/null 2>&1
    wait $wrk_pid
    echo "RESULT ingress $(sed -n 's/^WRK //p' "$work/wrk.txt") (while profiled)"
    bench/profile_groups.py perf "$work/perf.data"
  else
    start ingress "$PORT" valgrind --tool=callgrind --callgrind-out-file="$work/cg.%p" "$bin"
    wrk -t1 -c8 -d3s -s "$work/post.lua" "$url" >/dev/null
    callgrind_control -z "$SERVER_PID" >/dev/null 2>&1
    wrk -t1 -c8 -d"${SECONDS_PER_RUN}s" -s "$work/post.lua" "$url" > "$work/wrk.txt"
    callgrind_control -d "$SERVER_PID" >/dev/null 2>&1
    local requests
    requests=$(sed -n 's/^WRK .*requests=\([0-9]*\).*/\1/p' "$work/wrk.txt")
    echo "RESULT ingress requests=$requests (under valgrind)"
    bench/profile_groups.py callgrind "$(ls "$work"/cg.*.1)" "$requests"
  fi
  stop
  echo "RESULT load_after $(load)"
}

if [ "$MODE" != bench ]; then
  profile
  exit 0
fi

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
# The broker-limit phase leaves hundreds of thousands of 2 KB messages behind: delete them, so
# ingress publishes to a broker in the same state as the broker-limit phase found it.
scripts/delete-queues.sh "$BASE.broker" >/dev/null 2>&1 || true
echo "== no-broker reference (ingress router answering without publishing; wrk, $CONNS connections)"
measure no_broker "$CARGO_TARGET_DIR/release/examples/no_broker" "$NO_BROKER_PORT"
echo "== ingress (wrk, $CONNS connections, $WRK_THREADS threads, valid signed 2 KB events)"
measure ingress "$CARGO_TARGET_DIR/release/ingress" "$PORT"
if [ -n "${COMPARE_BIN:-}" ]; then
  scripts/delete-queues.sh "$BASE" >/dev/null 2>&1 || true
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
