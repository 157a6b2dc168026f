//! Settlement: what the consume loop does with each delivery once the batch's transaction is
//! over — ack it, or republish it (with a confirm) to a retry queue or the dead-letter queue and
//! then ack it, or return it to the queue when the republish was not confirmed.
//!
//! Invariant: [`decide`] is the only place that maps an outcome to ack, retry or park, and a
//! delivery is acked only after the copy that replaces it is confirmed.

use std::time::Duration;

use futures_util::future::join_all;
use lapin::BasicProperties;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::types::FieldTable;
use shared::amqp::PublishError;
use shared::topology::headers;

use super::Worker;
use super::batch::Item;
use super::short;
use crate::store::Outcome;

/// What the consume loop does with a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Ack,
    /// Republish to the Stripe queue unchanged (no attempt counted), then ack.
    Handover,
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

/// The first retry queue without counting an attempt: not a failure of the event.
fn wait(delays: &[Duration], attempts: u32, reason: &str) -> Decision {
    match delays.first() {
        Some(after) => Decision::Retry {
            after: *after,
            queue: 1,
            attempts,
            reason: reason.to_owned(),
        },
        None => Decision::DeadLetter {
            reason: format!("{reason}, and no retry queue"),
            attempts,
        },
    }
}

/// Maps an outcome to a decision: the one place that chooses ack, retry or park. `attempts` is the delivery's `attempts` header (retries so far).
///
/// A transient failure goes to the next retry queue; after the last one it is dead-lettered with
/// `attempts` = the number of retries made. A busy event is put in the first retry queue without
/// counting an attempt: it is not a failure, and the claim of a crashed worker expires. An event
/// waiting for Stripe does the same, for as long as Stripe cannot answer.
#[must_use]
pub fn decide(outcome: &Outcome, attempts: u32, delays: &[Duration]) -> Decision {
    match outcome {
        Outcome::Applied(_) | Outcome::Replay => Decision::Ack,
        Outcome::Rejected(reason) => Decision::DeadLetter {
            reason: reason.clone(),
            attempts,
        },
        Outcome::Later(reason) => {
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
        Outcome::Busy => wait(delays, attempts, "claimed by another worker"),
        Outcome::Waiting(reason) => wait(delays, attempts, reason),
        Outcome::NeedsStripe => Decision::Handover,
    }
}

impl Worker {
    /// Makes every outcome durable (publishing retries and dead letters with confirms), then
    /// acks. A delivery whose republish failed is requeued instead of acked.
    pub(super) async fn settle(&self, items: Vec<Item>) -> bool {
        let delays = self.config.topology.retry_delays();
        let decisions: Vec<Decision> = items
            .iter()
            .map(|item| {
                let later = Outcome::Later("not processed".into());
                decide(item.outcome().unwrap_or(&later), item.attempts, delays)
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
            record(item, decision, *ok && healthy);
        }
        healthy
    }

    async fn make_durable(&self, item: &Item, decision: &Decision) -> bool {
        let topology = &self.config.topology;
        let result = match decision {
            Decision::Ack => return true,
            Decision::Handover => {
                self.republish(&topology.stripe_queue(), item, item.headers())
                    .await
            }
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
                let table = failure_headers(item, *attempts, reason);
                self.republish(&topology.retry_queue(*queue), item, table)
                    .await
            }
            Decision::DeadLetter { .. } if self.already_parked(item).await => Ok(()),
            Decision::DeadLetter { reason, attempts } => {
                let mut table = failure_headers(item, *attempts, reason);
                headers::put_text(
                    &mut table,
                    headers::DEAD_LETTERED_AT,
                    &chrono::Utc::now().to_rfc3339(),
                );
                let parked = self
                    .republish(&topology.dead_letter_queue(), item, table.clone())
                    .await;
                if parked.is_ok() {
                    self.index_parked(item, table).await;
                }
                parked
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

    /// True when `item` is a redelivery of an event the dead-letter index already holds: a
    /// worker parked it and died before its ack. Acked without a second copy.
    async fn already_parked(&self, item: &Item) -> bool {
        if !item.delivery.redelivered || item.event_id.is_empty() {
            return false;
        }
        let Some(index) = self.parked.get() else {
            return false;
        };
        let held = index.holds(&item.event_id).await.unwrap_or(false);
        if held {
            item.span
                .in_scope(|| tracing::info!("already parked; acked without a second copy"));
        }
        held
    }

    /// Adds a parked event to the dead-letter index, so `processor dlq` reads it without a pass
    /// over the queue. Best effort: the next pass adds what is missed here.
    async fn index_parked(&self, item: &Item, table: FieldTable) {
        let Some(index) = self.parked.get() else {
            return;
        };
        // As published: the publisher makes every message persistent.
        let properties = item
            .delivery
            .properties
            .clone()
            .with_headers(table)
            .with_delivery_mode(2);
        if let Err(error) = index.record(&item.delivery.data, &properties).await {
            item.span.in_scope(|| {
                tracing::warn!(%error, "parked event not indexed; the next dlq pass will add it");
            });
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
/// Counts and logs what became of `item`.
fn record(item: &Item, decision: &Decision, settled: bool) {
    let kind = match (item.outcome(), decision) {
        (_, Decision::Retry { .. }) if !settled => "requeued",
        (_, Decision::DeadLetter { .. } | Decision::Handover) if !settled => "requeued",
        (Some(Outcome::Applied(_)), _) => "applied",
        (Some(Outcome::Replay), _) => "replay",
        (Some(Outcome::Busy), _) => "deferred",
        (Some(Outcome::Waiting(_)), _) => "waiting",
        (Some(Outcome::NeedsStripe), _) => "to_stripe",
        (_, Decision::Retry { .. }) => "retried",
        (_, Decision::DeadLetter { .. }) => "dead_lettered",
        (_, Decision::Ack | Decision::Handover) => "acked",
    };
    let event_type = crate::domain::events::type_label(&item.event_type);
    metrics::counter!("events_total", "type" => event_type, "outcome" => kind).increment(1);
    metrics::histogram!("event_processing_seconds").record(item.received.elapsed().as_secs_f64());
    let _guard = item.span.enter();
    match decision {
        Decision::Ack => match item.outcome() {
            Some(Outcome::Replay) => {
                tracing::info!(event_id = %item.event_id, "skipped replay");
            }
            Some(Outcome::Applied(users)) => {
                tracing::debug!(users = users.len(), "applied");
            }
            _ => {}
        },
        Decision::Retry { queue, after, .. } if item.outcome() == Some(&Outcome::Busy) => {
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
                metrics::counter!("event_retries_total", "queue" => queue.to_string()).increment(1);
            }
            tracing::warn!(queue, ?after, reason = %reason, settled, "scheduled for retry");
        }
        Decision::DeadLetter { reason, attempts } => {
            if settled {
                metrics::counter!("events_dead_lettered_total").increment(1);
            }
            tracing::error!(attempts, reason = %reason, settled, "dead-lettered");
        }
        Decision::Handover => tracing::debug!(settled, "moved to the Stripe queue"),
    }
}

/// The delivery's headers with the failure bookkeeping of a retry or a dead letter.
fn failure_headers(item: &Item, attempts: u32, reason: &str) -> FieldTable {
    let mut table = item.headers();
    headers::put_integer(&mut table, headers::ATTEMPTS, i64::from(attempts));
    headers::put_text(&mut table, headers::FIRST_SEEN_AT, &item.first_seen_at);
    headers::put_text(&mut table, headers::LAST_ERROR, &short(reason));
    table
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::MAX_REASON_LEN;

    const DELAYS: &[Duration] = &[Duration::from_secs(5), Duration::from_secs(30)];

    #[test]
    fn committed_and_replayed_events_are_acked() {
        assert_eq!(
            decide(&Outcome::Applied(Vec::new()), 0, DELAYS),
            Decision::Ack
        );
        assert_eq!(decide(&Outcome::Replay, 1, DELAYS), Decision::Ack);
    }

    #[test]
    fn transient_failures_walk_the_retry_queues_then_dead_letter() {
        let t = Outcome::Later("down".into());
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
            decide(&Outcome::Rejected("bad".into()), 0, DELAYS),
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
}
