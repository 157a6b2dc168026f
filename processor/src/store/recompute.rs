//! A user's entitlements recomputed from their rows: derived by the projection, compared with
//! what is stored, written where they changed, with the notifications of transitions into
//! `revoked` or `suspended` and the version bump — for any number of users in two round trips.
//!
//! Invariant: the caller holds the users' advisory locks, so the rows read here are the latest
//! committed, and the version bump lands in the same transaction as the entitlements.
//!
//! Outbox: the statement that bumps the versions also writes, in the same transaction, the
//! `outbox` rows the relay delivers ([`crate::outbox`]): an `entitlements.changed` row (the new
//! snapshot and its cause) for each user whose entitlements changed, and a `notification.*` row
//! for each notification queued now, all at the bumped version. Held user locks make a user's
//! versions, and so their rows, commit in order.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use futures_util::future::{try_join, try_join3, try_join4};
use tokio_postgres::Row;
use tokio_postgres::types::Type;

use super::{
    Db, FEATURE_COLUMNS, PURCHASE_COLUMNS, Param, SUBSCRIPTION_COLUMNS, StoreError,
    entitlement_source, entitlement_status, feature_from_row, grant_sources, opt_timestamp,
    purchase_from_row, secs, subscription_from_row,
};
use crate::domain::events::Event;
use crate::domain::message::{self, ENTITLEMENTS_CHANGED, Member, Notice};
use crate::domain::organization::{
    Membership, OrganizationId, Role, SUBJECT_PREFIX, is_organization_subject,
};
use crate::domain::projection::{
    self, Entitlement, FeatureFacts, PurchaseFacts, SubscriptionFacts,
};
use crate::domain::view::{EntitlementView, UserSnapshot};

/// What one user's recomputation bumps: the version by `count` (the events of the set that
/// concerned the user), and `cause`, the last of them, named by the outbox messages.
#[derive(Debug, Clone, Copy)]
pub(super) struct Bump<'e> {
    pub(super) count: i64,
    /// `None` when no event caused it (`processor recompute`, a membership change).
    pub(super) cause: Option<&'e Event>,
    /// Write the `entitlements.changed` message even if the entitlements are unchanged (an
    /// organisation whose members changed).
    pub(super) announce: bool,
}

/// One user's recomputation, before it is written.
struct Recomputed {
    user: String,
    views: Vec<EntitlementView>,
    /// Entitlements whose stored row differs (or is missing).
    changed: Vec<Entitlement>,
    /// The notifications to queue.
    notices: Vec<Notice>,
    /// Stored keys no source grants any more (a row moved to another user).
    stale: Vec<String>,
    /// The transaction's time, at which the outbox snapshot is taken.
    now: DateTime<Utc>,
    /// A user's organisations; an organisation's members (`Some`, for its messages).
    organizations: Vec<Membership>,
    members: Option<Vec<Member>>,
}

/// Compares `derived` with the user's stored entitlements (`existing`: key → row and its
/// `updated_at`) at the server's `now`.
fn diff_entitlements(
    user: &str,
    derived: Vec<Entitlement>,
    mut existing: BTreeMap<String, (Entitlement, DateTime<Utc>)>,
    now: DateTime<Utc>,
) -> Result<Recomputed, StoreError> {
    let mut views = Vec::with_capacity(derived.len());
    let mut changed = Vec::new();
    let mut notices = Vec::new();
    for entitlement in derived {
        let before = existing.remove(&entitlement.key);
        let expires_at = opt_timestamp(entitlement.expires_at)?;
        let updated_at = match &before {
            Some((stored, updated_at)) if *stored == entitlement => *updated_at,
            _ => now,
        };
        views.push(EntitlementView {
            key: entitlement.key.clone(),
            status: entitlement.status,
            source: entitlement.source,
            source_id: entitlement.source_id.clone(),
            expires_at,
            updated_at,
            sources: entitlement.sources.clone(),
        });
        let unchanged_status = before
            .as_ref()
            .is_some_and(|(stored, _)| stored.status == entitlement.status);
        if !unchanged_status {
            notices.extend(Notice::status_change(user, &entitlement));
        }
        if !matches!(&before, Some((stored, _)) if *stored == entitlement) {
            changed.push(entitlement);
        }
    }
    Ok(Recomputed {
        user: user.to_owned(),
        views,
        changed,
        notices,
        stale: existing.into_keys().collect(),
        now,
        organizations: Vec::new(),
        members: None,
    })
}

fn entitlement_from_row(row: &Row) -> Result<Entitlement, StoreError> {
    Ok(Entitlement {
        key: row.try_get("key")?,
        status: entitlement_status(row.try_get("status")?)?,
        source: entitlement_source(row.try_get("source")?)?,
        source_id: row.try_get("source_id")?,
        expires_at: secs(row.try_get("expires_at")?),
        sources: grant_sources(row.try_get("sources")?)?,
    })
}

/// Recomputes the entitlements of `users` (user id → applied events that concerned them) from
/// their rows, writes what changed, queues notifications for transitions into
/// `revoked`/`suspended`, bumps each version by the user's event count and returns the new
/// snapshots, sorted by user id. The caller holds the users' advisory locks.
///
/// Set-based: whatever the number of users, the reads are one pipeline of three statements and
/// the writes one pipeline of at most four, so a recomputation costs two round trips.
pub(super) async fn recompute(
    db: Db<'_>,
    users: &BTreeMap<String, Bump<'_>>,
) -> Result<Vec<UserSnapshot>, StoreError> {
    let ids: Vec<&str> = users.keys().map(String::as_str).collect();
    let by_users: [Param<'_>; 1] = [(&ids, Type::TEXT_ARRAY)];
    let purchases_sql = format!("SELECT {PURCHASE_COLUMNS} FROM purchases WHERE user_id = ANY($1)");
    let subscriptions_sql =
        format!("SELECT {SUBSCRIPTION_COLUMNS} FROM subscriptions WHERE user_id = ANY($1)");
    let features_sql =
        format!("SELECT {FEATURE_COLUMNS} FROM stripe_features WHERE user_id = ANY($1)");
    // The memberships of the users, and the members of the organisations, among `ids`.
    let organizations: Vec<String> = ids
        .iter()
        .filter_map(|s| OrganizationId::of_subject(s))
        .map(|o| o.as_str().to_owned())
        .collect();
    let by_members: [Param<'_>; 2] = [(&ids, Type::TEXT_ARRAY), (&organizations, Type::TEXT_ARRAY)];
    let (
        (purchase_rows, subscription_rows, entitlement_rows, generation),
        feature_rows,
        member_rows,
    ) = try_join3(
        try_join4(
            db.query(&purchases_sql, &by_users),
            db.query(&subscriptions_sql, &by_users),
            db.query(
                "SELECT n.now, e.user_id, e.key, e.status, e.source, e.source_id, e.expires_at,
                    e.updated_at, e.sources
               FROM (SELECT now() AS now) n
               LEFT JOIN entitlements e ON e.user_id = ANY($1)",
                &by_users,
            ),
            db.query(super::registry::GENERATION_SQL, &[]),
        ),
        db.query(&features_sql, &by_users),
        db.query(
            "SELECT organization_id, user_id, role, seat FROM organization_members
                  WHERE NOT removed AND (user_id = ANY($1) OR organization_id = ANY($2))
                  ORDER BY organization_id, seat",
            &by_members,
        ),
    )
    .await?;
    let mut memberships: BTreeMap<String, Vec<Membership>> = BTreeMap::new();
    let mut members: BTreeMap<String, Vec<Member>> = BTreeMap::new();
    for row in &member_rows {
        let organization: String = row.try_get(0)?;
        let member = Member {
            user_id: row.try_get(1)?,
            role: Role::from_column(row.try_get(2)?)
                .ok_or(StoreError::Corrupt { column: "role" })?,
            seat: i64::from(row.try_get::<_, i32>(3)?),
        };
        memberships
            .entry(member.user_id.clone())
            .or_default()
            .push(Membership {
                organization_id: organization.clone(),
                role: member.role,
                seat: member.seat,
            });
        members
            .entry(format!("{SUBJECT_PREFIX}{organization}"))
            .or_default()
            .push(member);
    }
    let mut features: BTreeMap<String, Vec<FeatureFacts>> = BTreeMap::new();
    for row in &feature_rows {
        let facts = feature_from_row(row)?;
        if let Some(user) = facts.user_id.clone() {
            features.entry(user).or_default().push(facts);
        }
    }
    let registry =
        super::registry::at(db, &super::registry::Stamp::from_rows(&generation)?).await?;
    let mut purchases: BTreeMap<String, Vec<PurchaseFacts>> = BTreeMap::new();
    // Each purchase's row id and stored `duplicate` flag, in the same order.
    let mut flags: BTreeMap<String, Vec<(i64, bool)>> = BTreeMap::new();
    for row in &purchase_rows {
        let (id, facts) = purchase_from_row(row)?;
        if let Some(user) = facts.user_id.clone() {
            flags
                .entry(user.clone())
                .or_default()
                .push((id, row.try_get("duplicate")?));
            purchases.entry(user).or_default().push(facts);
        }
    }
    let duplicates = flag_duplicates(&purchases, &flags, &registry);
    let mut subscriptions: BTreeMap<String, Vec<SubscriptionFacts>> = BTreeMap::new();
    for row in &subscription_rows {
        let facts = subscription_from_row(row)?;
        if let Some(user) = facts.user_id.clone() {
            subscriptions.entry(user).or_default().push(facts);
        }
    }
    let mut now: DateTime<Utc> = DateTime::UNIX_EPOCH;
    let mut existing: BTreeMap<String, BTreeMap<String, (Entitlement, DateTime<Utc>)>> =
        BTreeMap::new();
    for row in &entitlement_rows {
        now = row.try_get("now")?;
        let Some(user) = row.try_get::<_, Option<String>>("user_id")? else {
            continue;
        };
        let entitlement = entitlement_from_row(row)?;
        existing.entry(user).or_default().insert(
            entitlement.key.clone(),
            (entitlement, row.try_get("updated_at")?),
        );
    }
    let recomputed = users
        .keys()
        .map(|user| {
            let derived = projection::derive_entitlements(
                purchases.get(user).map_or(&[], Vec::as_slice),
                subscriptions.get(user).map_or(&[], Vec::as_slice),
                features.get(user).map_or(&[], Vec::as_slice),
                &registry,
            );
            let mut recomputed = diff_entitlements(
                user,
                derived,
                existing.remove(user).unwrap_or_default(),
                now,
            )?;
            if is_organization_subject(user) {
                recomputed.members = Some(members.remove(user).unwrap_or_default());
            } else {
                recomputed.organizations = memberships.remove(user).unwrap_or_default();
            }
            Ok::<_, StoreError>(recomputed)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let (versions, ()) = try_join(
        write_recomputed(db, &recomputed, users),
        write_duplicates(db, &duplicates),
    )
    .await?;
    recomputed
        .into_iter()
        .map(|r| {
            let version = versions
                .get(&r.user)
                .copied()
                .ok_or(StoreError::Corrupt { column: "version" })?;
            Ok(UserSnapshot {
                user_id: r.user,
                version,
                entitlements: r.views,
                organizations: r.organizations,
            })
        })
        .collect()
}

/// The purchases whose `duplicate` flag changes (row id, new flag), from each user's purchases
/// (`flags`: row ids and stored flags, in the same order). A purchase newly found to be a
/// second payment is counted in `purchases_duplicate_total`.
fn flag_duplicates(
    purchases: &BTreeMap<String, Vec<PurchaseFacts>>,
    flags: &BTreeMap<String, Vec<(i64, bool)>>,
    registry: &crate::domain::projection::Registry,
) -> Vec<(i64, bool)> {
    let mut changes = Vec::new();
    for (user, rows) in purchases {
        let derived = projection::duplicate_payments(rows, registry);
        let stored = flags.get(user).map_or(&[][..], Vec::as_slice);
        for (&(id, before), now) in stored.iter().zip(derived) {
            if before != now {
                if now {
                    metrics::counter!("purchases_duplicate_total").increment(1);
                    tracing::warn!(user_id = %user, purchase_id = id,
                        "a second payment for something the user already owns; recorded as a purchase of its own");
                }
                changes.push((id, now));
            }
        }
    }
    changes
}

/// Writes the changed `duplicate` flags.
async fn write_duplicates(db: Db<'_>, changes: &[(i64, bool)]) -> Result<(), StoreError> {
    if changes.is_empty() {
        return Ok(());
    }
    let (ids, flags): (Vec<i64>, Vec<bool>) = changes.iter().copied().unzip();
    db.execute(
        "UPDATE purchases p SET duplicate = d.f FROM unnest($1::int8[], $2::bool[]) AS d(id, f)
          WHERE p.id = d.id",
        &[(&ids, Type::INT8_ARRAY), (&flags, Type::BOOL_ARRAY)],
    )
    .await?;
    Ok(())
}

/// Writes recomputations in one pipeline; returns each user's new version.
async fn write_recomputed(
    db: Db<'_>,
    recomputed: &[Recomputed],
    users: &BTreeMap<String, Bump<'_>>,
) -> Result<BTreeMap<String, i64>, StoreError> {
    let mut upsert = EntitlementColumns::default();
    let (mut kinds, mut types, mut notice_users, mut dedupe_keys, mut payloads) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut stale_users, mut stale_keys) = (Vec::new(), Vec::new());
    for r in recomputed {
        for e in &r.changed {
            upsert.push(&r.user, e)?;
        }
        for notice in &r.notices {
            kinds.push(notice.kind.column());
            types.push(notice.kind.message_type());
            notice_users.push(r.user.as_str());
            dedupe_keys.push(notice.dedupe_key.as_str());
            payloads.push(&notice.payload);
        }
        for key in &r.stale {
            stale_users.push(r.user.as_str());
            stale_keys.push(key.as_str());
        }
    }
    let upserts = async {
        if upsert.users.is_empty() {
            return Ok(0);
        }
        db.execute(
            "INSERT INTO entitlements (user_id, key, status, source, source_id, expires_at,
                 sources, updated_at)
             SELECT u, k, st, src, sid, exp, srcs, now()
               FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                           $6::timestamptz[], $7::jsonb[]) AS e(u, k, st, src, sid, exp, srcs)
             ON CONFLICT (user_id, key) DO UPDATE SET status = EXCLUDED.status,
                 source = EXCLUDED.source, source_id = EXCLUDED.source_id,
                 expires_at = EXCLUDED.expires_at, sources = EXCLUDED.sources,
                 updated_at = now()",
            &[
                (&upsert.users, Type::TEXT_ARRAY),
                (&upsert.keys, Type::TEXT_ARRAY),
                (&upsert.statuses, Type::TEXT_ARRAY),
                (&upsert.sources, Type::TEXT_ARRAY),
                (&upsert.source_ids, Type::TEXT_ARRAY),
                (&upsert.expires_at, Type::TIMESTAMPTZ_ARRAY),
                (&upsert.source_lists, Type::JSONB_ARRAY),
            ],
        )
        .await
    };
    let deletes = async {
        if stale_users.is_empty() {
            return Ok(0);
        }
        db.execute(
            "DELETE FROM entitlements e USING unnest($1::text[], $2::text[]) AS d(u, k)
              WHERE e.user_id = d.u AND e.key = d.k",
            &[
                (&stale_users, Type::TEXT_ARRAY),
                (&stale_keys, Type::TEXT_ARRAY),
            ],
        )
        .await
    };
    let bump_users: Vec<&str> = users.keys().map(String::as_str).collect();
    let bump_counts: Vec<i64> = users.values().map(|b| b.count).collect();
    let causes: Vec<serde_json::Value> = users
        .values()
        .map(|b| {
            b.cause
                .map_or(serde_json::Value::Null, crate::domain::message::cause)
        })
        .collect();
    // An `entitlements.changed` message for each user whose stored entitlements change, and
    // for each organisation whose members changed.
    let (changed_users, changed_bodies): (Vec<&str>, Vec<serde_json::Value>) = recomputed
        .iter()
        .filter(|r| {
            !r.changed.is_empty()
                || !r.stale.is_empty()
                || users.get(&r.user).is_some_and(|b| b.announce)
        })
        .map(|r| {
            let body = match &r.members {
                None => message::entitlements_body(&r.views, r.now),
                Some(members) => message::organization_body(&r.views, r.now, &r.user, members),
            };
            (r.user.as_str(), body)
        })
        .unzip();
    let bump_params: [Param<'_>; 11] = [
        (&bump_users, Type::TEXT_ARRAY),
        (&bump_counts, Type::INT8_ARRAY),
        (&causes, Type::JSONB_ARRAY),
        (&kinds, Type::TEXT_ARRAY),
        (&notice_users, Type::TEXT_ARRAY),
        (&dedupe_keys, Type::TEXT_ARRAY),
        (&payloads, Type::JSONB_ARRAY),
        (&changed_users, Type::TEXT_ARRAY),
        (&changed_bodies, Type::JSONB_ARRAY),
        (&types, Type::TEXT_ARRAY),
        (&ENTITLEMENTS_CHANGED, Type::TEXT),
    ];
    let bump = db.query(
        // The new versions are also marked pending for the cache healer, in this transaction:
        // a cache write that never happens (Redis down, the process killed) is repaired.
        // Notifications and the outbox rows (at the bumped version, with the cause) are written
        // by the same statement, so they share its version.
        "WITH bumped AS (
             INSERT INTO user_entitlement_versions (user_id, version)
             SELECT * FROM unnest($1::text[], $2::int8[])
             ON CONFLICT (user_id) DO UPDATE
                 SET version = user_entitlement_versions.version + EXCLUDED.version
             RETURNING user_id, version),
         pending AS (
             INSERT INTO cache_pending (user_id, version)
             SELECT user_id, version FROM bumped
             ON CONFLICT (user_id) DO UPDATE
                 SET version = EXCLUDED.version, marked_at = now()),
         notified AS (
             INSERT INTO notifications (kind, user_id, dedupe_key, payload)
             SELECT * FROM unnest($4::text[], $5::text[], $6::text[], $7::jsonb[])
             ON CONFLICT (dedupe_key) DO NOTHING
             RETURNING id, kind, user_id, dedupe_key, payload),
         messages AS (
             SELECT m.user_id, 0 AS rank, $11::text AS type, m.body,
                    NULL::bigint AS notification_id
               FROM unnest($8::text[], $9::jsonb[]) AS m(user_id, body)
             UNION ALL
             SELECT n.user_id, 1, t.type, n.payload, n.id
               FROM notified n
               JOIN unnest($6::text[], $10::text[]) AS t(dedupe_key, type) USING (dedupe_key)),
         outboxed AS (
             INSERT INTO outbox (user_id, version, type, body, notification_id)
             SELECT m.user_id, b.version, m.type,
                    m.body || jsonb_build_object('cause', c.cause), m.notification_id
               FROM messages m
               JOIN bumped b USING (user_id)
               JOIN unnest($1::text[], $3::jsonb[]) AS c(user_id, cause) USING (user_id)
              ORDER BY m.user_id, m.rank, m.notification_id)
         SELECT user_id, version FROM bumped",
        &bump_params,
    );
    let (_, _, version_rows) = try_join3(upserts, deletes, bump).await?;
    version_rows
        .iter()
        .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
        .collect()
}

/// The entitlement rows to upsert, as one array per column.
#[derive(Default)]
struct EntitlementColumns<'a> {
    users: Vec<&'a str>,
    keys: Vec<&'a str>,
    statuses: Vec<&'static str>,
    sources: Vec<&'static str>,
    source_ids: Vec<&'a str>,
    expires_at: Vec<Option<DateTime<Utc>>>,
    source_lists: Vec<serde_json::Value>,
}

impl<'a> EntitlementColumns<'a> {
    fn push(&mut self, user: &'a str, e: &'a Entitlement) -> Result<(), StoreError> {
        self.users.push(user);
        self.keys.push(&e.key);
        self.statuses.push(e.status.as_str());
        self.sources.push(e.source.as_str());
        self.source_ids.push(&e.source_id);
        self.expires_at.push(opt_timestamp(e.expires_at)?);
        self.source_lists.push(
            serde_json::to_value(&e.sources)
                .map_err(|_| StoreError::Corrupt { column: "sources" })?,
        );
        Ok(())
    }
}
