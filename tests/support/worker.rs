//! Helpers shared by the consumer's system tests: a worker per test on its own database and
//! topology, Stripe-shaped events, and reads of the resulting state.

use std::time::Duration;

use crate::amqp::TestBroker;
use crate::db::TestDb;
use crate::{eventually, redis_url, unique};
use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable, LongString};
use processor::config::Config;
use processor::service::StartError as WorkerError;
use shared::config::Env;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const WAIT: Duration = Duration::from_secs(30);

/// A worker config for `db` and `broker`, with short tuning values.
pub fn config(database_url: &str, broker: &TestBroker) -> Config {
    config_with(database_url, broker, &redis_url())
}

pub fn config_with(database_url: &str, broker: &TestBroker, redis: &str) -> Config {
    let env = Env::from_pairs([
        ("DATABASE_URL", database_url),
        ("REDIS_URL", redis),
        ("AMQP_URL", crate::amqp_url().as_str()),
    ]);
    let mut config = Config::from_env(&env).expect("test config");
    config.topology = broker.topology.clone();
    config.claim_ttl = Duration::from_secs(2);
    // Tests share the machine's Redis: their markers and cache entries expire soon.
    config.dedupe_ttl = Duration::from_secs(600);
    config.entitlement_cache_ttl = Duration::from_secs(600);
    config.db_timeout = Duration::from_secs(2);
    config.shutdown_grace = Duration::from_secs(10);
    config.queue_depth_interval = Duration::from_millis(500);
    config
}

/// A worker running in the background; stops when [`Running::stop`] is called or it is dropped.
pub struct Running {
    stop: Option<oneshot::Sender<()>>,
    handle: JoinHandle<Result<(), WorkerError>>,
}

pub fn spawn_worker(config: Config) -> Running {
    shared::telemetry::init_tracing(shared::telemetry::LogFormat::Pretty, "warn");
    let (stop, stopped) = oneshot::channel::<()>();
    let handle = tokio::spawn(processor::run_worker(config, async move {
        let _ = stopped.await;
    }));
    Running {
        stop: Some(stop),
        handle,
    }
}

impl Running {
    /// Aborts the worker task where it stands, as a crash would: its connections are dropped
    /// without closing, nothing is acked, released or finished.
    pub fn kill(mut self) {
        self.handle.abort();
        // Dropping the sender after the abort must not look like a graceful stop.
        std::mem::forget(self.stop.take());
    }

    /// Signals shutdown and waits for the worker to return.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(WAIT, &mut self.handle)
            .await
            .expect("worker stops within the deadline")
            .expect("worker task")
            .expect("worker result");
    }
}

/// A `checkout.session.completed` event (paid, payment mode) for `user`.
/// A paid checkout of a product of its own (a user may hold only one completed purchase per
/// product, so every call buys a different one).
pub fn checkout_completed(event_id: &str, user: &str) -> Vec<u8> {
    let session = unique("cs");
    let product = unique("prod");
    serde_json::json!({
        "id": event_id,
        "object": "event",
        "api_version": "2025-03-31.basil",
        "type": "checkout.session.completed",
        "created": chrono::Utc::now().timestamp(),
        "livemode": false,
        "data": {"object": {
            "id": session,
            "object": "checkout.session",
            "mode": "payment",
            "status": "complete",
            "payment_status": "paid",
            "client_reference_id": user,
            "customer": format!("cus_{user}"),
            "payment_intent": unique("pi"),
            "amount_total": 4900,
            "currency": "usd",
            "metadata": {"user_id": user, "product_key": product},
        }},
    })
    .to_string()
    .into_bytes()
}

/// Registers the product a [`checkout_completed`] body names (an item at its amount and
/// currency), so the purchase grants `content:{product}`.
pub async fn register_product_of(client: &tokio_postgres::Client, body: &[u8]) {
    let event: serde_json::Value = serde_json::from_slice(body).expect("event body");
    let object = &event["data"]["object"];
    let key = object["metadata"]["product_key"]
        .as_str()
        .expect("product key");
    client
        .execute(
            "INSERT INTO products (key, origin, amount_cents, currency, grants)
             VALUES ($1, 'admin', $2, $3, ARRAY['content:' || $1])",
            &[
                &key,
                &object["amount_total"].as_i64().expect("amount"),
                &object["currency"].as_str().expect("currency"),
            ],
        )
        .await
        .expect("register the product");
}

/// Makes the database refuse every write of a purchase of `user` with an error that is neither
/// an outage nor refused data (SQLSTATE P0001, as an operator's trigger or a lock might): the
/// store charges it to the event, to be retried later.
pub async fn refuse_purchases_of(client: &tokio_postgres::Client, user: &str) {
    client
        .batch_execute(&format!(
            "CREATE OR REPLACE FUNCTION refuse_purchases() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
               IF NEW.user_id = '{user}' THEN
                 RAISE EXCEPTION 'purchases of {user} refused by the test' USING ERRCODE = 'P0001';
               END IF;
               RETURN NEW;
             END $$;
             CREATE TRIGGER refuse_purchases BEFORE INSERT OR UPDATE ON purchases
               FOR EACH ROW EXECUTE FUNCTION refuse_purchases();"
        ))
        .await
        .expect("install the refusing trigger");
}

/// Publishes `body` to the test exchange as ingress does.
pub async fn publish(broker: &TestBroker, body: &[u8], message_id: &str, event_type: &str) {
    let mut headers = FieldTable::default();
    headers.insert(
        "received_at".into(),
        AMQPValue::LongString(LongString::from(chrono::Utc::now().to_rfc3339())),
    );
    let properties = BasicProperties::default()
        .with_message_id(message_id.into())
        .with_type(event_type.into())
        .with_timestamp(u64::try_from(chrono::Utc::now().timestamp()).unwrap_or(0))
        .with_delivery_mode(2)
        .with_headers(headers);
    broker
        .channel
        .basic_publish(
            broker.topology.exchange().into(),
            "stripe".into(),
            BasicPublishOptions::default(),
            body,
            properties,
        )
        .await
        .expect("publish")
        .await
        .expect("publish settled");
}

pub async fn publish_event(broker: &TestBroker, event_id: &str, user: &str) {
    publish(
        broker,
        &checkout_completed(event_id, user),
        event_id,
        "checkout.session.completed",
    )
    .await;
}

pub async fn pg(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect to the test database");
    tokio::spawn(connection);
    client
}

/// Rows in `processed_events` for `event_id` (0 while the schema does not exist yet).
pub async fn processed_rows(client: &tokio_postgres::Client, event_id: &str) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM processed_events WHERE event_id = $1",
            &[&event_id],
        )
        .await
        .map_or(0, |r| r.get(0))
}

pub async fn processed_total(client: &tokio_postgres::Client) -> i64 {
    client
        .query_one("SELECT count(*) FROM processed_events", &[])
        .await
        .map_or(0, |r| r.get(0))
}

/// The user's entitlement version: bumped once per applied event that concerns the user.
pub async fn version(client: &tokio_postgres::Client, user: &str) -> i64 {
    client
        .query_opt(
            "SELECT version FROM user_entitlement_versions WHERE user_id = $1",
            &[&user],
        )
        .await
        .ok()
        .flatten()
        .map_or(0, |r| r.get(0))
}

/// Waits until the worker has migrated the database.
pub async fn wait_migrated(client: &tokio_postgres::Client) {
    eventually(WAIT, "migrations applied", || async {
        client
            .query_one("SELECT count(*) FROM schema_migrations", &[])
            .await
            .ok()
            .filter(|r| r.get::<_, i64>(0) > 0)
            .map(drop)
    })
    .await;
}

/// Waits until `n` consumers are attached to the main queue (the workers are past start-up).
pub async fn wait_consumers(broker: &TestBroker, n: u32) {
    let queue = broker.topology.main_queue();
    eventually(WAIT, "workers consuming", || async {
        let declared = broker
            .channel
            .queue_declare(
                queue.as_str().into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("passive declare");
        (declared.consumer_count() >= n).then_some(())
    })
    .await;
}

pub async fn wait_processed(client: &tokio_postgres::Client, event_id: &str) {
    eventually(WAIT, &format!("{event_id} processed"), || async {
        (processed_rows(client, event_id).await == 1).then_some(())
    })
    .await;
}

pub async fn wait_depth(broker: &TestBroker, queue: &str, expected: u32) {
    eventually(WAIT, &format!("{queue} holds {expected}"), || async {
        (broker.depth(queue).await == expected).then_some(())
    })
    .await;
}

pub async fn redis() -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis_url())
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect to redis")
}

pub struct Setup {
    pub db: TestDb,
    pub broker: TestBroker,
}

impl Setup {
    pub async fn new(retry_delays: &[u64]) -> Self {
        let delays = retry_delays
            .iter()
            .map(|ms| Duration::from_millis(*ms))
            .collect();
        Self {
            db: TestDb::create().await,
            broker: TestBroker::new(delays).await,
        }
    }
}
