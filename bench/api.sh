#!/usr/bin/env bash
# Entitlement API benchmark: GET /api/pro/entitlement with a valid token at 64 connections on a
# cache hit, next to `redis-benchmark -t get -c 64` in the same run; then the cache-miss path
# (every request a different user, served from Postgres and refilling the cache).
# Usage: bench/api.sh [seconds=15]   (needs wrk, redis-benchmark, the local Postgres and Redis)
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-15}
USERS=40000
RUN=$$
DB=bench_api_$RUN
PORT=${BENCH_API_PORT:-18081}
SECRET=bench_jwt_secret_that_is_at_least_32_bytes_long
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
export DATABASE_URL=postgres://postgres@127.0.0.1:5432/$DB AUTH_JWT_SECRET=$SECRET
export API_ADDR=127.0.0.1:$PORT RUST_LOG=warn AMQP_TOPOLOGY_BASE=bench.api.$RUN
bin=$CARGO_TARGET_DIR/release
psqlq() { psql -h 127.0.0.1 -U postgres -Atq "$@"; }
command -v wrk >/dev/null || { echo "wrk is required (apt-get install wrk)"; exit 2; }

cargo build --release -q -p processor --bin processor
work=$(mktemp -d)
cleanup() {
  [ -n "${API_PID:-}" ] && kill "$API_PID" 2>/dev/null || true
  psqlq -d postgres -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" || true
  redis-cli --scan --pattern 'entitlements:v1:ub_*' | xargs -r -n 1000 redis-cli del >/dev/null
  scripts/delete-queues.sh "bench.api.$RUN" || true
  rm -rf "$work"
}
trap cleanup EXIT

"$bin/processor" migrate >/dev/null
psqlq -d "$DB" <<SQL
INSERT INTO entitlements (user_id, key, status, source, source_id, expires_at, updated_at)
SELECT 'ub_' || i, 'pro', 'active', 'purchase', 'pi_bench_' || i, NULL, now() FROM generate_series(1, $USERS) i;
INSERT INTO user_entitlement_versions (user_id, version) SELECT 'ub_' || i, 1 FROM generate_series(1, $USERS) i;
SQL

"$bin/processor" api >"$work/api.log" 2>&1 &
API_PID=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null && break; sleep 0.1; done

# Tokens: HS256, one per user; the hit script uses user 1 only, the miss script walks the others.
python3 - "$SECRET" "$USERS" "$work" <<'PY'
import base64, hmac, hashlib, json, sys, time
secret, users, work = sys.argv[1].encode(), int(sys.argv[2]), sys.argv[3]
b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
def token(user):
    body = b64(json.dumps({"sub": user, "exp": int(time.time()) + 3600}).encode())
    sig = b64(hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest())
    return f"{head}.{body}.{sig}"
report = '''
done = function(s, latency, requests)
  io.write(string.format("RESULT rps=%.0f p50_ms=%.2f p99_ms=%.2f requests=%d errors=%d\\n",
    s.requests / (s.duration / 1e6), latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    s.requests, s.errors.connect + s.errors.read + s.errors.write + s.errors.status + s.errors.timeout))
end
'''
with open(f"{work}/hit.lua", "w") as f:
    f.write(f'wrk.headers["Authorization"] = "Bearer {token("ub_1")}"\n' + report)
with open(f"{work}/miss.lua", "w") as f:
    f.write("tokens = {\n" + ",\n".join(f'"{token(f"ub_{i}")}"' for i in range(2, users + 1)) + "\n}\n")
    f.write('''
local counter, stride = 0, 1
setup = function(thread) thread:set("offset", counter); counter = counter + 1 end
init = function() counter = offset; stride = 2 end
request = function()
  counter = counter + stride
  local t = tokens[(counter % #tokens) + 1]
  return wrk.format("GET", nil, {["Authorization"] = "Bearer " .. t})
end
''' + report)
PY
url="http://127.0.0.1:$PORT/api/pro/entitlement"
curl -sf -H "Authorization: Bearer $(sed -n 's/.*Bearer \(.*\)".*/\1/p' "$work/hit.lua")" "$url" >"$work/one.json"
grep -q '"isPro":true' "$work/one.json" || { echo "unexpected answer: $(cat "$work/one.json")"; exit 1; }

echo "== redis-benchmark -t get -c 64 (same machine, same run)"
redis-benchmark -t get -c 64 -n 400000 -q | tee "$work/redis.txt"
echo "== GET /api/pro/entitlement, cache hit, 64 connections"
wrk -t2 -c64 -d"${SECS}s" --latency -s "$work/hit.lua" "$url" | grep RESULT | tee "$work/hit.txt"
echo "== GET /api/pro/entitlement, cache miss (a different user each request), 64 connections"
redis-cli --scan --pattern 'entitlements:v1:ub_*' | xargs -r -n 1000 redis-cli del >/dev/null
wrk -t2 -c64 -d5s --latency -s "$work/miss.lua" "$url" | grep RESULT | tee "$work/miss.txt"
rss_kb=$(awk '/VmHWM/ {print $2}' /proc/$API_PID/status)

redis_rps=$(sed -n 's/.*GET: \([0-9.]*\) requests per second.*/\1/p' "$work/redis.txt" | cut -d. -f1)
hit_rps=$(sed -n 's/.*rps=\([0-9]*\).*/\1/p' "$work/hit.txt")
echo "== summary"
echo "api_hit_rps=$hit_rps redis_get_rps=$redis_rps ratio=$(python3 -c "print(f'{$hit_rps/$redis_rps:.2f}')") api_peak_rss_mb=$((rss_kb / 1024))"
echo "hit:  $(sed 's/RESULT //' "$work/hit.txt")"
echo "miss: $(sed 's/RESULT //' "$work/miss.txt")"
