#!/usr/bin/env bash
# Processor benchmark: sustained events per second from a pre-filled queue of mixed Stripe events
# to committed Postgres rows and a refreshed cache, next to `pgbench -N -c 8 -j 2` TPS on the
# same server in the same run, with the processor's RSS sampled every half second.
# Usage: bench/processor.sh [events=50000]   (PROCESSOR_BIN: the processor binary to measure,
# default the fresh release build, for an A/B against another build)
#
# As production runs it: with STRIPE_SECRET_KEY set, against the Stripe-shaped fake
# (examples/stripe_fake.rs) answering in STRIPE_LATENCY_MS (default 150). The mix's own checkout
# sessions are recorded as the API records them; one customer in FOREIGN_EVERY (default 10)
# buys through a session created elsewhere, whose line items are read from the fake.
# STRIPE_MAX_REQUESTS_PER_SECOND (default 100, live mode's limit) is the worker's budget.
# BENCH_LOGS=DIR keeps the worker's log and the fake's output.
# STRIPE=off measures without a key (the figures before this mode existed).
# Besides the whole drain, it reports the drain of everything but the foreign completions (the
# lanes' rate: those wait for their reads, at the budget's rate, which it reports too).
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib/stripe_fake.sh
N=${1:-50000}
RUN=$$
DB=bench_processor_$RUN
BASE=bench.processor.$RUN
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
export DATABASE_URL=postgres://postgres@127.0.0.1:5432/$DB AMQP_TOPOLOGY_BASE=$BASE
export RUST_LOG=${RUST_LOG:-warn} API_ADDR=127.0.0.1:18081 RETRY_DELAYS=5s,30s
bin=$CARGO_TARGET_DIR/release
psqlq() { psql -h 127.0.0.1 -U postgres -Atq "$@"; }

cargo build --release -q -p processor --bin processor --example fill_queue
PROCESSOR_BIN=${PROCESSOR_BIN:-$bin/processor}
STRIPE=${STRIPE:-on}
work=$(mktemp -d)
cleanup() {
  [ -n "${WORKER_PID:-}" ] && kill "$WORKER_PID" 2>/dev/null || true
  [ -n "${FAKE_PID:-}" ] && kill "$FAKE_PID" 2>/dev/null || true
  psqlq -d postgres -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" || true
  psqlq -d postgres -c "DROP DATABASE IF EXISTS pgbench_$RUN WITH (FORCE)" || true
  scripts/delete-queues.sh "$BASE" || true
  [ -n "${BENCH_LOGS:-}" ] && mkdir -p "$BENCH_LOGS" && cp "$work"/*.log "$work"/*.out "$BENCH_LOGS"/ 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

"$PROCESSOR_BIN" migrate >/dev/null
fill_args=()
if [ "$STRIPE" != off ]; then
  start_stripe_fake
  fill_args=(--offers-db "$DATABASE_URL" --foreign-every "${FOREIGN_EVERY:-10}")
fi
echo "== filling $BASE.q with $N mixed events"
"$bin/examples/fill_queue" --base "$BASE" --count "$N" --run "$RUN" "${fill_args[@]}" | tee "$work/fill.out"
# The completions of sessions created elsewhere (they wait for their Stripe read, at the
# budget's rate) and the rest, drained by the lanes; fill_queue names the former by customer.
FOREIGN=$(sed -n 's/^foreign_completions=//p' "$work/fill.out")
FOREIGN=${FOREIGN:-0}
every=${FOREIGN_EVERY:-10}
# When the last of the rest was applied (its transaction's time), read after the drain.
rest_sql="select extract(epoch from max(processed_at)) from processed_events where not (event_type in
  ('checkout.session.completed', 'checkout.session.async_payment_succeeded')
  and $FOREIGN > 0 and split_part(event_id, '_', 3)::int % $every = 4 % $every)"

echo "== draining with one processor worker (PROCESSOR_PREFETCH=${PROCESSOR_PREFETCH:-64})"
"$PROCESSOR_BIN" worker >"$work/worker.log" 2>&1 &
WORKER_PID=$!
start=$(date +%s.%N)
rss_samples=()
while :; do
  done_count=$(psqlq -d "$DB" -c "select count(*) from processed_events")
  rss_samples+=("$(awk '/VmRSS/ {print $2}' /proc/$WORKER_PID/status 2>/dev/null || echo 0)")
  [ "$done_count" -ge "$N" ] && break
  kill -0 $WORKER_PID 2>/dev/null || { echo "worker died"; tail -20 "$work/worker.log"; exit 1; }
  sleep 0.5
done
end=$(date +%s.%N)
rest_end=$(psqlq -d "$DB" -c "$rest_sql")
# Acks follow the commit and the cache refresh: the queue must be empty, nothing dead-lettered.
for _ in $(seq 1 20); do
  depth=$(rabbitmqctl -q list_queues name messages 2>/dev/null | awk -v q="$BASE.q" '$1 == q {print $2}')
  [ "${depth:-1}" = 0 ] && break
  sleep 0.5
done
dead=$(rabbitmqctl -q list_queues name messages 2>/dev/null | awk -v q="$BASE.dlq" '$1 == q {print $2}')
echo "main_queue_left=${depth:-?} dead_lettered=${dead:-?}"
peak_kb=$(awk '/VmHWM/ {print $2}' /proc/$WORKER_PID/status)
kill -TERM $WORKER_PID; wait $WORKER_PID 2>/dev/null || true; WORKER_PID=
rate=$(python3 -c "print(round($N/($end-$start)))")
users=$(psqlq -d "$DB" -c "select count(distinct user_id) from entitlements")
echo "processed=$N seconds=$(python3 -c "print(round($end-$start,1))") events_per_sec=$rate users_with_entitlements=$users"
python3 - "${rss_samples[@]}" <<'PY'
import sys
s=[int(x)//1024 for x in sys.argv[1:] if x.isdigit() and int(x)>0]
q=len(s)//4
print(f"rss_mb first_quarter_max={max(s[:q] or s)} last_quarter_max={max(s[-q:] or s)} overall_max={max(s)} samples={len(s)}")
PY
echo "processor_peak_rss_mb=$((peak_kb / 1024))"
if [ -n "${FAKE_PID:-}" ]; then
  stop_stripe_fake
  requests=$(sed -n 's/^stripe_requests=//p' "$work/stripe.out")
  purchases=$(psqlq -d "$DB" -c "select count(*) from purchases where checkout_session_id is not null")
  echo "stripe_requests_per_purchase=$(python3 -c "print(f'{${requests:-0}/max(1,$purchases):.3f}')") purchases_with_session=$purchases"
  # The reads ran from the start of the drain to its end: their rate against the budget.
  python3 -c "
r=${requests:-0}; s=$end-$start; b=$STRIPE_MAX_REQUESTS_PER_SECOND
print(f'foreign_completions=$FOREIGN stripe_reads_per_sec={r/s:.1f} budget={b} of_budget={r/s/b:.2f}')"
fi
rest_rate=$(python3 -c "print(round(($N-$FOREIGN)/max(0.001,$rest_end-$start)))")
echo "rest_events=$((N - FOREIGN)) rest_seconds=$(python3 -c "print(round($rest_end-$start,1))") rest_events_per_sec=$rest_rate"

echo "== pgbench -N -c 8 -j 2 on the same server"
psqlq -d postgres -c "CREATE DATABASE pgbench_$RUN"
pgbench -h 127.0.0.1 -U postgres -i -q -s 10 "pgbench_$RUN" >/dev/null 2>&1
pgbench -h 127.0.0.1 -U postgres -N -c 8 -j 2 -T 20 "pgbench_$RUN" 2>/dev/null | grep -E "^tps" | tee "$work/pgbench.txt"
tps=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' "$work/pgbench.txt" | cut -d. -f1)
echo "== summary"
echo "processor_events_per_sec=$rate pgbench_tps=$tps ratio=$(python3 -c "print(f'{$rate/$tps:.2f}')")"
echo "rest_events_per_sec=$rest_rate (all but the $FOREIGN completions waiting for Stripe) ratio=$(python3 -c "print(f'{$rest_rate/$tps:.2f}')")"
