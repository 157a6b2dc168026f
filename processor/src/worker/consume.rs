//! The broker side of the consumer: one consuming session (connection, channel, consumer), and
//! the dispatcher that sends each delivery to the lane of the user it concerns.
//!
//! Invariant: a lane runs one batch at a time and every delivery of a user goes to the same
//! lane, so the batches of one process never wait on each other's per-user locks.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::FusedFuture;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Connection, Consumer};

use super::Worker;
use super::batch::Item;
use crate::config::Config;
use crate::events::Event;

/// An open consuming connection.
pub(super) struct Session {
    connection: Connection,
    channel: Channel,
    consumer: Consumer,
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
        let consumer = channel
            .basic_consume(
                config.topology.main_queue().as_str().into(),
                ShortString::from(format!("processor-{}", uuid::Uuid::new_v4().simple())),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(Self {
            connection,
            channel,
            consumer,
        })
    }

    /// Closes the channel and the connection (bounded), returning unacked deliveries.
    pub(super) async fn close(self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            let _ = self.channel.close(200, "closing".into()).await;
            let _ = self.connection.close(200, "closing".into()).await;
        })
        .await;
    }

    /// Stops deliveries to this consumer; those already prefetched return on close.
    async fn cancel(&self) {
        let tag = self.consumer.tag();
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            self.channel
                .basic_cancel(tag, BasicCancelOptions::default()),
        )
        .await;
    }
}

impl Worker {
    /// Dispatches deliveries to `lanes` batch processors by user: the same user always lands in
    /// the same lane, so concurrent batches of one process do not contend for (or deadlock on)
    /// the per-user locks. Returns when shutdown is requested or the connection is lost.
    pub(super) async fn consume<S>(
        &self,
        session: &mut Session,
        mut shutdown: Pin<&mut S>,
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
            session.cancel().await;
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
