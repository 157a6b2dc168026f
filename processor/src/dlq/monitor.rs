//! Alerting on parked and struggling events, for the worker to run next to its consumer.
//!
//! - [`monitor`] polls the depth of every queue of the topology (gauge `queue_depth{queue}`),
//!   keeps the gauge `dlq_depth` current and logs at ERROR when the dead-letter depth rises
//!   above zero, then again every [`REMIND_EVERY`] while it stays above zero (never on every
//!   poll), and at INFO once it is back to zero. It is the process's one depth poller.
//! - [`record_attempts`] is called by the consumer after each failed attempt; past the
//!   threshold it logs at ERROR and increments `events_attempts_over_threshold_total`.
//!
//! Invariant: monitoring never touches messages (a passive declare only reads the count), and
//! a broker outage never stops it: it reconnects on the next poll.
//!
//! The runbook for both alerts is `docs/operations.md`.

use std::future::Future;
use std::time::Duration;

use lapin::{Channel, Connection};
use shared::topology::Topology;
use tokio::time::{Instant, MissedTickBehavior};

use super::pass::queue_depth;

/// How often the ERROR log repeats while the dead-letter queue stays non-empty.
pub const REMIND_EVERY: Duration = Duration::from_secs(15 * 60);

/// What a depth observation means for the operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DepthAlert {
    /// The queue went from empty (or unknown) to non-empty.
    Raised { depth: u32 },
    /// Still non-empty, and the last alert is [`REMIND_EVERY`] old.
    Reminder { depth: u32 },
    /// Back to empty after an alert.
    Cleared,
}

/// Turns a stream of depth readings into alerts: one on each rise above zero, reminders while
/// it lasts, one when it clears.
#[derive(Debug, Clone)]
pub struct DepthAlerts {
    remind_every: Duration,
    last_alert: Option<Instant>,
}

impl DepthAlerts {
    #[must_use]
    pub fn new(remind_every: Duration) -> Self {
        Self {
            remind_every,
            last_alert: None,
        }
    }

    pub fn observe(&mut self, depth: u32, now: Instant) -> Option<DepthAlert> {
        match (depth, self.last_alert) {
            (0, None) => None,
            (0, Some(_)) => {
                self.last_alert = None;
                Some(DepthAlert::Cleared)
            }
            (depth, None) => {
                self.last_alert = Some(now);
                Some(DepthAlert::Raised { depth })
            }
            (depth, Some(last)) if now.duration_since(last) >= self.remind_every => {
                self.last_alert = Some(now);
                Some(DepthAlert::Reminder { depth })
            }
            _ => None,
        }
    }
}

/// Polls the dead-letter queue of `topology` every `interval` until `shutdown` resolves.
///
/// Sets gauges `dlq_depth` (each successful poll) and `events_attempts_threshold` (once, so a
/// dashboard can show what [`record_attempts`] compares against), and logs as described in the
/// module doc. Connection failures are logged at WARN once per outage and retried each poll.
pub async fn monitor(
    amqp_url: String,
    topology: Topology,
    attempts_threshold: u32,
    interval: Duration,
    shutdown: impl Future,
) {
    let queue = topology.dead_letter_queue();
    let mut queues = vec![
        queue.clone(),
        topology.main_queue(),
        topology.stripe_queue(),
    ];
    queues.extend((1..=topology.retry_delays().len()).map(|n| topology.retry_queue(n)));
    queues.dedup();
    metrics::gauge!("events_attempts_threshold").set(f64::from(attempts_threshold));
    let mut alerts = DepthAlerts::new(REMIND_EVERY);
    let mut broker: Option<(Connection, Channel)> = None;
    let mut failing = false;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = ticker.tick() => {}
        }
        match poll(&mut broker, &amqp_url, &queues).await {
            Ok(depths) => {
                failing = false;
                for (name, depth) in queues.iter().zip(&depths) {
                    metrics::gauge!("queue_depth", "queue" => name.clone()).set(f64::from(*depth));
                }
                let depth = depths[0];
                metrics::gauge!("dlq_depth").set(f64::from(depth));
                match alerts.observe(depth, Instant::now()) {
                    Some(DepthAlert::Raised { depth }) => tracing::error!(
                        queue,
                        depth,
                        "events are parked in the dead-letter queue; see docs/operations.md"
                    ),
                    Some(DepthAlert::Reminder { depth }) => tracing::error!(
                        queue,
                        depth,
                        "events are still parked in the dead-letter queue; see docs/operations.md"
                    ),
                    Some(DepthAlert::Cleared) => {
                        tracing::info!(queue, "the dead-letter queue is empty again");
                    }
                    None => {}
                }
            }
            Err(error) => {
                broker = None;
                if !failing {
                    tracing::warn!(queue, %error, "cannot read the dead-letter queue depth; retrying");
                }
                failing = true;
            }
        }
    }
    if let Some((connection, _)) = broker {
        let _ = connection.close(200, "shutdown".into()).await;
    }
}

/// The depths of `queues`, in order, over the kept connection (reopened when lost).
async fn poll(
    broker: &mut Option<(Connection, Channel)>,
    amqp_url: &str,
    queues: &[String],
) -> Result<Vec<u32>, lapin::Error> {
    let open = broker
        .as_ref()
        .is_some_and(|(c, ch)| c.status().connected() && ch.status().connected());
    if !open {
        let connection = shared::amqp::connect(amqp_url, "processor-dlq-monitor").await?;
        let channel = connection.create_channel().await?;
        *broker = Some((connection, channel));
    }
    let Some((_, channel)) = broker.as_ref() else {
        return Ok(Vec::new());
    };
    let mut depths = Vec::with_capacity(queues.len());
    for queue in queues {
        depths.push(queue_depth(channel, queue).await?);
    }
    Ok(depths)
}

/// Records that an event has now been attempted `attempts` times. Past `threshold` (every
/// attempt after it) it logs at ERROR with the event id and increments
/// `events_attempts_over_threshold_total`; returns whether it did.
///
/// The consumer calls it after each failed attempt, with the count including that attempt.
pub fn record_attempts(event_id: &str, attempts: u32, threshold: u32) -> bool {
    if attempts <= threshold {
        return false;
    }
    tracing::error!(
        event_id,
        attempts,
        threshold,
        "event keeps failing past the attempts threshold; see docs/operations.md"
    );
    metrics::counter!("events_attempts_over_threshold_total").increment(1);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depth_alerts_fire_on_the_rise_then_only_as_reminders() {
        let start = Instant::now();
        let mut alerts = DepthAlerts::new(Duration::from_secs(600));
        let at = |s: u64| start + Duration::from_secs(s);
        assert_eq!(alerts.observe(0, at(0)), None);
        assert_eq!(
            alerts.observe(3, at(10)),
            Some(DepthAlert::Raised { depth: 3 })
        );
        assert_eq!(alerts.observe(5, at(20)), None);
        assert_eq!(alerts.observe(5, at(609)), None);
        assert_eq!(
            alerts.observe(7, at(610)),
            Some(DepthAlert::Reminder { depth: 7 })
        );
        assert_eq!(alerts.observe(7, at(700)), None);
        assert_eq!(alerts.observe(0, at(710)), Some(DepthAlert::Cleared));
        assert_eq!(alerts.observe(0, at(720)), None);
        assert_eq!(
            alerts.observe(1, at(730)),
            Some(DepthAlert::Raised { depth: 1 })
        );
    }

    #[test]
    fn attempts_alert_only_past_the_threshold() {
        assert!(!record_attempts("evt_1", 2, 3));
        assert!(!record_attempts("evt_1", 3, 3));
        assert!(record_attempts("evt_1", 4, 3));
    }
}
