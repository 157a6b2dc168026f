//! Failures: transient ones are retried through the delay queues until the dependency is back,
//! permanent ones are parked at once, and retries end in the dead-letter queue with the count.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use lapin::types::AMQPValue;
use shared::topology::headers;
use system_tests::chaos::ChaosProxy;
use system_tests::unique;
use system_tests::worker::*;

fn header<'a>(message: &'a lapin::message::BasicGetMessage, name: &str) -> Option<&'a AMQPValue> {
    message
        .delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(name))
}

fn header_int(message: &lapin::message::BasicGetMessage, name: &str) -> Option<i64> {
    match header(message, name)? {
        AMQPValue::LongLongInt(v) => Some(*v),
        AMQPValue::LongInt(v) => Some(i64::from(*v)),
        _ => None,
    }
}

fn header_str(message: &lapin::message::BasicGetMessage, name: &str) -> Option<String> {
    match header(message, name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        _ => None,
    }
}

fn proxied_url(proxy: &ChaosProxy, database: &str) -> String {
    format!("postgres://postgres@{}/{database}", proxy.addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_outage_longer_than_every_retry_parks_nothing_and_applies_everything() {
    // The whole retry schedule (0.6 s) is over long before the outage (several seconds) ends.
    let setup = Setup::new(&[100, 200, 300]).await;
    let proxy = ChaosProxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let direct = pg(&setup.db.url).await;
    let worker = spawn_worker(config(&proxied_url(&proxy, &setup.db.name), &setup.broker));
    wait_consumers(&setup.broker, 1).await;

    proxy.break_all();
    let user = unique("u");
    let events: Vec<String> = (0..40).map(|_| unique("evt")).collect();
    for (i, event) in events.iter().enumerate() {
        publish_event(&setup.broker, event, &user).await;
        if i % 10 == 9 {
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
    }
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let topology = setup.broker.topology.clone();
    assert_eq!(setup.broker.dead_letter_depth().await, 0, "nothing parked");
    for n in 1..=topology.retry_delays().len() {
        assert_eq!(
            setup.broker.depth(&topology.retry_queue(n)).await,
            0,
            "an outage spends no retry"
        );
    }

    proxy.restore();
    for event in &events {
        wait_processed(&direct, event).await;
    }
    wait_depth(&setup.broker, &topology.main_queue(), 0).await;
    worker.stop().await;
    assert_eq!(version(&direct, &user).await, 40);
    assert_eq!(setup.broker.dead_letter_depth().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_that_can_never_parse_go_straight_to_the_dead_letter_queue_with_headers() {
    let setup = Setup::new(&[200, 400]).await;
    let direct = pg(&setup.db.url).await;
    let worker = spawn_worker(config(&setup.db.url, &setup.broker));
    wait_consumers(&setup.broker, 1).await;

    let not_json = b"this is not json".to_vec();
    let missing_type = br#"{"id":"evt_missing_type","created":1700000000}"#.to_vec();
    publish(&setup.broker, &not_json, "evt_not_json", "unknown").await;
    publish(&setup.broker, &missing_type, "evt_missing_type", "unknown").await;

    let topology = setup.broker.topology.clone();
    wait_depth(&setup.broker, &topology.dead_letter_queue(), 2).await;
    worker.stop().await;
    for n in 1..=topology.retry_delays().len() {
        assert_eq!(setup.broker.depth(&topology.retry_queue(n)).await, 0);
    }

    let mut bodies = Vec::new();
    while let Some(parked) = setup.broker.get(&topology.dead_letter_queue()).await {
        assert_eq!(header_int(&parked, headers::ATTEMPTS), Some(0));
        let last_error = header_str(&parked, headers::LAST_ERROR).expect("last_error");
        assert!(last_error.starts_with("invalid event"), "{last_error}");
        assert!(last_error.len() <= 200);
        for name in [headers::FIRST_SEEN_AT, headers::DEAD_LETTERED_AT] {
            let at = header_str(&parked, name).expect(name);
            assert!(
                chrono::DateTime::parse_from_rfc3339(&at).is_ok(),
                "{name}={at}"
            );
        }
        assert!(
            header_str(&parked, "received_at").is_some(),
            "original headers kept"
        );
        let props = &parked.delivery.properties;
        let message_id = props.message_id().as_ref().unwrap().to_string();
        assert_eq!(props.kind().as_ref().unwrap().as_str(), "unknown");
        assert!(props.timestamp().is_some());
        bodies.push((message_id, parked.delivery.data.clone()));
    }
    bodies.sort();
    assert_eq!(
        bodies,
        vec![
            ("evt_missing_type".to_owned(), missing_type),
            ("evt_not_json".to_owned(), not_json)
        ]
    );
    assert_eq!(processed_total(&direct).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_that_exhausts_its_retries_is_dead_lettered_with_the_number_of_retries() {
    let setup = Setup::new(&[100, 200]).await;
    let direct = pg(&setup.db.url).await;
    let worker = spawn_worker(config(&setup.db.url, &setup.broker));
    wait_consumers(&setup.broker, 1).await;

    // A purchase the database keeps refusing (neither an outage nor refused data).
    let user = unique("u");
    refuse_purchases_of(&direct, &user).await;
    let event = unique("evt");
    let body = checkout_completed(&event, &user);
    publish(&setup.broker, &body, &event, "checkout.session.completed").await;

    let dlq = setup.broker.topology.dead_letter_queue();
    wait_depth(&setup.broker, &dlq, 1).await;
    worker.stop().await;
    let parked = setup.broker.get(&dlq).await.expect("parked event");
    assert_eq!(header_int(&parked, headers::ATTEMPTS), Some(2));
    let last_error = header_str(&parked, headers::LAST_ERROR).expect("last_error");
    assert!(last_error.starts_with("database error"), "{last_error}");
    assert!(header_str(&parked, headers::FIRST_SEEN_AT).is_some());
    assert!(header_str(&parked, headers::DEAD_LETTERED_AT).is_some());
    assert_eq!(parked.delivery.data, body);
    assert_eq!(
        parked
            .delivery
            .properties
            .message_id()
            .as_ref()
            .unwrap()
            .as_str(),
        event
    );
    assert_eq!(processed_rows(&direct, &event).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_reconnects_when_the_broker_goes_away() {
    let setup = Setup::new(&[200, 400]).await;
    let proxy = ChaosProxy::start("127.0.0.1:5672".parse().unwrap()).await;
    let direct = pg(&setup.db.url).await;
    let mut config = config(&setup.db.url, &setup.broker);
    config.amqp_url = proxy.amqp_url();
    let worker = spawn_worker(config);
    wait_consumers(&setup.broker, 1).await;
    let (before, user) = (unique("evt"), unique("u"));
    publish_event(&setup.broker, &before, &user).await;
    wait_processed(&direct, &before).await;

    proxy.break_all();
    let during = unique("evt");
    publish_event(&setup.broker, &during, &user).await;
    proxy.restore();
    wait_processed(&direct, &during).await;
    wait_depth(&setup.broker, &setup.broker.topology.main_queue(), 0).await;
    worker.stop().await;
    assert_eq!(version(&direct, &user).await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_started_before_postgres_is_reachable_waits_for_it() {
    let setup = Setup::new(&[200, 400]).await;
    let proxy = ChaosProxy::start("127.0.0.1:5432".parse().unwrap()).await;
    proxy.break_all();
    let direct = pg(&setup.db.url).await;
    let worker = spawn_worker(config(&proxied_url(&proxy, &setup.db.name), &setup.broker));
    let (event, user) = (unique("evt"), unique("u"));
    publish_event(&setup.broker, &event, &user).await;
    // Still unreachable: nothing is migrated or consumed yet.
    assert_eq!(processed_rows(&direct, &event).await, 0);
    proxy.restore();
    wait_processed(&direct, &event).await;
    worker.stop().await;
    assert_eq!(version(&direct, &user).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_refused_event_in_a_batch_is_retried_alone_and_the_rest_commits() {
    let setup = Setup::new(&[60_000]).await;
    let direct = pg(&setup.db.url).await;
    // One purchase is refused with an error that is neither an outage nor refused data: the
    // set-based batch fails on it.
    let refused = unique("u");
    refuse_purchases_of(&direct, &refused).await;
    let now = chrono::Utc::now().timestamp();
    let mut ids = Vec::new();
    for (n, user) in [unique("u"), refused].iter().enumerate() {
        let o = unique("o");
        let sample = shared::samples::Sample {
            user,
            product: "pro",
            object: &o,
            amount: 4900,
            created: now + n as i64,
            subscription: false,
        };
        let id = unique("evt");
        let body = shared::samples::event(&id, "checkout.session.completed", &sample);
        publish(
            &setup.broker,
            body.to_string().as_bytes(),
            &id,
            "checkout.session.completed",
        )
        .await;
        ids.push(id);
    }
    let mut others = Vec::new();
    for _ in 0..10 {
        let id = unique("evt");
        publish_event(&setup.broker, &id, &unique("u")).await;
        others.push(id);
    }

    // Started after the publishing, so the twelve deliveries share a batch.
    let worker = spawn_worker(config(&setup.db.url, &setup.broker));
    let retry = setup.broker.topology.retry_queue(1);
    wait_depth(&setup.broker, &retry, 1).await;
    for id in &others {
        wait_processed(&direct, id).await;
    }
    worker.stop().await;
    let applied: Vec<i64> =
        futures_util::future::join_all(ids.iter().map(|id| processed_rows(&direct, id))).await;
    assert_eq!(
        applied,
        vec![1, 0],
        "the first purchase commits, the refused one waits"
    );
    let parked = setup.broker.get(&retry).await.expect("retried event");
    assert_eq!(
        parked
            .delivery
            .properties
            .message_id()
            .as_ref()
            .unwrap()
            .as_str(),
        ids[1]
    );
    assert_eq!(setup.broker.main_depth().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_queues_are_quorum_queues_that_dead_letter_at_least_once() {
    let setup = Setup::new(&[1500, 60_000]).await;
    let listed = std::process::Command::new("rabbitmqctl")
        .args(["-q", "list_queues", "name", "type", "arguments"])
        .output()
        .expect("rabbitmqctl");
    let listed = String::from_utf8_lossy(&listed.stdout);
    for n in 1..=2 {
        let name = setup.broker.topology.retry_queue(n);
        let line = listed
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name.as_str()))
            .unwrap_or_else(|| panic!("{name} declared:\n{listed}"));
        assert!(line.contains("quorum"), "{line}");
        assert!(line.contains("at-least-once"), "{line}");
        assert!(line.contains("reject-publish"), "{line}");
    }
    assert!(
        setup
            .broker
            .topology
            .retry_queue(1)
            .ends_with(".delay.1500ms")
    );
    assert!(setup.broker.topology.retry_queue(2).ends_with(".delay.1m"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_waiting_in_an_old_classic_retry_queue_are_moved_and_applied_at_start_up() {
    use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
    use lapin::types::{FieldTable, LongString};

    let setup = Setup::new(&[200, 400]).await;
    let direct = pg(&setup.db.url).await;
    let topology = setup.broker.topology.clone();
    // The layout of earlier releases: a classic queue with an hour's TTL.
    let legacy = topology.legacy_retry_queue(2);
    let mut args = FieldTable::default();
    args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(3_600_000));
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(LongString::from("")),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(LongString::from(topology.main_queue())),
    );
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    setup
        .broker
        .channel
        .queue_declare(legacy.as_str().into(), durable, args)
        .await
        .unwrap();
    let (event, user) = (unique("evt"), unique("u"));
    setup
        .broker
        .channel
        .basic_publish(
            "".into(),
            legacy.as_str().into(),
            BasicPublishOptions::default(),
            &checkout_completed(&event, &user),
            lapin::BasicProperties::default().with_message_id(event.as_str().into()),
        )
        .await
        .unwrap()
        .await
        .unwrap();

    let worker = spawn_worker(config(&setup.db.url, &setup.broker));
    wait_processed(&direct, &event).await;
    worker.stop().await;
    let gone = setup
        .broker
        .connection
        .create_channel()
        .await
        .unwrap()
        .queue_declare(
            legacy.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await;
    assert!(gone.is_err(), "the drained classic queue is deleted");
}
