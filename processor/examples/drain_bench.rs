//! Drain benchmark: pre-fills an isolated queue with mixed Stripe events, drains it with the
//! consumer, and reports events per second next to `pgbench -N -c 8 -j 2` on the same server,
//! plus the process's resident memory while draining.
//!
//! ```text
//! cargo run --release -p processor --example drain_bench -- [EVENTS] [PGBENCH_SECONDS]
//! ```
//!
//! Uses `BENCH_DATABASE_SERVER` (default `postgres://postgres@127.0.0.1:5432`), `AMQP_URL` and
//! `REDIS_URL` (contract defaults); `PROCESSOR_PREFETCH` applies to the worker. Creates a scratch database and topology of its own and
//! removes them afterwards; it never touches the contract's queues.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::BasicProperties;
use processor::config::Config;
use shared::amqp::Publisher;
use shared::config::Env;
use shared::topology::Topology;
use tokio::sync::Semaphore;

const USERS: usize = 5_000;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1).peekable();
    if args.peek().map(String::as_str) == Some("--worker") {
        // Child mode: only the consumer runs in this process, so its RSS is the processor's.
        let base = args.nth(1).expect("topology base");
        let database_url = args.next().expect("database url");
        let config = bench_config(&base, &database_url)?;
        shared::telemetry::init_tracing(config.log_format, "warn");
        processor::run_worker(config, shared::shutdown_signal()).await?;
        return Ok(());
    }
    let events: usize = args.next().map_or(Ok(50_000), |a| a.parse())?;
    let pgbench_seconds: u64 = args.next().map_or(Ok(20), |a| a.parse())?;
    let server = std::env::var("BENCH_DATABASE_SERVER")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let database = format!("bench_drain_{}", &tag[..12]);
    let database_url = format!("{server}/{database}");

    let base = format!("bench.stripe.events.{}", &tag[..12]);
    let config = bench_config(&base, &database_url)?;

    let distinct = prefill(&config, events).await?;
    println!("queue pre-filled: {events} deliveries, {distinct} distinct events");

    let pool = processor::db::pool(&config)?;
    processor::db::prepare(&config, &pool).await?;
    let started = Instant::now();
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .args(["--worker", &base, &database_url])
        .kill_on_drop(true)
        .spawn()?;
    let pid = child.id().expect("child pid");
    let client = pool.get().await?;
    let mut samples: Vec<(u64, i64, u64)> = Vec::new();
    let mut peak = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let rss = rss_kib(pid);
        peak = peak.max(rss);
        let done: i64 = client
            .query_one("SELECT count(*) FROM processed_events", &[])
            .await?
            .get(0);
        let second = started.elapsed().as_secs();
        if samples.last().is_none_or(|(s, _, _)| *s < second) {
            samples.push((second, done, rss));
        }
        if usize::try_from(done)? >= distinct {
            break;
        }
        anyhow::ensure!(child.try_wait()?.is_none(), "the worker exited early");
    }
    let elapsed = started.elapsed();
    // Leave the queue drained: the last acks follow the last commit by a few milliseconds.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_end = rss_kib(pid);
    drop(client);
    tokio::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .await?;
    let status = child.wait().await?;
    anyhow::ensure!(status.success(), "worker exited with {status}");

    println!("RSS over time (s, committed, KiB):");
    for (s, done, rss) in &samples {
        println!("  {s:>4} {done:>7} {rss:>8}");
    }
    let rate = events as f64 / elapsed.as_secs_f64();
    println!(
        "drained {events} deliveries in {:.2}s: {rate:.0} events/s",
        elapsed.as_secs_f64()
    );
    println!(
        "processor RSS: peak {} MiB, after draining {} MiB",
        peak / 1024,
        rss_end / 1024
    );

    cleanup(&config, &server, &database).await;
    match pgbench(&server, &tag, pgbench_seconds).await {
        Ok(tps) => println!(
            "pgbench -N -c 8 -j 2 -T {pgbench_seconds}: {tps:.0} tps; drain/pgbench = {:.2}x",
            rate / tps
        ),
        Err(error) => println!("pgbench failed: {error:#}"),
    }
    Ok(())
}

fn bench_config(base: &str, database_url: &str) -> anyhow::Result<Config> {
    let mut config = Config::from_env(&Env::load())?;
    config.database_url = database_url.to_owned();
    config.topology = Topology::new(base, vec![Duration::from_secs(5), Duration::from_secs(30)]);
    config.queue_depth_interval = Duration::from_secs(2);
    Ok(config)
}

/// Publishes `events` deliveries with confirms, many in flight: 90 % checkout completions for
/// `USERS` users, 5 % an ignored type, 5 % duplicates of earlier events. Returns the number of
/// distinct event ids.
async fn prefill(config: &Config, events: usize) -> anyhow::Result<usize> {
    let (publisher, task) = Publisher::start(
        config.amqp_url.clone(),
        "bench-prefill".into(),
        config.topology.clone(),
        Duration::from_secs(30),
    );
    anyhow::ensure!(
        publisher.wait_ready(Duration::from_secs(10)).await,
        "broker not ready"
    );
    let in_flight = Arc::new(Semaphore::new(512));
    let mut handles = Vec::with_capacity(events);
    let mut ids: Vec<(String, usize, &'static str)> = Vec::with_capacity(events);
    let mut distinct = 0;
    for n in 0..events {
        let (id, body, kind) = if n % 20 == 19 && !ids.is_empty() {
            // A duplicate: the same id and body as an earlier event.
            let (id, first_n, kind) = ids[(n * 7919) % ids.len()].clone();
            let body = event_body(&id, first_n, kind);
            (id, body, kind)
        } else {
            let id = format!(
                "evt_bench_{}_{n}",
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            );
            distinct += 1;
            let kind = if n % 20 == 7 {
                "customer.created"
            } else {
                "checkout.session.completed"
            };
            ids.push((id.clone(), n, kind));
            let body = event_body(&id, n, kind);
            (id, body, kind)
        };
        let permit = Arc::clone(&in_flight).acquire_owned().await?;
        let publisher = publisher.clone();
        let exchange = config.topology.exchange().to_owned();
        handles.push(tokio::spawn(async move {
            let properties = BasicProperties::default()
                .with_message_id(id.as_str().into())
                .with_type(kind.into());
            let result = publisher
                .publish(&exchange, "bench", &body, properties)
                .await;
            drop(permit);
            result
        }));
    }
    for handle in handles {
        handle.await??;
    }
    task.shutdown().await;
    Ok(distinct)
}

fn event_body(id: &str, n: usize, kind: &str) -> Vec<u8> {
    // Duplicates reuse the id and get the same user back from it.
    let user_index = id.bytes().fold(0usize, |h, b| {
        h.wrapping_mul(31).wrapping_add(usize::from(b))
    }) % USERS;
    let user = format!("bench_user_{user_index}");
    serde_json::json!({
        "id": id,
        "object": "event",
        "type": kind,
        "created": 1_763_900_000 + n,
        "data": {"object": {
            "id": format!("cs_bench_{id}"),
            "object": if kind == "customer.created" { "customer" } else { "checkout.session" },
            "mode": "payment",
            "status": "complete",
            "payment_status": "paid",
            "client_reference_id": if kind == "customer.created" { None } else { Some(&user) },
            "customer": format!("cus_{user}"),
            "payment_intent": format!("pi_bench_{id}"),
            "amount_total": 4900,
            "currency": "usd",
            "metadata": {"product_key": "pro"},
        }},
    })
    .to_string()
    .into_bytes()
}

/// Resident set size of process `pid`, in KiB (0 where /proc is unavailable).
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

async fn cleanup(config: &Config, server: &str, database: &str) {
    if let Ok(connection) = shared::amqp::connect(&config.amqp_url, "bench-cleanup").await {
        if let Ok(channel) = connection.create_channel().await {
            let _ = config.topology.delete(&channel).await;
        }
        let _ = connection.close(200, "done".into()).await;
    }
    let _ = admin(
        server,
        &format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)"),
    )
    .await;
    // The bench users' cache entries and dedupe markers expire on their own; remove them now.
    if let Ok(client) = redis::Client::open(config.redis_url.as_str())
        && let Ok(mut c) = client.get_multiplexed_async_connection().await
    {
        {
            let mut keys = Vec::new();
            for pattern in ["dedupe:v1:evt_bench_*", "entitlements:v1:bench_user_*"] {
                let mut cursor = 0u64;
                loop {
                    let (next, page_keys): (u64, Vec<String>) = match redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(pattern)
                        .arg("COUNT")
                        .arg(1000)
                        .query_async(&mut c)
                        .await
                    {
                        Ok(page) => page,
                        Err(_) => break,
                    };
                    keys.extend(page_keys);
                    if next == 0 {
                        break;
                    }
                    cursor = next;
                }
            }
            for chunk in keys.chunks(1000) {
                let _: Result<i64, _> = redis::cmd("DEL").arg(chunk).query_async(&mut c).await;
            }
        }
    }
}

async fn admin(server: &str, sql: &str) -> anyhow::Result<()> {
    let (client, connection) =
        tokio_postgres::connect(&format!("{server}/postgres"), tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    client.batch_execute(sql).await?;
    Ok(())
}

/// `pgbench -i` into a scratch database, then `pgbench -N -c 8 -j 2 -T seconds`; returns TPS.
async fn pgbench(server: &str, tag: &str, seconds: u64) -> anyhow::Result<f64> {
    let database = format!("bench_pgbench_{}", &tag[..12]);
    admin(server, &format!("CREATE DATABASE {database}")).await?;
    let url = format!("{server}/{database}");
    let result = async {
        let init = tokio::process::Command::new("pgbench")
            .args(["-i", "-q", &url])
            .output()
            .await?;
        anyhow::ensure!(
            init.status.success(),
            "pgbench -i: {}",
            String::from_utf8_lossy(&init.stderr)
        );
        let run = tokio::process::Command::new("pgbench")
            .args(["-N", "-c", "8", "-j", "2", "-T", &seconds.to_string(), &url])
            .output()
            .await?;
        anyhow::ensure!(
            run.status.success(),
            "pgbench: {}",
            String::from_utf8_lossy(&run.stderr)
        );
        let out = String::from_utf8_lossy(&run.stdout);
        out.lines()
            .find_map(|l| {
                l.strip_prefix("tps = ")
                    .and_then(|rest| rest.split_whitespace().next())
                    .and_then(|v| v.parse().ok())
            })
            .ok_or_else(|| anyhow::anyhow!("no tps in pgbench output:\n{out}"))
    }
    .await;
    let _ = admin(
        server,
        &format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)"),
    )
    .await;
    result
}
