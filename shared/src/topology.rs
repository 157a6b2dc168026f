//! The RabbitMQ topology of the contract, declared idempotently by both binaries and used by the
//! operator commands. Names live here and nowhere else.
//!
//! ```text
//!   ingress ──publish──▶ stripe.events (topic) ──#──▶ stripe.events.q (quorum)
//!                                                        │  ▲
//!                        processor: retry n ─────────────┘  │ TTL expiry dead-letters back
//!                                   ▼                       │
//!                        stripe.events.retry.<n> (classic, x-message-ttl) ──┘
//!                        processor: give up ──▶ stripe.events.dlq (classic, parked)
//! ```
//!
//! Invariants: retry queues hold one delay each (per-message TTL only expires at the head, so
//! delays never mix in a queue); the main queue dead-letters at-least-once (with
//! `reject-publish` overflow), and its delivery limit is a crash-loop backstop, not the retry
//! policy.

use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, ExchangeKind};

use crate::config::{ConfigError, Env, parse_duration_list};

/// The contract's base name; tests use their own base so they never share queues.
pub const DEFAULT_BASE: &str = "stripe.events";

/// The contract's retry schedule.
pub const DEFAULT_RETRY_DELAYS: &str = "5s,30s,2m,10m,1h";

/// Redeliveries the quorum queue allows before parking a message on its own (crash loops only).
pub const MAIN_QUEUE_DELIVERY_LIMIT: i64 = 20;

/// Message header names shared by ingress, processor and the operator commands.
pub mod headers {
    /// Set by ingress: when the webhook was received (RFC 3339).
    pub const RECEIVED_AT: &str = "received_at";
    /// The project's own attempt counter (never derived from `x-death`).
    pub const ATTEMPTS: &str = "attempts";
    /// Why the last attempt failed (short, no secrets).
    pub const LAST_ERROR: &str = "last_error";
    /// When the processor first saw the event (RFC 3339).
    pub const FIRST_SEEN_AT: &str = "first_seen_at";
    /// When the event was parked in the dead-letter queue (RFC 3339).
    pub const DEAD_LETTERED_AT: &str = "dead_lettered_at";
}

/// Queue and exchange names plus the retry schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    base: String,
    retry_delays: Vec<Duration>,
}

impl Default for Topology {
    fn default() -> Self {
        Self::new(DEFAULT_BASE, default_retry_delays())
    }
}

fn default_retry_delays() -> Vec<Duration> {
    // The constant is known-good; an empty schedule would be the only other outcome.
    parse_duration_list(DEFAULT_RETRY_DELAYS).unwrap_or_default()
}

impl Topology {
    #[must_use]
    pub fn new(base: impl Into<String>, retry_delays: Vec<Duration>) -> Self {
        Self {
            base: base.into(),
            retry_delays,
        }
    }

    /// Reads `RETRY_DELAYS`, and `AMQP_TOPOLOGY_BASE` (default `stripe.events`), which lets a
    /// benchmark or a second environment on the same broker use its own queues.
    ///
    /// # Errors
    /// When `RETRY_DELAYS` is not a comma-separated list of durations, or a delay is zero.
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let raw = env.string_or("RETRY_DELAYS", DEFAULT_RETRY_DELAYS);
        let delays = parse_duration_list(&raw).map_err(|e| ConfigError::new("RETRY_DELAYS", e))?;
        if delays.iter().any(Duration::is_zero) {
            return Err(ConfigError::new("RETRY_DELAYS", "delays must be positive"));
        }
        let base = env.string_or("AMQP_TOPOLOGY_BASE", DEFAULT_BASE);
        if base.contains(char::is_whitespace) {
            return Err(ConfigError::new(
                "AMQP_TOPOLOGY_BASE",
                "must not contain spaces",
            ));
        }
        Ok(Self::new(base, delays))
    }

    /// The same schedule under another base name (tests isolate themselves this way).
    #[must_use]
    pub fn with_base(mut self, base: impl Into<String>) -> Self {
        self.base = base.into();
        self
    }

    #[must_use]
    pub fn exchange(&self) -> &str {
        &self.base
    }

    #[must_use]
    pub fn main_queue(&self) -> String {
        format!("{}.q", self.base)
    }

    /// The queue holding messages for their `n`-th retry (1-based).
    #[must_use]
    pub fn retry_queue(&self, n: usize) -> String {
        format!("{}.retry.{n}", self.base)
    }

    #[must_use]
    pub fn dead_letter_queue(&self) -> String {
        format!("{}.dlq", self.base)
    }

    #[must_use]
    pub fn retry_delays(&self) -> &[Duration] {
        &self.retry_delays
    }

    /// Declares exchange, main queue, retry queues and dead-letter queue. Safe to call any number
    /// of times from any number of processes, as long as they agree on `RETRY_DELAYS`.
    ///
    /// # Errors
    /// The broker's error, e.g. `PRECONDITION_FAILED` when an existing queue was declared with
    /// other arguments (a changed `RETRY_DELAYS` needs the old, empty retry queues deleted).
    pub async fn declare(&self, channel: &Channel) -> Result<(), lapin::Error> {
        let durable_queue = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        channel
            .exchange_declare(
                self.exchange().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;

        // The parked events' queue is classic by name, not by the broker's default: on a broker
        // whose default type is quorum, repeated reads would otherwise count towards a delivery
        // limit and drop events. Redeclaring an existing classic queue declared without the
        // argument is accepted (checked on 3.10), so existing deployments upgrade in place.
        let mut dead_letter_args = FieldTable::default();
        insert_str(&mut dead_letter_args, "x-queue-type", "classic");
        channel
            .queue_declare(
                self.dead_letter_queue().as_str().into(),
                durable_queue,
                dead_letter_args,
            )
            .await?;

        let mut main_args = FieldTable::default();
        insert_str(&mut main_args, "x-queue-type", "quorum");
        main_args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(MAIN_QUEUE_DELIVERY_LIMIT),
        );
        insert_str(&mut main_args, "x-dead-letter-exchange", "");
        insert_str(
            &mut main_args,
            "x-dead-letter-routing-key",
            &self.dead_letter_queue(),
        );
        insert_str(&mut main_args, "x-dead-letter-strategy", "at-least-once");
        insert_str(&mut main_args, "x-overflow", "reject-publish");
        channel
            .queue_declare(self.main_queue().as_str().into(), durable_queue, main_args)
            .await?;
        channel
            .queue_bind(
                self.main_queue().as_str().into(),
                self.exchange().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;

        for (i, delay) in self.retry_delays.iter().enumerate() {
            let mut args = FieldTable::default();
            insert_str(&mut args, "x-queue-type", "classic");
            args.insert(
                "x-message-ttl".into(),
                AMQPValue::LongLongInt(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX)),
            );
            insert_str(&mut args, "x-dead-letter-exchange", "");
            insert_str(&mut args, "x-dead-letter-routing-key", &self.main_queue());
            channel
                .queue_declare(self.retry_queue(i + 1).as_str().into(), durable_queue, args)
                .await?;
        }
        Ok(())
    }

    /// Deletes every queue and the exchange (tests clean up with this).
    ///
    /// # Errors
    /// The broker's error.
    pub async fn delete(&self, channel: &Channel) -> Result<(), lapin::Error> {
        let mut queues = vec![self.main_queue(), self.dead_letter_queue()];
        queues.extend((1..=self.retry_delays.len()).map(|n| self.retry_queue(n)));
        for queue in queues {
            channel
                .queue_delete(queue.as_str().into(), Default::default())
                .await?;
        }
        channel
            .exchange_delete(self.exchange().into(), Default::default())
            .await
    }
}

fn insert_str(table: &mut FieldTable, key: &str, value: &str) {
    table.insert(
        ShortString::from(key),
        AMQPValue::LongString(LongString::from(value)),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_contract() {
        let t = Topology::default();
        assert_eq!(t.exchange(), "stripe.events");
        assert_eq!(t.main_queue(), "stripe.events.q");
        assert_eq!(t.retry_queue(1), "stripe.events.retry.1");
        assert_eq!(t.dead_letter_queue(), "stripe.events.dlq");
        assert_eq!(t.retry_delays().len(), 5);
        assert_eq!(t.retry_delays()[4], Duration::from_secs(3600));
    }

    #[test]
    fn zero_or_garbage_retry_delays_are_refused_by_name() {
        for bad in ["0s", "soon"] {
            let err = Topology::from_env(&Env::from_pairs([("RETRY_DELAYS", bad)])).unwrap_err();
            assert_eq!(err.var, "RETRY_DELAYS");
        }
    }
}
