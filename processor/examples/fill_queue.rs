//! Pre-fills a topology's main queue with a realistic mix of Stripe events for the processor
//! benchmark (`bench/processor.sh`): `shared::samples::mix_customer`, one-time purchases (some
//! refunded), subscriptions with invoices and updates, and event types the processor ignores.
//! Every event has its own id.
//!
//! `fill_queue --base bench.processor --count 50000 [--url amqp://…]`
#![allow(clippy::unwrap_used, clippy::expect_used)]

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
        let created = created0 + i64::try_from(k).unwrap();
        for event in samples::mix_customer(&run, k, created) {
            if produced == count {
                break;
            }
            let (id, event_type) = (
                event["id"].as_str().unwrap(),
                event["type"].as_str().unwrap(),
            );
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
}
