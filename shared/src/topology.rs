//! The RabbitMQ topology of the contract, declared idempotently by both binaries and used by the
//! operator commands. Names live here and nowhere else.
//!
//! ```text
//!   ingress ──publish──▶ stripe.events (topic) ──#──▶ stripe.events.q (quorum)
//!                                                        │  ▲
//!                        processor: retry n ─────────────┘  │ TTL expiry dead-letters back
//!                                   ▼                       │   at least once
//!                        stripe.events.delay.<delay> (quorum, x-message-ttl) ──┘
//!                        processor: give up ──▶ stripe.events.dlq (classic, parked)
//!                        processor: needs a Stripe read ──▶ stripe.events.stripe (quorum),
//!                                   consumed at the rate Stripe allows
//!   processor outbox relay ──publish──▶ stripe.events.out (topic; routing key = message type;
//!                                        the app binds its own queues)
//! ```
//!
//! Invariants: delay queues hold one delay each (per-message TTL only expires at the head, so
//! delays never mix in a queue) and are named by it (`stripe.events.delay.30s`), so a changed
//! `RETRY_DELAYS` declares new queues instead of clashing with old ones; every queue that
//! dead-letters (the main queue, the Stripe queue and the delay queues) is a quorum queue with the
//! `at-least-once` strategy and `reject-publish` overflow, because classic queues dead-letter
//! at most once and lose what they hold across a broker restart; the consumed queues' delivery
//! limit is a crash-loop backstop, not the retry policy.

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

    use lapin::types::{AMQPValue, FieldTable, LongString};

    /// An integer header, whatever integer type (or decimal text) the publisher chose.
    #[must_use]
    pub fn integer(value: &AMQPValue) -> Option<i64> {
        match value {
            AMQPValue::ShortShortInt(v) => Some(i64::from(*v)),
            AMQPValue::ShortShortUInt(v) => Some(i64::from(*v)),
            AMQPValue::ShortInt(v) => Some(i64::from(*v)),
            AMQPValue::ShortUInt(v) => Some(i64::from(*v)),
            AMQPValue::LongInt(v) => Some(i64::from(*v)),
            AMQPValue::LongUInt(v) => Some(i64::from(*v)),
            AMQPValue::LongLongInt(v) => Some(*v),
            AMQPValue::Timestamp(v) => i64::try_from(*v).ok(),
            AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok()?.trim().parse().ok(),
            AMQPValue::ShortString(s) => s.as_str().trim().parse().ok(),
            _ => None,
        }
    }

    /// A text header (long or short string).
    #[must_use]
    pub fn text(value: &AMQPValue) -> Option<String> {
        match value {
            AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
            AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
            _ => None,
        }
    }

    /// Sets an integer header (as a signed 64-bit integer).
    pub fn put_integer(table: &mut FieldTable, key: &str, value: i64) {
        table.insert(key.into(), AMQPValue::LongLongInt(value));
    }

    /// Sets a text header (as a long string).
    pub fn put_text(table: &mut FieldTable, key: &str, value: &str) {
        table.insert(key.into(), AMQPValue::LongString(LongString::from(value)));
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn integer_headers_are_read_whatever_their_type() {
            assert_eq!(integer(&AMQPValue::LongLongInt(3)), Some(3));
            assert_eq!(integer(&AMQPValue::ShortShortUInt(2)), Some(2));
            assert_eq!(integer(&AMQPValue::LongString("4".into())), Some(4));
            assert_eq!(integer(&AMQPValue::LongLongInt(-1)), Some(-1));
            assert_eq!(integer(&AMQPValue::Boolean(true)), None);
        }

        #[test]
        fn written_headers_read_back() {
            let mut table = FieldTable::default();
            put_integer(&mut table, ATTEMPTS, 7);
            put_text(&mut table, LAST_ERROR, "down");
            assert_eq!(table.inner().get(ATTEMPTS).and_then(integer), Some(7));
            assert_eq!(
                table.inner().get(LAST_ERROR).and_then(text).as_deref(),
                Some("down")
            );
        }
    }
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

    /// The queue of events waiting for a Stripe read (`<base>.stripe`): sessions created
    /// elsewhere, whose line items the processor's completions read at the rate Stripe allows.
    #[must_use]
    pub fn stripe_queue(&self) -> String {
        format!("{}.stripe", self.base)
    }

    /// The delay queue holding messages for their `n`-th retry (1-based), named by its delay:
    /// `<base>.delay.<delay>`, e.g. `stripe.events.delay.30s`.
    ///
    /// # Panics
    /// Never for `n` in `1..=retry_delays().len()`; other `n` name no queue of the schedule but
    /// still yield a name (of a zero delay).
    #[must_use]
    pub fn retry_queue(&self, n: usize) -> String {
        let delay = n
            .checked_sub(1)
            .and_then(|i| self.retry_delays.get(i))
            .copied()
            .unwrap_or_default();
        format!("{}.delay.{}", self.base, delay_name(delay))
    }

    /// The classic `<base>.retry.<n>` queue of releases before durable delays: never declared
    /// any more, only drained by `processor migrate` (see the README's upgrade notes).
    #[must_use]
    pub fn legacy_retry_queue(&self, n: usize) -> String {
        format!("{}.retry.{n}", self.base)
    }

    /// The durable topic exchange the processor's outbox relay publishes the app's messages to
    /// (`<base>.out`, routing key = message type). The app binds its own queues to it.
    #[must_use]
    pub fn out_exchange(&self) -> String {
        format!("{}.out", self.base)
    }

    #[must_use]
    pub fn dead_letter_queue(&self) -> String {
        format!("{}.dlq", self.base)
    }

    #[must_use]
    pub fn retry_delays(&self) -> &[Duration] {
        &self.retry_delays
    }

    /// Declares exchange, main queue, Stripe queue, retry queues and dead-letter queue. Safe to call any number
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
        for exchange in [self.exchange().to_owned(), self.out_exchange()] {
            channel
                .exchange_declare(
                    exchange.as_str().into(),
                    ExchangeKind::Topic,
                    ExchangeDeclareOptions {
                        durable: true,
                        ..ExchangeDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await?;
        }

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

        // The main queue and the Stripe queue: consumed, and parked by the broker itself only
        // in a crash loop.
        let mut work_args = FieldTable::default();
        insert_str(&mut work_args, "x-queue-type", "quorum");
        work_args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(MAIN_QUEUE_DELIVERY_LIMIT),
        );
        insert_str(&mut work_args, "x-dead-letter-exchange", "");
        insert_str(
            &mut work_args,
            "x-dead-letter-routing-key",
            &self.dead_letter_queue(),
        );
        insert_str(&mut work_args, "x-dead-letter-strategy", "at-least-once");
        insert_str(&mut work_args, "x-overflow", "reject-publish");
        for queue in [self.main_queue(), self.stripe_queue()] {
            channel
                .queue_declare(queue.as_str().into(), durable_queue, work_args.clone())
                .await?;
        }
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
            insert_str(&mut args, "x-queue-type", "quorum");
            args.insert(
                "x-message-ttl".into(),
                AMQPValue::LongLongInt(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX)),
            );
            insert_str(&mut args, "x-dead-letter-exchange", "");
            insert_str(&mut args, "x-dead-letter-routing-key", &self.main_queue());
            // Without both, a quorum queue silently falls back to at-most-once dead-lettering.
            insert_str(&mut args, "x-dead-letter-strategy", "at-least-once");
            insert_str(&mut args, "x-overflow", "reject-publish");
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
        let mut queues = vec![
            self.main_queue(),
            self.stripe_queue(),
            self.dead_letter_queue(),
        ];
        queues.extend((1..=self.retry_delays.len()).map(|n| self.retry_queue(n)));
        for queue in queues {
            channel
                .queue_delete(queue.as_str().into(), Default::default())
                .await?;
        }
        channel
            .exchange_delete(self.out_exchange().as_str().into(), Default::default())
            .await?;
        channel
            .exchange_delete(self.exchange().into(), Default::default())
            .await
    }
}

/// A delay in the largest unit that states it exactly: `1h`, `2m`, `30s`, `1500ms`.
fn delay_name(delay: Duration) -> String {
    let ms = delay.as_millis();
    match ms {
        _ if ms > 0 && ms.is_multiple_of(3_600_000) => format!("{}h", ms / 3_600_000),
        _ if ms > 0 && ms.is_multiple_of(60_000) => format!("{}m", ms / 60_000),
        _ if ms > 0 && ms.is_multiple_of(1_000) => format!("{}s", ms / 1_000),
        _ => format!("{ms}ms"),
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
        assert_eq!(t.stripe_queue(), "stripe.events.stripe");
        assert_eq!(t.retry_queue(1), "stripe.events.delay.5s");
        assert_eq!(t.retry_queue(3), "stripe.events.delay.2m");
        assert_eq!(t.retry_queue(5), "stripe.events.delay.1h");
        assert_eq!(t.legacy_retry_queue(1), "stripe.events.retry.1");
        assert_eq!(t.dead_letter_queue(), "stripe.events.dlq");
        assert_eq!(t.out_exchange(), "stripe.events.out");
        assert_eq!(t.retry_delays().len(), 5);
        assert_eq!(t.retry_delays()[4], Duration::from_secs(3600));
    }

    #[test]
    fn delay_queues_are_named_by_their_delay() {
        assert_eq!(delay_name(Duration::from_millis(1500)), "1500ms");
        assert_eq!(delay_name(Duration::from_secs(90)), "90s");
        assert_eq!(delay_name(Duration::from_secs(7200)), "2h");
        let t = Topology::new("b", vec![Duration::from_secs(1), Duration::from_secs(1)]);
        assert_eq!(
            t.retry_queue(1),
            t.retry_queue(2),
            "one queue per distinct delay"
        );
    }

    #[test]
    fn zero_or_garbage_retry_delays_are_refused_by_name() {
        for bad in ["0s", "soon"] {
            let err = Topology::from_env(&Env::from_pairs([("RETRY_DELAYS", bad)])).unwrap_err();
            assert_eq!(err.var, "RETRY_DELAYS");
        }
    }
}
