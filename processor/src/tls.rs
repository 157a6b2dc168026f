//! TLS to the stores: Postgres when `DATABASE_URL` says `sslmode=require`, Redis when `REDIS_URL`
//! is `rediss://`.
//!
//! Invariants: a connection that asked for TLS is never made in the clear; servers are verified
//! against the system trust store (`/etc/ssl/certs`, where a private CA is added), never accepted
//! blindly; one crypto provider (ring, which reqwest already builds) serves every TLS client of
//! the process, so no client depends on which rustls features happen to be compiled in.

use std::sync::Arc;

use rustls::ClientConfig;
use tokio_postgres::config::SslMode;

/// Why a TLS client could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("no trusted root certificate could be loaded from the system store")]
    NoRoots,
    #[error("cannot build the TLS client: {0}")]
    Config(#[from] rustls::Error),
}

/// How the pool reaches Postgres.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PgTransport {
    /// `sslmode=disable`, or `prefer` (the default), which this service reads as "no TLS asked".
    Plain,
    /// `sslmode=require` (or stricter): TLS with a verified server certificate.
    Tls,
}

/// The transport `config` asks for.
#[must_use]
pub fn pg_transport(config: &tokio_postgres::Config) -> PgTransport {
    match config.get_ssl_mode() {
        SslMode::Disable | SslMode::Prefer => PgTransport::Plain,
        _ => PgTransport::Tls,
    }
}

/// Makes ring the process's rustls provider (for clients that build their configuration from
/// the process default, like redis). Idempotent.
pub fn install_provider() {
    // An error only says that a provider is installed already.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A rustls client configuration trusting the system store.
///
/// # Errors
/// [`TlsError::NoRoots`] when the system store holds no usable certificate.
pub fn client_config() -> Result<ClientConfig, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    let (added, _ignored) =
        roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    if added == 0 {
        return Err(TlsError::NoRoots);
    }
    Ok(
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// The Postgres TLS connector for `sslmode=require`.
///
/// # Errors
/// As [`client_config`].
pub fn pg_connector() -> Result<tokio_postgres_rustls::MakeRustlsConnect, TlsError> {
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(
        client_config()?,
    ))
}

/// Whether a Redis client connects over TLS (`rediss://`).
#[must_use]
pub fn redis_uses_tls(client: &redis::Client) -> bool {
    matches!(
        client.get_connection_info().addr,
        redis::ConnectionAddr::TcpTls { .. }
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::config::Config;
    use shared::config::Env;

    #[test]
    fn sslmode_require_chooses_the_tls_connector_and_the_default_does_not() {
        for (url, expected) in [
            (
                "postgres://app:pw@db.example:5432/entitlements?sslmode=require",
                PgTransport::Tls,
            ),
            (
                "postgres://app@db.example/entitlements?sslmode=disable",
                PgTransport::Plain,
            ),
            (
                "postgres://postgres@127.0.0.1:5432/entitlements",
                PgTransport::Plain,
            ),
        ] {
            let env = Env::from_pairs([("DATABASE_URL", url)]);
            let config = Config::from_env(&env).unwrap();
            let pg: tokio_postgres::Config = config.database_url.parse().unwrap();
            assert_eq!(pg_transport(&pg), expected, "{url}");
        }
        // The system store this machine has is enough to build the connector.
        assert!(pg_connector().is_ok());
    }

    #[test]
    fn a_rediss_url_is_accepted_and_connects_over_tls() {
        let env = Env::from_pairs([("REDIS_URL", "rediss://:pw@cache.example:6380/0")]);
        let config = Config::from_env(&env).unwrap();
        let client = crate::redis_link::client(config.redis_url.as_str()).unwrap();
        assert!(redis_uses_tls(&client));
        let plain = crate::redis_link::client("redis://127.0.0.1:6379").unwrap();
        assert!(!redis_uses_tls(&plain));
    }
}
