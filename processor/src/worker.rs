//! The consumer: takes Stripe events from the main queue and applies them to Postgres in small
//! batches, then refreshes the Redis cache and acknowledges.
//!
//! Invariants:
//! - a delivery is acked only after its outcome is durable: its Postgres transaction committed
//!   (applied, or found already processed), or a copy was republished to a retry queue or the
//!   dead-letter queue and confirmed by the broker. Anything else goes back to the queue;
//! - only the consume loop acks (in its lanes, after the batch). Handling a batch yields one
//!   [`Decision`] per delivery, derived from an error taxonomy: transient failures (Postgres,
//!   pool, broker) are retried, permanent ones (unparsable event, rejected data) are
//!   dead-lettered at once;
//! - one Postgres transaction per batch, applied as a set ([`store::batch`]); if any of it
//!   fails, the batch is redone with one savepoint per event, so a permanent failure rolls back
//!   only its own event. `processed_events` is written in the same transaction as the effects,
//!   so an event's effects are applied at most once whatever Redis says;
//! - several batches run at once in lanes; a dispatcher sends every delivery of a user to the
//!   same lane, so the batches of one process do not wait on each other's per-user locks
//!   (across processes Postgres serializes them, and a deadlock is retried as transient);
//! - the Redis `done` marker and the cache are written after the commit, the cache only with the
//!   newest version per user in the batch, and a Redis failure never fails an event.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::pin::pin;
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use deadpool_postgres::Pool;
use futures_util::StreamExt;
use futures_util::future::FusedFuture;
use futures_util::future::join_all;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, Consumer};
use shared::amqp::{PublishError, Publisher, PublisherTask};
use shared::topology::headers;

use crate::cache::{Cache, CacheError, Claim, ClaimToken};
use crate::config::Config;
use crate::db::{self, DbError};
use crate::events::{self, Event};
use crate::store::{self, StoreError, UserSnapshot};

/// How long start-up waits for Postgres to become reachable before giving up.
pub const STARTUP_PATIENCE: Duration = Duration::from_secs(60);

/// Longest `last_error` header, so a header never carries a long driver message.
const MAX_REASON_LEN: usize = 200;

/// Why the worker stopped on its own.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Cache(#[from] CacheError),
}

/// What became of one event inside a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Committed now (its effects, possibly none for an ignored type).
    Applied,
    /// Committed before (`processed_events` or the `done` marker says so): skipped replay.
    Replay,
    /// Can never succeed: parse failure or data the database rejects.
    Permanent(String),
    /// May succeed later: Postgres, pool or Redis trouble.
    Transient(String),
    /// Another worker holds a live claim on the event right now.
    Busy,
}

/// What the consume loop does with a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Ack,
    /// Republish to retry queue `queue` (1-based) with header `attempts`, then ack.
    Retry {
        after: Duration,
        queue: usize,
        attempts: u32,
        reason: String,
    },
    /// Republish to the dead-letter queue, then ack.
    DeadLetter {
        reason: String,
        attempts: u32,
    },
}

/// Maps an outcome to a decision. `attempts` is the delivery's `attempts` header (retries so far).
///
/// A transient failure goes to the next retry queue; after the last one it is dead-lettered with
/// `attempts` = the number of retries made. A busy event is put in the first retry queue without
/// counting an attempt: it is not a failure, and the claim of a crashed worker expires.
#[must_use]
pub fn decide(outcome: &Outcome, attempts: u32, delays: &[Duration]) -> Decision {
    match outcome {
        Outcome::Applied | Outcome::Replay => Decision::Ack,
        Outcome::Permanent(reason) => Decision::DeadLetter {
            reason: reason.clone(),
            attempts,
        },
        Outcome::Transient(reason) => {
            let index = usize::try_from(attempts).unwrap_or(usize::MAX);
            match delays.get(index) {
                Some(after) => Decision::Retry {
                    after: *after,
                    queue: index + 1,
                    attempts: attempts.saturating_add(1),
                    reason: reason.clone(),
                },
                None => Decision::DeadLetter {
                    reason: reason.clone(),
                    attempts,
                },
            }
        }
        Outcome::Busy => match delays.first() {
            Some(after) => Decision::Retry {
                after: *after,
                queue: 1,
                attempts,
                reason: "claimed by another worker".into(),
            },
            None => Decision::DeadLetter {
                reason: "claimed by another worker and no retry queue".into(),
                attempts,
            },
        },
    }
}

/// Runs the consumer until `shutdown` resolves: prepares the database (creates it, migrates),
/// then consumes, reconnecting to the broker whenever it goes away.
///
/// # Errors
/// [`WorkerError`] when the database cannot be prepared at start-up or the config is unusable.
pub async fn run_worker(
    config: Config,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), WorkerError> {
    let (deps, publisher_task) = Dependencies::start(&config).await?;
    Worker::new(config, deps.pool, deps.cache, deps.publisher)
        .run(shutdown)
        .await;
    publisher_task.shutdown().await;
    Ok(())
}

/// What the consumer and the API share: the Postgres pool (database prepared), the Redis cache
/// and the confirmed publisher.
#[derive(Debug, Clone)]
pub struct Dependencies {
    pub pool: Pool,
    pub cache: Cache,
    pub publisher: Publisher,
}

impl Dependencies {
    /// Installs the metrics recorder, prepares the database (waiting up to [`STARTUP_PATIENCE`]
    /// for Postgres), and starts the cache client and the publisher. Stop the returned task after
    /// the last publish.
    ///
    /// # Errors
    /// [`WorkerError`] when the database cannot be prepared or the configuration is unusable.
    pub async fn start(config: &Config) -> Result<(Self, PublisherTask), WorkerError> {
        // Installs the process-wide recorder before anything records.
        let _ = shared::telemetry::metrics_handle();
        let pool = db::pool(config)?;
        db::prepare_patiently(config, &pool, STARTUP_PATIENCE).await?;
        let cache = Cache::new(config)?;
        let (publisher, publisher_task) = Publisher::start(
            config.amqp_url.clone(),
            "processor-publish".into(),
            config.topology.clone(),
            config.publish_confirm_timeout,
        );
        Ok((
            Self {
                pool,
                cache,
                publisher,
            },
            publisher_task,
        ))
    }
}

/// The consumer with its dependencies, for callers that share them (e.g. with the API).
#[derive(Debug, Clone)]
pub struct Worker {
    config: Config,
    pool: Pool,
    cache: Cache,
    publisher: Publisher,
}

/// An open consuming connection.
struct Session {
    connection: Connection,
    channel: Channel,
    consumer: Consumer,
}

enum SessionEnd {
    Shutdown,
    Lost,
}

impl Worker {
    #[must_use]
    pub fn new(config: Config, pool: Pool, cache: Cache, publisher: Publisher) -> Self {
        Self {
            config,
            pool,
            cache,
            publisher,
        }
    }

    /// Consumes until `shutdown` resolves. On shutdown it cancels the consumer, lets the
    /// in-flight batch finish within `shutdown_grace`, and closes the connection, which returns
    /// every unacked delivery to the queue.
    pub async fn run(&self, shutdown: impl Future<Output = ()> + Send) {
        let mut shutdown = pin!(futures_util::FutureExt::fuse(shutdown));
        let (stop_depths, stopped) = tokio::sync::watch::channel(false);
        let depths = tokio::spawn(poll_queue_depths(self.config.clone(), stopped));
        let mut backoff = Duration::from_millis(200);
        // Consuming before the publishing channel is open would only requeue the first retries.
        tokio::select! {
            biased;
            () = &mut shutdown => {}
            ready = self.publisher.wait_ready(Duration::from_secs(10)) => if !ready {
                tracing::warn!("publishing channel not ready; consuming anyway");
            },
        }
        while !shutdown.is_terminated() {
            let opened = tokio::select! {
                biased;
                () = &mut shutdown => break,
                opened = self.open_session() => opened,
            };
            let mut session = match opened {
                Ok(session) => session,
                Err(error) => {
                    tracing::warn!(%error, retry_in = ?backoff, "cannot consume; broker unavailable");
                    metrics::gauge!("amqp_connected", "connection" => "consume").set(0.0);
                    tokio::select! {
                        biased;
                        () = &mut shutdown => break,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            backoff = Duration::from_millis(200);
            metrics::gauge!("amqp_connected", "connection" => "consume").set(1.0);
            tracing::info!(queue = %self.config.topology.main_queue(), "consuming");
            let end = self.consume(&mut session, shutdown.as_mut()).await;
            metrics::gauge!("amqp_connected", "connection" => "consume").set(0.0);
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                let _ = session.channel.close(200, "closing".into()).await;
                let _ = session.connection.close(200, "closing".into()).await;
            })
            .await;
            match end {
                SessionEnd::Shutdown => break,
                SessionEnd::Lost => tracing::warn!("consuming connection lost; reconnecting"),
            }
        }
        let _ = stop_depths.send(true);
        let _ = depths.await;
        tracing::info!("consumer stopped");
    }

    async fn open_session(&self) -> Result<Session, lapin::Error> {
        let connection = shared::amqp::connect(&self.config.amqp_url, "processor-consume").await?;
        let channel = connection.create_channel().await?;
        self.config.topology.declare(&channel).await?;
        channel
            .basic_qos(self.config.prefetch, BasicQosOptions::default())
            .await?;
        let consumer = channel
            .basic_consume(
                self.config.topology.main_queue().as_str().into(),
                ShortString::from(format!("processor-{}", uuid::Uuid::new_v4().simple())),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(Session {
            connection,
            channel,
            consumer,
        })
    }

    /// Dispatches deliveries to `lanes` batch processors by user: the same user always lands in
    /// the same lane, so concurrent batches of one process do not contend for (or deadlock on)
    /// the per-user locks. Returns when shutdown is requested or the connection is lost.
    async fn consume<S>(
        &self,
        session: &mut Session,
        mut shutdown: std::pin::Pin<&mut S>,
    ) -> SessionEnd
    where
        S: Future<Output = ()> + FusedFuture,
    {
        let lanes = self.config.lanes.max(1);
        let (lost_tx, mut lost_rx) = tokio::sync::watch::channel(false);
        let mut senders = Vec::with_capacity(lanes);
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..lanes {
            let (tx, rx) = tokio::sync::mpsc::channel(usize::from(self.config.prefetch));
            senders.push(tx);
            tasks.spawn(self.clone().lane(rx, lost_tx.clone()));
        }
        drop(lost_tx);
        let end = loop {
            let next = tokio::select! {
                biased;
                () = &mut shutdown => break SessionEnd::Shutdown,
                _ = lost_rx.wait_for(|lost| *lost) => break SessionEnd::Lost,
                next = session.consumer.next() => next,
            };
            let Some(Ok(delivery)) = next else {
                break SessionEnd::Lost;
            };
            // Parsed once, here: the lane gets the parsed event with the delivery.
            let item = Item::new(delivery);
            let lane = lane_of(&item, lanes);
            if senders[lane].send(item).await.is_err() {
                break SessionEnd::Lost;
            }
        };
        if matches!(end, SessionEnd::Shutdown) {
            self.cancel(session).await;
        }
        // Lanes finish the batch in hand and whatever was already dispatched to them.
        drop(senders);
        let grace = match end {
            SessionEnd::Shutdown => self.config.shutdown_grace,
            SessionEnd::Lost => Duration::from_secs(2),
        };
        let drained =
            tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            tracing::warn!(
                ?grace,
                "in-flight batches did not finish in time; their deliveries return to the queue"
            );
            tasks.shutdown().await;
        }
        end
    }

    /// One lane: batches what the dispatcher sends it and processes one batch at a time.
    async fn lane(
        self,
        mut deliveries: tokio::sync::mpsc::Receiver<Item>,
        lost: tokio::sync::watch::Sender<bool>,
    ) {
        while let Some(first) = deliveries.recv().await {
            let mut batch = vec![first];
            let deadline = tokio::time::Instant::now() + self.config.batch_wait;
            while batch.len() < self.config.batch_size.max(1) {
                match tokio::time::timeout_at(deadline, deliveries.recv()).await {
                    Ok(Some(delivery)) => batch.push(delivery),
                    Ok(None) | Err(_) => break,
                }
            }
            if !self.process_batch(batch).await {
                let _ = lost.send(true);
                return;
            }
        }
    }

    /// Stops deliveries to this consumer; those already prefetched return on close.
    async fn cancel(&self, session: &Session) {
        let tag = session.consumer.tag();
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            session
                .channel
                .basic_cancel(tag, BasicCancelOptions::default()),
        )
        .await;
    }

    /// Handles one batch end to end. Returns false when the channel broke while acking.
    async fn process_batch(&self, mut items: Vec<Item>) -> bool {
        metrics::histogram!("worker_batch_size").record(items.len() as f64);

        // In-batch duplicates share the first copy's work and are acked with it.
        let mut seen: std::collections::HashSet<String> = std::collections::HashSet::new();
        for item in &mut items {
            let Ok(event) = &item.parsed else {
                continue;
            };
            if !seen.insert(event.id.as_str().to_owned()) {
                item.outcome = Some(Outcome::Replay);
                item.batch_duplicate = true;
            }
        }

        let size = items.len();
        let started = Instant::now();
        self.claim_all(&mut items).await;
        let claimed = started.elapsed();
        self.apply_all(&mut items).await;
        let committed = started.elapsed();
        self.after_commit(&items).await;
        let cached = started.elapsed();
        let healthy = self.resolve_and_ack(items).await;
        tracing::debug!(
            size,
            ?claimed,
            ?committed,
            ?cached,
            settled = ?started.elapsed(),
            "batch done"
        );
        healthy
    }

    /// Takes the dedupe claims of the batch's fresh events concurrently.
    async fn claim_all(&self, items: &mut [Item]) {
        let pending: Vec<usize> = (0..items.len())
            .filter(|&i| items[i].outcome.is_none() && items[i].parsed.is_ok())
            .collect();
        let claims = join_all(pending.iter().map(|&i| {
            let cache = &self.cache;
            let id = items[i].event().map(|e| e.id.clone());
            async move {
                match id {
                    Some(id) => cache.claim(&id).await,
                    None => Claim::Unavailable,
                }
            }
        }))
        .await;
        for (i, claim) in pending.into_iter().zip(claims) {
            match claim {
                Claim::Done => items[i].outcome = Some(Outcome::Replay),
                Claim::HeldElsewhere => items[i].outcome = Some(Outcome::Busy),
                Claim::Acquired(token) => items[i].claim = Some(token),
                Claim::Unavailable => {}
            }
        }
    }

    /// Applies the batch's fresh events in one transaction, retrying transient failures briefly
    /// in process before handing them to the delay queues.
    async fn apply_all(&self, items: &mut [Item]) {
        let pending: Vec<usize> = (0..items.len())
            .filter(|&i| items[i].outcome.is_none())
            .collect();
        // Parse failures need no transaction.
        let mut todo = Vec::new();
        for i in pending {
            match &items[i].parsed {
                Ok(_) => todo.push(i),
                Err(error) => {
                    items[i].outcome = Some(Outcome::Permanent(short(&format!(
                        "invalid event: {error}"
                    ))));
                }
            }
        }
        if todo.is_empty() {
            return;
        }
        let events: Vec<&Event> = todo.iter().filter_map(|&i| items[i].event()).collect();
        // In-process retries use `backon`: the `backoff` crate is unmaintained
        // (RUSTSEC-2025-0012) and pulls in `instant` (RUSTSEC-2024-0384).
        let policy = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(50))
            .with_max_delay(Duration::from_millis(400))
            .with_max_times(3)
            .with_jitter();
        let mut result = (|| apply_batch(&self.pool, &events, BatchMode::SetBased))
            .retry(policy)
            .when(|error| !matches!(error, BatchError::Recompute(_)))
            .notify(|error, after| {
                metrics::counter!("worker_inprocess_retries_total").increment(1);
                tracing::warn!(%error, retry_in = ?after, events = events.len(), "batch failed; retrying");
            })
            .await;
        if let Err(BatchError::Recompute(error)) = &result {
            tracing::warn!(%error, events = events.len(), "batch recomputation failed; redoing it per event");
            result = (|| apply_batch(&self.pool, &events, BatchMode::PerEvent))
                .retry(policy)
                .notify(|error, after| {
                    metrics::counter!("worker_inprocess_retries_total").increment(1);
                    tracing::warn!(%error, retry_in = ?after, events = events.len(), "batch failed; retrying");
                })
                .await;
        }
        match result {
            Ok(results) => {
                for (i, result) in todo.into_iter().zip(results) {
                    items[i].outcome = Some(match result {
                        EventResult::Applied(users) => {
                            items[i].users = users;
                            Outcome::Applied
                        }
                        EventResult::Replay => Outcome::Replay,
                        EventResult::Permanent(reason) => Outcome::Permanent(reason),
                        EventResult::Later(reason) => Outcome::Transient(reason),
                    });
                }
            }
            Err(error) => {
                let reason = short(&error.to_string());
                for i in todo {
                    items[i].outcome = Some(Outcome::Transient(reason.clone()));
                }
            }
        }
    }

    /// Post-commit side effects in Redis: `done` markers, claim releases, cache refresh with the
    /// newest version of each user. All best effort.
    async fn after_commit(&self, items: &[Item]) {
        let mut latest: HashMap<&str, &UserSnapshot> = HashMap::new();
        for snapshot in items.iter().flat_map(|item| item.users.iter()) {
            latest
                .entry(snapshot.user_id.as_str())
                .and_modify(|held| {
                    if snapshot.version > held.version {
                        *held = snapshot;
                    }
                })
                .or_insert(snapshot);
        }
        let markers = items.iter().filter_map(|item| {
            let event = item.event()?;
            if item.batch_duplicate {
                // The first copy in the batch owns the marker, whatever became of it.
                return None;
            }
            let cache = &self.cache;
            match (&item.outcome, &item.claim) {
                (Some(Outcome::Applied | Outcome::Replay), _) => Some(
                    futures_util::future::Either::Left(cache.mark_done(&event.id)),
                ),
                (_, Some(token)) => Some(futures_util::future::Either::Right(
                    cache.release(&event.id, token),
                )),
                _ => None,
            }
        });
        let refreshes = latest
            .into_values()
            .map(|snapshot| self.cache.refresh(snapshot));
        futures_util::future::join(join_all(markers), join_all(refreshes)).await;
    }

    /// Makes every outcome durable (publishing retries and dead letters with confirms), then
    /// acks. A delivery whose republish failed is requeued instead of acked.
    async fn resolve_and_ack(&self, items: Vec<Item>) -> bool {
        let delays = self.config.topology.retry_delays();
        let decisions: Vec<Decision> = items
            .iter()
            .map(|item| {
                let outcome = item
                    .outcome
                    .clone()
                    .unwrap_or_else(|| Outcome::Transient("not processed".into()));
                decide(&outcome, item.attempts, delays)
            })
            .collect();
        let durable = join_all(
            items
                .iter()
                .zip(&decisions)
                .map(|(item, decision)| self.make_durable(item, decision)),
        )
        .await;

        // Lanes share the channel, so every delivery is settled on its own (no multiple-ack).
        let settled = join_all(items.iter().zip(&durable).map(|(item, ok)| async move {
            let sent = if *ok {
                item.delivery.acker.ack(BasicAckOptions::default()).await
            } else {
                item.delivery
                    .acker
                    .nack(BasicNackOptions {
                        requeue: true,
                        multiple: false,
                    })
                    .await
            };
            matches!(sent, Ok(true))
        }))
        .await;
        let healthy = settled.iter().all(|s| *s);
        if !healthy {
            tracing::warn!("acknowledgement not sent; deliveries return to the queue");
        }
        for ((item, decision), ok) in items.iter().zip(&decisions).zip(&durable) {
            item.record(decision, *ok && healthy);
        }
        healthy
    }

    async fn make_durable(&self, item: &Item, decision: &Decision) -> bool {
        let topology = &self.config.topology;
        let result = match decision {
            Decision::Ack => return true,
            Decision::Retry {
                queue,
                attempts,
                reason,
                ..
            } => {
                crate::dlq::record_attempts(
                    &item.event_id,
                    *attempts,
                    self.config.attempts_alert_threshold,
                );
                let mut table = item.headers();
                put_int(&mut table, headers::ATTEMPTS, *attempts);
                put_str(&mut table, headers::FIRST_SEEN_AT, &item.first_seen_at);
                put_str(&mut table, headers::LAST_ERROR, reason);
                self.republish(&topology.retry_queue(*queue), item, table)
                    .await
            }
            Decision::DeadLetter { reason, attempts } => {
                let mut table = item.headers();
                put_int(&mut table, headers::ATTEMPTS, *attempts);
                put_str(&mut table, headers::FIRST_SEEN_AT, &item.first_seen_at);
                put_str(&mut table, headers::LAST_ERROR, reason);
                put_str(
                    &mut table,
                    headers::DEAD_LETTERED_AT,
                    &chrono::Utc::now().to_rfc3339(),
                );
                self.republish(&topology.dead_letter_queue(), item, table)
                    .await
            }
        };
        match result {
            Ok(()) => true,
            Err(error) => {
                item.span.in_scope(|| {
                    tracing::warn!(%error, "republish not confirmed; requeueing the delivery");
                });
                false
            }
        }
    }

    /// Publishes the delivery's body with its properties unchanged but `headers`, through the
    /// default exchange straight to `queue`, and waits for the confirm.
    async fn republish(
        &self,
        queue: &str,
        item: &Item,
        table: FieldTable,
    ) -> Result<(), PublishError> {
        let properties: BasicProperties = item.delivery.properties.clone().with_headers(table);
        match self
            .publisher
            .publish("", queue, &item.delivery.data, properties.clone())
            .await
        {
            // The publishing connection is being re-established: give it a moment once.
            Err(PublishError::Unavailable)
                if self
                    .publisher
                    .wait_ready(self.config.publish_confirm_timeout)
                    .await =>
            {
                self.publisher
                    .publish("", queue, &item.delivery.data, properties)
                    .await
            }
            other => other,
        }
    }
}

/// Result of one event inside the batch transaction.
enum EventResult {
    Applied(Vec<UserSnapshot>),
    Replay,
    Permanent(String),
    /// This event cannot be applied yet (e.g. a second completed purchase of a product whose
    /// refund has not arrived): its savepoint is rolled back and it alone is retried later.
    Later(String),
}

/// A failure that aborts the whole batch transaction.
#[derive(Debug, thiserror::Error)]
enum BatchError {
    #[error("postgres unavailable: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("postgres error: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("store error: {0}")]
    Store(StoreError),
    /// The batch's recomputation read a row it cannot use: redo the batch per event.
    #[error("recomputation failed: {0}")]
    Recompute(StoreError),
}

/// One transaction, one savepoint per event: `processed_events` insert (a conflict means the
/// event was committed before), then the projection.
///
/// The savepoints are issued by hand rather than through nested `Transaction`s so they can be
/// pipelined: releasing the previous event's savepoint, opening the next one and inserting its
/// `processed_events` row cost one round trip together.
async fn apply_batch(
    pool: &Pool,
    events: &[&Event],
    mode: BatchMode,
) -> Result<Vec<EventResult>, BatchError> {
    let mut client = pool.get().await?;
    if mode == BatchMode::SetBased {
        let statements = std::sync::Arc::clone(&client.statement_cache);
        let tx = client.transaction().await?;
        match store::batch::apply(&tx, &statements, events).await {
            Ok(results) => {
                tx.commit().await?;
                return Ok(results
                    .into_iter()
                    .map(|result| match result {
                        Some(users) => EventResult::Applied(users),
                        None => EventResult::Replay,
                    })
                    .collect());
            }
            // Whatever failed (an event the projection refuses, a second completed purchase,
            // a deadlock), the per-event path redoes the batch and charges it to one event.
            Err(error) => {
                metrics::counter!("worker_batch_fallbacks_total").increment(1);
                tracing::debug!(%error, events = events.len(), "set-based batch failed; applying it event by event");
                tx.rollback().await?;
            }
        }
    }
    let insert = client
        .prepare_cached(
            "INSERT INTO processed_events (event_id, event_type, event_created)
             VALUES ($1, $2, $3) ON CONFLICT (event_id) DO NOTHING",
        )
        .await?;
    let statements = std::sync::Arc::clone(&client.statement_cache);
    let tx = client.transaction().await?;
    let mut results = Vec::with_capacity(events.len());
    // Per batch: the users each kept event concerns, recomputed once after the last event.
    let mut touched: Vec<(usize, BTreeSet<String>)> = Vec::new();
    let mut savepoint_open = false;
    for event in events {
        let begin = if savepoint_open {
            "RELEASE SAVEPOINT event; SAVEPOINT event"
        } else {
            "SAVEPOINT event"
        };
        let created = chrono::DateTime::from_timestamp(event.created, 0);
        let id = event.id.as_str();
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] =
            [&id, &event.event_type, &created];
        let (began, inserted) =
            tokio::join!(tx.batch_execute(begin), tx.execute(&insert, &params),);
        began?;
        savepoint_open = true;
        if inserted? == 0 {
            results.push(EventResult::Replay);
            continue;
        }
        let applied = match mode {
            BatchMode::SetBased => store::apply_facts(&tx, &statements, event)
                .await
                .map(|users| {
                    if !users.is_empty() {
                        touched.push((results.len(), users));
                    }
                    Vec::new()
                }),
            BatchMode::PerEvent => store::apply_prepared(&tx, &statements, event)
                .await
                .map(|applied| applied.users),
        };
        match applied {
            Ok(users) => results.push(EventResult::Applied(users)),
            Err(error) => match permanent_reason(&error) {
                Some(reason) => {
                    // Undoes this event's writes, its processed_events row included.
                    tx.batch_execute("ROLLBACK TO SAVEPOINT event").await?;
                    results.push(EventResult::Permanent(reason));
                }
                // A transient condition of this event's own data, not of the connection.
                None if !matches!(error, StoreError::Db(_)) => {
                    tx.batch_execute("ROLLBACK TO SAVEPOINT event").await?;
                    results.push(EventResult::Later(short(&error.to_string())));
                }
                None => return Err(BatchError::Store(error)),
            },
        }
    }
    if !touched.is_empty() {
        let mut counts: BTreeMap<String, i64> = BTreeMap::new();
        for user in touched.iter().flat_map(|(_, users)| users) {
            *counts.entry(user.clone()).or_default() += 1;
        }
        let snapshots = match store::recompute_users(&tx, &statements, &counts).await {
            Ok(snapshots) => snapshots,
            // Which event brought the unreadable row in is unknown here: the caller redoes the
            // batch with a recomputation per event, which isolates it.
            Err(error) if !matches!(error, StoreError::Db(_)) => {
                return Err(BatchError::Recompute(error));
            }
            Err(error) => return Err(BatchError::Store(error)),
        };
        let by_user: HashMap<&str, &UserSnapshot> = snapshots
            .iter()
            .map(|snapshot| (snapshot.user_id.as_str(), snapshot))
            .collect();
        for (index, users) in touched {
            if let Some(EventResult::Applied(views)) = results.get_mut(index) {
                views.extend(
                    users
                        .iter()
                        .filter_map(|user| by_user.get(user.as_str()).map(|s| (*s).clone())),
                );
            }
        }
    }
    tx.commit().await?;
    Ok(results)
}

/// How a batch is applied, and when it recomputes its users' entitlements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BatchMode {
    /// The whole batch in a few set-based statements ([`store::batch`]); when any part of
    /// it fails, in the same call, a savepoint per event with each user recomputed once after
    /// the batch's last event (the usual path).
    SetBased,
    /// A savepoint per event, each recomputed after it, so a failing recomputation is charged
    /// to its own event alone.
    PerEvent,
}

/// `Some(reason)` when the store error can never go away for this event: data the database
/// rejects (SQLSTATE classes 22 and 23), or a store error the store itself calls permanent.
/// Connection trouble, deadlocks and serialization failures are transient.
fn permanent_reason(error: &StoreError) -> Option<String> {
    match error {
        StoreError::Db(db) => {
            let code = db.code()?.code();
            (code.starts_with("22") || code.starts_with("23")).then(|| {
                let constraint = db
                    .as_db_error()
                    .and_then(|d| d.constraint())
                    .map(|c| format!(" ({c})"))
                    .unwrap_or_default();
                format!("database rejected the event: SQLSTATE {code}{constraint}")
            })
        }
        other if !other.is_transient() => Some(short(&other.to_string())),
        _ => None,
    }
}

/// One delivery in a batch, with what was learned about it.
struct Item {
    delivery: Delivery,
    parsed: Result<Event, events::EventError>,
    attempts: u32,
    first_seen_at: String,
    event_id: String,
    event_type: String,
    received: Instant,
    claim: Option<ClaimToken>,
    outcome: Option<Outcome>,
    /// Another delivery of the same event id came earlier in this batch.
    batch_duplicate: bool,
    users: Vec<UserSnapshot>,
    span: tracing::Span,
}

impl Item {
    fn new(delivery: Delivery) -> Self {
        let parsed = events::parse(&delivery.data);
        let table = delivery.properties.headers().clone().unwrap_or_default();
        let attempts = table
            .inner()
            .get(headers::ATTEMPTS)
            .and_then(int_value)
            .unwrap_or(0);
        let first_seen_at = table
            .inner()
            .get(headers::FIRST_SEEN_AT)
            .and_then(str_value)
            .unwrap_or_else(|| chrono::Utc::now().to_rfc3339());
        let (event_id, event_type) = match &parsed {
            Ok(event) => (event.id.as_str().to_owned(), event.event_type.clone()),
            Err(_) => (
                delivery
                    .properties
                    .message_id()
                    .as_ref()
                    .map_or_else(String::new, |m| m.as_str().to_owned()),
                "unknown".to_owned(),
            ),
        };
        let span = tracing::info_span!(
            "delivery",
            event_id = %event_id,
            event_type = %event_type,
            attempts,
            redelivered = delivery.redelivered,
        );
        Self {
            delivery,
            parsed,
            attempts,
            first_seen_at,
            event_id,
            event_type,
            received: Instant::now(),
            claim: None,
            outcome: None,
            batch_duplicate: false,
            users: Vec::new(),
            span,
        }
    }

    fn event(&self) -> Option<&Event> {
        self.parsed.as_ref().ok()
    }

    fn headers(&self) -> FieldTable {
        self.delivery
            .properties
            .headers()
            .clone()
            .unwrap_or_default()
    }

    fn record(&self, decision: &Decision, settled: bool) {
        let kind = match (&self.outcome, decision) {
            (_, Decision::Retry { .. }) if !settled => "requeued",
            (_, Decision::DeadLetter { .. }) if !settled => "requeued",
            (Some(Outcome::Applied), _) => "applied",
            (Some(Outcome::Replay), _) => "replay",
            (Some(Outcome::Busy), _) => "deferred",
            (_, Decision::Retry { .. }) => "retried",
            (_, Decision::DeadLetter { .. }) => "dead_lettered",
            (_, Decision::Ack) => "acked",
        };
        let event_type = self.event_type.clone();
        metrics::counter!("events_total", "type" => event_type, "outcome" => kind).increment(1);
        metrics::histogram!("event_processing_seconds")
            .record(self.received.elapsed().as_secs_f64());
        let _guard = self.span.enter();
        match decision {
            Decision::Ack => match self.outcome {
                Some(Outcome::Replay) => {
                    tracing::info!(event_id = %self.event_id, "skipped replay");
                }
                _ => tracing::debug!(users = self.users.len(), "applied"),
            },
            Decision::Retry { queue, after, .. } if self.outcome == Some(Outcome::Busy) => {
                tracing::info!(
                    queue,
                    ?after,
                    settled,
                    "claimed by another worker; deferred"
                );
            }
            Decision::Retry {
                queue,
                after,
                reason,
                ..
            } => {
                if settled {
                    metrics::counter!("event_retries_total", "queue" => queue.to_string())
                        .increment(1);
                }
                tracing::warn!(queue, ?after, reason = %reason, settled, "scheduled for retry");
            }
            Decision::DeadLetter { reason, attempts } => {
                if settled {
                    metrics::counter!("events_dead_lettered_total").increment(1);
                }
                tracing::error!(attempts, reason = %reason, settled, "dead-lettered");
            }
        }
    }
}

fn int_value(value: &AMQPValue) -> Option<u32> {
    let n: i64 = match value {
        AMQPValue::ShortShortInt(v) => i64::from(*v),
        AMQPValue::ShortShortUInt(v) => i64::from(*v),
        AMQPValue::ShortInt(v) => i64::from(*v),
        AMQPValue::ShortUInt(v) => i64::from(*v),
        AMQPValue::LongInt(v) => i64::from(*v),
        AMQPValue::LongUInt(v) => i64::from(*v),
        AMQPValue::LongLongInt(v) => *v,
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes())
            .ok()?
            .trim()
            .parse()
            .ok()?,
        AMQPValue::ShortString(s) => s.as_str().trim().parse().ok()?,
        _ => return None,
    };
    u32::try_from(n).ok()
}

fn str_value(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok().map(str::to_owned),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

fn put_int(table: &mut FieldTable, key: &str, value: u32) {
    table.insert(key.into(), AMQPValue::LongLongInt(i64::from(value)));
}

fn put_str(table: &mut FieldTable, key: &str, value: &str) {
    table.insert(key.into(), AMQPValue::LongString(LongString::from(value)));
}

/// First line of `text`, at most [`MAX_REASON_LEN`] characters.
fn short(text: &str) -> String {
    let line = text.lines().next().unwrap_or_default();
    line.chars().take(MAX_REASON_LEN).collect()
}

/// The lane of a delivery: a hash of the user it most likely concerns
/// ([`Event::routing_hint`]), or of the whole body when the event names none or did not parse.
/// Only a routing hint: correctness never depends on it, the per-user lock in Postgres does.
fn lane_of(item: &Item, lanes: usize) -> usize {
    use std::hash::{Hash, Hasher};
    if lanes <= 1 {
        return 0;
    }
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    match item.parsed.as_ref().ok().and_then(Event::routing_hint) {
        Some(hint) => hint.hash(&mut hasher),
        None => item.delivery.data.hash(&mut hasher),
    }
    usize::try_from(hasher.finish() % lanes as u64).unwrap_or(0)
}

/// Samples the depth of every queue of the topology into the `queue_depth` gauge.
async fn poll_queue_depths(config: Config, mut stop: tokio::sync::watch::Receiver<bool>) {
    let topology = &config.topology;
    let mut queues = vec![topology.main_queue(), topology.dead_letter_queue()];
    queues.extend((1..=topology.retry_delays().len()).map(|n| topology.retry_queue(n)));
    let mut tick = tokio::time::interval(config.queue_depth_interval);
    let mut connection: Option<(Connection, Channel)> = None;
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            _ = tick.tick() => {}
        }
        if connection
            .as_ref()
            .is_none_or(|(c, ch)| !c.status().connected() || !ch.status().connected())
        {
            connection = async {
                let c = shared::amqp::connect(&config.amqp_url, "processor-depths")
                    .await
                    .ok()?;
                let ch = c.create_channel().await.ok()?;
                Some((c, ch))
            }
            .await;
        }
        let Some((_, channel)) = &connection else {
            continue;
        };
        for queue in &queues {
            let declared = channel
                .queue_declare(
                    queue.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await;
            match declared {
                Ok(q) => metrics::gauge!("queue_depth", "queue" => queue.clone())
                    .set(f64::from(q.message_count())),
                // A failed passive declare closes the channel; reopen on the next tick.
                Err(_) => break,
            }
        }
    }
    if let Some((connection, _)) = connection {
        let _ = connection.close(200, "closing".into()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DELAYS: &[Duration] = &[Duration::from_secs(5), Duration::from_secs(30)];

    #[test]
    fn committed_and_replayed_events_are_acked() {
        assert_eq!(decide(&Outcome::Applied, 0, DELAYS), Decision::Ack);
        assert_eq!(decide(&Outcome::Replay, 1, DELAYS), Decision::Ack);
    }

    #[test]
    fn transient_failures_walk_the_retry_queues_then_dead_letter() {
        let t = Outcome::Transient("down".into());
        assert_eq!(
            decide(&t, 0, DELAYS),
            Decision::Retry {
                after: DELAYS[0],
                queue: 1,
                attempts: 1,
                reason: "down".into()
            }
        );
        assert_eq!(
            decide(&t, 1, DELAYS),
            Decision::Retry {
                after: DELAYS[1],
                queue: 2,
                attempts: 2,
                reason: "down".into()
            }
        );
        assert_eq!(
            decide(&t, 2, DELAYS),
            Decision::DeadLetter {
                reason: "down".into(),
                attempts: 2
            }
        );
    }

    #[test]
    fn permanent_failures_are_dead_lettered_at_once() {
        assert_eq!(
            decide(&Outcome::Permanent("bad".into()), 0, DELAYS),
            Decision::DeadLetter {
                reason: "bad".into(),
                attempts: 0
            }
        );
    }

    #[test]
    fn busy_events_wait_in_the_first_retry_queue_without_counting_an_attempt() {
        match decide(&Outcome::Busy, 1, DELAYS) {
            Decision::Retry {
                queue, attempts, ..
            } => assert_eq!((queue, attempts), (1, 1)),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn reasons_are_one_short_line() {
        let long = format!("first line {}\nsecond", "x".repeat(500));
        let reason = short(&long);
        assert!(!reason.contains('\n'));
        assert_eq!(reason.chars().count(), MAX_REASON_LEN);
    }

    #[test]
    fn attempt_headers_are_read_whatever_their_integer_type() {
        assert_eq!(int_value(&AMQPValue::LongLongInt(3)), Some(3));
        assert_eq!(int_value(&AMQPValue::ShortShortUInt(2)), Some(2));
        assert_eq!(int_value(&AMQPValue::LongString("4".into())), Some(4));
        assert_eq!(int_value(&AMQPValue::LongLongInt(-1)), None);
    }
}
