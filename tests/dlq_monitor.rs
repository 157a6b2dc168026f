//! The dead-letter alerting against the machine's RabbitMQ: the `dlq_depth` gauge follows the
//! queue, and attempts past the threshold are counted. One test per file: the metrics recorder
//! is process-wide.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use processor::dlq::monitor::{monitor, record_attempts};
use system_tests::amqp::TestBroker;
use system_tests::amqp_url;

/// Polls the rendered metrics until one line equals `line`.
async fn wait_for_metric(handle: &metrics_exporter_prometheus::PrometheusHandle, line: &str) {
    let started = Instant::now();
    while !handle.render().lines().any(|l| l == line) {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "metric line {line:?} never appeared in:\n{}",
            handle.render()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test]
async fn the_monitor_follows_the_dead_letter_depth_and_attempts_over_threshold_are_counted() {
    let handle = shared::telemetry::metrics_handle();
    let broker = TestBroker::new(vec![Duration::from_secs(1)]).await;
    let (topology, channel) = (&broker.topology, &broker.channel);

    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(monitor(
        amqp_url(),
        topology.clone(),
        3,
        Duration::from_millis(50),
        stopped,
    ));
    wait_for_metric(&handle, "dlq_depth 0").await;
    wait_for_metric(&handle, "events_attempts_threshold 3").await;

    for id in ["evt_a", "evt_b"] {
        let confirm = channel
            .basic_publish(
                "".into(),
                topology.dead_letter_queue().as_str().into(),
                BasicPublishOptions::default(),
                b"{}",
                BasicProperties::default().with_message_id(id.into()),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack());
    }
    wait_for_metric(&handle, "dlq_depth 2").await;

    assert!(!record_attempts("evt_a", 3, 3));
    assert!(record_attempts("evt_a", 4, 3));
    wait_for_metric(&handle, "events_attempts_over_threshold_total 1").await;

    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the monitor stops on shutdown")
        .unwrap();
}
