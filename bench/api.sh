#!/usr/bin/env bash
# Entitlement API benchmark: GET /api/pro/entitlement with a valid token at 64 connections on a
# cache hit (served from process memory), next to `redis-benchmark -t get -c 64` in the same run;
# then the cache-miss path (every request a different user, served from Postgres and refilling
# the cache). Prints the load average beside the figures, and what share of the hits came from
# memory (the API's own metrics). Then the same hit for a member of an organisation that holds
# `pro` (their answer merges the organisation's snapshot), in the same run as the user's.
# Usage: bench/api.sh [seconds=15]   (installs wrk and redis-benchmark when absent; needs the
# local Postgres and Redis)
# ENTITLEMENT_LOCAL_CACHE_ENTRIES=0 bench/api.sh measures hits served by Redis instead;
# PERF=1 also records the API process with `perf` during each run and prints its hottest symbols.
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
source bench/lib/tools.sh
need wrk
need redis-benchmark redis-tools

cargo build --release -q -p processor --bin processor
work=$(mktemp -d)
cleanup() {
  [ -n "${API_PID:-}" ] && kill "$API_PID" 2>/dev/null || true
  psqlq -d postgres -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" || true
  redis-cli --scan --pattern 'entitlements:v1:ub_*' | xargs -r -n 1000 redis-cli del >/dev/null
  redis-cli del 'entitlements:v1:org:ub_org' >/dev/null
  scripts/delete-queues.sh "bench.api.$RUN" || true
  rm -rf "$work"
}
trap cleanup EXIT

"$bin/processor" migrate >/dev/null
psqlq -d "$DB" <<SQL
INSERT INTO entitlements (user_id, key, status, source, source_id, expires_at, updated_at)
SELECT 'ub_' || i, 'pro', 'active', 'purchase', 'pi_bench_' || i, NULL, now() FROM generate_series(1, $USERS) i;
INSERT INTO user_entitlement_versions (user_id, version) SELECT 'ub_' || i, 1 FROM generate_series(1, $USERS) i;
-- An organisation holding pro, and a member of it who holds nothing of their own.
INSERT INTO entitlements (user_id, key, status, source, source_id, expires_at, updated_at)
VALUES ('org:ub_org', 'pro', 'active', 'purchase', 'pi_bench_org', NULL, now());
INSERT INTO user_entitlement_versions (user_id, version) VALUES ('org:ub_org', 1), ('ub_member', 1);
INSERT INTO organization_members (organization_id, user_id, role, joined_at, version, seat)
VALUES ('ub_org', 'ub_member', 'member', now(), 1, 0);
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
with open(f"{work}/member.lua", "w") as f:
    f.write(f'wrk.headers["Authorization"] = "Bearer {token("ub_member")}"\n' + report)
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
profile() {
  [ -n "${PERF:-}" ] || return 0
  perf record -q -F 499 -g -p "$API_PID" -o "$work/$1.perf" -- sleep "$2" 2>/dev/null &
  PERF_PID=$!
}
report() {
  [ -n "${PERF:-}" ] || return 0
  wait "$PERF_PID" || true
  echo "-- hottest symbols of the API process ($1)"
  perf report -q -g none -i "$work/$1.perf" --no-children --sort dso,symbol 2>/dev/null | grep -v '^$' | cut -c1-150 | head -30 || true
}
local_reads() { curl -sf "http://127.0.0.1:$PORT/metrics" | awk -v o="$1" '$0 ~ "^entitlement_local_cache_reads_total" && $0 ~ "outcome=\""o"\"" {s += $2} END {print s + 0}'; }
# Twice: the first read fills Redis from Postgres (after its answer), a later one fills process
# memory from Redis; `from_memory` below counts the hits that memory served.
curl -sf -o /dev/null -H "Authorization: Bearer $(sed -n 's/.*Bearer \(.*\)".*/\1/p' "$work/hit.lua")" "$url"
curl -sf -H "Authorization: Bearer $(sed -n 's/.*Bearer \(.*\)".*/\1/p' "$work/hit.lua")" "$url" >"$work/one.json"
grep -q '"isPro":true' "$work/one.json" || { echo "unexpected answer: $(cat "$work/one.json")"; exit 1; }
member_token=$(sed -n 's/.*Bearer \(.*\)".*/\1/p' "$work/member.lua")
curl -sf -o /dev/null -H "Authorization: Bearer $member_token" "$url"
curl -sf -H "Authorization: Bearer $member_token" "$url" >"$work/member.json"
grep -q '"isPro":true' "$work/member.json" && grep -q '"organizationId":"ub_org"' "$work/member.json" \
  || { echo "unexpected member answer: $(cat "$work/member.json")"; exit 1; }

echo "== load before the runs: $(cut -d' ' -f1-3 /proc/loadavg) ($(nproc) CPUs)"
echo "== redis-benchmark -t get -c 64 (same machine, same run)"
redis-benchmark -t get -c 64 -n 400000 -q | tr '\r' '\n' | grep 'requests per second' | tail -1 | tee "$work/redis.txt"
echo "== GET /api/pro/entitlement, cache hit, 64 connections"
memory_before=$(local_reads hit)
profile hit "$SECS"
wrk -t2 -c64 -d"${SECS}s" --latency -s "$work/hit.lua" "$url" | grep RESULT | tee "$work/hit.txt"
report hit
memory_hits=$(( $(local_reads hit) - memory_before ))
load_hit=$(cut -d' ' -f1-3 /proc/loadavg)
echo "== GET /api/pro/entitlement for an organisation's member, cache hit, 64 connections"
wrk -t2 -c64 -d"${SECS}s" --latency -s "$work/member.lua" "$url" | grep RESULT | tee "$work/member.txt"
load_member=$(cut -d' ' -f1-3 /proc/loadavg)
echo "== GET /api/pro/entitlement, cache miss (a different user each request), 64 connections"
redis-cli --scan --pattern 'entitlements:v1:ub_*' | xargs -r -n 1000 redis-cli del >/dev/null
profile miss 5
wrk -t2 -c64 -d5s --latency -s "$work/miss.lua" "$url" | grep RESULT | tee "$work/miss.txt"
report miss
load_miss=$(cut -d' ' -f1-3 /proc/loadavg)
rss_kb=$(awk '/VmHWM/ {print $2}' /proc/$API_PID/status)

redis_rps=$(sed -n 's/.*GET: \([0-9.]*\) requests per second.*/\1/p' "$work/redis.txt" | cut -d. -f1)
hit_rps=$(sed -n 's/.*rps=\([0-9]*\).*/\1/p' "$work/hit.txt")
ratio=$(python3 -c "print(f'{$hit_rps/$redis_rps:.2f}')")
hit_requests=$(sed -n 's/.*requests=\([0-9]*\).*/\1/p' "$work/hit.txt")
p99() { sed -n 's/.*p99_ms=\([0-9.]*\).*/\1/p' "$1"; }
echo "== summary ($(nproc) CPUs; load average at the end of each run)"
echo "hit:  $(sed 's/RESULT //' "$work/hit.txt") from_memory=$memory_hits/$hit_requests load=$load_hit"
member_rps=$(sed -n 's/.*rps=\([0-9]*\).*/\1/p' "$work/member.txt")
echo "member hit: $(sed 's/RESULT //' "$work/member.txt") load=$load_member member/user=$(python3 -c "print(f'{$member_rps/$hit_rps:.2f}')")"
echo "miss: $(sed 's/RESULT //' "$work/miss.txt") load=$load_miss"
echo "RESULT api_hit_rps=$hit_rps member_hit_rps=$member_rps member_p99_ms=$(p99 "$work/member.txt") redis_get_rps=$redis_rps ratio=$ratio hit_p99_ms=$(p99 "$work/hit.txt") miss_p99_ms=$(p99 "$work/miss.txt") api_peak_rss_mb=$((rss_kb / 1024)) load=\"$load_miss\""
