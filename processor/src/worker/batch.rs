//! One batch of deliveries, end to end: claim the fresh events in Redis, apply them through the
//! store in one transaction, write the post-commit markers and cache, then settle.
//!
//! Invariant: every delivery leaves the batch with an outcome; the Redis steps around the
//! transaction are best effort and never decide one alone (Postgres' `processed_events` is the
//! truth, the claim only spares concurrent work).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use futures_util::future::join_all;
use lapin::message::Delivery;
use lapin::types::FieldTable;
use shared::backoff::Reconnect;
use shared::topology::headers;

use super::Worker;
use super::short;
use crate::cache::{Claim, ClaimToken};
use crate::domain::events::{self, Event};
use crate::domain::view::UserSnapshot;
use crate::store::{self, Failure, Outcome};

/// One delivery in a batch, with what was learned about it.
pub(super) struct Item {
    pub(super) delivery: Delivery,
    parsed: Result<Event, events::EventError>,
    pub(super) attempts: u32,
    pub(super) first_seen_at: String,
    pub(super) event_id: String,
    pub(super) event_type: String,
    pub(super) received: Instant,
    claim: Option<ClaimToken>,
    pub(super) outcome: Option<Outcome>,
    /// Another delivery of the same event id came earlier in this batch: it shares that
    /// delivery's work and is acked as a replay.
    batch_duplicate: bool,
    pub(super) span: tracing::Span,
}

impl Item {
    pub(super) fn new(delivery: Delivery) -> Self {
        let parsed = events::parse(&delivery.data);
        let table = delivery.properties.headers().clone().unwrap_or_default();
        let attempts = table
            .inner()
            .get(headers::ATTEMPTS)
            .and_then(headers::integer)
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(0);
        let first_seen_at = table
            .inner()
            .get(headers::FIRST_SEEN_AT)
            .and_then(headers::text)
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
            span,
        }
    }

    pub(super) fn event(&self) -> Option<&Event> {
        self.parsed.as_ref().ok()
    }

    pub(super) fn headers(&self) -> FieldTable {
        self.delivery
            .properties
            .headers()
            .clone()
            .unwrap_or_default()
    }
}

impl Worker {
    /// Handles one batch end to end. Returns false when the channel broke while acking.
    pub(super) async fn process_batch(&self, mut items: Vec<Item>) -> bool {
        metrics::histogram!("worker_batch_size").record(items.len() as f64);
        mark_duplicates(&mut items);
        self.complete_from_stripe(&mut items).await;
        let size = items.len();
        let started = Instant::now();
        self.claim_all(&mut items).await;
        let claimed = started.elapsed();
        self.apply_all(&mut items).await;
        let committed = started.elapsed();
        self.after_commit(&items).await;
        let cached = started.elapsed();
        let healthy = self.settle(items).await;
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

    /// Completes the events whose payload lacks what the projection needs from Stripe
    /// ([`crate::complete`]); one that cannot be completed is retried later.
    async fn complete_from_stripe(&self, items: &mut [Item]) {
        for item in items.iter_mut().filter(|i| i.outcome.is_none()) {
            let Ok(event) = &item.parsed else { continue };
            if !crate::complete::needs_completion(event) {
                continue;
            }
            match crate::complete::complete(self.stripe.as_ref(), event.clone()).await {
                Ok(complete) => item.parsed = Ok(complete),
                Err(error) => {
                    tracing::warn!(parent: &item.span, %error, "event not completed from Stripe");
                    item.outcome = Some(Outcome::Later(error.to_string()));
                }
            }
        }
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

    /// Applies the batch's fresh events in one transaction. An unavailable database is retried
    /// briefly in process, then waited for: an outage parks nothing and counts no attempt.
    async fn apply_all(&self, items: &mut [Item]) {
        let mut todo = Vec::new();
        for (i, item) in items.iter_mut().enumerate() {
            match (&item.outcome, &item.parsed) {
                (Some(_), _) => {}
                (None, Ok(_)) => todo.push(i),
                // A body that does not parse can never succeed: no transaction needed.
                (None, Err(error)) => {
                    item.outcome =
                        Some(Outcome::Rejected(short(&format!("invalid event: {error}"))));
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
        let outcomes = loop {
            let result = (|| store::apply_and_commit(&self.pool, &events))
                .retry(policy)
                .notify(|error, after| {
                    metrics::counter!("worker_inprocess_retries_total").increment(1);
                    tracing::warn!(%error, retry_in = ?after, events = events.len(), "batch failed; retrying");
                })
                .await;
            match result {
                Ok(outcomes) => break Ok(outcomes),
                // An outage is no fault of the events: they wait here, unacked and uncounted,
                // and this lane takes nothing new until the database answers again.
                Err(error) if error.failure() == Failure::Unavailable => {
                    self.wait_for_database(&error).await;
                }
                Err(error) => break Err(error),
            }
        };
        match outcomes {
            Ok(outcomes) => {
                for (i, outcome) in todo.into_iter().zip(outcomes) {
                    items[i].outcome = Some(outcome);
                }
            }
            Err(error) => {
                let reason = short(&error.reason());
                for i in todo {
                    items[i].outcome = Some(Outcome::Later(reason.clone()));
                }
            }
        }
    }

    /// Waits until Postgres answers a query again, with a capped backoff, while the
    /// `worker_paused{reason="database"}` gauge says why nothing moves.
    async fn wait_for_database(&self, error: &store::StoreError) {
        let _paused = Paused::database();
        tracing::warn!(%error, "database unavailable; holding the batch until it answers");
        let mut pauses = Reconnect::new(Duration::from_millis(250), Duration::from_secs(5));
        loop {
            tokio::time::sleep(pauses.next_pause()).await;
            let probe = async {
                let client = self.pool.get().await.ok()?;
                client.simple_query("SELECT 1").await.ok()
            };
            if tokio::time::timeout(self.config.db_timeout, probe)
                .await
                .ok()
                .flatten()
                .is_some()
            {
                break;
            }
        }
        tracing::info!("database answers again; resuming");
    }

    /// Post-commit side effects in Redis: `done` markers, claim releases, cache refresh with the
    /// newest version of each user. All best effort.
    async fn after_commit(&self, items: &[Item]) {
        let mut latest: HashMap<&str, &UserSnapshot> = HashMap::new();
        let snapshots = items.iter().flat_map(|item| match &item.outcome {
            Some(Outcome::Applied(users)) => users.as_slice(),
            _ => &[],
        });
        for snapshot in snapshots {
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
                (Some(Outcome::Applied(_) | Outcome::Replay), _) => Some(
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
        // The cache writes first: they are what a reader waits for (the markers only spare a
        // redelivery some work), and the commands go out on one connection in this order.
        futures_util::future::join(join_all(refreshes), join_all(markers)).await;
    }
}

/// Marks every delivery that repeats an earlier event id of the batch as a replay: it shares
/// the first copy's work (one claim, one application) and is acked with it.
fn mark_duplicates(items: &mut [Item]) {
    let mut seen = std::collections::HashSet::new();
    for item in items {
        let Some(id) = item.event().map(|e| e.id.as_str().to_owned()) else {
            continue;
        };
        if !seen.insert(id) {
            item.outcome = Some(Outcome::Replay);
            item.batch_duplicate = true;
        }
    }
}

/// Counts a lane in `worker_paused{reason}` while it lives (also when its task is aborted).
struct Paused(&'static str);

impl Paused {
    fn database() -> Self {
        metrics::gauge!("worker_paused", "reason" => "database").increment(1.0);
        Self("database")
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        metrics::gauge!("worker_paused", "reason" => self.0).decrement(1.0);
    }
}
