//! Organisation memberships as the app names them (`PUT`/`DELETE
//! /v1/organizations/{id}/members/{userId}`), and the seats they imply.
//!
//! Invariants:
//! - A write lands only with a version above the row's (a removal stays as a tombstone with its
//!   version), so writes in any order end in the state of the highest version; the same version
//!   written again with the same content is a no-op, with other content a conflict.
//! - Seats are the organisation's current members ordered by (`joined_at`, `user_id`) from 0,
//!   rewritten in the transaction of every membership change of the organisation.
//! - Every member whose membership or seat changed has their version bumped (their snapshot
//!   carries their memberships) and the organisation announces its members in an
//!   `entitlements.changed` message, through the recomputation events use, under the same user
//!   locks. A membership lock per organisation, taken first and by membership writes only,
//!   serializes them without ever waiting on a user lock in another order.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use shared::ids::UserId;
use tokio_postgres::types::Type;

use super::{Db, StoreError, lock, lock_and_recompute, recompute};
use crate::domain::organization::{OrganizationId, Role};
use crate::domain::view::UserSnapshot;

/// What the app asks for one member of one organisation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberWrite {
    pub organization: OrganizationId,
    pub user: UserId,
    /// `None` removes the member.
    pub role: Option<Role>,
    pub version: i64,
    /// When the member joined (their place in the seat order); now when not given, kept for a
    /// member who stays.
    pub joined_at: Option<DateTime<Utc>>,
}

/// A member's row as it stands.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MemberRow {
    pub organization_id: String,
    pub user_id: String,
    pub role: Role,
    pub joined_at: DateTime<Utc>,
    pub version: i64,
    pub removed: bool,
    /// `None` once removed.
    pub seat: Option<i64>,
}

/// What became of a write.
#[derive(Debug, Clone, PartialEq)]
pub enum Written {
    /// Applied: the row now, and the snapshots of the subjects it changed (for the cache).
    Applied(MemberRow, Vec<UserSnapshot>),
    /// The same version with the same content was written before.
    Unchanged(MemberRow),
    /// The row holds this version or a newer one with other content; nothing changed.
    Stale(MemberRow),
}

const ROW_COLUMNS: &str = "organization_id, user_id, role, joined_at, version, removed, seat";

fn member_row(row: &tokio_postgres::Row) -> Result<MemberRow, StoreError> {
    Ok(MemberRow {
        organization_id: row.try_get(0)?,
        user_id: row.try_get(1)?,
        role: Role::from_column(row.try_get(2)?).ok_or(StoreError::Corrupt { column: "role" })?,
        joined_at: row.try_get(3)?,
        version: row.try_get(4)?,
        removed: row.try_get(5)?,
        seat: row.try_get::<_, Option<i32>>(6)?.map(i64::from),
    })
}

/// Applies `write` in a transaction of its own.
///
/// # Errors
/// [`StoreError`] when the database fails; nothing is committed then.
pub async fn write(
    pool: &deadpool_postgres::Pool,
    write: &MemberWrite,
) -> Result<Written, StoreError> {
    let mut client = pool.get().await?;
    let statements = std::sync::Arc::clone(&client.statement_cache);
    let tx = client.transaction().await?;
    let db = Db {
        tx: &tx,
        statements: Some(&statements),
    };
    let organization = write.organization.as_str();
    lock(db, vec![format!("members:{organization}")]).await?;
    let current = tx
        .query_typed_opt(
            &format!(
                "SELECT {ROW_COLUMNS} FROM organization_members
                  WHERE organization_id = $1 AND user_id = $2"
            ),
            &[
                (&organization, Type::TEXT),
                (&write.user.as_str(), Type::TEXT),
            ],
        )
        .await?
        .map(|row| member_row(&row))
        .transpose()?;
    if let Some(current) = current.filter(|c| c.version >= write.version) {
        let same = current.version == write.version
            && current.removed == write.role.is_none()
            && write.role.is_none_or(|role| role == current.role)
            && write.joined_at.is_none_or(|at| at == current.joined_at);
        tx.commit().await?;
        return Ok(if same {
            Written::Unchanged(current)
        } else {
            Written::Stale(current)
        });
    }
    // A member who joins (again) takes `joined_at` or now; one who stays keeps their place
    // unless told otherwise; a removal keeps the row as a tombstone.
    let role = write.role.unwrap_or(Role::Member);
    let row = tx
        .query_one(
            &format!(
                "INSERT INTO organization_members AS m
                     (organization_id, user_id, role, joined_at, version, removed)
                 VALUES ($1, $2, $3, COALESCE($4, now()), $5, $6)
                 ON CONFLICT (organization_id, user_id) DO UPDATE SET
                     role = CASE WHEN EXCLUDED.removed THEN m.role ELSE EXCLUDED.role END,
                     joined_at = CASE
                         WHEN $4::timestamptz IS NOT NULL THEN $4
                         WHEN m.removed AND NOT EXCLUDED.removed THEN now()
                         ELSE m.joined_at END,
                     version = EXCLUDED.version, removed = EXCLUDED.removed,
                     seat = CASE WHEN EXCLUDED.removed THEN NULL ELSE m.seat END,
                     updated_at = now()
                 RETURNING {ROW_COLUMNS}"
            ),
            &[
                &organization,
                &write.user.as_str(),
                &role.as_str(),
                &write.joined_at,
                &write.version,
                &write.role.is_none(),
            ],
        )
        .await?;
    let written = member_row(&row)?;
    // Every current member's seat, rewritten where it moved.
    let moved = tx
        .query(
            "WITH ranked AS (
                 SELECT user_id,
                        (row_number() OVER (ORDER BY joined_at, user_id) - 1)::int AS seat
                   FROM organization_members WHERE organization_id = $1 AND NOT removed)
             UPDATE organization_members m SET seat = r.seat, updated_at = now()
               FROM ranked r
              WHERE m.organization_id = $1 AND m.user_id = r.user_id
                AND m.seat IS DISTINCT FROM r.seat
             RETURNING m.user_id",
            &[&organization],
        )
        .await?;
    let mut changed: Vec<String> = moved
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()?;
    changed.push(write.user.as_str().to_owned());
    let subject = write.organization.subject();
    let snapshots = recompute_subjects(db, &changed, subject.as_str()).await?;
    // The written member's seat as it now stands.
    let seat = snapshots
        .iter()
        .find(|s| s.user_id == written.user_id)
        .and_then(|s| {
            s.organizations
                .iter()
                .find(|m| m.organization_id == written.organization_id)
        })
        .map(|m| m.seat);
    tx.commit().await?;
    Ok(Written::Applied(MemberRow { seat, ..written }, snapshots))
}

/// Locks and recomputes `users` and the organisation `subject` after a change of its members
/// (no event caused it: each version grows by one, and the organisation announces its members
/// even though its entitlements did not change).
async fn recompute_subjects(
    db: Db<'_>,
    users: &[String],
    subject: &str,
) -> Result<Vec<UserSnapshot>, StoreError> {
    let bump = |announce| recompute::Bump {
        count: 1,
        cause: None,
        announce,
    };
    let mut bumps: BTreeMap<String, recompute::Bump<'_>> =
        users.iter().map(|u| (u.clone(), bump(false))).collect();
    bumps.insert(subject.to_owned(), bump(true));
    lock_and_recompute(db, &bumps).await
}

/// The organisation's current members, by seat.
///
/// # Errors
/// [`StoreError`] when the database fails.
pub async fn members(
    client: &impl super::GenericClient,
    organization: &OrganizationId,
) -> Result<Vec<MemberRow>, StoreError> {
    client
        .query_typed(
            &format!(
                "SELECT {ROW_COLUMNS} FROM organization_members
                  WHERE organization_id = $1 AND NOT removed ORDER BY seat"
            ),
            &[(&organization.as_str(), Type::TEXT)],
        )
        .await?
        .iter()
        .map(member_row)
        .collect()
}
