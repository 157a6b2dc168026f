//! What `ingress` and `processor` must agree on: configuration reading, Stripe webhook
//! signatures, domain identifiers, the RabbitMQ topology and confirmed publishing, the one
//! reconnect backoff and the one shutdown primitive, telemetry, and the HTTP listener with its
//! limits. It depends on no crate of the workspace.

pub mod amqp;
pub mod backoff;
pub mod config;
pub mod ids;
pub mod json;
pub mod samples;
pub mod secrets;
pub mod server;
pub mod shutdown;
pub mod signature;
pub mod telemetry;
pub mod topology;

/// Resolves when the process receives SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sig) => {
                sig.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutdown signal received");
}
