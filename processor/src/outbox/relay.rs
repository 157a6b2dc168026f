//! The relay: a task of `processor run`/`worker` that delivers outbox rows on each channel that
//! is on, marks them, and prunes what every channel is done with.
//!
//! Invariants:
//! - leadership: the relay delivers only while it holds the session advisory lock
//!   [`RELAY_LOCK_KEY`] on a connection of its own, driven inside the relay's future. Killing the
//!   process (or aborting the task) closes that connection and Postgres frees the lock, so a
//!   standby relay takes over within [`STANDBY_RETRY`]; a pooled connection never holds it;
//! - RabbitMQ: a user's rows are published one after another, each waiting for its confirm
//!   (users run concurrently); the first failure stops that user's rows for this pass, and only
//!   confirmed rows are marked `sent`. A row the broker returns as unroutable (no queue bound to
//!   the exchange) counts as delivered to nobody (`outbox_unroutable_total`);
//! - webhook: only the head of each user's pending rows (lowest `(version, seq)`) is ever sent,
//!   so a user's rows go in order and a failing row (in backoff) holds back only its own user;
//!   every attempt is counted on the row, and after the last delay of the schedule the row is
//!   marked `failed` (kept for `processor outbox replay`) and the user's next row proceeds;
//! - a channel that is off marks the row `off` for it when the other channel is done with it,
//!   so turning a channel on later never floods the app with history.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chrono::Utc;
use deadpool_postgres::Pool;
use futures_util::{StreamExt as _, stream};
use lapin::BasicProperties;
use lapin::types::FieldTable;
use shared::amqp::{PublishError, Publisher};
use shared::shutdown::Shutdown;
use shared::topology::headers;
use uuid::Uuid;

use super::webhook::Sender;
use super::{MESSAGE_COLUMNS, Message};
use crate::config::{Config, OutboxConfig};

/// Key of the session advisory lock held by the delivering relay ("outboxr1").
pub const RELAY_LOCK_KEY: i64 = 0x6f75_7462_6f78_7231;
/// How often a standby relay tries to take over.
pub const STANDBY_RETRY: Duration = Duration::from_secs(1);
/// How often delivered rows older than the retention are deleted.
const PRUNE_EVERY: Duration = Duration::from_secs(60);
/// Rows one prune deletes at most.
const PRUNE_LIMIT: i64 = 10_000;
/// Users whose rows are published concurrently.
const AMQP_USERS_IN_FLIGHT: usize = 64;

/// Marks the notifications of the rows in `marked` (a CTE with `notification_id` and `status`)
/// as sent, once.
const NOTIFICATIONS_SENT: &str = "noted AS (
    UPDATE notifications SET sent_at = now()
     WHERE id IN (SELECT notification_id FROM marked WHERE status = 'sent') AND sent_at IS NULL)";

/// Why the relay stopped leading.
#[derive(Debug, thiserror::Error)]
enum RelayError {
    #[error("database error: {0}")]
    Db(#[from] tokio_postgres::Error),
    #[error("postgres unavailable: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("the lock connection did not open: {0}")]
    Connect(#[from] crate::db::DbError),
    #[error("the lock connection closed")]
    LockLost,
}

/// How a leadership session ended without error.
enum Lead {
    Stopped,
    Standby,
}

/// Runs the relay until `stopped` fires (then finishes one last pass, so changes
/// committed before the stop are not left waiting for the next start).
///
/// The relay publishes on a connection of its own: a message nobody's queue is bound for comes
/// back from the broker, and on a channel shared with other publishes the broker's separate
/// return and confirm frames cannot be paired safely (a worker's republish could be reported
/// unroutable for the relay's return).
pub async fn run(config: Config, pool: Pool, stopped: Shutdown) {
    let (publisher, publisher_task) = Publisher::start(
        config.amqp_url.clone(),
        "processor-outbox".into(),
        config.topology.clone(),
        config.publish_confirm_timeout,
    );
    relay(config, pool, publisher, stopped).await;
    publisher_task.shutdown().await;
}

async fn relay(config: Config, pool: Pool, publisher: Publisher, mut stopped: Shutdown) {
    let outbox = config.outbox.clone();
    let sender = outbox.webhook.as_ref().and_then(|target| {
        Sender::new(target, outbox.webhook_timeout)
            .inspect_err(|error| tracing::error!(%error, "webhook channel unusable; it stays off"))
            .ok()
    });
    if outbox.amqp {
        // Publishing before the channel is open would only log failures.
        tokio::select! {
            () = stopped.recv() => {}
            _ = publisher.wait_ready(Duration::from_secs(10)) => {}
        }
    }
    let relay = Relay {
        publish_failing: AtomicBool::new(false),
        exchange: config.topology.out_exchange(),
        database_url: config.database_url.clone(),
        db_timeout: config.db_timeout,
        config: outbox,
        pool,
        publisher,
        sender,
    };
    loop {
        if stopped.is_shutdown() {
            break;
        }
        match relay.lead(&mut stopped).await {
            Ok(Lead::Stopped) => break,
            Ok(Lead::Standby) => tracing::debug!("another relay delivers; standing by"),
            Err(error) => tracing::warn!(%error, "outbox relay paused; retrying"),
        }
        metrics::gauge!("outbox_relay_leader").set(0.0);
        tokio::select! {
            () = stopped.recv() => break,
            () = tokio::time::sleep(STANDBY_RETRY) => {}
        }
    }
    metrics::gauge!("outbox_relay_leader").set(0.0);
}

struct Relay {
    config: OutboxConfig,
    exchange: String,
    database_url: String,
    db_timeout: Duration,
    pool: Pool,
    publisher: Publisher,
    sender: Option<Sender>,
    /// Whether the last pass failed to publish: only the first failure of an outage is a
    /// warning, so a broker outage does not log every poll.
    publish_failing: AtomicBool,
}

impl Relay {
    /// Takes the leader lock on a connection of its own and delivers until stopped.
    async fn lead(&self, stopped: &mut Shutdown) -> Result<Lead, RelayError> {
        let mut pg: tokio_postgres::Config = self.database_url.parse()?;
        pg.application_name("processor-outbox-relay");
        pg.connect_timeout(self.db_timeout);
        let (client, mut connection) = crate::db::connect(&pg, self.db_timeout).await?;
        let session = async {
            let row = client
                .query_one("SELECT pg_try_advisory_lock($1)", &[&RELAY_LOCK_KEY])
                .await?;
            if !row.try_get::<_, bool>(0)? {
                return Ok(Lead::Standby);
            }
            tracing::info!(
                amqp = self.config.amqp,
                webhook = self.sender.is_some(),
                "outbox relay delivering"
            );
            metrics::gauge!("outbox_relay_leader").set(1.0);
            self.deliver(stopped).await
        };
        // The connection is driven here, not spawned: when this future is dropped (shutdown,
        // an aborted task, a killed process) the session ends and Postgres frees the lock.
        tokio::select! {
            result = session => result,
            _ = &mut connection => Err(RelayError::LockLost),
        }
    }

    async fn deliver(&self, stopped: &mut Shutdown) -> Result<Lead, RelayError> {
        let mut last_prune: Option<Instant> = None;
        loop {
            let stopping = stopped.is_shutdown();
            let mut busy = false;
            if self.config.amqp {
                busy |= self.amqp_pass().await?;
            }
            if let Some(sender) = &self.sender {
                busy |= self.webhook_pass(sender).await?;
            }
            if last_prune.is_none_or(|at| at.elapsed() >= PRUNE_EVERY) {
                self.prune().await?;
                last_prune = Some(Instant::now());
            }
            if stopping {
                return Ok(Lead::Stopped);
            }
            if !busy {
                tokio::select! {
                    () = stopped.recv() => {}
                    () = tokio::time::sleep(self.config.poll_interval) => {}
                }
            }
        }
    }

    /// Publishes the oldest pending rows; true when any was delivered (more may be waiting).
    async fn amqp_pass(&self) -> Result<bool, RelayError> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {MESSAGE_COLUMNS}, seq FROM outbox WHERE amqp_status = 'pending'
                      ORDER BY seq LIMIT $1"
                ),
                &[&i64::from(self.config.batch_size)],
            )
            .await?;
        let Some(oldest) = rows.first() else {
            metrics::gauge!("outbox_lag_seconds", "channel" => "amqp").set(0.0);
            return Ok(false);
        };
        let oldest: chrono::DateTime<Utc> = oldest.try_get("created_at")?;
        record_lag("amqp", oldest);
        let mut by_user: BTreeMap<String, Vec<(i64, i64, Message)>> = BTreeMap::new();
        for row in &rows {
            let message = Message::from_row(row)?;
            by_user.entry(message.user_id.clone()).or_default().push((
                message.version,
                row.try_get("seq")?,
                message,
            ));
        }
        let published: Vec<(Vec<Uuid>, Option<PublishError>)> = stream::iter(by_user.into_values())
            .map(|mut rows| async move {
                rows.sort_by_key(|(version, seq, _)| (*version, *seq));
                self.publish_in_order(rows.into_iter().map(|(_, _, m)| m))
                    .await
            })
            .buffer_unordered(AMQP_USERS_IN_FLIGHT)
            .collect()
            .await;
        let mut sent = Vec::new();
        let mut first_error = None;
        for (ids, error) in published {
            sent.extend(ids);
            first_error = first_error.or(error);
        }
        match first_error {
            Some(error) if !self.publish_failing.swap(true, Ordering::Relaxed) => {
                tracing::warn!(%error, delivered = sent.len(), "outbox publish failed; will retry");
            }
            Some(error) => tracing::debug!(%error, "outbox publish still failing"),
            None if self.publish_failing.swap(false, Ordering::Relaxed) => {
                tracing::info!("outbox publishing again");
            }
            None => {}
        }
        if sent.is_empty() {
            return Ok(false);
        }
        let latencies = client
            .query(
                &format!(
                    "WITH marked AS (
                         UPDATE outbox SET amqp_status = 'sent', amqp_at = now(),
                             webhook_status = CASE WHEN $2 AND webhook_status = 'pending'
                                                   THEN 'off' ELSE webhook_status END
                          WHERE id = ANY($1) AND amqp_status = 'pending'
                         RETURNING notification_id, created_at, 'sent' AS status),
                     {NOTIFICATIONS_SENT}
                     SELECT EXTRACT(EPOCH FROM now() - created_at)::float8 FROM marked"
                ),
                &[&sent, &self.sender.is_none()],
            )
            .await?;
        record_delivered("amqp", &latencies)?;
        Ok(true)
    }

    /// Publishes one user's rows in order until the first failure; returns the confirmed ids.
    async fn publish_in_order(
        &self,
        messages: impl Iterator<Item = Message>,
    ) -> (Vec<Uuid>, Option<PublishError>) {
        let mut sent = Vec::new();
        for message in messages {
            let mut table = FieldTable::default();
            headers::put_text(&mut table, "user_id", &message.user_id);
            headers::put_integer(&mut table, "version", message.version);
            let properties = BasicProperties::default()
                .with_message_id(message.id.to_string().as_str().into())
                .with_type(message.kind.as_str().into())
                .with_content_type("application/json".into())
                .with_timestamp(u64::try_from(message.created_at.timestamp()).unwrap_or(0))
                .with_headers(table);
            let outcome = self
                .publisher
                .publish(
                    &self.exchange,
                    &message.kind,
                    &message.to_bytes(),
                    properties,
                )
                .await;
            match outcome {
                Ok(()) => sent.push(message.id),
                Err(PublishError::Unroutable) => {
                    metrics::counter!("outbox_unroutable_total").increment(1);
                    sent.push(message.id);
                }
                Err(error) => {
                    metrics::counter!("outbox_delivery_failures_total", "channel" => "amqp")
                        .increment(1);
                    return (sent, Some(error));
                }
            }
        }
        (sent, None)
    }

    /// Sends the due head row of each user; true when any was delivered.
    async fn webhook_pass(&self, sender: &Sender) -> Result<bool, RelayError> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {MESSAGE_COLUMNS}, webhook_attempts, webhook_next_at <= now() AS due
                       FROM (SELECT DISTINCT ON (user_id) * FROM outbox
                              WHERE webhook_status = 'pending'
                              ORDER BY user_id, version, seq) head
                      ORDER BY seq LIMIT $1"
                ),
                &[&i64::from(self.config.batch_size)],
            )
            .await?;
        let mut oldest = None;
        let mut due = Vec::new();
        for row in &rows {
            let message = Message::from_row(row)?;
            let at = message.created_at;
            oldest = Some(oldest.map_or(at, |o: chrono::DateTime<Utc>| o.min(at)));
            if row.try_get("due")? {
                due.push((message, row.try_get::<_, i32>("webhook_attempts")?));
            }
        }
        match oldest {
            Some(oldest) => record_lag("webhook", oldest),
            None => metrics::gauge!("outbox_lag_seconds", "channel" => "webhook").set(0.0),
        }
        if due.is_empty() {
            return Ok(false);
        }
        let results: Vec<_> = stream::iter(due)
            .map(|(message, attempts)| async move {
                let result = sender.send(&message).await;
                (message, attempts, result)
            })
            .buffer_unordered(self.config.webhook_concurrency)
            .collect()
            .await;
        let mut marks = WebhookMarks::default();
        for (message, attempts, result) in results {
            marks.push(&self.config, &message, attempts, result.err());
        }
        let latencies = client
            .query(
                &format!(
                    "WITH marked AS (
                         UPDATE outbox o SET webhook_status = f.status,
                             webhook_attempts = o.webhook_attempts + 1,
                             webhook_next_at = now() + f.delay_ms * interval '1 millisecond',
                             webhook_last_error = f.error,
                             webhook_at = CASE WHEN f.status = 'pending' THEN o.webhook_at
                                               ELSE now() END,
                             amqp_status = CASE WHEN $5 AND o.amqp_status = 'pending'
                                                     AND f.status <> 'pending'
                                                THEN 'off' ELSE o.amqp_status END
                           FROM unnest($1::uuid[], $2::text[], $3::int8[], $4::text[])
                                AS f(id, status, delay_ms, error)
                          WHERE o.id = f.id AND o.webhook_status = 'pending'
                         RETURNING o.notification_id, o.created_at, f.status),
                     {NOTIFICATIONS_SENT}
                     SELECT EXTRACT(EPOCH FROM now() - created_at)::float8 FROM marked
                      WHERE status = 'sent'"
                ),
                &[
                    &marks.ids,
                    &marks.statuses,
                    &marks.delays_ms,
                    &marks.errors,
                    &!self.config.amqp,
                ],
            )
            .await?;
        record_delivered("webhook", &latencies)?;
        Ok(!latencies.is_empty())
    }

    /// Deletes rows older than the retention that no channel still has to deliver (a failed
    /// webhook row stays until replayed), and refreshes the failed-row gauge.
    async fn prune(&self) -> Result<(), RelayError> {
        let client = self.pool.get().await?;
        let retention = i64::try_from(self.config.retention.as_secs()).unwrap_or(i64::MAX);
        let deleted = client
            .execute(
                "DELETE FROM outbox WHERE id IN (
                     SELECT id FROM outbox
                      WHERE created_at < now() - $1::int8 * interval '1 second'
                        AND (amqp_status <> 'pending' OR NOT $2)
                        AND (webhook_status IN ('sent', 'off')
                             OR (webhook_status = 'pending' AND NOT $3))
                      LIMIT $4)",
                &[
                    &retention,
                    &self.config.amqp,
                    &self.sender.is_some(),
                    &PRUNE_LIMIT,
                ],
            )
            .await?;
        if deleted > 0 {
            tracing::debug!(deleted, "pruned delivered outbox rows");
        }
        let failed: i64 = client
            .query_one(
                "SELECT count(*) FROM outbox WHERE webhook_status = 'failed'",
                &[],
            )
            .await?
            .try_get(0)?;
        #[allow(clippy::cast_precision_loss)]
        metrics::gauge!("outbox_webhook_failed").set(failed as f64);
        Ok(())
    }
}

/// The webhook attempts of one pass, as one array per column of the marking statement.
#[derive(Default)]
struct WebhookMarks {
    ids: Vec<Uuid>,
    statuses: Vec<&'static str>,
    delays_ms: Vec<i64>,
    errors: Vec<Option<String>>,
}

impl WebhookMarks {
    /// Records one attempt: sent, retried after the schedule's next delay, or failed for good.
    fn push(
        &mut self,
        config: &OutboxConfig,
        message: &Message,
        attempts_before: i32,
        error: Option<super::webhook::DeliveryError>,
    ) {
        self.ids.push(message.id);
        let Some(error) = error else {
            self.statuses.push("sent");
            self.delays_ms.push(0);
            self.errors.push(None);
            return;
        };
        metrics::counter!("outbox_delivery_failures_total", "channel" => "webhook").increment(1);
        let attempts = attempts_before.saturating_add(1);
        let next_delay = usize::try_from(attempts - 1)
            .ok()
            .and_then(|i| config.webhook_retry_delays.get(i));
        match next_delay {
            Some(delay) if attempts < config.webhook_max_attempts() => {
                tracing::debug!(message_id = %message.id, user_id = %message.user_id, attempts,
                    %error, retry_in = ?delay, "webhook attempt failed");
                self.statuses.push("pending");
                self.delays_ms
                    .push(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX));
            }
            _ => {
                tracing::error!(message_id = %message.id, user_id = %message.user_id, attempts,
                    %error, "webhook delivery failed for good; `processor outbox replay` resends it");
                metrics::counter!("outbox_webhook_gave_up_total").increment(1);
                self.statuses.push("failed");
                self.delays_ms.push(0);
            }
        }
        self.errors.push(Some(error.to_string()));
    }
}

fn record_lag(channel: &'static str, oldest: chrono::DateTime<Utc>) {
    let lag = (Utc::now() - oldest).num_milliseconds().max(0);
    #[allow(clippy::cast_precision_loss)]
    metrics::gauge!("outbox_lag_seconds", "channel" => channel).set(lag as f64 / 1000.0);
}

fn record_delivered(
    channel: &'static str,
    latencies: &[tokio_postgres::Row],
) -> Result<(), RelayError> {
    for row in latencies {
        let seconds: f64 = row.try_get(0)?;
        metrics::histogram!("outbox_delivery_seconds", "channel" => channel).record(seconds);
    }
    metrics::counter!("outbox_delivered_total", "channel" => channel)
        .increment(latencies.len() as u64);
    Ok(())
}
