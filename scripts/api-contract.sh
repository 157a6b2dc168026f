#!/usr/bin/env bash
# The OpenAPI document is the contract: Schemathesis (a property-based API tester, from PyPI)
# generates requests from the document `processor api` serves, valid and invalid, and fails on
# any 5xx, any status or content type the document does not list, any response that does not
# match its schema, and any invalid input the API accepts. It runs twice: the user routes with a
# user's token, the admin routes with the admin token (each also tries without and with a wrong
# one). The API runs as in production, with a Stripe key, against the Stripe-shaped fake
# (examples/stripe_fake.rs) and its own database on the machine's Postgres, Redis and RabbitMQ.
#
# Usage: scripts/api-contract.sh            (MAX_EXAMPLES per operation, default 40)
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v schemathesis >/dev/null 2>&1; then
  python3 -m pip install --quiet --disable-pip-version-check 'schemathesis>=4.3,<5' >/dev/null 2>&1 \
    || { echo "api-contract: could not install schemathesis from PyPI" >&2; exit 1; }
fi
scripts/services.sh

target=${CARGO_TARGET_DIR:-target}
cargo build --quiet -p processor --bin processor
cargo build --quiet -p system-tests --example stripe_fake
bin=$target/debug
work=$(mktemp -d)
db=contract_$$
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  psql -q -h 127.0.0.1 -U postgres -c "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

"$bin/examples/stripe_fake" --latency-ms "${STRIPE_LATENCY_MS:-100}" >"$work/stripe.out" 2>"$work/stripe.err" &
pids+=($!)
for _ in $(seq 1 100); do grep -q STRIPE_SECRET_KEY "$work/stripe.out" && break; sleep 0.1; done
export $(grep -E '^STRIPE_(API_BASE|SECRET_KEY)=' "$work/stripe.out" | xargs)

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
export DATABASE_URL=postgres://postgres@127.0.0.1:5432/$db
export API_ADDR=127.0.0.1:$port
export AUTH_JWT_SECRET=$(openssl rand -hex 32)
export ADMIN_API_TOKEN=$(openssl rand -hex 32)
export STRIPE_PRICE_PRO_LIFETIME=price_pro
export CHECKOUT_SUCCESS_URL=https://app.example/success CHECKOUT_CANCEL_URL=https://app.example/cancel
export BILLING_PORTAL_RETURN_URL=https://app.example/account
export AMQP_TOPOLOGY_BASE=contract_$$ RUST_LOG=warn
"$bin/processor" migrate >/dev/null
"$bin/processor" api >"$work/api.log" 2>&1 &
pids+=($!)
base=http://$API_ADDR
for _ in $(seq 1 100); do curl -fsS "$base/healthz" >/dev/null 2>&1 && break; sleep 0.1; done
curl -fsS "$base/healthz" >/dev/null || { cat "$work/api.log" >&2; exit 1; }

# A user who owns something, so that reads have rows to show.
user_token=$("$bin/processor" dev-token --user contract_user --ttl 1h)

export SCHEMATHESIS_HOOKS=$PWD/scripts/schemathesis_hooks.py
run() { # label, token, path regex
  echo "== schemathesis: $1" >&2
  schemathesis run "$base/openapi.json" --url "$base" \
    --checks all --max-examples "${MAX_EXAMPLES:-40}" --workers 1 \
    --include-path-regex "$3" -H "Authorization: Bearer $2" \
    --generation-deterministic --suppress-health-check all \
    --report-dir "$work/report" --no-color
}
status=0
run "user routes, a user's token" "$user_token" '^/api/' || status=1
run "admin routes, the admin token" "$ADMIN_API_TOKEN" '^/v1/' || status=1
run "service routes" "$ADMIN_API_TOKEN" '^/(healthz|readyz|metrics|openapi)' || status=1
if [ $status != 0 ]; then
  echo "api-contract: Schemathesis found answers outside the document (API log: below)" >&2
  tail -n 40 "$work/api.log" >&2
fi
exit $status
