//! The long-running service: consumer plus the operational HTTP routes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod worker_common;

use system_tests::unique;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use worker_common::*;

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
    setup.cleanup().await;
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
    setup.cleanup().await;
}
