//! Postgres side of applying an event (interim version: bumps the per-user entitlement version
//! so the consumer's exactly-once and cache guarantees can be observed).
//!
//! Invariant: [`apply`] runs inside the caller's transaction and bumps the version of every user
//! it touches in that same transaction, serialized per user with an advisory lock.

use serde::{Deserialize, Serialize};
use shared::ids::UserId;
use tokio_postgres::GenericClient;

use crate::events::{Event, EventKind};

/// One entitlement as readers see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EntitlementView {
    pub key: String,
    pub status: String,
}

/// A user's entitlements at a version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UserSnapshot {
    pub user_id: String,
    pub version: i64,
    pub entitlements: Vec<EntitlementView>,
}

/// The users whose entitlements were recomputed by one event.
#[derive(Debug, Clone, Default)]
pub struct Applied {
    pub users: Vec<UserSnapshot>,
}

/// Why an event could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Transient: the database failed, the event may succeed later.
    #[error("database error: {0}")]
    Db(#[from] tokio_postgres::Error),
}

/// Applies `event` inside `tx`.
///
/// # Errors
/// [`StoreError::Db`] on any database failure.
pub async fn apply(
    tx: &tokio_postgres::Transaction<'_>,
    event: &Event,
) -> Result<Applied, StoreError> {
    let EventKind::ForUser { user } = &event.kind else {
        return Ok(Applied::default());
    };
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext($1))",
        &[&user.as_str()],
    )
    .await?;
    let row = tx
        .query_one(
            "INSERT INTO user_entitlement_versions (user_id, version) VALUES ($1, 1)
             ON CONFLICT (user_id) DO UPDATE SET version = user_entitlement_versions.version + 1
             RETURNING version",
            &[&user.as_str()],
        )
        .await?;
    Ok(Applied {
        users: vec![UserSnapshot {
            user_id: user.as_str().to_owned(),
            version: row.get(0),
            entitlements: Vec::new(),
        }],
    })
}

/// The user's current entitlements.
///
/// # Errors
/// [`StoreError::Db`] on any database failure.
pub async fn user_snapshot(
    client: &impl GenericClient,
    user: &UserId,
) -> Result<UserSnapshot, StoreError> {
    let row = client
        .query_opt(
            "SELECT version FROM user_entitlement_versions WHERE user_id = $1",
            &[&user.as_str()],
        )
        .await?;
    Ok(UserSnapshot {
        user_id: user.as_str().to_owned(),
        version: row.map_or(0, |r| r.get(0)),
        entitlements: Vec::new(),
    })
}
