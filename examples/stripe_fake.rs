//! The Stripe-shaped fake of the system tests as a process of its own, for the benchmarks:
//! every answer waits `--latency-ms` (Stripe's API from a data centre takes 100–400 ms), and
//! the line items of a session it does not hold are one item at `--unknown-session-price`, as
//! for a Payment Link's or the Dashboard's sessions.
//!
//! Prints `STRIPE_API_BASE=…` and `STRIPE_SECRET_KEY=…` on two lines, then serves until SIGTERM
//! or Ctrl-C, when it prints `stripe_requests=N`, `stripe_requests{path}=N` per path, and
//! `stripe_line_item_reads_of_created_sessions=N` (reads of sessions it created itself).
//!
//! SIGUSR1 starts an outage (every answer 500, `Stripe-Should-Retry: true`), SIGUSR2 ends it.
//!
//! `stripe_fake [--latency-ms 150] [--unknown-session-price price_pro]`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::io::Write as _;
use std::time::Duration;

use system_tests::stripe_fake::{FakeStripe, Fault};

#[tokio::main]
async fn main() {
    let mut latency_ms = 150_u64;
    let mut price = "price_pro".to_owned();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--latency-ms" => {
                latency_ms = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--latency-ms N")
            }
            "--unknown-session-price" => {
                price = args.next().expect("--unknown-session-price PRICE")
            }
            other => panic!("unknown argument {other}"),
        }
    }
    let fake = std::sync::Arc::new(FakeStripe::start().await);
    fake.set_latency(Duration::from_millis(latency_ms));
    fake.sell_unknown_sessions_at(&price);
    println!("STRIPE_API_BASE={}", fake.base_url());
    println!("STRIPE_SECRET_KEY={}", fake.secret_key());
    std::io::stdout().flush().unwrap();
    // SIGUSR1: an outage begins (every answer 500 `api_error`, `Stripe-Should-Retry: true`);
    // SIGUSR2: it ends.
    let outages = {
        let fake = std::sync::Arc::clone(&fake);
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let (mut begin, mut end) = (
                signal(SignalKind::user_defined1()).unwrap(),
                signal(SignalKind::user_defined2()).unwrap(),
            );
            loop {
                tokio::select! {
                    _ = begin.recv() => fake.inject(Fault::ServerErrorShouldRetry, 1_000_000),
                    _ = end.recv() => fake.clear_faults(),
                }
            }
        })
    };
    shared::shutdown_signal().await;
    outages.abort();
    let requests = fake.requests();
    let mut by_path: BTreeMap<String, usize> = BTreeMap::new();
    for request in &requests {
        // Ids out of the path: one line per endpoint.
        let path: Vec<&str> = request
            .path
            .split('/')
            .map(|part| {
                let id = part.contains('_') && part.bytes().any(|b| b.is_ascii_digit());
                if id { "{id}" } else { part }
            })
            .collect();
        *by_path.entry(path.join("/")).or_default() += 1;
    }
    // Line items read of the sessions this fake created (through `POST /v1/checkout/sessions`,
    // as the service's checkouts are): the service should never need them.
    let created_sessions_read = requests
        .iter()
        .filter(|r| {
            r.path.starts_with("/v1/checkout/sessions/cs_test") && r.path.ends_with("/line_items")
        })
        .count();
    println!("stripe_requests={}", requests.len());
    println!("stripe_line_item_reads_of_created_sessions={created_sessions_read}");
    for (path, n) in by_path {
        println!("stripe_requests{{path=\"{path}\"}}={n}");
    }
}
