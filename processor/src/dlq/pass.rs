//! Reading and changing the dead-letter queue without ever leaving messages in limbo.
//!
//! A [`Session`] owns the queue for one command: it holds the broker-side lock (an exclusive
//! queue `<dlq>.lock`, gone with the connection, so `kill -9` never leaves it behind) and reads
//! the depth once. It then reads in one of two ways:
//!
//! - [`Session::peek`] looks at the first few messages (at most [`PEEK_MAX`]): they are
//!   fetched unacknowledged and handed straight back with one `nack(requeue)`, which a classic
//!   queue puts back in place. A handful of requeues is instant; tens of thousands are what
//!   left the queue in limbo for minutes, hence the cap.
//! - [`Session::pass`] goes through exactly the messages that were parked when the session
//!   opened, each one once, in order. Each message is settled before the next window is read:
//!   [`Action::Keep`] republishes it to the tail of the same queue and acknowledges the
//!   original only after the broker confirmed the copy ("rotation": a full pass leaves the
//!   queue in its original order); [`Action::Replay`] does the same towards the main exchange;
//!   [`Action::Remove`] acknowledges it. At most [`WINDOW`] messages are unacknowledged at any
//!   time, so memory is bounded and the broker never has a backlog to return.
//!
//! Every pass also brings the Postgres index up to date (see the `index` module) when the
//! session has one.
//!
//! Invariants: a message is acknowledged only after its copy is confirmed (or, for `Remove`,
//! because the caller asked), so a crash at any point loses nothing. A crash between a confirm
//! and its ack leaves two identical copies (at most [`WINDOW`]); the next pass recognises the
//! second by its [`Fingerprint`] and removes it, and for a replay the processor's dedupe by
//! event id absorbs the second delivery.

use std::collections::HashSet;
use std::time::Duration;

use futures_util::StreamExt as _;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesOrdered;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Confirmation, Connection};
use shared::topology::Topology;

use super::index::{Index, IndexError, Update};
use super::message::{Action, Fingerprint, ParkedMessage};

/// Messages unacknowledged at once during a pass (also the consumer's prefetch).
pub(crate) const WINDOW: u16 = 512;
/// The most messages [`Session::peek`] holds; beyond that, a full pass is cheaper than the
/// broker's requeue.
pub(crate) const PEEK_MAX: usize = 1000;
/// How long one copy may wait for its confirm.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);
const CONSUMER_TAG: &str = "processor-dlq-pass";

/// The dead-letter queue could not be read or changed. The display names what failed; the
/// broker's own message is the [source](std::error::Error::source), printed once after it.
#[derive(Debug, thiserror::Error)]
pub enum PassError {
    #[error("cannot reach the broker")]
    Connect(#[source] lapin::Error),
    #[error(
        "another `processor dlq` command is working on {queue}; run one at a time and try again \
         when it ends"
    )]
    Busy { queue: String },
    #[error("cannot read queue {queue}")]
    Read {
        queue: String,
        #[source]
        source: lapin::Error,
    },
    #[error("the broker did not confirm the copy of {event_id} ({why}); the original stays parked")]
    NotConfirmed { event_id: String, why: String },
    #[error("the broker ended the read of {queue} (channel closed)")]
    Ended { queue: String },
    #[error(
        "the broker did not take an acknowledgement (channel closed); the message stays parked"
    )]
    NotAcked,
}

/// Number of ready messages in `queue` (passive declare: never creates it).
///
/// # Errors
/// The broker's error, e.g. `NOT_FOUND` when the queue does not exist (that closes `channel`).
pub async fn queue_depth(channel: &Channel, queue: &str) -> Result<u32, lapin::Error> {
    Ok(queue_counts(channel, queue).await?.ready)
}

/// What the broker says about a queue without touching it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueCounts {
    /// Messages ready for delivery (not held by any consumer).
    pub ready: u32,
    /// Consumers attached; a running `processor dlq` pass is one.
    pub consumers: u32,
}

/// Ready messages and consumers of `queue` (passive declare: never creates it).
///
/// # Errors
/// The broker's error, e.g. `NOT_FOUND` when the queue does not exist (that closes `channel`).
pub async fn queue_counts(channel: &Channel, queue: &str) -> Result<QueueCounts, lapin::Error> {
    let queue = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok(QueueCounts {
        ready: queue.message_count(),
        consumers: queue.consumer_count(),
    })
}

/// Acknowledgements of settled originals, sent as one `multiple` ack per [`ACK_EVERY`]: the
/// in-flight futures finish in delivery order, so acknowledging the newest settled delivery
/// with `multiple` covers exactly the settled ones. After a failure (`in_order` false) each
/// later one is acknowledged alone, so the failed one is never covered.
#[derive(Debug)]
struct Acks {
    newest: Option<lapin::Acker>,
    pending: usize,
    in_order: bool,
}

impl Default for Acks {
    fn default() -> Self {
        Self {
            newest: None,
            pending: 0,
            in_order: true,
        }
    }
}

/// Settled originals acknowledged at once.
const ACK_EVERY: usize = 64;

impl Acks {
    async fn settled(&mut self, acker: lapin::Acker) -> Result<(), PassError> {
        if !self.in_order {
            return ack(&acker, false).await;
        }
        self.newest = Some(acker);
        self.pending += 1;
        if self.pending >= ACK_EVERY {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), PassError> {
        self.pending = 0;
        match self.newest.take() {
            Some(acker) => ack(&acker, true).await,
            None => Ok(()),
        }
    }
}

async fn ack(acker: &lapin::Acker, multiple: bool) -> Result<(), PassError> {
    match acker.ack(BasicAckOptions { multiple }).await {
        Ok(true) => Ok(()),
        _ => Err(PassError::NotAcked),
    }
}

/// How one message was settled.
#[derive(Debug, Clone, Copy)]
enum Settled {
    Done(Action),
    /// A second copy of a message already visited in this pass, removed.
    Duplicate,
}

/// What a pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Tally {
    /// Messages read (each visited once, duplicates excluded).
    pub(crate) visited: u64,
    pub(crate) kept: u64,
    pub(crate) replayed: u64,
    pub(crate) removed: u64,
    /// Leftover copies of an interrupted earlier pass, removed.
    pub(crate) duplicates: u64,
    /// Stopped early by Ctrl-C/SIGTERM; what was not reached is untouched.
    pub(crate) interrupted: bool,
}

/// One command's hold on the dead-letter queue.
#[derive(Debug)]
pub(crate) struct Session {
    connection: Connection,
    channel: Channel,
    queue: String,
    topology: Topology,
    amqp_url: String,
    /// Messages parked when the session opened: what a pass covers.
    pub(crate) depth: u32,
    /// The Postgres index the passes keep up to date, when Postgres is reachable.
    index: Option<Index>,
}

/// The index's answer, or `None` after a warning: the commands never fail for the index.
fn usable<T>(result: Result<T, IndexError>, warning: &str) -> Option<T> {
    match result {
        Ok(value) => Some(value),
        Err(error) => {
            let error = super::describe(&anyhow::Error::new(error));
            tracing::warn!(error, "{warning}");
            None
        }
    }
}

fn lock_queue(queue: &str) -> String {
    format!("{queue}.lock")
}

fn is_resource_locked(error: &lapin::Error) -> bool {
    matches!(
        error.kind(),
        lapin::ErrorKind::ProtocolError(e)
            if matches!(e.kind(), lapin::protocol::AMQPErrorKind::Soft(
                lapin::protocol::AMQPSoftError::RESOURCELOCKED
            ))
    )
}

impl Session {
    /// Connects, takes the queue's lock and reads its depth; opens the index at `database_url`
    /// when given and reachable (a warning otherwise: the commands work without it).
    ///
    /// # Errors
    /// [`PassError::Busy`] when another command holds the queue, otherwise the broker's error.
    pub(crate) async fn open(
        amqp_url: &str,
        topology: &Topology,
        database_url: Option<&str>,
    ) -> Result<Self, PassError> {
        let queue = topology.dead_letter_queue();
        let connection = shared::amqp::connect(amqp_url, "processor-dlq")
            .await
            .map_err(PassError::Connect)?;
        let read = |source| PassError::Read {
            queue: queue.clone(),
            source,
        };
        let channel = connection.create_channel().await.map_err(read)?;
        // Exclusive: a second declaration from another connection fails with RESOURCE_LOCKED;
        // the broker deletes it when this connection ends, however it ends.
        let locked = channel
            .queue_declare(
                lock_queue(&queue).as_str().into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        match locked {
            Ok(_) => {}
            Err(e) if is_resource_locked(&e) => {
                let _ = connection.close(200, "busy".into()).await;
                return Err(PassError::Busy { queue });
            }
            Err(e) => return Err(read(e)),
        }
        let depth = queue_depth(&channel, &queue).await.map_err(read)?;
        let index = match database_url {
            Some(url) => usable(
                Index::open(url, &queue).await,
                "working without the dead-letter index",
            ),
            None => None,
        };
        if depth == 0
            && let Some(index) = &index
            && let Some(update) = usable(index.begin().await, "dead-letter index not updated")
        {
            // An empty queue is a pass over everything: the (empty) index is trusted from here
            // on, and events recorded at park time keep it current.
            usable(update.finish(true).await, "dead-letter index not updated");
        }
        Ok(Self {
            connection,
            channel,
            queue,
            topology: topology.clone(),
            amqp_url: amqp_url.to_owned(),
            depth,
            index,
        })
    }

    pub(crate) fn queue(&self) -> &str {
        &self.queue
    }

    pub(crate) fn index(&self) -> Option<&Index> {
        self.index.as_ref()
    }

    /// The index, when it holds exactly the events parked now (so a read can be a query).
    pub(crate) async fn current_index(&self) -> Option<&Index> {
        let index = self.index.as_ref()?;
        usable(
            index.is_current(self.depth).await,
            "dead-letter index not read",
        )?
        .then_some(index)
    }

    fn read_error(&self, source: lapin::Error) -> PassError {
        PassError::Read {
            queue: self.queue.clone(),
            source,
        }
    }

    /// The first messages of the queue, up to `max` (capped at [`PEEK_MAX`]) or until `enough`
    /// says so, handed back in place before returning. The second value tells whether every
    /// parked message was seen.
    ///
    /// # Errors
    /// The broker's error; what was fetched returns to the queue with the connection.
    pub(crate) async fn peek(
        &self,
        max: usize,
        mut enough: impl FnMut(&ParkedMessage) -> bool,
    ) -> Result<(Vec<ParkedMessage>, bool), PassError> {
        let max = max.min(PEEK_MAX).min(self.depth as usize);
        let mut seen = Vec::new();
        while seen.len() < max {
            let Some(got) = self
                .channel
                .basic_get(
                    self.queue.as_str().into(),
                    BasicGetOptions { no_ack: false },
                )
                .await
                .map_err(|e| self.read_error(e))?
            else {
                break;
            };
            let message = ParkedMessage::new(got.delivery.data, got.delivery.properties);
            let stop = enough(&message);
            seen.push(message);
            if stop {
                break;
            }
        }
        if !seen.is_empty() {
            // Tag 0 with `multiple`: every delivery outstanding on this channel.
            self.channel
                .basic_nack(
                    0,
                    BasicNackOptions {
                        multiple: true,
                        requeue: true,
                    },
                )
                .await
                .map_err(|e| self.read_error(e))?;
        }
        let complete = seen.len() >= self.depth as usize;
        Ok((seen, complete))
    }

    /// Goes once through every message parked when the session opened, in order, doing with
    /// each what `visit` says (given the message and its fingerprint) (see the module doc). Copies left by an interrupted earlier pass
    /// are removed without being visited. Stops early on Ctrl-C/SIGTERM (reported in the
    /// outcome) or at the first failure, after settling what is in flight; whatever was not
    /// reached stays where it was.
    ///
    /// # Errors
    /// The broker's error, or a copy that was not confirmed; the message concerned stays
    /// parked and everything settled before it stays settled.
    pub(crate) async fn pass(
        &self,
        mut visit: impl FnMut(&ParkedMessage, Fingerprint) -> Action,
    ) -> Result<Tally, PassError> {
        let mut outcome = Tally::default();
        if self.depth == 0 {
            return Ok(outcome);
        }
        // Copies go out on a connection of their own (a resource alarm blocks publishers only).
        let publishing = shared::amqp::connect(&self.amqp_url, "processor-dlq-publish")
            .await
            .map_err(PassError::Connect)?;
        let mut update = match &self.index {
            Some(index) => usable(index.begin().await, "dead-letter index not updated"),
            None => None,
        };
        let result = self
            .pass_with(&publishing, &mut visit, &mut outcome, &mut update)
            .await;
        if let Some(update) = update {
            let complete = result.is_ok() && !outcome.interrupted;
            usable(
                update.finish(complete).await,
                "dead-letter index not updated",
            );
        }
        // Whatever this channel still holds (read ahead past the pass, or not reached after an
        // interruption) goes back in place; it is at most one window.
        let _ = self
            .channel
            .basic_cancel(CONSUMER_TAG.into(), BasicCancelOptions::default())
            .await;
        let _ = self
            .channel
            .basic_nack(
                0,
                BasicNackOptions {
                    multiple: true,
                    requeue: true,
                },
            )
            .await;
        let _ = publishing.close(200, "pass done".into()).await;
        result.map(|()| outcome)
    }

    async fn pass_with(
        &self,
        publishing: &Connection,
        visit: &mut impl FnMut(&ParkedMessage, Fingerprint) -> Action,
        outcome: &mut Tally,
        update: &mut Option<Update<'_>>,
    ) -> Result<(), PassError> {
        let read = |e| self.read_error(e);
        let publish = publishing.create_channel().await.map_err(read)?;
        publish
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(read)?;
        self.channel
            .basic_qos(WINDOW, BasicQosOptions::default())
            .await
            .map_err(read)?;
        let mut consumer = self
            .channel
            .basic_consume(
                self.queue.as_str().into(),
                CONSUMER_TAG.into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(read)?;
        let total = u64::from(self.depth);
        let mut received = 0u64;
        let mut seen: HashSet<Fingerprint> = HashSet::new();
        let mut in_flight: FuturesOrdered<
            BoxFuture<'static, Result<(Settled, lapin::Acker), PassError>>,
        > = FuturesOrdered::new();
        let mut failure: Option<PassError> = None;
        let mut acks = Acks::default();
        let mut stopping = false;
        let shutdown = shared::shutdown_signal();
        tokio::pin!(shutdown);
        loop {
            let reading = !stopping && received < total && in_flight.len() < usize::from(WINDOW);
            if in_flight.is_empty() {
                // Nothing else will settle: hand the broker what is done so it can send more.
                if let Err(e) = acks.flush().await {
                    failure.get_or_insert(e);
                    break;
                }
                if !reading {
                    break;
                }
            }
            tokio::select! {
                biased;
                () = &mut shutdown, if !stopping => {
                    stopping = true;
                    outcome.interrupted = true;
                }
                Some(settled) = in_flight.next(), if !in_flight.is_empty() => match settled {
                    Ok((settled, acker)) => {
                        match settled {
                            Settled::Done(Action::Keep) => outcome.kept += 1,
                            Settled::Done(Action::Replay) => outcome.replayed += 1,
                            Settled::Done(Action::Remove) => outcome.removed += 1,
                            Settled::Duplicate => outcome.duplicates += 1,
                        }
                        if let Err(e) = acks.settled(acker).await {
                            failure.get_or_insert(e);
                            stopping = true;
                        }
                    }
                    Err(e) => {
                        // Everything settled before this one is acknowledged; what settles
                        // after it is acknowledged one by one, never past it.
                        if let Err(e) = acks.flush().await {
                            failure.get_or_insert(e);
                        }
                        acks.in_order = false;
                        failure.get_or_insert(e);
                        stopping = true;
                    }
                },
                delivery = consumer.next(), if reading => {
                    let delivery = match delivery {
                        Some(Ok(d)) => d,
                        Some(Err(e)) => return Err(failure.unwrap_or_else(|| read(e))),
                        None => return Err(failure.unwrap_or_else(|| PassError::Ended {
                            queue: self.queue.clone(),
                        })),
                    };
                    received += 1;
                    let message = ParkedMessage::new(delivery.data, delivery.properties);
                    let fingerprint = Fingerprint::of(&message);
                    let settled = if seen.insert(fingerprint) {
                        outcome.visited += 1;
                        let action = visit(&message, fingerprint);
                        if let Some(update) = update.as_mut() {
                            update.note(&message, fingerprint, action).await;
                        }
                        Settled::Done(action)
                    } else {
                        Settled::Duplicate
                    };
                    let settle = self
                        .settle(&publish, message, delivery.acker, settled)
                        .await;
                    match settle {
                        Ok(future) => in_flight.push_back(future),
                        Err(e) => {
                            failure.get_or_insert(e);
                            stopping = true;
                        }
                    }
                }
            }
        }
        if let Err(e) = acks.flush().await {
            failure.get_or_insert(e);
        }
        failure.map_or(Ok(()), Err)
    }

    /// Sends what `action` needs (in queue order, so the tail keeps the order) and returns the
    /// future that waits for the confirm and hands back the original's acker.
    async fn settle(
        &self,
        publish: &Channel,
        message: ParkedMessage,
        acker: lapin::Acker,
        settled: Settled,
    ) -> Result<BoxFuture<'static, Result<(Settled, lapin::Acker), PassError>>, PassError> {
        let event_id = message.event_id().unwrap_or_default();
        let copy = match settled {
            Settled::Duplicate | Settled::Done(Action::Remove) => None,
            Settled::Done(Action::Keep) => Some((
                String::new(),
                self.queue.clone(),
                message.body,
                message.properties,
            )),
            Settled::Done(Action::Replay) => {
                let replay = message.for_replay();
                Some((
                    self.topology.exchange().to_owned(),
                    replay.event_type().unwrap_or_default(),
                    replay.body,
                    replay.properties,
                ))
            }
        };
        let confirm = match copy {
            None => None,
            Some((exchange, routing_key, body, properties)) => Some(
                publish
                    .basic_publish(
                        exchange.as_str().into(),
                        routing_key.as_str().into(),
                        BasicPublishOptions {
                            mandatory: true,
                            ..BasicPublishOptions::default()
                        },
                        &body,
                        properties,
                    )
                    .await
                    .map_err(|e| self.read_error(e))?,
            ),
        };
        Ok(Box::pin(async move {
            if let Some(confirm) = confirm {
                let not_confirmed = |why: String| PassError::NotConfirmed {
                    event_id: event_id.clone(),
                    why,
                };
                match tokio::time::timeout(CONFIRM_TIMEOUT, confirm).await {
                    Ok(Ok(Confirmation::Ack(None))) => {}
                    Ok(Ok(Confirmation::Ack(Some(_)))) => {
                        return Err(not_confirmed("returned as unroutable".to_owned()));
                    }
                    Ok(Ok(_)) => return Err(not_confirmed("nacked".to_owned())),
                    Ok(Err(e)) => return Err(not_confirmed(e.to_string())),
                    Err(_) => {
                        return Err(not_confirmed(format!(
                            "no confirm within {CONFIRM_TIMEOUT:?}"
                        )));
                    }
                }
            }
            Ok((settled, acker))
        }))
    }

    /// Closes the connection (which also releases the lock).
    pub(crate) async fn close(self) {
        let _ = self.channel.close(200, "done".into()).await;
        let _ = self.connection.close(200, "done".into()).await;
    }
}
