//! The broker's own limit for the ingress benchmark: a plain lapin program publishing the same
//! persistent messages to the same quorum queue, with `--inflight` confirms pipelined over
//! `--channels` channels of one connection (one by default, as ingress). Prints one line:
//! `broker_limit msgs_per_sec=… p50_ms=… p99_ms=…`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use shared::topology::Topology;

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, default_value = ingress::DEFAULT_AMQP_URL)]
    url: String,
    /// Topology base name (a throwaway one: it is deleted at the end).
    #[arg(long, default_value = "bench.broker")]
    base: String,
    #[arg(long, default_value_t = 15)]
    seconds: u64,
    /// Confirms in flight, over all channels.
    #[arg(long, default_value_t = 64)]
    inflight: usize,
    /// Confirm-mode channels the publishers take turns on (ingress publishes on one; more were
    /// measured and did not raise either limit, see BENCHMARKS.md).
    #[arg(long, default_value_t = 1)]
    channels: usize,
    /// Message size in bytes.
    #[arg(long, default_value_t = 2048)]
    size: usize,
}

#[tokio::main]
async fn main() {
    let Args {
        url,
        base,
        seconds,
        inflight,
        channels,
        size,
    } = Args::parse();

    let topology = Topology::new(base, vec![Duration::from_secs(5)]);
    let connection = Connection::connect(&url, ConnectionProperties::default())
        .await
        .expect("connect");
    let mut pool = Vec::new();
    for _ in 0..channels.max(1) {
        let channel = connection.create_channel().await.unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        pool.push(channel);
    }
    topology.declare(&pool[0]).await.unwrap();
    let body: Arc<Vec<u8>> = Arc::new(vec![b'x'; size]);
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for i in 0..inflight {
        let (channel, body, stop, exchange) = (
            pool[i % pool.len()].clone(),
            Arc::clone(&body),
            Arc::clone(&stop),
            topology.exchange().to_owned(),
        );
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let confirm = channel
                    .basic_publish(
                        exchange.as_str().into(),
                        "checkout.session.completed".into(),
                        BasicPublishOptions {
                            mandatory: true,
                            ..BasicPublishOptions::default()
                        },
                        &body,
                        BasicProperties::default()
                            .with_delivery_mode(2)
                            .with_message_id("evt_bench".into()),
                    )
                    .await
                    .unwrap()
                    .await
                    .unwrap();
                assert!(confirm.is_ack());
                latencies.push(started.elapsed());
            }
            latencies
        }));
    }
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort();
    #[allow(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss
    )]
    let pct = |p: f64| all[((all.len() as f64 - 1.0) * p) as usize].as_secs_f64() * 1000.0;
    #[allow(clippy::cast_precision_loss)]
    let rate = all.len() as f64 / elapsed;
    println!(
        "broker_limit msgs_per_sec={rate:.0} p50_ms={:.2} p99_ms={:.2} messages={}",
        pct(0.50),
        pct(0.99),
        all.len()
    );
    topology.delete(&pool[0]).await.unwrap();
}
