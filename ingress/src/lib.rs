//! Ingress: the Stripe webhook endpoint.
//!
//! Invariant: Stripe gets a 2xx only after the broker has confirmed the persistent publish of
//! the exact bytes it sent; a refused request publishes nothing. Ingress holds no state of its
//! own — no database, no cache — so it can be restarted or scaled freely.

mod config;
mod routes;

use std::future::Future;

use shared::amqp::Publisher;
use tokio::net::TcpListener;

pub use config::{CONFIRM_TIMEOUT, Config, DEFAULT_AMQP_URL};
pub use routes::router;

/// Serves ingress on `listener` until `shutdown` resolves, then finishes in-flight requests and
/// closes the broker connection. Starts even while the broker is unreachable.
///
/// # Errors
/// When the HTTP server fails.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (publisher, publisher_task) = Publisher::start(
        config.amqp_url.clone(),
        "ingress".to_owned(),
        config.topology.clone(),
        config.confirm_timeout,
    );
    let app = router(&config, publisher);
    tracing::info!(addr = %listener.local_addr()?, "ingress listening");
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await;
    publisher_task.shutdown().await;
    tracing::info!("ingress stopped");
    served
}
