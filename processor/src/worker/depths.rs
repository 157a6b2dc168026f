//! The `queue_depth{queue}` gauge: the ready messages of every queue of the topology, sampled
//! on a timer over a connection of its own.

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Channel, Connection};

use crate::config::Config;

/// Samples the depth of every queue of the topology into the `queue_depth` gauge.
pub(super) async fn poll(config: Config, mut stop: tokio::sync::watch::Receiver<bool>) {
    let topology = &config.topology;
    let mut queues = vec![topology.main_queue(), topology.dead_letter_queue()];
    queues.extend((1..=topology.retry_delays().len()).map(|n| topology.retry_queue(n)));
    let mut tick = tokio::time::interval(config.queue_depth_interval);
    let mut connection: Option<(Connection, Channel)> = None;
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            _ = tick.tick() => {}
        }
        if connection
            .as_ref()
            .is_none_or(|(c, ch)| !c.status().connected() || !ch.status().connected())
        {
            connection = async {
                let c = shared::amqp::connect(&config.amqp_url, "processor-depths")
                    .await
                    .ok()?;
                let ch = c.create_channel().await.ok()?;
                Some((c, ch))
            }
            .await;
        }
        let Some((_, channel)) = &connection else {
            continue;
        };
        for queue in &queues {
            let declared = channel
                .queue_declare(
                    queue.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await;
            match declared {
                Ok(q) => metrics::gauge!("queue_depth", "queue" => queue.clone())
                    .set(f64::from(q.message_count())),
                // A failed passive declare closes the channel; reopen on the next tick.
                Err(_) => break,
            }
        }
    }
    if let Some((connection, _)) = connection {
        let _ = connection.close(200, "closing".into()).await;
    }
}
