//! What the consumer and the API share, started once per process: the metrics recorder, the
//! Postgres pool (database created and migrated, configured products written into the
//! registry), the Redis cache client and the confirmed publisher.

use std::time::Duration;

use deadpool_postgres::Pool;
use shared::amqp::{Publisher, PublisherTask};

use crate::cache::{Cache, CacheError};
use crate::config::Config;
use crate::db::{self, DbError};
use crate::registry;

/// How long start-up waits for Postgres to become reachable before giving up.
pub const STARTUP_PATIENCE: Duration = Duration::from_secs(60);

/// Why the process could not start its dependencies.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// The configured catalog is invalid, or writing it into the registry was refused.
    #[error("product registry: {0}")]
    Registry(String),
}

/// Writes the configured products (`STRIPE_PRICE_PRO_LIFETIME`, `CATALOG_FILE`) and the
/// subscription policy (`SUBSCRIPTION_REFUND_POLICY`, `SUBSCRIPTION_GRACE`) into the registry.
///
/// # Errors
/// [`StartError::Registry`] when the catalog is invalid or the change is refused (a price still
/// used by live subscriptions; the message names it).
pub async fn sync_catalog(config: &Config, pool: &Pool) -> Result<(), StartError> {
    registry::sync_config(pool, &config.catalog)
        .await
        .map_err(|e| StartError::Registry(e.to_string()))?;
    registry::sync_policy(pool, config.subscription_policy)
        .await
        .map_err(|e| StartError::Registry(e.to_string()))
}

/// The Postgres pool (database prepared), the Redis cache and the confirmed publisher.
#[derive(Debug, Clone)]
pub struct Dependencies {
    pub pool: Pool,
    pub cache: Cache,
    pub publisher: Publisher,
}

impl Dependencies {
    /// Installs the metrics recorder, prepares the database (waiting up to [`STARTUP_PATIENCE`]
    /// for Postgres), and starts the cache client and the publisher. Stop the returned task after
    /// the last publish.
    ///
    /// # Errors
    /// [`StartError`] when the database cannot be prepared or the configuration is unusable.
    pub async fn start(config: &Config) -> Result<(Self, PublisherTask), StartError> {
        // Installs the process-wide recorder before anything records.
        let _ = shared::telemetry::metrics_handle();
        let pool = db::pool(config)?;
        db::prepare_patiently(config, &pool, STARTUP_PATIENCE).await?;
        sync_catalog(config, &pool).await?;
        let cache = Cache::new(config)?;
        let (publisher, publisher_task) = Publisher::start(
            config.amqp_url.clone(),
            "processor-publish".into(),
            config.topology.clone(),
            config.publish_confirm_timeout,
        );
        Ok((
            Self {
                pool,
                cache,
                publisher,
            },
            publisher_task,
        ))
    }
}
