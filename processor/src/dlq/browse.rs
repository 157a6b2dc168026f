//! Reading the dead-letter queue without taking anything out of it.
//!
//! Invariant: every message read here stays parked unless the caller explicitly removes it
//! with [`Snapshot::remove`]. Messages are fetched with `basic_get` *without* auto-ack on a
//! channel of their own, so until the snapshot is released they are unacknowledged and
//! invisible to other readers; [`Snapshot::release`] nacks them back with requeue (a classic
//! queue puts requeued messages back in their original position), and if the process dies
//! first the broker requeues them when the connection drops. Nothing is lost either way.

use lapin::Acker;
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicNackOptions, BasicQosOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};

use super::message::ParkedMessage;

/// The dead-letter queue could not be read, or a parked message could not be removed.
#[derive(Debug, thiserror::Error)]
pub enum BrowseError {
    #[error("cannot reach the broker: {0}")]
    Connect(#[source] lapin::Error),
    #[error("cannot read queue {queue}: {source}")]
    Read {
        queue: String,
        #[source]
        source: lapin::Error,
    },
    #[error(
        "the broker did not take the acknowledgement (channel closed); the message stays parked"
    )]
    NotAcked,
}

/// One held message and the handle that settles it.
#[derive(Debug)]
pub(crate) struct Held {
    pub(crate) message: ParkedMessage,
    acker: Acker,
}

/// The messages that were in the dead-letter queue when it was read, held unacknowledged.
#[derive(Debug)]
pub(crate) struct Snapshot {
    connection: Connection,
    channel: Channel,
    pub(crate) held: Vec<Held>,
    /// Ready messages the broker reported before reading (what a full read covers).
    pub(crate) depth: u32,
}

/// Number of ready messages in `queue` (passive declare: never creates it).
///
/// # Errors
/// The broker's error, e.g. `NOT_FOUND` when the queue does not exist (that closes `channel`).
pub async fn queue_depth(channel: &Channel, queue: &str) -> Result<u32, lapin::Error> {
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
    Ok(queue.message_count())
}

impl Snapshot {
    /// Reads up to the queue's current depth, stopping early once `enough` says so.
    ///
    /// # Errors
    /// When the broker is unreachable or the queue cannot be read; whatever was already held
    /// returns to the queue when the connection is dropped.
    pub(crate) async fn take(
        amqp_url: &str,
        queue: &str,
        mut enough: impl FnMut(&ParkedMessage) -> bool,
    ) -> Result<Self, BrowseError> {
        let connection = shared::amqp::connect(amqp_url, "processor-dlq")
            .await
            .map_err(BrowseError::Connect)?;
        let read = |source| BrowseError::Read {
            queue: queue.to_owned(),
            source,
        };
        let channel = connection.create_channel().await.map_err(read)?;
        // basic_get ignores prefetch, but a zero-prefetch channel documents that nothing here
        // consumes: the snapshot is exactly what was fetched.
        channel
            .basic_qos(0, BasicQosOptions::default())
            .await
            .map_err(read)?;
        let depth = queue_depth(&channel, queue).await.map_err(read)?;
        let mut held = Vec::new();
        // Reading only the depth seen at the start keeps the snapshot bounded while the
        // consumer goes on parking new messages behind it.
        while held.len() < depth as usize {
            let Some(got) = channel
                .basic_get(queue.into(), BasicGetOptions { no_ack: false })
                .await
                .map_err(read)?
            else {
                break;
            };
            let delivery = got.delivery;
            let message = ParkedMessage::new(delivery.data, delivery.properties);
            let stop = enough(&message);
            held.push(Held {
                message,
                acker: delivery.acker,
            });
            if stop {
                break;
            }
        }
        Ok(Self {
            connection,
            channel,
            held,
            depth,
        })
    }

    pub(crate) fn messages(&self) -> impl Iterator<Item = &ParkedMessage> {
        self.held.iter().map(|h| &h.message)
    }

    /// Removes one held message from the queue for good.
    ///
    /// # Errors
    /// When the acknowledgement could not be sent; the message then stays parked.
    pub(crate) async fn remove(held: &Held) -> Result<(), BrowseError> {
        match held.acker.ack(BasicAckOptions::default()).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(BrowseError::NotAcked),
            Err(source) => Err(BrowseError::Read {
                queue: "dead-letter queue".to_owned(),
                source,
            }),
        }
    }

    /// Returns every message not removed to the queue, in its original order, and closes the
    /// connection. Never fails: if the nack cannot be sent, closing the connection requeues.
    pub(crate) async fn release(self) {
        // `multiple` settles every outstanding delivery up to this one; removed ones are already
        // settled, so the newest still-held delivery covers the rest.
        if let Some(last) = self.held.iter().rev().find(|h| h.acker.usable()) {
            let _ = last
                .acker
                .nack(BasicNackOptions {
                    multiple: true,
                    requeue: true,
                })
                .await;
        }
        let _ = self.channel.close(200, "released".into()).await;
        let _ = self.connection.close(200, "done".into()).await;
    }
}
