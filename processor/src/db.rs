//! Postgres access: the connection pool and the schema migration runner.
//!
//! Invariants:
//! - every pool operation is bounded in time (deadpool's wait, create and recycle timeouts
//!   default to none, which would let a checkout hang forever while Postgres is away);
//! - migrations are the `migrations/*.sql` files of the workspace, embedded at build time by
//!   `build.rs` and applied in name order, each in its own transaction together with its row in
//!   `schema_migrations`, under a session advisory lock so two processes never migrate at once.
//!   Applying them again is a no-op.
//!
//! The embedding is a build script rather than `refinery` or `include_dir`: it needs no extra
//! dependency, keeps plain SQL files as the source, and a new migration is picked up by adding a
//! file, with no list to keep in sync.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;

use crate::config::Config;
use crate::tls::{PgTransport, TlsError, pg_connector, pg_transport};

/// The embedded migrations: `(version, sql)` in the order they apply.
pub const MIGRATIONS: &[(&str, &str)] = include!(concat!(env!("OUT_DIR"), "/migrations.rs"));

/// Key of the session advisory lock held while migrating (any constant shared by all processes).
const MIGRATION_LOCK_KEY: i64 = 0x656e_7469_746c_6d31;

/// Why the database could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("invalid DATABASE_URL: {0}")]
    Url(String),
    #[error("database error: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("database did not answer within {0:?}")]
    Timeout(Duration),
    #[error("migration {version} failed: {source}")]
    Migration {
        version: String,
        source: tokio_postgres::Error,
    },
    #[error("cannot build the connection pool: {0}")]
    Pool(String),
    #[error("DATABASE_URL asks for TLS: {0}")]
    Tls(#[from] TlsError),
}

/// The server setting every pooled connection starts with (see [`pool`]).
const CUSTOM_PLANS: &str = "-c plan_cache_mode=force_custom_plan";

/// Builds the pool. Connections are opened lazily, so this succeeds while Postgres is down.
///
/// `RecyclingMethod::Fast` only checks that the connection is not closed: a connection cut by the
/// server is noticed (its connection task ends), and the query that hits a half-open one fails
/// with a transient error the consumer retries anyway, so the round trip of `Verified` buys
/// nothing on the hot path.
///
/// # Errors
/// [`DbError::Url`] for a URL that does not parse, [`DbError::Pool`] if the pool cannot be built.
pub fn pool(config: &Config) -> Result<Pool, DbError> {
    let mut pg: tokio_postgres::Config = config
        .database_url
        .parse()
        .map_err(|e: tokio_postgres::Error| DbError::Url(e.to_string()))?;
    pg.connect_timeout(config.db_timeout);
    pg.application_name("processor");
    // Statements are prepared once per connection, and after five runs Postgres switches a
    // prepared statement to a generic plan. For the batch's `= ANY($1)` reads the generic plan
    // chosen while the tables were small is a sequential scan, which then grows with them
    // (BENCHMARKS.md: 20,000 events/s fell to 3,000 by 100,000 rows). Planning each execution
    // for its arrays costs far less than one scan. Appended to any options the URL carries.
    let options = match pg.get_options() {
        Some(own) if !own.trim().is_empty() => format!("{own} {CUSTOM_PLANS}"),
        _ => CUSTOM_PLANS.to_owned(),
    };
    pg.options(&options);
    let manager_config = ManagerConfig {
        recycling_method: RecyclingMethod::Fast,
    };
    // `sslmode=require` gets TLS with a verified certificate; anything else stays in the clear.
    let manager = match pg_transport(&pg) {
        PgTransport::Plain => Manager::from_config(pg, NoTls, manager_config),
        PgTransport::Tls => Manager::from_config(pg, pg_connector()?, manager_config),
    };
    Pool::builder(manager)
        .max_size(config.db_pool_size)
        .wait_timeout(Some(config.db_timeout))
        .create_timeout(Some(config.db_timeout))
        .recycle_timeout(Some(config.db_timeout))
        .runtime(Runtime::Tokio1)
        .build()
        .map_err(|e| DbError::Pool(e.to_string()))
}

/// What drives one connection opened by [`connect`]: the client works while it is polled
/// (spawned, or selected on by a caller that must notice the connection end).
pub type Driver = Pin<Box<dyn Future<Output = Result<(), tokio_postgres::Error>> + Send>>;

/// Opens one connection outside the pool (a session lock's, a command's) over the transport
/// `pg` asks for, exactly as the pool's connections: the one place a connection is made.
///
/// # Errors
/// [`DbError::Timeout`] after `timeout`, [`DbError::Tls`] when TLS cannot be set up,
/// [`DbError::Postgres`] when the server refuses.
pub async fn connect(
    pg: &tokio_postgres::Config,
    timeout: Duration,
) -> Result<(tokio_postgres::Client, Driver), DbError> {
    match pg_transport(pg) {
        PgTransport::Plain => {
            let (client, connection) = bounded(timeout, pg.connect(NoTls)).await?;
            Ok((client, Box::pin(connection)))
        }
        PgTransport::Tls => {
            let (client, connection) = bounded(timeout, pg.connect(pg_connector()?)).await?;
            Ok((client, Box::pin(connection)))
        }
    }
}

/// Creates the database named in `database_url` if it does not exist, connecting to the
/// server's `postgres` database to do so. Concurrent callers are fine: losing the race to create
/// it counts as success.
///
/// # Errors
/// [`DbError`] when the URL names no database or the server refuses.
pub async fn ensure_database(database_url: &str, timeout: Duration) -> Result<(), DbError> {
    let mut pg: tokio_postgres::Config = database_url
        .parse()
        .map_err(|e: tokio_postgres::Error| DbError::Url(e.to_string()))?;
    let name = pg
        .get_dbname()
        .ok_or_else(|| DbError::Url("no database name".into()))?
        .to_owned();
    pg.dbname("postgres");
    pg.connect_timeout(timeout);
    let (client, connection) = connect(&pg, timeout).await?;
    let task = tokio::spawn(async move { drop(connection.await) });
    let result = async {
        let exists = bounded(
            timeout,
            client.query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name]),
        )
        .await?
        .is_some();
        if !exists {
            let sql = format!("CREATE DATABASE {}", quote_ident(&name));
            match bounded(timeout, client.batch_execute(&sql)).await {
                Ok(()) => tracing::info!(database = %name, "created database"),
                Err(DbError::Postgres(e))
                    if e.code() == Some(&tokio_postgres::error::SqlState::DUPLICATE_DATABASE) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
    .await;
    drop(client);
    let _ = task.await;
    result
}

/// Applies the embedded migrations that are not yet recorded. Returns the versions applied now.
///
/// # Errors
/// [`DbError`] when the database is unreachable or a migration fails (that migration's
/// transaction is rolled back; earlier ones stay applied).
pub async fn migrate(pool: &Pool) -> Result<Vec<String>, DbError> {
    migrate_list(pool, MIGRATIONS).await
}

async fn migrate_list(pool: &Pool, migrations: &[(&str, &str)]) -> Result<Vec<String>, DbError> {
    let mut client = pool.get().await.map_err(|e| DbError::Pool(e.to_string()))?;
    // A session lock, held across the per-migration transactions; it is released explicitly
    // below, or by Postgres when this connection dies.
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK_KEY])
        .await?;
    let result = apply_pending(&mut client, migrations).await;
    let unlocked = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK_KEY])
        .await;
    let applied = result?;
    unlocked?;
    Ok(applied)
}

async fn apply_pending(
    client: &mut deadpool_postgres::Object,
    migrations: &[(&str, &str)],
) -> Result<Vec<String>, DbError> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                 version    text PRIMARY KEY,
                 applied_at timestamptz NOT NULL DEFAULT now()
             )",
        )
        .await?;
    let done: Vec<String> = client
        .query("SELECT version FROM schema_migrations", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut applied = Vec::new();
    for (version, sql) in migrations {
        if done.iter().any(|d| d == version) {
            continue;
        }
        let wrap = |source| DbError::Migration {
            version: (*version).to_owned(),
            source,
        };
        let tx = client.transaction().await?;
        tx.batch_execute(sql).await.map_err(wrap)?;
        tx.execute(
            "INSERT INTO schema_migrations (version) VALUES ($1)",
            &[version],
        )
        .await
        .map_err(wrap)?;
        tx.commit().await.map_err(wrap)?;
        tracing::info!(version, "applied migration");
        applied.push((*version).to_owned());
    }
    Ok(applied)
}

/// `ensure_database` then `migrate`: what start-up and `processor migrate` do.
///
/// # Errors
/// See [`ensure_database`] and [`migrate`].
pub async fn prepare(config: &Config, pool: &Pool) -> Result<Vec<String>, DbError> {
    ensure_database(&config.database_url, config.db_timeout).await?;
    migrate(pool).await
}

/// [`prepare`], retried with backoff for up to `patience` while Postgres is unreachable or still
/// starting (a service started together with its database); other errors fail at once.
///
/// # Errors
/// The last error when Postgres stays unreachable, or the first other error.
pub async fn prepare_patiently(
    config: &Config,
    pool: &Pool,
    patience: Duration,
) -> Result<Vec<String>, DbError> {
    use backon::{ExponentialBuilder, Retryable};
    // `backon` rather than the unmaintained `backoff` crate (RUSTSEC-2025-0012).
    let policy = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(250))
        .with_max_delay(Duration::from_secs(5))
        .with_total_delay(Some(patience))
        .without_max_times();
    (|| prepare(config, pool))
        .retry(policy)
        .when(DbError::is_unavailable)
        .notify(|error, after| {
            tracing::warn!(%error, retry_in = ?after, "database not reachable yet");
        })
        .await
}

impl DbError {
    /// Whether the server could not be reached (or is starting up), as opposed to refusing
    /// what was asked.
    #[must_use]
    pub fn is_unavailable(&self) -> bool {
        match self {
            Self::Timeout(_) | Self::Pool(_) => true,
            Self::Postgres(e) | Self::Migration { source: e, .. } => match e.code() {
                None => true,
                Some(code) => {
                    *code == tokio_postgres::error::SqlState::CANNOT_CONNECT_NOW
                        || *code == tokio_postgres::error::SqlState::ADMIN_SHUTDOWN
                }
            },
            Self::Url(_) | Self::Tls(_) => false,
        }
    }
}

async fn bounded<T, E: Into<DbError>>(
    timeout: Duration,
    fut: impl Future<Output = Result<T, E>>,
) -> Result<T, DbError> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(result) => result.map_err(Into::into),
        Err(_) => Err(DbError::Timeout(timeout)),
    }
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn embedded_migrations_are_in_name_order() {
        assert!(!MIGRATIONS.is_empty());
        let names: Vec<&str> = MIGRATIONS.iter().map(|(v, _)| *v).collect();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        assert_eq!(names, sorted);
        assert!(MIGRATIONS.iter().all(|(_, sql)| !sql.trim().is_empty()));
    }

    #[test]
    fn only_reachability_problems_are_waited_out() {
        assert!(DbError::Timeout(Duration::from_secs(1)).is_unavailable());
        assert!(DbError::Pool("timed out waiting for a connection".into()).is_unavailable());
        assert!(!DbError::Url("no database name".into()).is_unavailable());
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_ident("entitlements"), "\"entitlements\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
