#!/usr/bin/env bash
# Paid → Pro end-to-end benchmark: the time from Stripe's POST of a paid `pro` checkout to the
# first `GET /api/pro/entitlement` that answers `isPro: true`, under steady background webhooks
# at each rate (open-loop, a realistic mix, distinct users), through ingress, RabbitMQ,
# `processor worker`, Postgres, Redis and `processor api` on a scratch database and topology.
# Prints one RESULT line per rate (processor/examples/e2e_load.rs says what each field means).
# Usage: bench/e2e.sh [seconds=20] [rates=300,1000]
#   PROBES_PER_SEC (default 20): probe purchases per second; PROCESSOR_BIN: the processor binary
#   to measure (default: the fresh release build), for an A/B against another build; E2E_LOGS=DIR
#   keeps the services' logs there (with RUST_LOG=warn,processor::worker=debug the worker logs
#   each batch's size and timings).
#   As production runs it: with STRIPE_SECRET_KEY set, against the Stripe-shaped fake
#   (examples/stripe_fake.rs) answering in STRIPE_LATENCY_MS (default 150); each probe opens its
#   checkout through the API (untimed), the background's own sessions are recorded as the API
#   records them, one customer in FOREIGN_EVERY (default 10) buys through a session created
#   elsewhere. It reports the Stripe reads of the probes' sessions per probe purchase (0 is
#   right). STRIPE=off measures without a key (the figures before this mode existed).
#   PROBE=refund times a Pro user's refund (→ not Pro) instead of a purchase; OUTAGE_AT=N makes
#   the fake answer 500 through the N-th rate of the list (and no longer after it), so
#   `PROBE=refund OUTAGE_AT=2 bench/e2e.sh 60 300,300` compares refunds while Stripe fails for
#   a minute with refunds just before; after each rate the script waits until every background
#   checkout is granted and reports what is parked.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib/stripe_fake.sh
SECS=${1:-20}
RATES=${2:-300,1000}
RUN=$$
DB=bench_e2e_$RUN
BASE=bench.e2e.$RUN
INGRESS_PORT=${E2E_INGRESS_PORT:-$((20000 + RUN % 20000 * 2))}
API_PORT=$((INGRESS_PORT + 1))
WORKER_PORT=$((INGRESS_PORT + 2)) # the worker's operational routes (healthz, metrics)
WEBHOOK_SECRET=whsec_$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
JWT_SECRET=bench_e2e_jwt_secret_that_is_at_least_32_bytes_$RUN
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
export DATABASE_URL=postgres://postgres@127.0.0.1:5432/$DB AMQP_TOPOLOGY_BASE=$BASE
export RUST_LOG=${RUST_LOG:-warn} RETRY_DELAYS=5s,30s
export STRIPE_WEBHOOK_SECRET=$WEBHOOK_SECRET AUTH_JWT_SECRET=$JWT_SECRET
export INGRESS_ADDR=127.0.0.1:$INGRESS_PORT API_ADDR=127.0.0.1:$API_PORT
bin=$CARGO_TARGET_DIR/release
psqlq() { psql -h 127.0.0.1 -U postgres -Atq "$@"; }
# Ready plus unacknowledged messages of one of this run's queues.
depth() {
  rabbitmqctl -q list_queues name messages 2>/dev/null | awk -v q="$BASE.$1" '$1 == q {print $2}'
}

cargo build --release -q -p ingress --bin ingress -p processor --bin processor --example e2e_load
PROCESSOR_BIN=${PROCESSOR_BIN:-$bin/processor}
STRIPE=${STRIPE:-on}
work=$(mktemp -d)
PIDS=()
FAKE_PID=
cleanup() {
  [ -n "$FAKE_PID" ] && kill "$FAKE_PID" 2>/dev/null || true
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  psqlq -d postgres -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" || true
  scripts/delete-queues.sh "$BASE" || true
  for pattern in "entitlements:v1:u_bg_${RUN}r*" "entitlements:v1:p_${RUN}r*" \
    "dedupe:v1:evt_bg_${RUN}r*" "dedupe:v1:evt_p_${RUN}r*"; do
    redis-cli --scan --pattern "$pattern" | xargs -r -n 1000 redis-cli del >/dev/null
  done
  if [ -n "${E2E_LOGS:-}" ]; then mkdir -p "$E2E_LOGS" && cp "$work"/*.log "$E2E_LOGS"/; fi
  rm -rf "$work"
}
trap cleanup EXIT

"$PROCESSOR_BIN" migrate >/dev/null
load_args=()
if [ "$STRIPE" != off ]; then
  # As production: a Stripe key, Stripe answered by the Stripe-shaped fake after
  # STRIPE_LATENCY_MS; the background's own checkouts recorded as the API records them, one
  # customer in FOREIGN_EVERY buying through a session created elsewhere; each probe opens its
  # checkout through the API first.
  start_stripe_fake
  export CHECKOUT_SUCCESS_URL=https://app.example/paid CHECKOUT_CANCEL_URL=https://app.example/pricing
  load_args=(--offers-db "$DATABASE_URL" --foreign-every "${FOREIGN_EVERY:-10}")
fi
"$bin/ingress" >"$work/ingress.log" 2>&1 &
PIDS+=($!)
API_ADDR=127.0.0.1:$WORKER_PORT "$PROCESSOR_BIN" worker >"$work/worker.log" 2>&1 &
PIDS+=($!)
"$PROCESSOR_BIN" api >"$work/api.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 300); do
  curl -sf "http://$INGRESS_ADDR/readyz" >/dev/null && curl -sf "http://$API_ADDR/readyz" >/dev/null &&
    rabbitmqctl -q list_queues name consumers 2>/dev/null | awk -v q="$BASE.q" '$1 == q && $2 > 0 {f=1} END {exit !f}' &&
    break
  sleep 0.2
done
for pid in "${PIDS[@]}"; do
  kill -0 "$pid" 2>/dev/null || { echo "a service did not start"; tail -5 "$work"/*.log; exit 1; }
done
curl -sf "http://$API_ADDR/readyz" >/dev/null || { echo "api not ready"; tail -5 "$work"/*.log; exit 1; }

echo "== paid → Pro: ${SECS}s of probes per rate (after a 2 s warm-up), ${PROBES_PER_SEC:-20} probes/s, background rates $RATES"
echo "== processor: $PROCESSOR_BIN (PROCESSOR_PREFETCH=${PROCESSOR_PREFETCH:-64})"
n=0
checkouts=0
for rate in ${RATES//,/ }; do
  n=$((n + 1))
  outage=
  if [ "$n" = "${OUTAGE_AT:-0}" ] && [ -n "$FAKE_PID" ]; then
    outage=1
    kill -USR1 "$FAKE_PID"
    echo "== Stripe answers 500 from now on"
  fi
  echo "== background $rate webhooks/s; load: $(cut -d' ' -f1-3 /proc/loadavg)"
  "$bin/examples/e2e_load" --rate "$rate" --seconds "$SECS" --probes-per-second "${PROBES_PER_SEC:-20}" \
    --ingress "http://$INGRESS_ADDR" --api "http://$API_ADDR" --webhook-secret "$WEBHOOK_SECRET" \
    --jwt-secret "$JWT_SECRET" --run "${RUN}r${rate}n$n" --probe "${PROBE:-purchase}" "${load_args[@]}" \
    2>"$work/load.err" | sed "s/^RESULT /RESULT${outage:+ stripe=500} /" | tee -a "$work/results.txt"
  grep -v '^background_checkouts=' "$work/load.err" >&2 || true
  checkouts=$((checkouts + $(sed -n 's/^background_checkouts=//p' "$work/load.err")))
  if [ -n "$outage" ]; then
    kill -USR2 "$FAKE_PID"
    echo "== Stripe answers again"
  fi
  for pid in "${PIDS[@]}"; do
    kill -0 "$pid" 2>/dev/null || { echo "a service died"; tail -20 "$work"/*.log; exit 1; }
  done
  # The next rate starts on an empty queue and every background checkout applied (those that
  # waited for Stripe included); the time this takes is the backlog left behind.
  waited=0
  granted() {
    psqlq -d "$DB" -c "select count(*) from processed_events
      where event_type = 'checkout.session.completed' and event_id like 'evt\_bg\_%'"
  }
  while { [ "$(depth q)" != 0 ] || [ "$(depth stripe)" != 0 ] || [ "$(granted)" -lt "$checkouts" ]; } &&
    [ $waited -lt 180 ]; do
    sleep 1; waited=$((waited + 1))
  done
  echo "backlog drained after ${waited}s; main queue: $(depth q), Stripe queue: $(depth stripe), parked: $(depth dlq); background checkouts applied: $(granted) of $checkouts"
done
echo "== summary (load: $(cut -d' ' -f1-3 /proc/loadavg))"
cat "$work/results.txt"
if [ -n "$FAKE_PID" ]; then
  stop_stripe_fake
  own=$(sed -n 's/^stripe_line_item_reads_of_created_sessions=//p' "$work/stripe.out")
  probes=$(psqlq -d "$DB" -c "select count(*) from purchases where user_id like 'p\_%' and status = 'completed'")
  echo "probe_purchases=$probes stripe_reads_per_probe_purchase=$(python3 -c "print(f'{${own:-0}/max(1,$probes):.3f}')")"
fi
