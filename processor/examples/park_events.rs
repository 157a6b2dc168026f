//! Parks events in a topology's dead-letter queue exactly as the consumer does after the last
//! retry, for the dead-letter benchmark (`bench/dlq.sh`): `checkout.session.completed` events of
//! about 2 KB (each for its own user, so a replay into a running processor applies every one),
//! with the original properties and the headers `attempts`, `last_error`, `first_seen_at`,
//! `dead_lettered_at` and `received_at`. Publishes with confirms, 256 in flight.
//!
//! `park_events --base bench.dlq --count 100000 --run r [--url amqp://…] [--index-url postgres://…]`;
//! event ids are `evt_{run}_{n}` for n in 0..count. With `--index-url`, each event is also
//! recorded in the dead-letter index once its publish is confirmed, as the consumer would with
//! the park-time call `processor::dlq::ParkedIndex::record`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use shared::amqp::Publisher;
use shared::samples::{self, Sample};
use shared::topology::Topology;
use tokio::sync::Semaphore;

/// Size the bodies are padded to, like a real checkout session with line items and metadata.
const BODY_BYTES: usize = 2048;

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, default_value = shared::amqp::DEFAULT_AMQP_URL)]
    url: String,
    /// Topology base name whose dead-letter queue is filled.
    #[arg(long, default_value = "bench.dlq")]
    base: String,
    #[arg(long, default_value_t = 100_000)]
    count: usize,
    /// Distinguishes the ids of one run from another's.
    #[arg(long, default_value = "r")]
    run: String,
    /// Record each parked event in the dead-letter index of this database.
    #[arg(long)]
    index_url: Option<String>,
}

fn text(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value))
}

#[tokio::main]
async fn main() {
    let Args {
        url,
        base,
        count,
        run,
        index_url,
    } = Args::parse();
    let topology = Topology::new(base, shared::config::parse_duration_list("5s,30s").unwrap());
    let (publisher, task) = Publisher::start(
        url,
        "park-events".into(),
        topology.clone(),
        Duration::from_secs(30),
    );
    assert!(
        publisher.wait_ready(Duration::from_secs(10)).await,
        "broker not reachable"
    );
    let queue = topology.dead_letter_queue();
    let index = match index_url {
        Some(url) => Some(Arc::new(
            processor::dlq::ParkedIndex::open(&url, &topology)
                .await
                .expect("dead-letter index"),
        )),
        None => None,
    };
    let limit = Arc::new(Semaphore::new(256));
    let mut handles = Vec::with_capacity(count);
    let now = chrono::Utc::now();
    for n in 0..count {
        let user = format!("u_{run}_{n}");
        let object = format!("{run}_{n}");
        let sample = Sample {
            user: &user,
            product: "pro",
            object: &object,
            amount: 1999,
            created: now.timestamp() - 3600,
            subscription: false,
        };
        let id = format!("evt_{run}_{n}");
        let event_type = "checkout.session.completed";
        let mut event = samples::event(&id, event_type, &sample);
        let size = serde_json::to_vec(&event).unwrap().len();
        event["bench_padding"] = "x".repeat(BODY_BYTES.saturating_sub(size + 20)).into();
        let body = serde_json::to_vec(&event).unwrap();
        let parked_at = (now - chrono::Duration::seconds(60)).to_rfc3339();
        let headers: BTreeMap<ShortString, AMQPValue> = [
            ("received_at", text(&parked_at)),
            ("first_seen_at", text(&parked_at)),
            (
                "last_error",
                text("projection failed: database unavailable"),
            ),
            ("dead_lettered_at", text(&parked_at)),
            ("attempts", AMQPValue::LongLongInt(6)),
        ]
        .into_iter()
        .map(|(k, v)| (ShortString::from(k), v))
        .collect();
        let props = BasicProperties::default()
            .with_message_id(id.as_str().into())
            .with_type(event_type.into())
            .with_content_type("application/json".into())
            .with_timestamp(u64::try_from(sample.created).unwrap())
            .with_headers(FieldTable::from(headers));
        let permit = Arc::clone(&limit).acquire_owned().await.unwrap();
        let (publisher, queue, index) = (publisher.clone(), queue.clone(), index.clone());
        handles.push(tokio::spawn(async move {
            // As published: the publisher sets delivery mode 2.
            let published = props.clone().with_delivery_mode(2);
            publisher
                .publish("", &queue, &body, props)
                .await
                .expect("confirmed publish");
            if let Some(index) = index {
                index.record(&body, &published).await.expect("indexed");
            }
            drop(permit);
        }));
    }
    for handle in handles {
        handle.await.unwrap();
    }
    task.shutdown().await;
    println!("parked {count} events in {queue}");
}
