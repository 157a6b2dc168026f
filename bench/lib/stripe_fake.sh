# Sourced by the benchmarks that run as production does, with a Stripe key: starts the
# Stripe-shaped fake (examples/stripe_fake.rs) answering in STRIPE_LATENCY_MS (default 150),
# exports STRIPE_API_BASE, STRIPE_SECRET_KEY and STRIPE_MAX_REQUESTS_PER_SECOND (default 100,
# live mode's limit), and the registry the mix's checkouts are sold from (pro at price_pro,
# pro_monthly at price_pro_monthly). Needs $bin and $work; sets FAKE_PID. stop_stripe_fake
# stops it and prints its request counts (`stripe_…=N` lines, also left in $work/stripe.out).
start_stripe_fake() {
  cargo build --release -q -p system-tests --example stripe_fake
  "$bin/examples/stripe_fake" --latency-ms "${STRIPE_LATENCY_MS:-150}" \
    --unknown-session-price price_pro >"$work/stripe.out" 2>"$work/stripe.err" &
  FAKE_PID=$!
  for _ in $(seq 1 50); do grep -q STRIPE_SECRET_KEY "$work/stripe.out" && break; sleep 0.1; done
  export $(grep -E '^STRIPE_(API_BASE|SECRET_KEY)=' "$work/stripe.out" | xargs)
  export STRIPE_MAX_REQUESTS_PER_SECOND=${STRIPE_MAX_REQUESTS_PER_SECOND:-100}
  printf '[products.pro_monthly]\nprice = "price_pro_monthly"\nmode = "subscription"\nentitlement = "pro"\n' \
    >"$work/catalog.toml"
  export STRIPE_PRICE_PRO_LIFETIME=price_pro CATALOG_FILE=$work/catalog.toml
  echo "== Stripe: the fake at ${STRIPE_LATENCY_MS:-150} ms, budget ${STRIPE_MAX_REQUESTS_PER_SECOND}/s, one customer in ${FOREIGN_EVERY:-10} foreign"
}

stop_stripe_fake() {
  kill -TERM "$FAKE_PID"; wait "$FAKE_PID" 2>/dev/null || true; FAKE_PID=
  grep '^stripe_' "$work/stripe.out" || true
}
