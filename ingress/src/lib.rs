//! Ingress: the Stripe webhook endpoint.
//!
//! Invariant: Stripe gets a 2xx only after the broker has confirmed the persistent publish of
//! the exact bytes it sent; a refused request publishes nothing. Ingress holds no state of its
//! own — no database, no cache — so it can be restarted or scaled freely.

mod config;
mod publish;
mod routes;

use std::future::Future;
use std::process::ExitCode;

use shared::amqp::Publisher;
use shared::config::Env;
use tokio::net::TcpListener;

pub use config::{CONFIRM_TIMEOUT, Config, DEFAULT_AMQP_URL, DEFAULT_REQUEST_TIMEOUT};
pub use publish::Publish;
pub use routes::router;

/// What the `ingress` binary (and the benchmark's no-broker reference) does before serving: read
/// the configuration from the environment (and `.env`), set up logging, bind `INGRESS_ADDR`.
///
/// # Errors
/// The exit code to end with: 2 for a configuration error (its message, naming the variable, is
/// on stderr), 1 when the address cannot be bound (logged).
pub async fn configure_and_bind() -> Result<(Config, TcpListener), ExitCode> {
    let config = match Config::from_env(&Env::load()) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("ingress: {error}");
            return Err(ExitCode::from(2));
        }
    };
    shared::telemetry::init_tracing(config.log_format, "info");
    match TcpListener::bind(config.addr).await {
        Ok(listener) => Ok((config, listener)),
        Err(error) => {
            tracing::error!(addr = %config.addr, %error, "cannot bind INGRESS_ADDR");
            Err(ExitCode::from(1))
        }
    }
}

/// Serves ingress on `listener` (and `/metrics` on `INGRESS_METRICS_ADDR` when set) under the
/// configured listener limits until `shutdown` resolves, then finishes in-flight requests and
/// closes the broker connection. Starts even while the broker is unreachable.
///
/// # Errors
/// When the metrics address cannot be bound or the HTTP server fails.
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
    let served = serve(config, listener, publisher, shutdown).await;
    publisher_task.shutdown().await;
    tracing::info!("ingress stopped");
    served
}

/// Serves the ingress router around `publisher` on `listener` (and `/metrics` on
/// `INGRESS_METRICS_ADDR` when set) until `shutdown` resolves, then finishes in-flight
/// requests. [`run`] calls it with the broker's publisher; the benchmark's no-broker reference
/// calls it with one that keeps nothing, so both measure the same HTTP path.
///
/// # Errors
/// When the metrics address cannot be bound or the HTTP server fails.
pub async fn serve<P: Publish>(
    config: Config,
    listener: TcpListener,
    publisher: P,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let metrics_listener = match config.metrics_addr {
        Some(addr) => Some(TcpListener::bind(addr).await?),
        None => None,
    };
    let app = router(&config, publisher);
    tracing::info!(addr = %listener.local_addr()?, "ingress listening");
    let stop = shared::shutdown::Stop::default();
    let metrics = async {
        let Some(listener) = metrics_listener else {
            return Ok(());
        };
        tracing::info!(addr = %listener.local_addr()?, "ingress metrics listening");
        shared::server::serve(
            listener,
            shared::server::metrics_router(),
            &config.limits,
            stop.wait(),
        )
        .await
    };
    let served = async {
        let served = shared::server::serve(listener, app, &config.limits, stop.wait()).await;
        // The main listener ending (for any reason) ends the metrics listener too.
        stop.trigger();
        served
    };
    let signal = async {
        tokio::select! {
            () = shutdown => {}
            () = stop.wait() => {}
        }
        stop.trigger();
    };
    let ((), served, metrics) = tokio::join!(signal, served, metrics);
    served.and(metrics)
}
