//! The broker side of the consumer: one consuming session (connection, channel, consumer), and
//! the dispatcher that sends each delivery to the lane of the user it concerns.
//!
//! Invariant: a lane runs one batch at a time and every delivery of a user goes to the same
//! lane, so the batches of one process never wait on each other's per-user locks. A lane holds
//! a delivery back only to fill a batch during a drain, never while it keeps up with live
//! traffic.

use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Connection, Consumer};
use shared::shutdown::{Shutdown, Stop};

use super::Worker;
use super::batch::Item;
use super::completions;
use crate::config::Config;
use crate::domain::events::Event;

/// An open consuming connection: the main queue, and the Stripe queue on a channel of its own
/// (so what waits for Stripe never takes the main queue's prefetch window).
pub(super) struct Session {
    connection: Connection,
    channel: Channel,
    consumer: Consumer,
    stripe_channel: Channel,
    stripe_consumer: Consumer,
}

/// Why [`Worker::consume`] returned.
pub(super) enum SessionEnd {
    Shutdown,
    Lost,
}

impl Session {
    /// Connects, declares the topology, sets the prefetch and starts consuming the main queue.
    pub(super) async fn open(config: &Config) -> Result<Self, lapin::Error> {
        let connection = shared::amqp::connect(&config.amqp_url, "processor-consume").await?;
        let channel = connection.create_channel().await?;
        config.topology.declare(&channel).await?;
        channel
            .basic_qos(config.prefetch, BasicQosOptions::default())
            .await?;
        let consumer = consume(&channel, &config.topology.main_queue()).await?;
        let stripe_channel = connection.create_channel().await?;
        stripe_channel
            .basic_qos(completions::PREFETCH, BasicQosOptions::default())
            .await?;
        let stripe_consumer = consume(&stripe_channel, &config.topology.stripe_queue()).await?;
        Ok(Self {
            connection,
            channel,
            consumer,
            stripe_channel,
            stripe_consumer,
        })
    }

    /// Closes the channel and the connection (bounded), returning unacked deliveries.
    pub(super) async fn close(self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            let _ = self.stripe_channel.close(200, "closing".into()).await;
            let _ = self.channel.close(200, "closing".into()).await;
            let _ = self.connection.close(200, "closing".into()).await;
        })
        .await;
    }

    /// Stops deliveries to both consumers; those already prefetched return on close.
    async fn cancel(&self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            let _ = self
                .stripe_channel
                .basic_cancel(self.stripe_consumer.tag(), BasicCancelOptions::default())
                .await;
            let _ = self
                .channel
                .basic_cancel(self.consumer.tag(), BasicCancelOptions::default())
                .await;
        })
        .await;
    }
}

/// Starts consuming `queue` on `channel`, under a tag of its own.
async fn consume(channel: &Channel, queue: &str) -> Result<Consumer, lapin::Error> {
    channel
        .basic_consume(
            queue.into(),
            ShortString::from(format!("processor-{}", uuid::Uuid::new_v4().simple())),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
}

impl Worker {
    /// Dispatches deliveries to `lanes` batch processors by user: the same user always lands in
    /// the same lane, so concurrent batches of one process do not contend for (or deadlock on)
    /// the per-user locks. Returns when shutdown is requested or the connection is lost.
    pub(super) async fn consume(
        &self,
        session: &mut Session,
        shutdown: &mut Shutdown,
    ) -> SessionEnd {
        let lanes = self.config.lanes.max(1);
        // Triggered by a lane whose acks failed; also fires once every lane is gone.
        let lost = Stop::default();
        let mut session_lost = lost.listener();
        let mut senders = Vec::with_capacity(lanes);
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..lanes {
            let (tx, rx) = tokio::sync::mpsc::channel(usize::from(self.config.prefetch));
            senders.push(tx);
            tasks.spawn(self.clone().lane(rx, lanes, lost.clone()));
        }
        drop(lost);
        let end = loop {
            // The Stripe queue first: its own prefetch bounds it, and it must not starve.
            let (next, from_stripe_queue) = tokio::select! {
                biased;
                () = shutdown.recv() => break SessionEnd::Shutdown,
                () = session_lost.recv() => break SessionEnd::Lost,
                next = session.stripe_consumer.next() => (next, true),
                next = session.consumer.next() => (next, false),
            };
            let Some(Ok(delivery)) = next else {
                break SessionEnd::Lost;
            };
            // Parsed once, here: the lane gets the parsed event with the delivery.
            let item = Item::new(delivery);
            let lane = lane_of(&item, lanes);
            // Read from Stripe first, then applied in its lane. Without a key (removed since),
            // what waited for Stripe is applied in the lanes as it is.
            if from_stripe_queue && self.stripe.is_some() {
                self.complete_off_lane(item, senders[lane].clone());
                continue;
            }
            if senders[lane].send(item).await.is_err() {
                break SessionEnd::Lost;
            }
        };
        if matches!(end, SessionEnd::Shutdown) {
            session.cancel().await;
        }
        // Lanes finish the batch in hand and whatever was already dispatched to them.
        drop(senders);
        let grace = match end {
            SessionEnd::Shutdown => self.config.shutdown_grace,
            SessionEnd::Lost => Duration::from_secs(2),
        };
        let deadline = tokio::time::Instant::now() + grace;
        let drained = tokio::time::timeout_at(deadline, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                ?grace,
                "in-flight batches did not finish in time; their deliveries return to the queue"
            );
            tasks.shutdown().await;
        }
        // The completions the lanes handed over share the same grace.
        self.completions
            .drain(deadline.saturating_duration_since(tokio::time::Instant::now()))
            .await;
        end
    }

    /// One lane: batches what the dispatcher sends it and processes one batch at a time.
    ///
    /// What arrives while a batch runs forms the next one, so live traffic the lane keeps up
    /// with is never held back. Only after a batch at least half the lane's share of the
    /// prefetch window (a drain: the broker refills the window after each ack, a burst at a
    /// time) does the next batch wait up to `batch_wait` for more, which keeps drain batches
    /// full.
    async fn lane(
        self,
        mut deliveries: tokio::sync::mpsc::Receiver<Item>,
        lanes: usize,
        lost: Stop,
    ) {
        let size = self.config.batch_size.max(1);
        let share = (usize::from(self.config.prefetch) / lanes.max(1)).clamp(1, size);
        let mut linger = true;
        while let Some(first) = deliveries.recv().await {
            let wait = linger.then_some(self.config.batch_wait);
            let batch = gather(first, &mut deliveries, size, wait).await;
            linger = lingers_after(batch.len(), share);
            if !self.process_batch(batch).await {
                lost.trigger();
                return;
            }
        }
    }
}

/// A batch: `first`, everything already waiting, and, with `wait`, what arrives within it after
/// `first`; at most `size`.
async fn gather<T>(
    first: T,
    deliveries: &mut tokio::sync::mpsc::Receiver<T>,
    size: usize,
    wait: Option<Duration>,
) -> Vec<T> {
    let mut batch = vec![first];
    let deadline = wait.map(|wait| tokio::time::Instant::now() + wait);
    while batch.len() < size {
        match deliveries.try_recv() {
            Ok(delivery) => batch.push(delivery),
            Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => break,
            Err(tokio::sync::mpsc::error::TryRecvError::Empty) => {
                let Some(deadline) = deadline else { break };
                match tokio::time::timeout_at(deadline, deliveries.recv()).await {
                    Ok(Some(delivery)) => batch.push(delivery),
                    Ok(None) | Err(_) => break,
                }
            }
        }
    }
    batch
}

/// Whether the batch after one of `len` deliveries waits for more: only after one at least
/// half of `share`, what the lane can hold of the prefetch window.
fn lingers_after(len: usize, share: usize) -> bool {
    len.saturating_mul(2) >= share
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
    match item.event().and_then(Event::routing_hint) {
        Some(hint) => hint.hash(&mut hasher),
        None => item.delivery.data.hash(&mut hasher),
    }
    usize::try_from(hasher.finish() % lanes as u64).unwrap_or(0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Bounds a test that must not wait for the batch wait (an hour) to end.
    const PROMPTLY: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn a_batch_takes_what_is_already_waiting_and_goes() {
        let (tx, mut rx) = tokio::sync::mpsc::channel(8);
        for n in 1..=3 {
            tx.send(n).await.unwrap();
        }
        let batch = tokio::time::timeout(PROMPTLY, gather(0, &mut rx, 64, None))
            .await
            .expect("a batch without wait never waits");
        assert_eq!(batch, vec![0, 1, 2, 3]);
        let alone = tokio::time::timeout(PROMPTLY, gather(4, &mut rx, 64, None))
            .await
            .expect("a batch without wait never waits");
        assert_eq!(alone, vec![4]);
    }

    #[tokio::test]
    async fn a_lingering_batch_waits_for_more_until_it_is_full() {
        let (tx, mut rx) = tokio::sync::mpsc::channel(8);
        tx.send(1).await.unwrap();
        let late = tokio::spawn(async move {
            tokio::task::yield_now().await;
            tx.send(2).await.unwrap();
            tx.send(3).await.unwrap();
            tx
        });
        let batch = tokio::time::timeout(
            PROMPTLY,
            gather(0, &mut rx, 3, Some(Duration::from_secs(3600))),
        )
        .await
        .expect("a full batch goes at once");
        assert_eq!(batch, vec![0, 1, 2]);
        let _tx = late.await.unwrap();
        assert_eq!(
            rx.try_recv().unwrap(),
            3,
            "what did not fit waits for the next batch"
        );
    }

    #[test]
    fn only_a_batch_at_least_half_full_makes_the_next_one_linger() {
        assert!(lingers_after(64, 64));
        assert!(lingers_after(32, 64));
        assert!(!lingers_after(31, 64));
        assert!(!lingers_after(1, 64));
        assert!(lingers_after(1, 1));
    }
}
