//! Pre-fills a topology's main queue with a realistic mix of Stripe events for the processor
//! benchmark (`bench/processor.sh`): one-time purchases (some refunded), subscriptions with
//! invoices and updates, and event types the processor ignores. Every event has its own id.
//!
//! `fill_queue --base bench.processor --count 50000 [--url amqp://…]`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use lapin::BasicProperties;
use shared::amqp::Publisher;
use shared::samples::{self, Sample};
use shared::topology::Topology;
use tokio::sync::Semaphore;

/// The events of one simulated customer, in the order Stripe typically sends them.
fn scenario(k: usize) -> &'static [&'static str] {
    match k % 10 {
        0..=4 => &["checkout.session.completed", "payment_intent.succeeded"],
        5 => &[
            "checkout.session.completed",
            "payment_intent.succeeded",
            "charge.refunded",
        ],
        6..=8 => &[
            "customer.subscription.created",
            "checkout.session.completed",
            "invoice.paid",
            "customer.subscription.updated",
        ],
        _ => &["customer.updated", "product.created"],
    }
}

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
}

#[tokio::main]
async fn main() {
    let Args {
        url,
        base,
        count,
        run,
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
    let (mut produced, mut k) = (0usize, 0usize);
    while produced < count {
        for (step, event_type) in scenario(k).iter().enumerate() {
            if produced == count {
                break;
            }
            let user = format!("u_{run}_{k}");
            let object = format!("{run}_{k}");
            let sample = Sample {
                user: &user,
                product: if k % 10 >= 6 { "pro_monthly" } else { "pro" },
                object: &object,
                amount: 1999,
                created: created0 + i64::try_from(k + step).unwrap(),
                subscription: (6..=8).contains(&(k % 10)),
            };
            let id = format!("evt_{run}_{produced}");
            let body = serde_json::to_vec(&samples::event(&id, event_type, &sample)).unwrap();
            let props = BasicProperties::default()
                .with_message_id(id.as_str().into())
                .with_type((*event_type).into())
                .with_content_type("application/json".into())
                .with_timestamp(u64::try_from(sample.created).unwrap());
            let permit = Arc::clone(&limit).acquire_owned().await.unwrap();
            let (publisher, exchange, routing) = (
                publisher.clone(),
                topology.exchange().to_owned(),
                (*event_type).to_owned(),
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
}
