#!/usr/bin/env bash
# Starts the whole system on this machine: PostgreSQL, Redis and RabbitMQ (installed from Debian
# packages when absent), the database and its migrations, then ingress and processor in the
# background. Prints the development webhook secret and the URLs. Stop with scripts/down.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v cargo >/dev/null || {
  echo "cargo is required (Rust 1.95 or newer, e.g. through rustup)"; exit 2; }

scripts/services.sh

# A .env with fresh development secrets on first run; later runs keep it.
if [ ! -f .env ]; then
  rand() { head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n'; }
  # Readable by its owner only: it holds every secret of the deployment.
  (umask 077 && sed -e "s/^STRIPE_WEBHOOK_SECRET=.*/STRIPE_WEBHOOK_SECRET=whsec_$(rand)/" \
      -e "s/^AUTH_JWT_SECRET=.*/AUTH_JWT_SECRET=dev_$(rand)/" \
      -e "s/^ADMIN_API_TOKEN=.*/ADMIN_API_TOKEN=admin_$(rand)/" \
      -e "s/^POSTGRES_PASSWORD=.*/POSTGRES_PASSWORD=$(rand)/" \
      -e "s/^RABBITMQ_PASSWORD=.*/RABBITMQ_PASSWORD=$(rand)/" .env.example > .env)
  echo "created .env with development secrets (mode 0600)"
fi
set -a; . ./.env; set +a

echo "building (release)…"
cargo build --release --quiet -p ingress -p processor --bins
bin=${CARGO_TARGET_DIR:-target}/release
mkdir -p .run

"$bin/processor" migrate

start() { # name, ready url, command...
  local name=$1 url=$2; shift 2
  if [ -f ".run/$name.pid" ] && kill -0 "$(cat ".run/$name.pid")" 2>/dev/null; then
    echo "$name already running (pid $(cat ".run/$name.pid"))"; return
  fi
  nohup "$@" >".run/$name.log" 2>&1 &
  echo $! >".run/$name.pid"
  for _ in $(seq 150); do curl -sf "$url" >/dev/null && return; sleep 0.2; done
  echo "$name did not become ready; see .run/$name.log"; exit 1
}
start ingress "http://${INGRESS_ADDR:-127.0.0.1:8080}/readyz" "$bin/ingress"
start processor "http://${API_ADDR:-127.0.0.1:8081}/readyz" "$bin/processor" run

cat <<MSG

The system is up.
  webhook endpoint   http://${INGRESS_ADDR:-127.0.0.1:8080}/webhooks/stripe
  webhook secret     $STRIPE_WEBHOOK_SECRET
  entitlement API    http://${API_ADDR:-127.0.0.1:8081}/api/pro/entitlement
  metrics            http://${INGRESS_ADDR:-127.0.0.1:8080}/metrics  http://${API_ADDR:-127.0.0.1:8081}/metrics
  logs               .run/ingress.log .run/processor.log

Buy Pro as user u_1, see it, refund it, see it revoked (README, "The first five minutes"):
  $bin/send-test-event checkout.session.completed --user u_1
  TOKEN=\$($bin/processor dev-token --user u_1)
  curl -s -H "Authorization: Bearer \$TOKEN" http://${API_ADDR:-127.0.0.1:8081}/api/pro/entitlement
  $bin/send-test-event charge.refunded --user u_1
  curl -s -H "Authorization: Bearer \$TOKEN" http://${API_ADDR:-127.0.0.1:8081}/api/pro/entitlement
Each change is also published to the ${AMQP_TOPOLOGY_BASE:-stripe.events}.out exchange (routing key = type).
Forward real test-mode events with the Stripe CLI:
  stripe listen --forward-to http://${INGRESS_ADDR:-127.0.0.1:8080}/webhooks/stripe
  (then put the whsec_… it prints into STRIPE_WEBHOOK_SECRET in .env and rerun scripts/up.sh)
Stop everything: scripts/down.sh
MSG
