//! RabbitMQ connections that survive the broker going away, and confirmed publishing.
//!
//! Invariant: [`Publisher::publish`] returns `Ok` only when the broker has acked the message and
//! did not return it as unroutable; every other outcome (no connection, nack, return, channel
//! error, no confirm within the deadline) is an error the caller must treat as "not stored".
//!
//! A background supervisor owns the connection: it connects (retrying with capped backoff while
//! the broker is down), declares the topology, enables confirms and hands the channel out through
//! a `watch`. Publishers never wait for a connection: with none, they fail at once, so a caller
//! can answer 503 promptly. Concurrent publishes share one confirm-mode channel and wait for
//! their own confirms independently, so confirms pipeline.

use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use lapin::Confirmation;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use crate::backoff::Reconnect;
use crate::topology::Topology;

/// `AMQP_URL`'s default: the local broker's guest account and default virtual host.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// How long one connection attempt may take before it counts as failed.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a publish is not known to be stored.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("no connection to the broker")]
    Unavailable,
    #[error("the broker nacked the message")]
    Nacked,
    #[error("the broker returned the message as unroutable")]
    Unroutable,
    #[error("no confirm within {0:?}")]
    Timeout(Duration),
    #[error("broker error: {0}")]
    Broker(#[from] lapin::Error),
}

/// Opens a connection with a bounded wait.
///
/// # Errors
/// The broker's error, or a timeout error when it does not answer within [`CONNECT_TIMEOUT`].
pub async fn connect(url: &str, connection_name: &str) -> Result<Connection, lapin::Error> {
    let props = ConnectionProperties::default().with_connection_name(connection_name.into());
    match tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(url, props)).await {
        Ok(result) => result,
        Err(_) => Err(lapin::Error::from(lapin::ErrorKind::IOError(Arc::new(
            std::io::Error::new(std::io::ErrorKind::TimedOut, "connection attempt timed out"),
        )))),
    }
}

/// A confirm-mode publishing channel kept alive by a supervisor task.
#[derive(Debug, Clone)]
pub struct Publisher {
    channel: watch::Receiver<Option<Channel>>,
    broken: Arc<Notify>,
    confirm_timeout: Duration,
    /// Registered once: looking the histogram up by name on every publish costs a hash and a
    /// registry lookup per request.
    confirm_seconds: metrics::Histogram,
}

/// Handle on the supervisor task; dropping it does not stop the task, [`Self::shutdown`] does.
#[derive(Debug)]
pub struct PublisherTask {
    stop: Arc<Notify>,
    handle: JoinHandle<()>,
}

impl PublisherTask {
    /// Stops reconnecting and closes the connection.
    pub async fn shutdown(self) {
        self.stop.notify_one();
        let _ = self.handle.await;
    }
}

impl Publisher {
    /// Starts the supervisor. Returns immediately, even while the broker is unreachable.
    #[must_use]
    pub fn start(
        url: String,
        connection_name: String,
        topology: Topology,
        confirm_timeout: Duration,
    ) -> (Self, PublisherTask) {
        // The histogram handle is kept, so the process recorder must exist first.
        let _ = crate::telemetry::metrics_handle();
        let (tx, rx) = watch::channel(None);
        let broken = Arc::new(Notify::new());
        let stop = Arc::new(Notify::new());
        let handle = tokio::spawn(supervise(
            url,
            connection_name,
            topology,
            tx,
            Arc::clone(&broken),
            Arc::clone(&stop),
        ));
        (
            Self {
                channel: rx,
                broken,
                confirm_timeout,
                confirm_seconds: metrics::histogram!("amqp_publish_confirm_seconds"),
            },
            PublisherTask { stop, handle },
        )
    }

    /// Whether a confirm-mode channel is open right now.
    #[must_use]
    pub fn is_ready(&self) -> bool {
        self.channel
            .borrow()
            .as_ref()
            .is_some_and(|c| c.status().connected())
    }

    /// Waits until the channel is open, up to `deadline`. Returns whether it is.
    pub async fn wait_ready(&self, deadline: Duration) -> bool {
        let mut rx = self.channel.clone();
        tokio::time::timeout(deadline, rx.wait_for(|c| c.is_some()))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Publishes persistently with `mandatory` and waits for the broker's confirm.
    ///
    /// # Errors
    /// See [`PublishError`]. On a broker error or a timeout the connection is recycled.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        let channel = self
            .channel
            .borrow()
            .clone()
            .filter(|c| c.status().connected())
            .ok_or(PublishError::Unavailable)?;
        let started = Instant::now();
        let properties = properties.with_delivery_mode(2);
        let confirmed = async {
            let confirm = channel
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    body,
                    properties,
                )
                .await?;
            confirm.await
        };
        let outcome = match tokio::time::timeout(self.confirm_timeout, confirmed).await {
            Err(_) => Err(PublishError::Timeout(self.confirm_timeout)),
            Ok(Err(e)) => Err(PublishError::Broker(e)),
            Ok(Ok(Confirmation::Ack(None))) => Ok(()),
            Ok(Ok(Confirmation::Ack(Some(_)))) => Err(PublishError::Unroutable),
            Ok(Ok(Confirmation::Nack(_))) => Err(PublishError::Nacked),
            // The supervisor always enables confirms; treat the impossible as not stored.
            Ok(Ok(Confirmation::NotRequested)) => Err(PublishError::Nacked),
        };
        self.confirm_seconds.record(started.elapsed().as_secs_f64());
        if matches!(
            outcome,
            Err(PublishError::Broker(_) | PublishError::Timeout(_))
        ) {
            self.broken.notify_one();
        }
        outcome
    }

    /// [`Publisher::publish`] tried up to `attempts` times, 200 ms apart and doubling, each try
    /// first waiting up to `ready` for the supervisor to have a channel open (after a lost
    /// connection it reconnects in between). [`PublishError::Unroutable`] is not retried: the
    /// queue is not bound, and trying again cannot change that.
    ///
    /// # Errors
    /// The last try's [`PublishError`].
    pub async fn publish_retrying(
        &self,
        message: (&str, &str, &[u8], &BasicProperties),
        attempts: usize,
        ready: Duration,
    ) -> Result<(), PublishError> {
        let (exchange, routing_key, body, properties) = message;
        let policy = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(200))
            .with_max_times(attempts.saturating_sub(1));
        (|| async {
            self.wait_ready(ready).await;
            self.publish(exchange, routing_key, body, properties.clone())
                .await
        })
        .retry(policy)
        .when(|error| !matches!(error, PublishError::Unroutable))
        .notify(|error, after| {
            tracing::warn!(%error, routing_key, retry_in = ?after, "publish failed; retrying");
        })
        .await
    }
}

async fn supervise(
    url: String,
    name: String,
    topology: Topology,
    tx: watch::Sender<Option<Channel>>,
    broken: Arc<Notify>,
    stop: Arc<Notify>,
) {
    let mut pauses = Reconnect::new(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        let attempt = async {
            let connection = connect(&url, &name).await?;
            let channel = connection.create_channel().await?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            topology.declare(&channel).await?;
            Ok::<_, lapin::Error>((connection, channel))
        };
        let (connection, channel) = tokio::select! {
            () = stop.notified() => return,
            result = attempt => match result {
                Ok(pair) => pair,
                Err(error) => {
                    let pause = pauses.next_pause();
                    tracing::warn!(%error, retry_in = ?pause, "broker unavailable");
                    tokio::select! {
                        () = stop.notified() => return,
                        () = tokio::time::sleep(pause) => {}
                    }
                    continue;
                }
            }
        };
        pauses.reset();
        tracing::info!(connection = %name, "broker channel open");
        metrics::gauge!("amqp_connected", "connection" => name.clone()).set(1.0);
        tx.send_replace(Some(channel.clone()));

        let mut poll = tokio::time::interval(Duration::from_millis(250));
        let stopping = loop {
            tokio::select! {
                () = stop.notified() => break true,
                () = broken.notified() => break false,
                _ = poll.tick() => {
                    if !channel.status().connected() || !connection.status().connected() {
                        break false;
                    }
                }
            }
        };
        tx.send_replace(None);
        metrics::gauge!("amqp_connected", "connection" => name.clone()).set(0.0);
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            connection.close(200, "closing".into()),
        )
        .await;
        if stopping {
            return;
        }
        tracing::warn!(connection = %name, "broker channel lost; reconnecting");
    }
}
