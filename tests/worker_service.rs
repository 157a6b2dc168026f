//! The long-running service: consumer plus the operational HTTP routes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use system_tests::unique;
use system_tests::worker::*;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Runs the whole service (consumer and HTTP) on an ephemeral port: its base URL, the switch
/// that stops it, and its task.
async fn start_service(
    config: processor::config::Config,
) -> (String, oneshot::Sender<()>, JoinHandle<anyhow::Result<()>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = oneshot::channel::<()>();
    let service = tokio::spawn(processor::cli::serve(
        config,
        listener,
        async move {
            let _ = stopped.await;
        },
        true,
    ));
    (base, stop, service)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_consumes_and_answers_health_readiness_and_metrics() {
    let setup = Setup::new(&[200]).await;
    let direct = pg(&setup.db.url).await;
    let (base, stop, service) = start_service(config(&setup.db.url, &setup.broker)).await;

    let (event, user) = (unique("evt"), unique("u"));
    publish_event(&setup.broker, &event, &user).await;
    wait_processed(&direct, &event).await;

    let http = reqwest::Client::new();
    let health = http.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let ready = system_tests::eventually(WAIT, "ready", || async {
        let response = http.get(format!("{base}/readyz")).send().await.ok()?;
        (response.status() == 200).then_some(response)
    })
    .await;
    let body: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(
        body,
        serde_json::json!({"postgres": "ok", "redis": "ok", "broker": "ok"})
    );
    let metrics = system_tests::eventually(WAIT, "queue depths sampled", || async {
        let text = http
            .get(format!("{base}/metrics"))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.contains("queue_depth").then_some(text)
    })
    .await;
    for name in [
        "events_total",
        "event_processing_seconds",
        "worker_batch_size",
    ] {
        assert!(metrics.contains(name), "{name} missing:\n{metrics}");
    }
    assert!(metrics.contains(&setup.broker.topology.main_queue()));

    stop.send(()).unwrap();
    service.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_event_raises_the_dead_letter_gauge_until_it_is_drained() {
    let setup = Setup::new(&[200]).await;
    let mut config = config(&setup.db.url, &setup.broker);
    config.queue_depth_interval = std::time::Duration::from_millis(200);
    let (base, stop, service) = start_service(config).await;
    let http = reqwest::Client::new();
    let gauge = |expected: &'static str| {
        let http = http.clone();
        let url = format!("{base}/metrics");
        async move {
            let text = http.get(&url).send().await.ok()?.text().await.ok()?;
            text.lines()
                .any(|l| l.starts_with("dlq_depth ") && l.ends_with(expected))
                .then_some(())
        }
    };
    system_tests::eventually(WAIT, "dlq_depth 0 while nothing is parked", || gauge(" 0")).await;

    let dlq = setup.broker.topology.dead_letter_queue();
    setup
        .broker
        .channel
        .basic_publish(
            "".into(),
            dlq.as_str().into(),
            lapin::options::BasicPublishOptions::default(),
            br#"{"id":"evt_parked","type":"x.y"}"#,
            lapin::BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    system_tests::eventually(WAIT, "dlq_depth 1 once an event is parked", || gauge(" 1")).await;

    assert!(setup.broker.get(&dlq).await.is_some());
    system_tests::eventually(WAIT, "dlq_depth back to 0 after draining", || gauge(" 0")).await;

    stop.send(()).unwrap();
    service.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_listener_cuts_stalled_heads_caps_connections_and_serves_metrics_apart() {
    use std::time::{Duration, Instant};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let setup = Setup::new(&[200]).await;
    let mut config = config(&setup.db.url, &setup.broker);
    config.api_limits.header_read_timeout = Duration::from_millis(500);
    config.api_limits.max_connections = 2;
    let metrics_port = system_tests::servers::free_port();
    config.metrics_addr = Some(([127, 0, 0, 1], metrics_port).into());
    let metrics_url = format!("http://{}/metrics", config.metrics_addr.unwrap());
    let (base, stop, service) = start_service(config).await;
    let addr = base.trim_start_matches("http://").to_owned();
    let http = reqwest::Client::new();
    system_tests::eventually(WAIT, "metrics on their own address", || async {
        let response = http.get(&metrics_url).send().await.ok()?;
        (response.status() == 200).then_some(())
    })
    .await;
    let on_api = http.get(format!("{base}/metrics")).send().await.unwrap();
    assert_eq!(on_api.status(), 404);

    // Two stalled heads take both connection slots: a third connection is refused with 503.
    let mut stalled = Vec::new();
    for _ in 0..2 {
        let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHo")
            .await
            .unwrap();
        stalled.push(stream);
    }
    let mut third = tokio::net::TcpStream::connect(&addr).await.unwrap();
    third
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    third.read_to_end(&mut answer).await.unwrap();
    assert!(
        answer.starts_with(b"HTTP/1.1 503"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    // The stalled ones are cut off after the header read timeout, freeing their slots.
    let started = Instant::now();
    for mut stream in stalled {
        let mut sink = Vec::new();
        let _ = stream.read_to_end(&mut sink).await;
    }
    assert!(started.elapsed() < Duration::from_secs(3));
    // A new connection is served (not the client's pooled one, which the server may have
    // closed while its slots were full).
    let fresh = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let health = fresh.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);

    stop.send(()).unwrap();
    service.await.unwrap().unwrap();
}
