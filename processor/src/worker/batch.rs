//! One batch of deliveries, end to end: claim the fresh events in Redis, apply them through the
//! store in one transaction, write the post-commit markers and cache, then settle.
//!
//! The path is a sequence of plain steps over the batch's [`Item`]s, each acting only on the
//! items still [`Step::Pending`] and deciding some of them ([`Item::decide`], the one way an
//! outcome is set): parse (at dispatch) → skip in-batch duplicates → park what is not this
//! service's (another Stripe mode or account) → claim in Redis → complete
//! from the recorded offers → hand what needs Stripe to the Stripe queue → apply in Postgres →
//! post-commit markers and cache → settle.
//!
//! Invariant: every delivery leaves the batch with an outcome (one still pending at the end is
//! retried later); the Redis steps around the transaction are best effort and never decide one
//! alone (Postgres' `processed_events` is the truth, the claim only spares concurrent work).

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
use crate::domain::events::{self, DisputeStatus, Event, EventKind, PaidFor};
use crate::domain::offer::{CheckoutOffer, LinkPrice};
use crate::domain::scope::Refusal;
use crate::domain::view::UserSnapshot;
use crate::store::{self, Failure, Outcome};

/// Where a delivery stands on the path.
enum Step {
    /// Parsed and not decided yet: the next step acts on it.
    Pending(Event),
    /// Decided; the event is kept when the body parsed (the post-commit markers need its id).
    Decided {
        event: Option<Event>,
        outcome: Outcome,
    },
}

/// One delivery in a batch, with what was learned about it.
pub(super) struct Item {
    pub(super) delivery: Delivery,
    step: Step,
    pub(super) attempts: u32,
    pub(super) first_seen_at: String,
    pub(super) event_id: String,
    pub(super) event_type: String,
    pub(super) received: Instant,
    claim: Option<ClaimToken>,
    /// Another delivery of the same event id came earlier in this batch: it shares that
    /// delivery's work and is acked as a replay.
    batch_duplicate: bool,
    /// Completed off the lane already ([`Worker::complete_off_lane`]): whatever Stripe answered
    /// is final, it is not handed over again.
    completed_off_lane: bool,
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
            attempts,
            first_seen_at,
            event_id,
            event_type,
            received: Instant::now(),
            claim: None,
            step: match parsed {
                Ok(event) => Step::Pending(event),
                // A body that does not parse can never succeed: no transaction needed.
                Err(error) => Step::Decided {
                    event: None,
                    outcome: Outcome::Rejected(short(&format!("invalid event: {error}"))),
                },
            },
            batch_duplicate: false,
            completed_off_lane: false,
            span,
        }
    }

    /// The parsed event, decided or not.
    pub(super) fn event(&self) -> Option<&Event> {
        match &self.step {
            Step::Pending(event) => Some(event),
            Step::Decided { event, .. } => event.as_ref(),
        }
    }

    /// The event while no step has decided it.
    fn pending(&self) -> Option<&Event> {
        match &self.step {
            Step::Pending(event) => Some(event),
            Step::Decided { .. } => None,
        }
    }

    /// [`Item::pending`], for a step that completes the event in place.
    fn pending_mut(&mut self) -> Option<&mut Event> {
        match &mut self.step {
            Step::Pending(event) => Some(event),
            Step::Decided { .. } => None,
        }
    }

    pub(super) fn outcome(&self) -> Option<&Outcome> {
        match &self.step {
            Step::Pending(_) => None,
            Step::Decided { outcome, .. } => Some(outcome),
        }
    }

    /// Decides the item (a pending one; a decided one keeps its first outcome).
    fn decide(&mut self, outcome: Outcome) {
        // The placeholder is replaced at once, never seen.
        let placeholder = Step::Decided {
            event: None,
            outcome: Outcome::Busy,
        };
        self.step = match std::mem::replace(&mut self.step, placeholder) {
            Step::Pending(event) => Step::Decided {
                event: Some(event),
                outcome,
            },
            decided @ Step::Decided { .. } => decided,
        };
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
        self.refuse_out_of_scope(&mut items);
        note_unknown_dispute_statuses(&items);
        let started = Instant::now();
        // Claimed before any request to Stripe, so a replay is recognised first; the recorded
        // offers are read meanwhile.
        let (sessions, links) = sessions_to_complete(&items);
        let (prices, ()) = futures_util::future::join(
            self.known_prices(&sessions, &links),
            self.claim_all(&mut items),
        )
        .await;
        complete_without_stripe(&mut items, &prices);
        self.settle_tied_disputes(&mut items).await;
        self.hand_over_to_stripe(&mut items);
        // What moves to the Stripe queue is published while the rest is applied.
        let (handed, rest): (Vec<Item>, Vec<Item>) = items
            .into_iter()
            .partition(|item| item.outcome() == Some(&Outcome::NeedsStripe));
        let (moved, finished) =
            futures_util::future::join(self.pass_on(handed), self.finish(rest, started)).await;
        moved && finished
    }

    /// Parks what is not this service's, before any other step: an event of the other Stripe
    /// mode, or of a Connect account not served ([`crate::domain::scope`]). It changes nothing;
    /// `events_out_of_scope_total{reason}` counts it and the dead-letter queue shows it.
    fn refuse_out_of_scope(&self, items: &mut [Item]) {
        let scope = &self.config.scope;
        for item in items.iter_mut() {
            let Some(refusal) = item.pending().and_then(|e| scope.refusal(&e.origin)) else {
                continue;
            };
            metrics::counter!("events_out_of_scope_total", "reason" => refusal.as_str())
                .increment(1);
            let reason = match (refusal, scope.mode) {
                (Refusal::Mode, Some(mode)) => format!(
                    "an event of the other Stripe mode: this service serves {} mode",
                    mode.as_str()
                ),
                _ => "an event of a Connect account not in STRIPE_ACCOUNTS".to_owned(),
            };
            item.decide(Outcome::Rejected(reason));
        }
    }

    /// Releases the claims of the items moved to the Stripe queue (their completion claims them
    /// again), then publishes and acks them.
    async fn pass_on(&self, handed: Vec<Item>) -> bool {
        if handed.is_empty() {
            return true;
        }
        let releases = handed.iter().filter_map(|item| {
            let (event, token) = (item.event()?, item.claim.as_ref()?);
            Some(self.cache.release(&event.id, token))
        });
        join_all(releases).await;
        self.settle(handed).await
    }

    /// Applies, caches and settles what is left of a batch.
    async fn finish(&self, mut items: Vec<Item>, started: Instant) -> bool {
        let size = items.len();
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

    /// Moves the items that still need Stripe to the Stripe queue, where the completions take
    /// them ([`Worker::complete_off_lane`]): the rest of the batch goes on without them.
    fn hand_over_to_stripe(&self, items: &mut [Item]) {
        let has_key = self.stripe.is_some();
        for item in items {
            if !item.completed_off_lane
                && item
                    .pending()
                    .is_some_and(|e| crate::complete::needs_stripe(e, has_key))
            {
                item.decide(Outcome::NeedsStripe);
            }
        }
    }

    /// Completes a delivery of the Stripe queue from Stripe, beside the lanes, then hands it to
    /// its user's `lane`, which applies it batched with the rest: claimed first (a replay costs
    /// no request), then read within one of the [`super::completions::IN_FLIGHT`] slots. A lane
    /// gone (the session ended) drops it unacked: the delivery returns to the queue.
    pub(super) fn complete_off_lane(&self, item: Item, lane: tokio::sync::mpsc::Sender<Item>) {
        let worker = self.clone();
        self.completions.spawn(async move {
            let mut items = vec![item];
            worker.claim_all(&mut items).await;
            let Some(mut item) = items.pop() else { return };
            item.completed_off_lane = true;
            if item.pending().is_some() {
                let running = worker.completions.slot().await;
                worker.complete_from_stripe(&mut item).await;
                drop(running);
            }
            let _ = lane.send(item).await;
        });
    }

    /// Completes one event from Stripe ([`crate::complete`]): on success it stays pending;
    /// while Stripe cannot answer (or refuses the key) it waits, otherwise it is retried later.
    async fn complete_from_stripe(&self, item: &mut Item) {
        let Some(event) = item.pending() else {
            return;
        };
        // The key may have been refused while this one waited for its slot.
        if let Some(reason) = self.completions.paused() {
            item.decide(Outcome::Waiting(reason.to_owned()));
            return;
        }
        if crate::complete::session_to_complete(event).is_some() {
            metrics::counter!("checkout_completions_total", "from" => "stripe").increment(1);
        }
        match crate::complete::complete(self.stripe.as_ref(), event.clone()).await {
            Ok(complete) => {
                self.completions.succeeded();
                if let Some(link) = crate::complete::learned_link_price(&complete) {
                    self.learn(&link).await;
                }
                item.step = Step::Pending(complete);
            }
            Err(error) if self.completions.waits(&error) => {
                tracing::warn!(parent: &item.span, %error, "waiting for Stripe");
                item.decide(Outcome::Waiting(short(&error.to_string())));
            }
            Err(error) => {
                tracing::warn!(parent: &item.span, %error, "event not completed from Stripe");
                item.decide(Outcome::Later(error.to_string()));
            }
        }
    }

    /// The recorded offers and learned Payment Link prices of `sessions` and `links`. Unreadable,
    /// those sessions are read from Stripe instead (the apply then waits for the database).
    async fn known_prices(&self, sessions: &[String], links: &[String]) -> KnownPrices {
        if sessions.is_empty() {
            return KnownPrices::default();
        }
        let sessions: Vec<&str> = sessions.iter().map(String::as_str).collect();
        let links: Vec<&str> = links.iter().map(String::as_str).collect();
        let found = async {
            let client = self.pool.get().await?;
            let (offers, links) = futures_util::future::try_join(
                store::offers::find(&**client, &sessions),
                store::offers::find_link_prices(&**client, &links),
            )
            .await?;
            Ok::<_, store::StoreError>(KnownPrices { offers, links })
        };
        found.await.unwrap_or_else(|error| {
            tracing::warn!(%error, "known prices unreadable; completing from Stripe");
            KnownPrices::default()
        })
    }

    /// Settles the disputes whose payment this service already holds tied to a purchase or an
    /// invoice, so only a payment nothing ties yet is looked up in Stripe (with a key; without
    /// one nothing is looked up). Unreadable, they are looked up.
    async fn settle_tied_disputes(&self, items: &mut [Item]) {
        if self.stripe.is_none() {
            return;
        }
        let payments: Vec<String> = items
            .iter()
            .filter_map(Item::pending)
            .filter_map(|e| match &e.kind {
                EventKind::ChargeDispute(d) if d.needs_invoice() => d.payment().map(str::to_owned),
                _ => None,
            })
            .collect();
        if payments.is_empty() {
            return;
        }
        let ids: Vec<&str> = payments.iter().map(String::as_str).collect();
        let tied = async {
            let client = self.pool.get().await?;
            store::offers::tied_payments(&**client, &ids).await
        };
        let tied = tied.await.unwrap_or_else(|error| {
            tracing::warn!(%error, "tied payments unreadable; looking the disputes up in Stripe");
            std::collections::HashSet::new()
        });
        for item in items.iter_mut() {
            if let Some(Event {
                kind: EventKind::ChargeDispute(d),
                ..
            }) = item.pending_mut()
                && d.payment().is_some_and(|p| tied.contains(p))
            {
                d.paid_for = PaidFor::Settled;
            }
        }
    }

    /// Keeps a Payment Link's price (best effort: unkept, the next session is read again).
    async fn learn(&self, link: &LinkPrice) {
        let kept = match self.pool.get().await {
            Ok(client) => store::offers::learn_link_price(&**client, link).await,
            Err(error) => Err(error.into()),
        };
        if let Err(error) = kept {
            tracing::warn!(%error, link = %link.payment_link, "payment link price not kept");
        }
    }

    /// Takes the dedupe claims of the batch's fresh events concurrently (but for those that hold
    /// theirs already: completed from Stripe, back in a lane).
    async fn claim_all(&self, items: &mut [Item]) {
        let pending: Vec<usize> = (0..items.len())
            .filter(|&i| items[i].pending().is_some() && items[i].claim.is_none())
            .collect();
        let claims = join_all(pending.iter().map(|&i| {
            let cache = &self.cache;
            let id = items[i].pending().map(|e| e.id.clone());
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
                Claim::Done => items[i].decide(Outcome::Replay),
                Claim::HeldElsewhere => items[i].decide(Outcome::Busy),
                Claim::Acquired(token) => items[i].claim = Some(token),
                Claim::Unavailable => {}
            }
        }
    }

    /// Applies the batch's fresh events in one transaction. An unavailable database is retried
    /// briefly in process, then waited for: an outage parks nothing and counts no attempt.
    async fn apply_all(&self, items: &mut [Item]) {
        let todo: Vec<usize> = (0..items.len())
            .filter(|&i| items[i].pending().is_some())
            .collect();
        if todo.is_empty() {
            return;
        }
        let events: Vec<&Event> = todo.iter().filter_map(|&i| items[i].pending()).collect();
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
                    items[i].decide(outcome);
                }
            }
            Err(error) => {
                let reason = short(&error.reason());
                for i in todo {
                    items[i].decide(Outcome::Later(reason.clone()));
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
        let snapshots = items.iter().flat_map(|item| match item.outcome() {
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
            match (item.outcome(), &item.claim) {
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

/// What the batch knows of the prices its sessions were sold at.
#[derive(Default)]
struct KnownPrices {
    offers: Vec<CheckoutOffer>,
    links: Vec<LinkPrice>,
}

/// The batch's sessions that need their line items, and the Payment Links among them.
fn sessions_to_complete(items: &[Item]) -> (Vec<String>, Vec<String>) {
    let events = || items.iter().filter_map(Item::pending);
    let sessions = events()
        .filter_map(crate::complete::session_to_complete)
        .map(str::to_owned)
        .collect();
    let links = events()
        .filter_map(crate::complete::link_to_complete)
        .map(str::to_owned)
        .collect();
    (sessions, links)
}

/// Completes what can be completed without Stripe: the checkouts this service created, from
/// their recorded offers, and Payment Links' sessions, from the link's learned price
/// ([`crate::complete::without_stripe`]).
fn complete_without_stripe(items: &mut [Item], prices: &KnownPrices) {
    for item in items.iter_mut() {
        let Some(event) = item.pending() else {
            continue;
        };
        if let Some((completed, from)) =
            crate::complete::without_stripe(event, &prices.offers, &prices.links)
        {
            metrics::counter!("checkout_completions_total", "from" => from).increment(1);
            item.step = Step::Pending(completed);
        }
    }
}

/// Marks every delivery that repeats an earlier event id of the batch as a replay: it shares
/// the first copy's work (one claim, one application) and is acked with it.
fn mark_duplicates(items: &mut [Item]) {
    let mut seen = std::collections::HashSet::new();
    for item in items {
        let Some(id) = item.pending().map(|e| e.id.as_str().to_owned()) else {
            continue;
        };
        if !seen.insert(id) {
            item.decide(Outcome::Replay);
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

/// A dispute status this code does not know is applied as a record only (the dispute keeps the
/// effect of its last known status); it is logged and counted in
/// `dispute_status_unknown_total`, which the `DisputeStatusUnknown` alert watches.
fn note_unknown_dispute_statuses(items: &[Item]) {
    for event in items.iter().filter_map(Item::pending) {
        if let EventKind::ChargeDispute(dispute) = &event.kind
            && let DisputeStatus::Unknown(status) = &dispute.status
        {
            tracing::warn!(event_id = %event.id, dispute_id = %dispute.id, status = %status,
                "a dispute status this service does not know: recorded, access unchanged");
            metrics::counter!("dispute_status_unknown_total").increment(1);
        }
    }
}
