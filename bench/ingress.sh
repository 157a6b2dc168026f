#!/usr/bin/env bash
# Ingress benchmark: throughput and latency of POST /webhooks/stripe at 64 connections with valid,
# pre-signed 2 KB events, next to the broker's own limit (a plain lapin publisher with pipelined
# confirms to the same quorum queue), measured in the same run on the same machine.
# Usage: bench/ingress.sh [seconds]   (needs wrk, the local RabbitMQ, and cargo)
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_RUN=${1:-20}
CONNS=64
WRK_THREADS=${WRK_THREADS:-2}
PORT=${BENCH_PORT:-18080}
BASE="bench.ingress.$$"
SECRET=whsec_bench_secret
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}

command -v wrk >/dev/null || { echo "wrk is required (apt-get install wrk)"; exit 2; }
cargo build --release -q -p ingress --bin ingress --example broker_limit

work=$(mktemp -d)
trap 'kill $INGRESS_PID 2>/dev/null || true; rm -rf "$work"' EXIT

# One valid 2 KB event, signed now; the tolerance is widened so the signature stays valid for
# the whole run (ingress does not dedupe: every request is a publish).
python3 - "$SECRET" "$work/post.lua" <<'PY'
import hmac, hashlib, json, sys, time
secret, out = sys.argv[1], sys.argv[2]
t = int(time.time())
event = {"id": "evt_bench_0001", "object": "event", "type": "checkout.session.completed",
         "created": t, "data": {"object": {"id": "cs_bench", "client_reference_id": "u_bench",
         "payment_status": "paid", "metadata": {"user_id": "u_bench", "product_key": "pro"}}}}
body = json.dumps(event, separators=(",", ":"))
event["padding"] = "x" * (2048 - len(body) - len(',"padding":""'))
body = json.dumps(event, separators=(",", ":"))
assert len(body) == 2048, len(body)
sig = hmac.new(secret.encode(), f"{t}.{body}".encode(), hashlib.sha256).hexdigest()
with open(out, "w") as f:
    f.write('wrk.method = "POST"\n')
    f.write('wrk.headers["Content-Type"] = "application/json"\n')
    f.write(f'wrk.headers["Stripe-Signature"] = "t={t},v1={sig}"\n')
    f.write("wrk.body = " + json.dumps(body) + "\n")
    f.write('''
local non200 = 0
response = function(status, headers, body) if status ~= 200 then non200 = non200 + 1 end end
done = function(summary, latency, requests)
  io.write(string.format("WRK rps=%.0f p50_ms=%.2f p99_ms=%.2f requests=%d errors=%d\\n",
    summary.requests / (summary.duration / 1e6), latency:percentile(50) / 1000,
    latency:percentile(99) / 1000, summary.requests,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.status + summary.errors.timeout))
end
''')
PY

STRIPE_WEBHOOK_SECRET=$SECRET STRIPE_WEBHOOK_TOLERANCE_SECONDS=86400 INGRESS_ADDR=127.0.0.1:$PORT \
  AMQP_TOPOLOGY_BASE=$BASE RUST_LOG=warn "$CARGO_TARGET_DIR/release/ingress" &
INGRESS_PID=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null && break; sleep 0.1; done
curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null || { echo "ingress did not become ready"; exit 1; }

echo "== broker limit (plain lapin, $CONNS confirms in flight, persistent 2 KB, quorum queue)"
"$CARGO_TARGET_DIR/release/examples/broker_limit" --base "bench.broker.$$" --seconds "$SECONDS_PER_RUN" --inflight $CONNS --size 2048 | tee "$work/broker.txt"

echo "== ingress (wrk, $CONNS connections, $WRK_THREADS threads, valid signed 2 KB events)"
wrk -t$WRK_THREADS -c$CONNS -d"${SECONDS_PER_RUN}s" --latency -s "$work/post.lua" "http://127.0.0.1:$PORT/webhooks/stripe" > "$work/wrk.txt"
grep -E "Requests/sec|Latency|Non-2xx|WRK" "$work/wrk.txt"

rss_kb=$(awk '/VmHWM/ {print $2}' /proc/$INGRESS_PID/status)
kill -TERM $INGRESS_PID; wait $INGRESS_PID 2>/dev/null || true
scripts/delete-queues.sh "$BASE" || true

broker=$(sed -n 's/.*msgs_per_sec=\([0-9]*\).*/\1/p' "$work/broker.txt")
ingress=$(sed -n 's/^WRK rps=\([0-9]*\).*/\1/p' "$work/wrk.txt")
echo "== summary"
echo "ingress_rps=$ingress broker_limit_msgs_per_sec=$broker ratio=$(python3 -c "print(f'{$ingress/$broker:.2f}')") ingress_peak_rss_mb=$((rss_kb / 1024))"
sed -n 's/^WRK //p' "$work/wrk.txt"
