//! The upgrade from the classic delay queues of earlier releases (`<base>.retry.<n>`), which
//! dead-letter at most once: a broker restart could drop what they held. The durable delay
//! queues have other names (`<base>.delay.<delay>`), so nothing clashes at declaration; at
//! start-up the worker moves whatever the old queues still hold into the main queue (retried a
//! little early, which the dedupe makes harmless) and deletes them once empty.
//!
//! Invariant: a message leaves an old queue only after its copy in the main queue is confirmed.

use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicNackOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use shared::amqp::Publisher;

use crate::config::Config;

/// Old schedules had at most this many delays.
const MAX_LEGACY_QUEUES: usize = 16;

/// Moves every message of the old delay queues to the main queue and deletes the emptied
/// queues. Returns how many messages moved. Best effort: a broker failure leaves the rest for
/// the next start.
pub(super) async fn drain(config: &Config, publisher: &Publisher) -> usize {
    let topology = &config.topology;
    let Ok(connection) = shared::amqp::connect(&config.amqp_url, "processor-upgrade").await else {
        return 0;
    };
    let mut moved = 0;
    for n in 1..=MAX_LEGACY_QUEUES {
        let queue = topology.legacy_retry_queue(n);
        // A passive declare of an absent queue closes its channel: one channel per queue.
        let Ok(channel) = connection.create_channel().await else {
            break;
        };
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        if channel
            .queue_declare(queue.as_str().into(), passive, FieldTable::default())
            .await
            .is_err()
        {
            continue;
        }
        loop {
            let got = channel
                .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false })
                .await;
            let Ok(Some(message)) = got else { break };
            let delivery = message.delivery;
            let confirmed = publisher
                .publish(
                    "",
                    &topology.main_queue(),
                    &delivery.data,
                    delivery.properties.clone(),
                )
                .await;
            if confirmed.is_err() {
                let _ = delivery
                    .acker
                    .nack(BasicNackOptions {
                        requeue: true,
                        multiple: false,
                    })
                    .await;
                tracing::warn!(queue, "old delay queue not drained; next start retries");
                return moved;
            }
            if !matches!(
                delivery.acker.ack(BasicAckOptions::default()).await,
                Ok(true)
            ) {
                return moved;
            }
            moved += 1;
        }
        let _ = channel
            .queue_delete(
                queue.as_str().into(),
                QueueDeleteOptions {
                    if_empty: true,
                    ..QueueDeleteOptions::default()
                },
            )
            .await;
        tracing::info!(queue, "old classic delay queue drained and deleted");
    }
    let _ = connection.close(200, "done".into()).await;
    moved
}
