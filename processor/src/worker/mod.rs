//! The consumer: takes Stripe events from the main queue and applies them to Postgres in small
//! batches, then refreshes the Redis cache and acknowledges.
//!
//! Invariants:
//! - a delivery is acked only after its outcome is durable: its Postgres transaction committed
//!   (applied, or found already processed), or a copy was republished to a retry queue or the
//!   dead-letter queue and confirmed by the broker. Anything else goes back to the queue;
//! - only the consume loop acks (in its lanes, after the batch). The store says what became of
//!   each event (a [`store::Outcome`]); [`settle::decide`] alone turns that into ack, retry or
//!   park;
//! - one Postgres transaction per batch, through the store's one apply path
//!   ([`store::apply_events`]), which charges a failure to its own event;
//! - several batches run at once in lanes; a dispatcher sends every delivery of a user to the
//!   same lane, so the batches of one process do not wait on each other's per-user locks
//!   (across processes Postgres serializes them, and a deadlock is retried as transient);
//! - the Redis `done` marker and the cache are written after the commit, the cache only with the
//!   newest version per user in the batch, and a Redis failure never fails an event.
//!
//! Modules: [`consume`] (broker session, dispatch to lanes), [`batch`] (the path as plain steps
//! over a typed item: skip in-batch copies, complete, claim, apply, after commit), [`settle`]
//! (decision, republish, ack, metrics),
//! [`heal`] (cache entries a failed write left stale), [`legacy`] (upgrade from classic delays).
//!
//! Direction: the worker sits on top of the adapters (`store`, `cache`, `stripe`, `dlq`'s
//! bookkeeping) and the domain's parser; nothing below imports it. It stops through
//! `shared::shutdown` (the consumer, then the relay's last pass) and waits for a broker or a
//! database to come back through `shared::backoff`.

mod batch;
pub mod completions;
mod consume;
mod heal;
mod legacy;
mod settle;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use shared::amqp::Publisher;
use shared::backoff::Reconnect;
use shared::shutdown::{Shutdown, Stop};
use tokio::sync::OnceCell;

use crate::cache::Cache;
use crate::config::Config;
use crate::dlq::ParkedIndex;
use crate::service::{Dependencies, StartError};
#[cfg(doc)]
use crate::store;

pub use settle::{Decision, decide};

/// Runs the consumer until `shutdown` resolves: prepares the database (creates it, migrates),
/// then consumes, reconnecting to the broker whenever it goes away.
///
/// # Errors
/// [`StartError`] when the database cannot be prepared at start-up or the config is unusable.
pub async fn run_worker(
    config: Config,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), StartError> {
    let (deps, publisher_task) = Dependencies::start(&config).await?;
    Worker::new(config, deps.pool, deps.cache, deps.publisher)
        .run(shutdown)
        .await;
    publisher_task.shutdown().await;
    Ok(())
}

/// The consumer with its dependencies, for callers that share them (e.g. with the API).
#[derive(Debug, Clone)]
pub struct Worker {
    config: Config,
    pool: Pool,
    cache: Cache,
    publisher: Publisher,
    /// The dead-letter index, once opened (none without Postgres at start-up).
    parked: Arc<OnceCell<ParkedIndex>>,
    /// Completes events from Stripe ([`crate::complete`]); `None` without a usable
    /// `STRIPE_SECRET_KEY`.
    stripe: Option<crate::stripe::StripeClient>,
    /// The events completed from Stripe off the lanes.
    completions: completions::Completions,
}

impl Worker {
    #[must_use]
    pub fn new(config: Config, pool: Pool, cache: Cache, publisher: Publisher) -> Self {
        // A background job, so with reconcile's patience (`None` without a key).
        let settings = crate::reconcile::stripe_config(&config).ok();
        let stripe = settings.and_then(|settings| {
            crate::stripe::StripeClient::new(settings)
                .inspect_err(|error| {
                    tracing::warn!(%error, "no Stripe client: events are not completed from Stripe");
                })
                .ok()
        });
        Self {
            stripe,
            completions: completions::Completions::default(),
            config,
            pool,
            cache,
            publisher,
            parked: Arc::new(OnceCell::new()),
        }
    }

    /// Whether Stripe refuses this worker's key, for `/readyz`.
    #[must_use]
    pub fn stripe_key_health(&self) -> completions::StripeKeyHealth {
        self.completions.key_health()
    }

    /// Consumes until `shutdown` resolves. On shutdown it cancels the consumer, lets the
    /// in-flight batch finish within `shutdown_grace`, and closes the connection, which returns
    /// every unacked delivery to the queue.
    ///
    /// The outbox relay ([`crate::outbox`]) runs inside this future (not spawned, so aborting
    /// the worker stops it as a crash would) and makes its last pass after the consumer stopped.
    pub async fn run(&self, shutdown: impl Future<Output = ()> + Send) {
        let stop = Stop::default();
        let stop_relay = Stop::default();
        let relay = crate::outbox::run(
            self.config.clone(),
            self.pool.clone(),
            stop_relay.listener(),
        );
        let signal = async {
            tokio::select! {
                () = shutdown => stop.trigger(),
                () = stop.wait() => {}
            }
        };
        let consume = async {
            self.consume_until(stop.listener()).await;
            // Ends `signal` too if the consumer stopped on its own.
            stop.trigger();
            stop_relay.trigger();
        };
        tokio::join!(signal, consume, relay);
    }

    async fn consume_until(&self, mut shutdown: Shutdown) {
        let stop_beside = Stop::default();
        // The queue depths and the dead-letter alert run beside the consumer and stop with it.
        let depths = tokio::spawn(crate::dlq::monitor(
            self.config.amqp_url.clone(),
            self.config.topology.clone(),
            self.config.attempts_alert_threshold,
            self.config.queue_depth_interval,
            stop_beside.wait(),
        ));
        let healer = tokio::spawn(heal::run(
            self.pool.clone(),
            self.cache.clone(),
            stop_beside.listener(),
        ));
        match ParkedIndex::open(&self.config.database_url, &self.config.topology).await {
            Ok(index) => {
                let _ = self.parked.set(index);
            }
            Err(error) => {
                tracing::warn!(%error, "dead-letter index unavailable; parking without it")
            }
        }
        let mut pauses = Reconnect::new(Duration::from_millis(200), Duration::from_secs(5));
        // Consuming before the publishing channel is open would only requeue the first retries.
        tokio::select! {
            biased;
            () = shutdown.recv() => {}
            ready = self.publisher.wait_ready(Duration::from_secs(10)) => if !ready {
                tracing::warn!("publishing channel not ready; consuming anyway");
            },
        }
        let upgrade = {
            let (config, publisher) = (self.config.clone(), self.publisher.clone());
            tokio::spawn(async move { legacy::drain(&config, &publisher).await })
        };
        while !shutdown.is_shutdown() {
            let opened = tokio::select! {
                biased;
                () = shutdown.recv() => break,
                opened = consume::Session::open(&self.config) => opened,
            };
            let mut session = match opened {
                Ok(session) => session,
                Err(error) => {
                    let pause = pauses.next_pause();
                    tracing::warn!(%error, retry_in = ?pause, "cannot consume; broker unavailable");
                    metrics::gauge!("amqp_connected", "connection" => "consume").set(0.0);
                    tokio::select! {
                        biased;
                        () = shutdown.recv() => break,
                        () = tokio::time::sleep(pause) => {}
                    }
                    continue;
                }
            };
            pauses.reset();
            metrics::gauge!("amqp_connected", "connection" => "consume").set(1.0);
            tracing::info!(queue = %self.config.topology.main_queue(), "consuming");
            let end = self.consume(&mut session, &mut shutdown).await;
            metrics::gauge!("amqp_connected", "connection" => "consume").set(0.0);
            session.close().await;
            match end {
                consume::SessionEnd::Shutdown => break,
                consume::SessionEnd::Lost => {
                    tracing::warn!("consuming connection lost; reconnecting");
                }
            }
        }
        upgrade.abort();
        stop_beside.trigger();
        let _ = depths.await;
        let _ = healer.await;
        tracing::info!("consumer stopped");
    }
}
/// Longest `last_error` header, so a header never carries a long driver message.
const MAX_REASON_LEN: usize = 200;

/// First line of `text`, at most [`MAX_REASON_LEN`] characters.
fn short(text: &str) -> String {
    let line = text.lines().next().unwrap_or_default();
    line.chars().take(MAX_REASON_LEN).collect()
}
