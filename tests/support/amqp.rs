//! Per-test RabbitMQ topology: the contract's layout under a unique base name, deleted when the
//! [`TestBroker`] is dropped — also when the test fails.

use std::time::Duration;

use lapin::options::BasicGetOptions;
use lapin::{Channel, Connection};
use shared::topology::Topology;

/// A topology with a unique base and short retry delays, declared on the machine's broker, with
/// a channel in confirm mode.
pub struct TestBroker {
    pub topology: Topology,
    pub connection: Connection,
    pub channel: Channel,
}

impl TestBroker {
    pub async fn new(retry_delays: Vec<Duration>) -> Self {
        let topology = Topology::new(super::unique("t.stripe.events"), retry_delays);
        let connection = shared::amqp::connect(&super::amqp_url(), "system-tests")
            .await
            .expect("connect to the test broker");
        let channel = connection.create_channel().await.expect("channel");
        channel
            .confirm_select(lapin::options::ConfirmSelectOptions::default())
            .await
            .expect("confirm mode");
        topology.declare(&channel).await.expect("declare topology");
        Self {
            topology,
            connection,
            channel,
        }
    }

    /// Number of ready messages in `queue`.
    pub async fn depth(&self, queue: &str) -> u32 {
        processor::dlq::queue_depth(&self.channel, queue)
            .await
            .expect("passive declare")
    }

    /// Number of ready messages in the main queue.
    pub async fn main_depth(&self) -> u32 {
        self.depth(&self.topology.main_queue()).await
    }

    /// Number of ready messages in the dead-letter queue.
    pub async fn dead_letter_depth(&self) -> u32 {
        self.depth(&self.topology.dead_letter_queue()).await
    }

    /// Takes one message from `queue` (acked), if any.
    pub async fn get(&self, queue: &str) -> Option<lapin::message::BasicGetMessage> {
        self.channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .expect("basic_get")
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        // As `TestDb`: a thread with a runtime of its own, on a connection of its own (the
        // test's may already be closed).
        let topology = self.topology.clone();
        let deleted = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let connection = shared::amqp::connect(&super::amqp_url(), "system-tests-drop")
                    .await
                    .map_err(std::io::Error::other)?;
                let channel = connection
                    .create_channel()
                    .await
                    .map_err(std::io::Error::other)?;
                let _ = topology.delete(&channel).await;
                let _ = connection.close(200, "done".into()).await;
                Ok::<_, std::io::Error>(())
            })
        })
        .join();
        if !matches!(deleted, Ok(Ok(()))) {
            eprintln!("test topology {} not deleted", self.topology.exchange());
        }
    }
}
