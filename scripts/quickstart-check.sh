#!/usr/bin/env bash
# Runs the README's quick start (the ```sh block after `<!-- quickstart -->`) as the README prints
# it, against a stack of its own: its own database, AMQP_TOPOLOGY_BASE, ports and .env (written
# from .env.example with fresh secrets, as scripts/up.sh does) and its own Redis database (index
# 15, emptied before and after: the README's user u_1 has the same cache key in every run), with
# this build's binaries in place of target/release. The only rewrite is the two listen
# addresses. A command followed by a `# → {…}` line is re-run (for up to 15 s: events are
# applied asynchronously) until its output holds every "key":value of that line.
# Usage: scripts/quickstart-check.sh        (scripts/test.sh runs it)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
target=${CARGO_TARGET_DIR:-$root/target}

cargo build --quiet -p ingress -p processor --bins
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
ingress_addr=127.0.0.1:$(free_port)
api_addr=127.0.0.1:$(free_port)
db=quickstart_$$
base=quickstart.$$
work=$(mktemp -d)
pids=()
redis_db=15
redis-cli -n $redis_db FLUSHDB >/dev/null
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  redis-cli -n $redis_db FLUSHDB >/dev/null 2>&1 || true
  psql -h 127.0.0.1 -U postgres -Atq -d postgres -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
  scripts/delete-queues.sh "$base" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

rand() { head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n'; }
sed -e "s/^STRIPE_WEBHOOK_SECRET=.*/STRIPE_WEBHOOK_SECRET=whsec_$(rand)/" \
    -e "s/^AUTH_JWT_SECRET=.*/AUTH_JWT_SECRET=dev_$(rand)/" \
    -e "s/^ADMIN_API_TOKEN=.*/ADMIN_API_TOKEN=admin_$(rand)/" \
    -e "s|^DATABASE_URL=.*|DATABASE_URL=postgres://postgres@127.0.0.1:5432/$db|" \
    -e "s/^AMQP_TOPOLOGY_BASE=.*/AMQP_TOPOLOGY_BASE=$base/" \
    -e "s|^REDIS_URL=.*|REDIS_URL=redis://127.0.0.1:6379/$redis_db|" \
    -e "s/^INGRESS_ADDR=.*/INGRESS_ADDR=$ingress_addr/" \
    -e "s/^API_ADDR=.*/API_ADDR=$api_addr/" \
    -e "s/^RUST_LOG=.*/RUST_LOG=warn/" .env.example > "$work/.env"
mkdir -p "$work/target"
ln -s "$target/debug" "$work/target/release"

cd "$work"
target/release/processor migrate
start() { # ready url, command...
  local url=$1; shift
  "$@" >>"$work/services.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 150); do curl -sf "$url" >/dev/null && return; sleep 0.2; done
  echo "quickstart: $* did not become ready" >&2; tail -20 "$work/services.log" >&2; exit 1
}
start "http://$ingress_addr/readyz" target/release/ingress
start "http://$api_addr/readyz" target/release/processor run

python3 - "$root/README.md" "$ingress_addr" "$api_addr" >"$work/quickstart.sh" <<'PY'
import re, shlex, sys
readme, ingress, api = sys.argv[1:]
text = open(readme).read()
block = re.search(r"<!-- quickstart -->\s*```sh\n(.*?)```", text, re.S)
if not block:
    sys.exit("quickstart: no ```sh block after <!-- quickstart --> in README.md")
steps = []
for line in block.group(1).splitlines():
    line = line.replace("127.0.0.1:8080", ingress).replace("127.0.0.1:8081", api)
    if line.startswith("# →"):
        steps[-1][1] = re.findall(r'"[A-Za-z]+":(?:"[^"]*"|true|false|null|-?\d+)', line)
    elif line.strip() and not line.lstrip().startswith("#"):
        steps.append([line, None])
print("set -euo pipefail")
for command, expected in steps:
    print(f"echo {shlex.quote('$ ' + command)}")
    if not expected:
        print(command)
        continue
    checks = " ".join(f'case "$out" in *{shlex.quote(f)}*) ;; *) ok=0 ;; esac;' for f in expected)
    want = shlex.quote(" ".join(expected))
    print(f'for i in $(seq 75); do out=$({command}) || true; ok=1; {checks} '
          f'if [ $ok = 1 ]; then echo "$out"; break; fi; '
          f'if [ $i = 75 ]; then echo "quickstart: expected "{want}" but got: $out" >&2; exit 1; fi; '
          f'sleep 0.2; done')
PY
bash "$work/quickstart.sh"
echo "quickstart: the README's quick start works as printed"
