//! `processor reconcile` against the Stripe fake and the real broker: every event Stripe lists
//! in the window reaches the main queue exactly once, looking as ingress would have published
//! it; filters reach Stripe; failures of Stripe or the broker stop the run with exit code 1
//! without claiming anything was enqueued that was not; and an event the processor already
//! handled is not applied twice.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::time::Duration;

use lapin::types::AMQPValue;
use processor::config::Config;
use processor::reconcile::{self, ReconcileArgs, ReconcileError, Summary};
use serde_json::{Value, json};
use shared::config::Env;
use system_tests::amqp::TestBroker;
use system_tests::chaos::ChaosProxy;
use system_tests::stripe_fake::{Collection, FakeStripe, Fault};
use system_tests::unique;
use system_tests::worker::{WAIT, pg, processed_rows, spawn_worker, version, wait_processed};

fn args(since: &str) -> ReconcileArgs {
    ReconcileArgs {
        since: since.into(),
        types: Vec::new(),
        undelivered_only: false,
        dry_run: false,
        features_drift: false,
    }
}

/// A processor config whose Stripe settings point at `fake` and whose topology is `broker`'s.
/// The exit code the binary gives for `error`.
fn exit_code(error: ReconcileError) -> u8 {
    processor::dlq::exit_code(&error.into_command_error())
}

fn config(fake: &FakeStripe, broker: &TestBroker) -> Config {
    let env = Env::from_pairs([
        // Reconcile touches neither Postgres nor Redis; the config only needs them to be set.
        ("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/unused"),
        ("REDIS_URL", system_tests::redis_url().as_str()),
        ("AMQP_URL", system_tests::amqp_url().as_str()),
        ("STRIPE_SECRET_KEY", fake.secret_key()),
        ("STRIPE_API_BASE", fake.base_url()),
    ]);
    let mut config = Config::from_env(&env).expect("test config");
    config.topology = broker.topology.clone();
    config
}

/// A Stripe-shaped event created `age` seconds ago.
fn stripe_event(event_type: &str, age: i64) -> Value {
    json!({
        "id": unique("evt"),
        "object": "event",
        "api_version": "2025-03-31.basil",
        "created": chrono::Utc::now().timestamp() - age,
        "livemode": false,
        "pending_webhooks": 1,
        "request": {"id": null, "idempotency_key": null},
        "type": event_type,
        "data": {"object": {"id": unique("obj"), "object": "charge", "amount": 4900,
                            "metadata": {"user_id": unique("u"), "note": "ünïcode ✓"}}},
    })
}

/// Seeds `types[i]` events, one a minute apart, all within the last hours.
fn seed(fake: &FakeStripe, types: &[&str]) -> Vec<Value> {
    types
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let event = stripe_event(t, 600 + 60 * i64::try_from(i).unwrap());
            fake.seed(Collection::Events, event.clone());
            event
        })
        .collect()
}

async fn run(args: &ReconcileArgs, config: &Config) -> (Result<Summary, ReconcileError>, String) {
    let mut out = Vec::new();
    let result = reconcile::run(args, config, &mut out).await;
    (result, String::from_utf8(out).unwrap())
}

/// Takes every message from the test's main queue until `expected` have arrived, then checks
/// that no more follow.
async fn drain(broker: &TestBroker, expected: usize) -> Vec<lapin::message::BasicGetMessage> {
    let queue = broker.topology.main_queue();
    let mut messages = Vec::new();
    let started = std::time::Instant::now();
    while messages.len() < expected {
        assert!(
            started.elapsed() < WAIT,
            "only {} of {expected} messages arrived in {queue}",
            messages.len()
        );
        match broker.get(&queue).await {
            Some(message) => messages.push(message),
            None => tokio::time::sleep(Duration::from_millis(25)).await,
        }
    }
    assert_eq!(
        broker.depth(&queue).await,
        0,
        "no message beyond the expected"
    );
    messages
}

fn header<'a>(message: &'a lapin::message::BasicGetMessage, name: &str) -> Option<&'a AMQPValue> {
    message
        .properties
        .headers()
        .as_ref()
        .and_then(|t| t.inner().get(name))
}

fn header_str(message: &lapin::message::BasicGetMessage, name: &str) -> Option<String> {
    match header(message, name)? {
        AMQPValue::LongString(s) => Some(s.to_string()),
        _ => None,
    }
}

#[tokio::test]
async fn every_event_in_the_window_lands_once_in_the_main_queue_as_ingress_would_publish_it() {
    let fake = FakeStripe::start().await;
    fake.set_max_page_size(3);
    let broker = TestBroker::new(vec![Duration::from_secs(1)]).await;
    let events = seed(
        &fake,
        &[
            "checkout.session.completed",
            "charge.refunded",
            "invoice.paid",
            "charge.refunded",
            "customer.subscription.updated",
            "invoice.paid",
            "charge.refunded",
            "charge.dispute.created",
        ],
    );
    // Older than the window: not listed, not enqueued.
    fake.seed(Collection::Events, stripe_event("invoice.paid", 5 * 3600));

    let (result, out) = run(&args("2h"), &config(&fake, &broker)).await;
    let summary = result.expect("reconcile succeeds");

    assert_eq!(summary.pages, 3, "8 events at 3 a page");
    assert_eq!(summary.total(), 8);
    assert_eq!(summary.enqueued["charge.refunded"], 3);
    assert_eq!(summary.enqueued["invoice.paid"], 2);
    assert_eq!(summary.enqueued["checkout.session.completed"], 1);
    assert!(out.contains("pages read: 3"), "{out}");
    assert!(out.contains("enqueued 8 events"), "{out}");
    assert!(out.contains("dedupes by event id"), "{out}");
    assert!(out.contains("(2h 0m)"), "window of 2 hours: {out}");

    let pages = fake.requests_to("/v1/events");
    assert_eq!(pages.len(), 3);
    let gte: i64 = pages[0].param("created[gte]").unwrap().parse().unwrap();
    assert_eq!(gte, summary.since.timestamp());
    assert!(pages[0].param("delivery_success").is_none());
    assert_eq!(pages[1].param("starting_after"), events[2]["id"].as_str());

    let messages = drain(&broker, 8).await;
    let mut by_id: HashMap<String, &lapin::message::BasicGetMessage> = HashMap::new();
    for message in &messages {
        let id = message
            .properties
            .message_id()
            .as_ref()
            .unwrap()
            .to_string();
        assert!(by_id.insert(id.clone(), message).is_none(), "{id} twice");
    }
    for event in &events {
        let id = event["id"].as_str().unwrap();
        let message = by_id.get(id).unwrap_or_else(|| panic!("{id} not enqueued"));
        let event_type = event["type"].as_str().unwrap();
        assert_eq!(message.data, serde_json::to_vec(event).unwrap());
        assert_eq!(message.routing_key.as_str(), event_type);
        assert_eq!(
            message.properties.kind().as_ref().unwrap().as_str(),
            event_type
        );
        assert_eq!(
            *message.properties.timestamp(),
            Some(u64::try_from(event["created"].as_i64().unwrap()).unwrap())
        );
        assert_eq!(
            message.properties.content_type().as_ref().unwrap().as_str(),
            "application/json"
        );
        assert_eq!(*message.properties.delivery_mode(), Some(2), "persistent");
        assert_eq!(header_str(message, "source").as_deref(), Some("reconcile"));
        let received_at = header_str(message, "received_at").expect("received_at");
        assert!(chrono::DateTime::parse_from_rfc3339(&received_at).is_ok());
    }
}

#[tokio::test]
async fn a_dry_run_lists_the_events_and_publishes_nothing() {
    let fake = FakeStripe::start().await;
    fake.set_max_page_size(2);
    let broker = TestBroker::new(vec![Duration::from_secs(1)]).await;
    let events = seed(&fake, &["invoice.paid", "charge.refunded", "invoice.paid"]);

    let mut dry = args("72h");
    dry.dry_run = true;
    let (result, out) = run(&dry, &config(&fake, &broker)).await;
    let summary = result.expect("dry run succeeds");

    assert_eq!(summary.total(), 3);
    assert_eq!(summary.pages, 2);
    for event in &events {
        let line = format!(
            "would enqueue {} {}",
            event["id"].as_str().unwrap(),
            event["type"].as_str().unwrap()
        );
        assert!(out.contains(&line), "{line:?} missing from {out}");
    }
    assert!(out.contains("dry run: nothing was published"), "{out}");
    assert_eq!(broker.main_depth().await, 0);
}

#[tokio::test]
async fn type_filters_are_sent_as_types_brackets_and_undelivered_only_as_delivery_success() {
    let fake = FakeStripe::start().await;
    let broker = TestBroker::new(vec![Duration::from_secs(1)]).await;
    let events = seed(
        &fake,
        &["invoice.paid", "charge.refunded", "customer.created"],
    );

    let mut filtered = args("1d");
    filtered.types = vec!["charge.refunded".into(), "invoice.paid".into()];
    filtered.undelivered_only = true;
    let (result, out) = run(&filtered, &config(&fake, &broker)).await;
    let summary = result.expect("reconcile succeeds");

    let request = &fake.requests_to("/v1/events")[0];
    assert_eq!(
        request.params_named("types[]"),
        ["charge.refunded", "invoice.paid"]
    );
    assert_eq!(request.param("delivery_success"), Some("false"));
    assert!(request.raw_query.contains("types[]=charge.refunded"));
    assert_eq!(summary.total(), 2, "{out}");
    assert!(!summary.enqueued.contains_key("customer.created"));

    let messages = drain(&broker, 2).await;
    let mut ids: Vec<String> = messages
        .iter()
        .map(|m| m.properties.message_id().as_ref().unwrap().to_string())
        .collect();
    ids.sort();
    let mut expected: Vec<String> = events[..2]
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect();
    expected.sort();
    assert_eq!(ids, expected);
}

#[tokio::test]
async fn a_stripe_500_that_should_be_retried_is_retried_and_the_run_completes() {
    let fake = FakeStripe::start().await;
    fake.set_max_page_size(2);
    let broker = TestBroker::new(vec![Duration::from_secs(1)]).await;
    seed(
        &fake,
        &[
            "invoice.paid",
            "charge.refunded",
            "invoice.paid",
            "charge.refunded",
        ],
    );
    fake.inject(Fault::ServerErrorShouldRetry, 2);

    let config = config(&fake, &broker);
    let mut out = Vec::new();
    let summary = reconcile::run_with(&args("3h"), &config, fake.client_config(), &mut out)
        .await
        .expect("reconcile completes despite the 500s");

    assert_eq!(summary.total(), 4);
    assert_eq!(summary.pages, 2);
    assert_eq!(
        fake.requests_to("/v1/events").len(),
        4,
        "2 failures + 2 pages"
    );
    drain(&broker, 4).await;
}

#[tokio::test]
async fn a_stripe_failure_that_must_not_be_retried_stops_the_run_with_exit_code_one() {
    let fake = FakeStripe::start().await;
    let broker = TestBroker::new(vec![Duration::from_secs(1)]).await;
    seed(&fake, &["invoice.paid"]);
    fake.inject(Fault::ServerErrorShouldNotRetry, 1);

    let (result, out) = run(&args("3h"), &config(&fake, &broker)).await;
    let error = result.expect_err("Stripe refused");

    assert!(matches!(error, ReconcileError::Stripe(_)), "{error:?}");
    assert!(error.to_string().contains("Stripe"), "{error}");
    assert_eq!(exit_code(error), 1);
    assert!(out.contains("enqueued 0 events"), "{out}");
    assert_eq!(fake.requests_to("/v1/events").len(), 1, "not retried");
    assert_eq!(broker.main_depth().await, 0);
}

#[tokio::test]
async fn an_unreachable_broker_fails_with_exit_code_one_and_claims_nothing_enqueued() {
    let fake = FakeStripe::start().await;
    let broker = TestBroker::new(vec![Duration::from_secs(1)]).await;
    seed(&fake, &["invoice.paid", "charge.refunded"]);
    let upstream = "127.0.0.1:5672".parse().unwrap();
    let proxy = ChaosProxy::start(upstream).await;
    proxy.break_all();
    let mut config = config(&fake, &broker);
    config.amqp_url = proxy.amqp_url();

    let (result, out) = run(&args("3h"), &config).await;
    let error = result.expect_err("broker is down");

    assert!(
        matches!(error, ReconcileError::BrokerUnavailable { .. }),
        "{error:?}"
    );
    assert!(error.to_string().contains("broker"), "{error}");
    assert_eq!(exit_code(error), 1);
    assert!(out.contains("nothing was enqueued"), "{out}");
    assert!(!out.contains("enqueued 2"), "{out}");
    assert!(
        fake.requests_to("/v1/events").is_empty(),
        "Stripe is not read while there is nowhere to put the events"
    );
    assert_eq!(broker.main_depth().await, 0);
}

#[tokio::test]
async fn a_window_older_than_thirty_days_is_a_usage_error() {
    let fake = FakeStripe::start().await;
    let broker = TestBroker::new(vec![Duration::from_secs(1)]).await;

    let (result, _) = run(&args("45d"), &config(&fake, &broker)).await;
    let error = result.expect_err("refused");

    assert!(error.to_string().contains("30 days"), "{error}");
    assert_eq!(exit_code(error), 2);
    assert!(fake.requests().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciling_an_event_the_processor_already_handled_does_not_apply_it_twice() {
    let fake = FakeStripe::start().await;
    let db = system_tests::db::TestDb::create().await;
    let broker = TestBroker::new(vec![Duration::from_millis(200)]).await;
    let direct = pg(&db.url).await;
    let user = unique("u");
    let event_id = unique("evt");
    let body = system_tests::worker::checkout_completed(&event_id, &user);

    let mut config = system_tests::worker::config(&db.url, &broker);
    config.stripe = Some(
        processor::stripe::StripeConfig::new(fake.secret_key().to_owned().into(), fake.base_url())
            .unwrap(),
    );
    let worker = spawn_worker(config.clone());
    system_tests::worker::publish(&broker, &body, &event_id, "checkout.session.completed").await;
    wait_processed(&direct, &event_id).await;
    assert_eq!(version(&direct, &user).await, 1);

    // Stripe still lists the event: reconcile puts it through the queue a second time.
    fake.seed(Collection::Events, serde_json::from_slice(&body).unwrap());
    let mut out = Vec::new();
    let summary = reconcile::run(&args("1h"), &config, &mut out)
        .await
        .expect("reconcile succeeds");
    assert_eq!(summary.total(), 1);

    system_tests::worker::wait_depth(&broker, &broker.topology.main_queue(), 0).await;
    // A graceful stop drains what the worker holds, so the redelivered copy is settled.
    worker.stop().await;
    assert_eq!(processed_rows(&direct, &event_id).await, 1);
    assert_eq!(version(&direct, &user).await, 1, "applied once");
    assert_eq!(
        broker.dead_letter_depth().await,
        0,
        "the copy was deduped, not parked"
    );
}
