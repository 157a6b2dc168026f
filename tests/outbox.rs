//! The app's side: every committed entitlement change (and every notification) is delivered to
//! the `<base>.out` exchange and to a signed webhook, at least once and per user in version
//! order — through failures of the receiver, a relay killed mid-delivery, and a broker outage.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use lapin::options::{QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use processor::config::{Config, WebhookTarget};
use processor::outbox::admin::{Channel, OutboxArgs, OutboxCommand, ReplayArgs, ReplaySelection};
use secrecy::SecretString;
use serde_json::Value;
use shared::samples::{self, Sample};
use system_tests::amqp::TestBroker;
use system_tests::chaos::ChaosProxy;
use system_tests::worker::{Setup, WAIT, config, pg, publish, spawn_worker, wait_processed};
use system_tests::{eventually, unique};

/// A Standard Webhooks secret for the tests ("outbox-test-signing-key").
const SECRET: &str = "whsec_b3V0Ym94LXRlc3Qtc2lnbmluZy1rZXk=";

/// A worker config whose relay polls often and, with `webhook`, posts there with short delays.
fn outbox_config(setup: &Setup, webhook: Option<&Receiver>) -> Config {
    let mut config = config(&setup.db.url, &setup.broker);
    config.outbox.poll_interval = Duration::from_millis(50);
    config.outbox.webhook_retry_delays = vec![Duration::from_millis(50); 2];
    config.outbox.webhook = webhook.map(|r| WebhookTarget {
        url: format!("http://{}/hooks", r.addr),
        secret: SecretString::from(SECRET),
    });
    config
}

/// A sample event of `event_type` about `user` and the Stripe objects named by `object`.
fn sample(event_id: &str, event_type: &str, user: &str, object: &str) -> Vec<u8> {
    let sample = Sample {
        user,
        product: "pro",
        object,
        amount: 1999,
        created: chrono::Utc::now().timestamp(),
        subscription: false,
    };
    samples::event(event_id, event_type, &sample)
        .to_string()
        .into_bytes()
}

async fn send(broker: &TestBroker, event_type: &str, user: &str, object: &str) -> String {
    let id = unique("evt");
    publish(
        broker,
        &sample(&id, event_type, user, object),
        &id,
        event_type,
    )
    .await;
    id
}

/// A queue of the test bound to the out exchange for every message type.
async fn bind_out_queue(broker: &TestBroker) -> String {
    let queue = format!("{}.app", broker.topology.out_exchange());
    broker
        .channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                exclusive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("declare the app's queue");
    broker
        .channel
        .queue_bind(
            queue.as_str().into(),
            broker.topology.out_exchange().as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind the app's queue");
    queue
}

/// Everything in `queue` right now, as `(routing key, JSON)`.
async fn drain(broker: &TestBroker, queue: &str) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    while let Some(message) = broker.get(queue).await {
        let body = serde_json::from_slice(&message.delivery.data).expect("JSON message");
        out.push((message.delivery.routing_key.to_string(), body));
    }
    out
}

/// `SELECT count(*)` of `from_where` (a `FROM … WHERE …` clause).
async fn count(client: &tokio_postgres::Client, from_where: &str) -> i64 {
    client
        .query_one(&format!("SELECT count(*) {from_where}"), &[])
        .await
        .map_or(-1, |r| r.get(0))
}

/// The bodies of everything in `queue` right now.
async fn drain_bodies(broker: &TestBroker, queue: &str) -> Vec<Value> {
    drain(broker, queue)
        .await
        .into_iter()
        .map(|(_, m)| m)
        .collect()
}

/// Rows of the outbox not yet sent on `channel` (`amqp` or `webhook`).
async fn unsent(client: &tokio_postgres::Client, channel: &str) -> i64 {
    count(
        client,
        &format!("FROM outbox WHERE {channel}_status <> 'sent'"),
    )
    .await
}

/// Checks at-least-once, per-user-ordered delivery: every id of the outbox arrived, and for
/// each user the first arrivals of each message are in (version) order.
async fn assert_complete_and_ordered(client: &tokio_postgres::Client, received: &[Value]) {
    let expected: HashSet<String> = client
        .query("SELECT id::text FROM outbox", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut seen = HashSet::new();
    let mut last_version: HashMap<String, i64> = HashMap::new();
    for message in received {
        let id = message["id"].as_str().unwrap().to_owned();
        if !seen.insert(id) {
            continue; // a redelivery
        }
        let user = message["userId"].as_str().unwrap().to_owned();
        let version = message["version"].as_i64().unwrap();
        let last = last_version.entry(user.clone()).or_insert(0);
        assert!(*last <= version, "{user}: version {version} after {last}");
        *last = version;
    }
    assert_eq!(seen, expected, "every outbox row delivered");
}

/// The app's webhook endpoint: verifies each signature, answers 500 for the users in `failing`
/// (or everyone while `fail_all`), waits `delay` before answering, and records what it accepted.
#[derive(Clone)]
struct Receiver {
    addr: SocketAddr,
    state: Arc<ReceiverState>,
}

#[derive(Default)]
struct ReceiverState {
    accepted: Mutex<Vec<Value>>,
    failing: Mutex<HashSet<String>>,
    attempts: Mutex<BTreeMap<String, u32>>,
    bad_signatures: Mutex<u32>,
    delay: Mutex<Duration>,
}

impl Receiver {
    async fn start() -> Self {
        let state = Arc::new(ReceiverState::default());
        let app = axum::Router::new()
            .route("/hooks", axum::routing::post(receive))
            .with_state(Arc::clone(&state));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { addr, state }
    }

    fn accepted(&self) -> Vec<Value> {
        self.state.accepted.lock().unwrap().clone()
    }

    fn accepted_ids(&self) -> usize {
        self.accepted()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_owned())
            .collect::<HashSet<_>>()
            .len()
    }
}

async fn receive(
    State(state): State<Arc<ReceiverState>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let id = header("webhook-id");
    let valid = processor::outbox::webhook::verify(
        &SecretString::from(SECRET),
        &id,
        &header("webhook-timestamp"),
        &body,
        &header("webhook-signature"),
        chrono::Utc::now().timestamp(),
        Duration::from_secs(300),
    );
    if !valid {
        *state.bad_signatures.lock().unwrap() += 1;
        return StatusCode::BAD_REQUEST;
    }
    *state.attempts.lock().unwrap().entry(id).or_default() += 1;
    let delay = *state.delay.lock().unwrap();
    tokio::time::sleep(delay).await;
    let message: Value = serde_json::from_slice(&body).unwrap();
    let user = message["userId"].as_str().unwrap_or_default().to_owned();
    if state.failing.lock().unwrap().contains(&user) {
        return StatusCode::INTERNAL_SERVER_ERROR;
    }
    state.accepted.lock().unwrap().push(message);
    StatusCode::NO_CONTENT
}

#[tokio::test]
async fn a_purchase_and_its_refund_reach_the_out_exchange_in_version_order_with_snapshot_and_cause()
{
    let setup = Setup::new(&[200]).await;
    let queue = bind_out_queue(&setup.broker).await;
    let worker = spawn_worker(outbox_config(&setup, None));
    let client = pg(&setup.db.url).await;
    let (user, object) = (unique("u"), unique("obj"));

    let bought = send(&setup.broker, "checkout.session.completed", &user, &object).await;
    wait_processed(&client, &bought).await;
    let refunded = send(&setup.broker, "charge.refunded", &user, &object).await;
    wait_processed(&client, &refunded).await;
    let abandoned_object = unique("obj");
    let expired = send(
        &setup.broker,
        "checkout.session.expired",
        &user,
        &abandoned_object,
    )
    .await;
    wait_processed(&client, &expired).await;

    let received = Arc::new(Mutex::new(Vec::new()));
    eventually(WAIT, "four messages on the out exchange", || async {
        let more = drain(&setup.broker, &queue).await;
        let mut received = received.lock().unwrap();
        received.extend(more);
        (received.len() >= 4).then_some(())
    })
    .await;
    let received = received.lock().unwrap().clone();
    let types: Vec<&str> = received.iter().map(|(key, _)| key.as_str()).collect();
    assert_eq!(
        types,
        [
            "entitlements.changed",
            "entitlements.changed",
            "notification.revoked",
            "notification.checkout_abandoned"
        ]
    );
    let (_, granted) = &received[0];
    assert_eq!(granted["type"], "entitlements.changed");
    assert_eq!(granted["userId"], user.as_str());
    assert_eq!(granted["version"], 1);
    assert_eq!(granted["cause"]["eventId"], bought.as_str());
    assert_eq!(granted["cause"]["eventType"], "checkout.session.completed");
    assert_eq!(granted["entitlements"][0]["key"], "pro");
    assert_eq!(granted["entitlements"][0]["status"], "active");
    assert_eq!(granted["entitlements"][0]["active"], true);
    assert!(granted["occurredAt"].as_str().unwrap().ends_with('Z'));

    let (_, revoked) = &received[1];
    assert_eq!(revoked["version"], 2);
    assert_eq!(revoked["entitlements"][0]["status"], "revoked");
    assert_eq!(revoked["entitlements"][0]["active"], false);
    assert_eq!(revoked["cause"]["eventId"], refunded.as_str());
    let (_, notice) = &received[2];
    assert_eq!(notice["version"], 2);
    assert_eq!(notice["entitlementKey"], "pro");
    assert_eq!(notice["cause"]["eventType"], "charge.refunded");
    let (_, abandoned) = &received[3];
    assert!(
        abandoned["recoveryUrl"]
            .as_str()
            .unwrap()
            .starts_with("https://")
    );

    eventually(WAIT, "rows marked sent", || async {
        (unsent(&client, "amqp").await == 0).then_some(())
    })
    .await;
    let unsent_notifications = count(&client, "FROM notifications WHERE sent_at IS NULL").await;
    assert_eq!(unsent_notifications, 0, "notifications.sent_at is set");
    let on = count(&client, "FROM outbox WHERE webhook_status <> 'off'").await;
    assert_eq!(on, 0, "without APP_WEBHOOK_URL the webhook channel is off");
    worker.stop().await;
}

#[tokio::test]
async fn webhooks_are_signed_retried_and_a_failing_user_holds_back_only_itself_until_replayed() {
    let setup = Setup::new(&[200]).await;
    let receiver = Receiver::start().await;
    let config = outbox_config(&setup, Some(&receiver));
    let worker = spawn_worker(config.clone());
    let client = pg(&setup.db.url).await;
    let (stuck, fine) = (unique("u_stuck"), unique("u_fine"));
    receiver.state.failing.lock().unwrap().insert(stuck.clone());

    for user in [&stuck, &fine] {
        let object = unique("obj");
        let bought = send(&setup.broker, "checkout.session.completed", user, &object).await;
        wait_processed(&client, &bought).await;
        let refunded = send(&setup.broker, "charge.refunded", user, &object).await;
        wait_processed(&client, &refunded).await;
    }
    // The other user's three messages arrive, in order, while the first one's keep failing.
    eventually(WAIT, "the healthy user's messages", || async {
        (receiver.accepted_ids() >= 3).then_some(())
    })
    .await;
    eventually(WAIT, "the failing user's rows marked failed", || async {
        let failed = count(
            &client,
            "FROM outbox WHERE webhook_status = 'failed'
               AND webhook_attempts = 3 AND webhook_last_error = 'HTTP 500'",
        )
        .await;
        (failed == 3).then_some(())
    })
    .await;
    assert!(
        receiver
            .accepted()
            .iter()
            .all(|m| m["userId"] == fine.as_str())
    );
    assert_eq!(*receiver.state.bad_signatures.lock().unwrap(), 0);

    // The operator fixes the app and replays; the rows arrive in the user's order.
    receiver.state.failing.lock().unwrap().clear();
    let replay = OutboxArgs {
        command: OutboxCommand::Replay(ReplayArgs {
            selection: ReplaySelection {
                failed: true,
                ids: Vec::new(),
            },
            channel: Channel::Webhook,
            dry_run: false,
            yes: true,
        }),
    };
    processor::outbox::admin::execute(replay, &config)
        .await
        .expect("replay");
    eventually(WAIT, "every row delivered by webhook", || async {
        (unsent(&client, "webhook").await == 0).then_some(())
    })
    .await;
    let accepted = receiver.accepted();
    assert_complete_and_ordered(&client, &accepted).await;
    let stuck_types: Vec<&str> = accepted
        .iter()
        .filter(|m| m["userId"] == stuck.as_str())
        .map(|m| m["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        stuck_types,
        [
            "entitlements.changed",
            "entitlements.changed",
            "notification.revoked"
        ]
    );
    worker.stop().await;
}

#[tokio::test]
async fn a_relay_killed_mid_delivery_and_restarted_loses_and_reorders_nothing() {
    let setup = Setup::new(&[200]).await;
    let queue = bind_out_queue(&setup.broker).await;
    let receiver = Receiver::start().await;
    *receiver.state.delay.lock().unwrap() = Duration::from_millis(100);
    let config = outbox_config(&setup, Some(&receiver));
    let worker = spawn_worker(config.clone());
    let client = pg(&setup.db.url).await;

    let users: Vec<String> = (0..8).map(|_| unique("u")).collect();
    // Round by round: a user's events applied in one transaction make one change (one row).
    for _ in 0..4 {
        let mut round = Vec::new();
        for user in &users {
            let id = unique("evt");
            let body = system_tests::worker::checkout_completed(&id, user);
            system_tests::worker::register_product_of(&client, &body).await;
            publish(&setup.broker, &body, &id, "checkout.session.completed").await;
            round.push(id);
        }
        for id in &round {
            wait_processed(&client, id).await;
        }
    }
    assert_eq!(
        count(&client, "FROM outbox").await,
        32,
        "one entitlements.changed per change"
    );
    eventually(WAIT, "some webhooks delivered", || async {
        (receiver.accepted_ids() >= 4).then_some(())
    })
    .await;
    // kill -9, as far as one process can: the task stops where it stands.
    worker.kill();
    let left = unsent(&client, "webhook").await;
    assert!(left > 0, "killed mid-delivery ({left} rows left)");

    *receiver.state.delay.lock().unwrap() = Duration::ZERO;
    let worker = spawn_worker(config);
    eventually(WAIT, "every row delivered on both channels", || async {
        (unsent(&client, "webhook").await == 0 && unsent(&client, "amqp").await == 0).then_some(())
    })
    .await;
    assert_complete_and_ordered(&client, &receiver.accepted()).await;
    let published = drain_bodies(&setup.broker, &queue).await;
    assert_complete_and_ordered(&client, &published).await;
    worker.stop().await;
}

/// The server a test cuts the worker off from.
#[derive(Clone, Copy, PartialEq)]
enum Server {
    Broker,
    Postgres,
}

fn metric_line(prefix: &str) -> Option<String> {
    let metrics = shared::telemetry::metrics_handle().render();
    metrics
        .lines()
        .find(|l| l.starts_with(prefix))
        .map(str::to_owned)
}

/// Cuts the worker off from `server` through a chaos proxy, commits changes meanwhile (through
/// the one apply path, on a direct connection, as restore does), checks that the relay tried
/// and nothing was marked, restores the link and checks they were then published in order.
async fn relay_survives_losing(server: Server) {
    let setup = Setup::new(&[200]).await;
    let queue = bind_out_queue(&setup.broker).await;
    let upstream = match server {
        Server::Broker => "127.0.0.1:5672",
        Server::Postgres => "127.0.0.1:5432",
    };
    let proxy = ChaosProxy::start(upstream.parse().unwrap()).await;
    let direct = outbox_config(&setup, None);
    let mut config = direct.clone();
    match server {
        Server::Broker => config.amqp_url = proxy.amqp_url(),
        Server::Postgres => {
            config.database_url = format!("postgres://postgres@{}/{}", proxy.addr, setup.db.name);
        }
    }
    let worker = spawn_worker(config);
    let client = pg(&setup.db.url).await;
    system_tests::worker::wait_consumers(&setup.broker, 1).await;
    eventually(WAIT, "the relay leading", || async {
        (metric_line("outbox_relay_leader ")? == "outbox_relay_leader 1").then_some(())
    })
    .await;

    proxy.break_all();
    let pool = processor::db::pool(&direct).unwrap();
    let (user, object) = (unique("u"), unique("obj"));
    for event_type in ["checkout.session.completed", "charge.refunded"] {
        let id = unique("evt");
        let event =
            processor::domain::events::parse(&sample(&id, event_type, &user, &object)).unwrap();
        processor::store::apply_and_commit(&pool, &[&event])
            .await
            .unwrap();
    }
    assert_eq!(unsent(&client, "amqp").await, 3);
    match server {
        Server::Broker => {
            eventually(WAIT, "the relay tried and failed", || async {
                metric_line("outbox_delivery_failures_total{channel=\"amqp\"}").map(drop)
            })
            .await
        }
        Server::Postgres => {
            eventually(WAIT, "the relay lost its lock", || async {
                (metric_line("outbox_relay_leader ")? == "outbox_relay_leader 0").then_some(())
            })
            .await
        }
    }
    assert_eq!(
        unsent(&client, "amqp").await,
        3,
        "nothing marked while away"
    );

    proxy.restore();
    eventually(WAIT, "published after the server returned", || async {
        (unsent(&client, "amqp").await == 0).then_some(())
    })
    .await;
    let published = drain_bodies(&setup.broker, &queue).await;
    assert_complete_and_ordered(&client, &published).await;
    let versions: Vec<i64> = published
        .iter()
        .map(|m| m["version"].as_i64().unwrap())
        .collect();
    assert_eq!(versions, [1, 2, 2]);
    worker.stop().await;
}

#[tokio::test]
async fn changes_committed_while_the_broker_is_unreachable_are_published_in_order_once_it_returns()
{
    relay_survives_losing(Server::Broker).await;
}

#[tokio::test]
async fn a_relay_cut_off_from_postgres_leads_again_and_publishes_in_order_once_it_returns() {
    relay_survives_losing(Server::Postgres).await;
}
