//! Pre-fills a topology's main queue with a realistic mix of Stripe events for the processor
//! benchmark (`bench/processor.sh`): `shared::samples::mix_customer`, one-time purchases (some
//! refunded), subscriptions with invoices and updates, and event types the processor ignores.
//! Every event has its own id.
//!
//! With `--offers-db`, the checkout sessions of the mix are recorded in that database's
//! `checkout_offers` as `POST /api/checkout/session` records them (one-time `pro` at
//! `price_pro`, subscriptions `pro_monthly` at `price_pro_monthly`), except every
//! `--foreign-every`-th customer's (the fifth of each ten by default): those are sessions created
//! elsewhere, whose line items the worker reads from Stripe.
//!
//! Prints `foreign_completions=N`: the queued events that complete a session created elsewhere
//! (their event ids are `evt_<run>_<customer>_<step>`, the customer `k` with
//! `k % foreign_every == 4 % foreign_every`).
//!
//! `fill_queue --base bench.processor --count 50000 [--url amqp://…] [--offers-db postgres://…]`
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/mix_offers.rs"]
mod mix_offers;

use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use lapin::BasicProperties;
use shared::amqp::Publisher;
use shared::samples;
use shared::topology::Topology;
use tokio::sync::Semaphore;

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, default_value = shared::amqp::DEFAULT_AMQP_URL)]
    url: String,
    /// Topology base name whose main queue is filled.
    #[arg(long, default_value = "bench.processor")]
    base: String,
    #[arg(long, default_value_t = 50_000)]
    count: usize,
    /// Distinguishes the ids of one run from another's.
    #[arg(long, default_value = "r")]
    run: String,
    /// Records the mix's own checkout sessions in this database's `checkout_offers`.
    #[arg(long)]
    offers_db: Option<String>,
    /// One customer in this many buys through a session created elsewhere (0: none).
    #[arg(long, default_value_t = 10)]
    foreign_every: usize,
}

#[tokio::main]
async fn main() {
    let Args {
        url,
        base,
        count,
        run,
        offers_db,
        foreign_every,
    } = Args::parse();

    let topology = Topology::new(base, shared::config::parse_duration_list("5s,30s").unwrap());
    let (publisher, task) = Publisher::start(
        url,
        "fill-queue".into(),
        topology.clone(),
        Duration::from_secs(30),
    );
    assert!(
        publisher.wait_ready(Duration::from_secs(10)).await,
        "broker not reachable"
    );

    let limit = Arc::new(Semaphore::new(256));
    let mut handles = Vec::with_capacity(count);
    let created0 = chrono::Utc::now().timestamp() - 86_400;
    let (mut produced, mut k, mut foreign_completions) = (0usize, 0usize, 0usize);
    while produced < count {
        let created = created0 + i64::try_from(k).unwrap();
        for event in samples::mix_customer(&run, k, created) {
            if produced == count {
                break;
            }
            let (id, event_type) = (
                event["id"].as_str().unwrap(),
                event["type"].as_str().unwrap(),
            );
            let completes = matches!(
                event_type,
                "checkout.session.completed" | "checkout.session.async_payment_succeeded"
            );
            if offers_db.is_some() && completes && samples::mix_foreign(k, foreign_every) {
                foreign_completions += 1;
            }
            let props = BasicProperties::default()
                .with_message_id(id.into())
                .with_type(event_type.into())
                .with_content_type("application/json".into())
                .with_timestamp(u64::try_from(event["created"].as_i64().unwrap()).unwrap());
            let body = serde_json::to_vec(&event).unwrap();
            let permit = Arc::clone(&limit).acquire_owned().await.unwrap();
            let (publisher, exchange, routing) = (
                publisher.clone(),
                topology.exchange().to_owned(),
                event_type.to_owned(),
            );
            handles.push(tokio::spawn(async move {
                publisher
                    .publish(&exchange, &routing, &body, props)
                    .await
                    .expect("confirmed publish");
                drop(permit);
            }));
            produced += 1;
        }
        k += 1;
    }
    for handle in handles {
        handle.await.unwrap();
    }
    task.shutdown().await;
    println!("filled {count} events for {k} customers");
    if let Some(db) = offers_db {
        let recorded = mix_offers::record(&db, &run, k, foreign_every).await;
        let sessions = (0..k)
            .filter(|&k| samples::mix_scenario(k).contains(&"checkout.session.completed"))
            .count();
        println!(
            "recorded {recorded} own checkout sessions of {sessions} (the others created elsewhere)"
        );
        println!("foreign_completions={foreign_completions}");
    }
}
