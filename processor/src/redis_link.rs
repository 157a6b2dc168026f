//! How the processor reaches Redis: [`client`] is the one way a client is made (so `rediss://`
//! always finds the process's TLS provider), and [`open`] is how the users that must keep their
//! pace without Redis (the cache, the shared Stripe budget) open their connection: answers within
//! a timeout or fail, one retry.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

/// Why no connection opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

/// A client for `url` (`redis://`, or `rediss://` for TLS verified against the system trust
/// store, see [`crate::tls`]). Connects lazily.
///
/// # Errors
/// A [`redis::RedisError`] when `url` is not a Redis URL.
pub fn client<T: redis::IntoConnectionInfo>(url: T) -> redis::RedisResult<redis::Client> {
    crate::tls::install_provider();
    redis::Client::open(url)
}

/// A connection manager to `client` whose commands answer within `timeout` or fail, opened
/// within twice that.
///
/// # Errors
/// [`OpenError`].
pub async fn open(
    client: &redis::Client,
    timeout: Duration,
) -> Result<ConnectionManager, OpenError> {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(timeout)
        .set_response_timeout(timeout)
        .set_number_of_retries(1);
    match tokio::time::timeout(
        timeout * 2,
        ConnectionManager::new_with_config(client.clone(), config),
    )
    .await
    {
        Ok(connected) => Ok(connected?),
        Err(_) => Err(OpenError::Timeout(timeout * 2)),
    }
}
