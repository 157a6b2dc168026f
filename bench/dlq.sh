#!/usr/bin/env bash
# Dead-letter benchmark: parks N events of 2 KB (checkout.session.completed, as the consumer
# parks them) in a scratch topology's dead-letter queue, then times every `processor dlq`
# command on it. For each: wall time, peak RSS (/usr/bin/time), and the queue's ready /
# unacknowledged counts one second after the command ended; every read-only command runs twice
# and the two answers are compared. Then a pass is killed with SIGKILL half-way, and finally
# `replay --all --yes` runs into a live `processor worker` until every event is applied.
# Usage: bench/dlq.sh [events=100000]
# PARK_INDEX=1 also records each event in the dead-letter index as it is parked (the park-time
# call the consumer does not make yet: processor::dlq::ParkedIndex::record); without it the
# first read after parking pays one pass that builds the index.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-100000}
RUN=$$
DB=bench_dlq_$RUN
BASE=bench.dlq.$RUN
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
export DATABASE_URL=postgres://postgres@127.0.0.1:5432/$DB AMQP_TOPOLOGY_BASE=$BASE
export RUST_LOG=${RUST_LOG:-warn} API_ADDR=127.0.0.1:18091 RETRY_DELAYS=5s,30s
export PROCESSOR_PREFETCH=${PROCESSOR_PREFETCH:-256}
bin=$CARGO_TARGET_DIR/release
psqlq() { psql -h 127.0.0.1 -U postgres -Atq "$@"; }

cargo build --release -q -p processor --bin processor --example park_events
work=$(mktemp -d)
cleanup() {
  [ -n "${WORKER_PID:-}" ] && kill "$WORKER_PID" 2>/dev/null || true
  psqlq -d postgres -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" || true
  for q in q dlq retry.1 retry.2; do rabbitmqctl -q delete_queue "$BASE.$q" >/dev/null 2>&1 || true; done
  rm -rf "$work"
}
trap cleanup EXIT

counts() {
  rabbitmqctl -q list_queues name messages_ready messages_unacknowledged 2>/dev/null |
    awk -v q="$BASE.dlq" '$1 == q {print "ready=" $2 " unacked=" $3}'
}

STEP=0
# run LABEL ARGS…: one timed `processor dlq ARGS…`; stdout kept in $work/out.$STEP.
run() {
  local label=$1; shift
  STEP=$((STEP + 1))
  local rc=0
  /usr/bin/time -f "%e %M" -o "$work/time.$STEP" "$bin/processor" dlq "$@" \
    >"$work/out.$STEP" 2>"$work/err.$STEP" || rc=$?
  local secs kb
  read -r secs kb < <(tail -1 "$work/time.$STEP")
  sleep 1
  printf '%-58s %7.2f s %5d MB  %s exit=%s\n' "$label" "$secs" $((kb / 1024)) "$(counts)" "$rc"
  [ "$rc" = 0 ] || sed 's/^/    stderr: /' "$work/err.$STEP" | head -5
}
# twice LABEL ARGS…: the same read-only command twice, then whether both answered the same.
twice() {
  run "$@"; local first=$STEP
  run "$@"; local second=$STEP
  if cmp -s "$work/out.$first" "$work/out.$second"; then same=yes; else same=NO; fi
  echo "    same answer both runs: $same; $(tail -1 "$work/out.$second" | cut -c1-110)"
}

echo "== machine: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"
"$bin/processor" migrate >/dev/null
park_args=()
if [ "${PARK_INDEX:-0}" = 1 ]; then
  # The queue is empty: the index starts trusted, and recording at park time keeps it current.
  "$CARGO_TARGET_DIR/release/examples/park_events" --base "$BASE" --count 0 >/dev/null
  "$bin/processor" dlq list >/dev/null
  park_args=(--index-url "$DATABASE_URL")
fi
start=$(date +%s.%N)
"$CARGO_TARGET_DIR/release/examples/park_events" --base "$BASE" --count "$N" --run "$RUN" "${park_args[@]}"
echo "parking took $(python3 -c "print(round($(date +%s.%N)-$start,1))") s; $(counts)"

echo "== read-only commands (each twice)"
twice "list --limit 20" list --limit 20
twice "show <event in the middle of the queue>" show "evt_${RUN}_$((N / 2))"
twice "replay --type checkout.session.completed --dry-run" replay --type checkout.session.completed --dry-run
twice "purge --older-than 7d --dry-run" purge --older-than 7d --dry-run
run "export --out FILE" export --out "$work/export-1.jsonl"
run "export --out FILE (second run)" export --out "$work/export-2.jsonl"
if cmp -s "$work/export-1.jsonl" "$work/export-2.jsonl"; then same=yes; else same=NO; fi
echo "    same file both runs: $same; $(wc -l <"$work/export-1.jsonl") lines, $(($(stat -c %s "$work/export-1.jsonl") / 1048576)) MB"

echo "== kill -9 half-way through a pass (a purge that matches nothing goes through every message)"
"$bin/processor" dlq purge --event-id evt_not_parked --yes >/dev/null 2>&1 &
victim=$!
sleep "${KILL_AFTER:-3}"
kill -9 "$victim" 2>/dev/null || true
wait "$victim" 2>/dev/null || true
sleep 1
echo "1 s after the kill: $(counts) (copies left by the kill are removed by the next pass)"
run "replay --all --dry-run (index untrusted: a pass)" replay --all --dry-run
echo "    $(grep -E 'would be replayed' "$work/out.$STEP" | tail -1); $(grep -E 'duplicate' "$work/err.$STEP" | tail -1)"
twice "list --limit 20 (after the kill)" list --limit 20

echo "== replay --all --yes into a running processor worker"
"$bin/processor" worker >"$work/worker.log" 2>&1 &
WORKER_PID=$!
for _ in $(seq 1 100); do
  curl -fs "http://$API_ADDR/readyz" >/dev/null 2>&1 && break
  sleep 0.2
done
start=$(date +%s.%N)
run "replay --all --yes" replay --all --yes
while :; do
  applied=$(psqlq -d "$DB" -c "select count(*) from processed_events")
  [ "$applied" -ge "$N" ] && break
  kill -0 "$WORKER_PID" 2>/dev/null || { echo "worker died"; tail -20 "$work/worker.log"; exit 1; }
  sleep 0.5
done
end=$(date +%s.%N)
echo "replay start to every event applied: $(python3 -c "print(round($end-$start,1))") s; applied=$applied; $(counts)"
grants=$(psqlq -d "$DB" -c "select count(*) from entitlements where status = 'active'")
echo "active entitlements: $grants"
kill -TERM "$WORKER_PID"; wait "$WORKER_PID" 2>/dev/null || true; WORKER_PID=
echo "== done; load average $(cut -d' ' -f1-3 /proc/loadavg)"
