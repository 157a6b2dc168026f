//! The cache healer: makes every committed change reach Redis (or removes the stale entry)
//! even when the write after the commit failed — Redis unreachable, slow or restarting — or
//! never ran because the process died.
//!
//! Invariant: a user stays in `cache_pending` (written in the transaction that bumped their
//! version) until Redis is seen holding that version or newer, or no entry at all. Every
//! [`HEAL_INTERVAL`], the healer checks the entries marked more than [`SETTLE`] ago (the worker's
//! own write normally lands first), rewrites the stale ones from Postgres through the versioned
//! compare-and-set (or deletes them), and forgets the rows it verified. So once Redis answers
//! again, a stale entry lives at most about `SETTLE + HEAL_INTERVAL` plus one round of repair.

use std::time::Duration;

use deadpool_postgres::Pool;
use shared::ids::UserId;
use shared::shutdown::Shutdown;
use tokio_postgres::types::Type;

use crate::cache::Cache;
use crate::store;

/// How often the healer looks for pending entries.
const HEAL_INTERVAL: Duration = Duration::from_secs(1);

/// How old a pending mark must be before the healer checks it.
const SETTLE: Duration = Duration::from_secs(1);

/// Users checked per round.
const ROUND: i64 = 1_000;

/// Heals until `stop` fires.
pub(super) async fn run(pool: Pool, cache: Cache, mut stop: Shutdown) {
    let mut tick = tokio::time::interval(HEAL_INTERVAL);
    let mut failing = false;
    loop {
        tokio::select! {
            () = stop.recv() => break,
            _ = tick.tick() => {}
        }
        // Keeps going while full rounds come back (a backlog after an outage).
        loop {
            let result = round(&pool, &cache).await;
            failing = report(&result, failing);
            if !matches!(result, Ok(ROUND)) {
                break;
            }
        }
    }
}

/// Counts and logs a round's result; returns whether the healer is now failing. A failure is
/// logged once per outage, not once per round (the counter keeps the count).
fn report(result: &Result<i64, HealError>, failing: bool) -> bool {
    match result {
        Ok(_) => {
            if failing {
                tracing::info!("cache healer recovered");
            }
            false
        }
        Err(error) => {
            count_failure(error.stage());
            if !failing {
                tracing::warn!(%error, "cache healer round failed; retrying every round");
            }
            true
        }
    }
}

/// One failure in `entitlement_cache_heal_failures_total{stage}`.
fn count_failure(stage: &'static str) {
    metrics::counter!("entitlement_cache_heal_failures_total", "stage" => stage).increment(1);
}

/// Why a healer round stopped; the round is retried at the next tick.
#[derive(Debug, thiserror::Error)]
enum HealError {
    #[error("postgres pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("postgres: {0}")]
    Db(#[from] tokio_postgres::Error),
    #[error("redis: {0}")]
    Cache(#[from] crate::cache::CacheError),
}

impl HealError {
    /// The `stage` label of `entitlement_cache_heal_failures_total`.
    fn stage(&self) -> &'static str {
        match self {
            Self::Pool(_) | Self::Db(_) => "postgres",
            Self::Cache(_) => "redis",
        }
    }
}

/// One round: returns how many pending users it looked at.
async fn round(pool: &Pool, cache: &Cache) -> Result<i64, HealError> {
    let client = pool.get().await?;
    let settle = i64::try_from(SETTLE.as_millis()).unwrap_or(i64::MAX);
    let rows = client
        .query_typed(
            "SELECT user_id, version FROM cache_pending
              WHERE marked_at < now() - make_interval(secs => $1::int8 / 1000.0)
              ORDER BY marked_at LIMIT $2",
            &[(&settle, Type::INT8), (&ROUND, Type::INT8)],
        )
        .await?;
    if rows.is_empty() {
        return Ok(0);
    }
    let mut pending: Vec<(String, i64)> = Vec::with_capacity(rows.len());
    for row in &rows {
        pending.push((row.try_get(0)?, row.try_get(1)?));
    }
    let users: Vec<String> = pending.iter().map(|(u, _)| u.clone()).collect();
    // Redis still away: try again next round.
    let cached = cache.cached_versions(&users).await?;
    let mut settled: Vec<(&str, i64)> = Vec::with_capacity(pending.len());
    for ((user, version), cached) in pending.iter().zip(cached) {
        match cached {
            Some(held) if held < *version => {
                if repair(&client, cache, user).await {
                    settled.push((user, *version));
                }
            }
            // No entry (readers go to Postgres), or the change is there.
            _ => settled.push((user, *version)),
        }
    }
    let (names, versions): (Vec<&str>, Vec<i64>) = settled.into_iter().unzip();
    client
        .execute_typed(
            "DELETE FROM cache_pending p USING unnest($1::text[], $2::int8[]) AS d(u, v)
              WHERE p.user_id = d.u AND p.version <= d.v",
            &[(&names, Type::TEXT_ARRAY), (&versions, Type::INT8_ARRAY)],
        )
        .await?;
    Ok(i64::try_from(rows.len()).unwrap_or(0))
}

/// Rewrites a stale entry from Postgres, or deletes it. True when Redis no longer holds it.
async fn repair(client: &tokio_postgres::Client, cache: &Cache, user: &str) -> bool {
    let Ok(id) = UserId::parse(user) else {
        // Only the store writes cache_pending, with ids it parsed: a row that does not parse
        // is corrupt, and stays for an operator to see.
        count_failure("user_id");
        tracing::error!(
            user_id = user,
            "cache_pending holds a user id that does not parse"
        );
        return false;
    };
    let written = match store::user_snapshot(client, &id).await {
        Ok(snapshot) => match cache.write_snapshot(&snapshot).await {
            Ok(_) => true,
            Err(error) => {
                count_failure("redis");
                tracing::debug!(user_id = user, %error, "healer could not rewrite the entry");
                false
            }
        },
        Err(error) => {
            count_failure("postgres");
            tracing::debug!(user_id = user, %error, "healer could not read the snapshot");
            false
        }
    };
    if written {
        metrics::counter!("entitlement_cache_healed_total", "how" => "rewritten").increment(1);
        return true;
    }
    let deleted = cache.invalidate(user).await;
    if deleted {
        metrics::counter!("entitlement_cache_healed_total", "how" => "deleted").increment(1);
    }
    deleted
}
