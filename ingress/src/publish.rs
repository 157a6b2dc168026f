//! Where a verified webhook goes: the step between "signature and envelope are good" and 200.
//!
//! Invariant: [`Publish::publish`] returns `Ok` only once the message is stored; the webhook
//! handler answers 200 only then. The service always runs with the broker's [`Publisher`]
//! (`Ok` = the broker acked the persistent publish and did not return it). The benchmark's
//! no-broker reference (`ingress/examples/no_broker.rs`) plugs in a sink that keeps nothing, so
//! the cost of the HTTP and verification path can be measured apart from the broker's; no
//! configuration of the service can select it.

use std::future::Future;

use lapin::BasicProperties;
use shared::amqp::{PublishError, Publisher};

/// A store for verified webhooks.
pub trait Publish: std::fmt::Debug + Send + Sync + 'static {
    /// Whether a publish could succeed right now (`/readyz`).
    fn is_ready(&self) -> bool;

    /// Stores `body` under `routing_key` on `exchange` with `properties`.
    ///
    /// # Errors
    /// Any reason the message is not known to be stored; the handler answers 503.
    fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> impl Future<Output = Result<(), PublishError>> + Send;
}

impl Publish for Publisher {
    fn is_ready(&self) -> bool {
        Publisher::is_ready(self)
    }

    fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> impl Future<Output = Result<(), PublishError>> + Send {
        Publisher::publish(self, exchange, routing_key, body, properties)
    }
}
