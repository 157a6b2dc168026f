//! Postgres I/O around the pure projection: load the rows an event touches, merge them with
//! the event's facts, write them back, recompute the affected users' entitlements, bump their
//! versions and queue notifications — all inside the caller's transaction.
//!
//! Invariants:
//! - Nothing here commits or rolls back: the caller owns the transaction (or savepoint) and
//!   the `processed_events` insert that makes an event apply once.
//! - Rows only ever hold the join of their facts ([`projection`]), so the final rows do not
//!   depend on the order events arrive in; entitlements are always recomputed from the rows.
//! - Serialization: every transaction first takes transaction-scoped advisory locks on the
//!   Stripe objects its event names (customer, session, payment intent, charge, subscription),
//!   sorted, then — once the rows have revealed them — on the users whose entitlements it
//!   recomputes, sorted. Object locks are always all taken before any user lock, so the two
//!   phases cannot wait on each other in a cycle. A user's entitlements are therefore
//!   recomputed by one transaction at a time, and the last to commit saw every earlier commit.
//! - A user's version is bumped in the same transaction as every recomputation of their
//!   entitlements; [`user_snapshot`] reads version and entitlements in one statement.
//!
//! For callers: run at READ COMMITTED (Postgres' default). Each statement then sees what
//! committed before it, which is what makes "wait for the lock, then read" correct; a
//! REPEATABLE READ snapshot taken before the wait would recompute from stale rows. Advisory
//! locks are transaction-scoped, so in a batch transaction (a savepoint per event) they are
//! held until the batch commits: two batching workers touching the same users in different
//! orders can deadlock, and Postgres then aborts one with `40P01`, surfacing as the transient
//! [`StoreError::Db`] — retry that batch.
//!
//! Statements carry explicit parameter types. Through [`apply_prepared`] each one is prepared
//! once per connection (the worker's path); [`apply`] sends them unnamed (one round trip each,
//! no prepare). Independent statements are pipelined: an event costs about four round trips.
//! The worker's usual path is [`batch`], which applies a whole batch in five.

pub mod batch;

use crate::events::{Event, SubscriptionStatus};
use crate::projection::{
    self, AbandonedCheckout, CustomerLink, DerivedEntitlement, DisputeState, EntitlementSource,
    EntitlementStatus, FeeSplit, PurchaseFacts, RefundFact, StatusClaim, SubscriptionFacts,
};
use chrono::{DateTime, Utc};
use deadpool_postgres::StatementCache;
use futures_util::future::{try_join, try_join3, try_join4};
use shared::ids::UserId;
use std::collections::{BTreeMap, BTreeSet};
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{GenericClient, Row, Statement, Transaction};

/// A user's entitlements as cached in Redis and served by the API.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct UserSnapshot {
    pub user_id: String,
    /// Bumped in every transaction that recomputes this user's entitlements; 0 if never.
    pub version: i64,
    /// Sorted by key.
    pub entitlements: Vec<EntitlementView>,
}

/// One entitlement row.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EntitlementView {
    pub key: String,
    /// `active|past_due|suspended|revoked|expired`
    pub status: String,
    /// `purchase|subscription`
    pub source: String,
    pub source_id: String,
    /// `None` is lifetime.
    pub expires_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
}

/// What [`apply`] changed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Applied {
    /// Users whose entitlements were recomputed, with their new version (sorted by user id).
    pub users: Vec<UserSnapshot>,
}

/// Why [`apply`] or [`user_snapshot`] failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Connection loss, timeout, serialization or deadlock failure…: retry the event.
    #[error("database error: {0}")]
    Db(#[from] tokio_postgres::Error),
    /// The user already owns a completed purchase of this product (the partial unique index
    /// refused a second one). Usually the refund of the earlier purchase is still on its way
    /// (a repurchase after a refund, delivered out of order), so this is worth retrying with a
    /// delay; if the retries run out it is a real double payment for an operator to refund.
    #[error("user already owns a completed purchase of product `{product_key}`")]
    DuplicatePurchase { product_key: String },
    /// The event carries a timestamp Postgres cannot store.
    #[error("timestamp {0} is out of range")]
    InvalidTimestamp(i64),
    /// A stored value the projection does not recognise (a schema/code mismatch).
    #[error("unexpected value in column `{column}`")]
    Corrupt { column: &'static str },
}

impl StoreError {
    /// True when retrying the event later can succeed: database failures, and a duplicate
    /// purchase whose earlier twin may still be refunded by an event not yet delivered. The
    /// other variants are permanent (dead-letter at once).
    #[must_use]
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Db(_) | Self::DuplicatePurchase { .. })
    }
}

/// Namespace of the projection's advisory locks (the two-key form keeps them apart from any
/// single-key lock other code takes).
const LOCK_CLASS: i32 = 0x454e_5431;

const PURCHASE_COLUMNS: &str = "id, user_id, customer_id, product_key, checkout_session_id, \
     payment_intent_id, charge_id, amount_paid_cents, currency, paid, purchased_at, \
     payment_failed, refund_amount_cents, stripe_refund_id, refund_reason, fully_refunded, \
     refunded_at, dispute_status, dispute_id";

const SUBSCRIPTION_COLUMNS: &str = "id, user_id, customer_id, product_key, status_claim, \
     status_claim_at, cancel_at_period_end, terminal_status, current_period_end, ended_at";

/// Applies one event inside the caller's transaction and returns the users whose entitlements
/// it recomputed.
///
/// # Errors
/// [`StoreError::Db`] for database failures (transient: retry the event),
/// [`StoreError::DuplicatePurchase`], [`StoreError::InvalidTimestamp`] and
/// [`StoreError::Corrupt`] for failures a retry cannot fix.
pub async fn apply(tx: &Transaction<'_>, event: &Event) -> Result<Applied, StoreError> {
    apply_in(
        Db {
            tx,
            statements: None,
        },
        event,
    )
    .await
}

/// [`apply`] with the connection's statement cache: each statement is prepared once per
/// connection and then only bound and executed, which spares the server parsing and planning
/// it for every event (the round trips stay the same).
///
/// # Errors
/// As [`apply`].
pub async fn apply_prepared(
    tx: &Transaction<'_>,
    statements: &StatementCache,
    event: &Event,
) -> Result<Applied, StoreError> {
    apply_in(
        Db {
            tx,
            statements: Some(statements),
        },
        event,
    )
    .await
}

async fn apply_in(db: Db<'_>, event: &Event) -> Result<Applied, StoreError> {
    let users = apply_facts_in(db, event).await?;
    if users.is_empty() {
        return Ok(Applied::default());
    }
    // Phase 2, one pipeline: the user locks, then the first recomputation's reads.
    let user_keys = users.iter().map(|u| format!("user:{u}")).collect();
    let counts = users.into_iter().map(|user| (user, 1)).collect();
    let (_, snapshots) = try_join(lock(db, user_keys), recompute(db, &counts)).await?;
    tracing::debug!(
        event_id = %event.id,
        event_type = %event.event_type,
        users = snapshots.len(),
        "event projected"
    );
    Ok(Applied { users: snapshots })
}

/// The first half of [`apply_prepared`], for a batch transaction: merges the event's facts into
/// the rows (under the object locks) and returns the users whose entitlements that affects,
/// without recomputing them. The caller must then call [`recompute_users`] in the same
/// transaction, after the batch's last event, with every user returned for an event it kept.
///
/// Recomputing once per batch gives the same rows as recomputing after every event: the
/// entitlements are a function of the rows alone, and the recomputation runs under the user
/// locks, after every write of the batch. Only states that never committed are skipped (a
/// notification is queued for a transition between two committed states).
///
/// # Errors
/// As [`apply`].
pub async fn apply_facts(
    tx: &Transaction<'_>,
    statements: &StatementCache,
    event: &Event,
) -> Result<BTreeSet<String>, StoreError> {
    let users = apply_facts_in(
        Db {
            tx,
            statements: Some(statements),
        },
        event,
    )
    .await?;
    tracing::debug!(
        event_id = %event.id,
        event_type = %event.event_type,
        users = users.len(),
        "event facts merged"
    );
    Ok(users)
}

/// Recomputes the entitlements of `users` (user id → number of events of the batch that
/// concerned them) under their advisory locks, taken here all at once in the global order,
/// and bumps each version by that number, so a version still counts the applied events that
/// concerned the user. All users are recomputed in two pipelined round trips. Returns the new
/// snapshots, sorted by user id.
///
/// # Errors
/// [`StoreError::Db`] for database failures, [`StoreError::Corrupt`] or
/// [`StoreError::InvalidTimestamp`] for a stored row the projection cannot read.
pub async fn recompute_users(
    tx: &Transaction<'_>,
    statements: &StatementCache,
    users: &BTreeMap<String, i64>,
) -> Result<Vec<UserSnapshot>, StoreError> {
    if users.is_empty() {
        return Ok(Vec::new());
    }
    let db = Db {
        tx,
        statements: Some(statements),
    };
    let user_keys = users.keys().map(|u| format!("user:{u}")).collect();
    // The lock statement goes first in the pipeline: every read below runs under the locks.
    let (_, snapshots) = try_join(lock(db, user_keys), recompute(db, users)).await?;
    Ok(snapshots)
}

/// Phase 1 of [`apply`]: the object locks, the facts merged into the rows; returns the users
/// whose entitlements need recomputing.
async fn apply_facts_in(db: Db<'_>, event: &Event) -> Result<BTreeSet<String>, StoreError> {
    let plan = projection::plan(event);
    if plan.is_empty() {
        return Ok(BTreeSet::new());
    }
    // Phase 1, one pipeline: the object locks first (the server runs pipelined statements in
    // order, so every read below happens under them), then the independent reads and the link.
    let (_, link, purchase_rows, subscription_row) = try_join4(
        lock(db, plan.lock_keys()),
        async {
            match &plan.link {
                Some(link) => insert_link(db, link).await.map(Some),
                None => Ok(None),
            }
        },
        async {
            match &plan.purchase {
                Some(delta) => load_purchases(db, delta).await.map(Some),
                None => Ok(None),
            }
        },
        async {
            match &plan.subscription {
                Some(delta) => load_subscription(db, delta).await.map(Some),
                None => Ok(None),
            }
        },
    )
    .await?;

    let mut users = BTreeSet::new();
    if let (Some(link), Some(row)) = (&plan.link, link) {
        attach_link(db, link, &row, &mut users).await?;
    }
    if let (Some(delta), Some(rows)) = (plan.purchase, purchase_rows) {
        merge_purchase(db, delta, &rows, &mut users).await?;
    }
    if let (Some(delta), Some(row)) = (plan.subscription, subscription_row) {
        merge_subscription(db, delta, row.as_ref(), &mut users).await?;
    }
    if let Some(abandoned) = &plan.abandoned {
        record_abandoned(db, abandoned).await?;
    }
    Ok(users)
}

/// Reads a user's current entitlements and version (0 and no entitlements for an unknown user).
///
/// # Errors
/// [`StoreError::Db`] when the query fails, [`StoreError::Corrupt`] on an unexpected row.
pub async fn user_snapshot(
    client: &impl GenericClient,
    user: &UserId,
) -> Result<UserSnapshot, StoreError> {
    // One statement, one MVCC snapshot: the version always matches the entitlements read.
    let rows = client
        .query_typed(
            "SELECT v.version, e.key, e.status, e.source, e.source_id, e.expires_at, e.updated_at
               FROM (SELECT COALESCE((SELECT version FROM user_entitlement_versions
                                       WHERE user_id = $1), 0) AS version) v
               LEFT JOIN entitlements e ON e.user_id = $1
              ORDER BY e.key",
            &[(&user.as_str(), Type::TEXT)],
        )
        .await?;
    let mut snapshot = UserSnapshot {
        user_id: user.as_str().to_owned(),
        version: 0,
        entitlements: Vec::new(),
    };
    for row in rows {
        snapshot.version = row.try_get(0)?;
        if let Some(key) = row.try_get::<_, Option<String>>(1)? {
            snapshot.entitlements.push(EntitlementView {
                key,
                status: row.try_get(2)?,
                source: row.try_get(3)?,
                source_id: row.try_get(4)?,
                expires_at: row.try_get(5)?,
                updated_at: row.try_get(6)?,
            });
        }
    }
    Ok(snapshot)
}

/// The caller's transaction, with the connection's statement cache when it has one.
#[derive(Clone, Copy)]
struct Db<'a> {
    tx: &'a Transaction<'a>,
    statements: Option<&'a StatementCache>,
}

type Param<'p> = (&'p (dyn ToSql + Sync), Type);

impl Db<'_> {
    /// The prepared form of `sql` (from the cache, or prepared now and cached), or `None`
    /// without a cache: the statement is then sent unnamed with its parameter types.
    async fn prepared(
        &self,
        sql: &str,
        params: &[Param<'_>],
    ) -> Result<Option<Statement>, tokio_postgres::Error> {
        let Some(cache) = self.statements else {
            return Ok(None);
        };
        let types: Vec<Type> = params.iter().map(|(_, t)| t.clone()).collect();
        cache
            .prepare_typed(self.tx.client(), sql, &types)
            .await
            .map(Some)
    }

    fn values<'p>(params: &'p [Param<'p>]) -> Vec<&'p (dyn ToSql + Sync)> {
        params.iter().map(|(v, _)| *v).collect()
    }

    async fn query(
        &self,
        sql: &str,
        params: &[Param<'_>],
    ) -> Result<Vec<Row>, tokio_postgres::Error> {
        match self.prepared(sql, params).await? {
            Some(statement) => self.tx.query(&statement, &Self::values(params)).await,
            None => self.tx.query_typed(sql, params).await,
        }
    }

    async fn query_one(
        &self,
        sql: &str,
        params: &[Param<'_>],
    ) -> Result<Row, tokio_postgres::Error> {
        match self.prepared(sql, params).await? {
            Some(statement) => self.tx.query_one(&statement, &Self::values(params)).await,
            None => self.tx.query_typed_one(sql, params).await,
        }
    }

    async fn query_opt(
        &self,
        sql: &str,
        params: &[Param<'_>],
    ) -> Result<Option<Row>, tokio_postgres::Error> {
        match self.prepared(sql, params).await? {
            Some(statement) => self.tx.query_opt(&statement, &Self::values(params)).await,
            None => self.tx.query_typed_opt(sql, params).await,
        }
    }

    async fn execute(&self, sql: &str, params: &[Param<'_>]) -> Result<u64, tokio_postgres::Error> {
        match self.prepared(sql, params).await? {
            Some(statement) => self.tx.execute(&statement, &Self::values(params)).await,
            None => self.tx.execute_typed(sql, params).await,
        }
    }
}

/// 32-bit FNV-1a: a stable hash, identical in every process, for advisory lock ids.
fn lock_id(key: &str) -> i32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in key.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    i32::from_ne_bytes(hash.to_ne_bytes())
}

/// Takes the advisory locks of `keys` in ascending id order (a global order, so lockers of
/// overlapping sets never deadlock).
async fn lock(db: Db<'_>, keys: Vec<String>) -> Result<(), StoreError> {
    let mut ids: Vec<i32> = keys.iter().map(|k| lock_id(k)).collect();
    if ids.is_empty() {
        return Ok(());
    }
    ids.sort_unstable();
    ids.dedup();
    // A function scan yields the array in order and the lock call runs row by row.
    db.execute(
        "SELECT pg_advisory_xact_lock($1, k) FROM unnest($2::int4[]) AS k",
        &[(&LOCK_CLASS, Type::INT4), (&ids, Type::INT4_ARRAY)],
    )
    .await?;
    Ok(())
}

fn timestamp(secs: i64) -> Result<DateTime<Utc>, StoreError> {
    DateTime::from_timestamp(secs, 0).ok_or(StoreError::InvalidTimestamp(secs))
}

fn opt_timestamp(secs: Option<i64>) -> Result<Option<DateTime<Utc>>, StoreError> {
    secs.map(timestamp).transpose()
}

fn secs(at: Option<DateTime<Utc>>) -> Option<i64> {
    at.map(|t| t.timestamp())
}

/// Records customer → user (the first link wins) and returns the row's state.
async fn insert_link(db: Db<'_>, link: &CustomerLink) -> Result<Row, StoreError> {
    Ok(db
        .query_one(
            "WITH ins AS (
                 INSERT INTO customers (customer_id, user_id) VALUES ($1, $2)
                 ON CONFLICT (customer_id) DO NOTHING
                 RETURNING user_id)
             SELECT (SELECT user_id FROM ins) AS inserted,
                    (SELECT user_id FROM customers WHERE customer_id = $1) AS existing",
            &[
                (&link.customer_id, Type::TEXT),
                (&link.user_id.as_str(), Type::TEXT),
            ],
        )
        .await?)
}

/// When the link is new, attaches the customer's rows that were waiting for a user.
async fn attach_link(
    db: Db<'_>,
    link: &CustomerLink,
    row: &Row,
    users: &mut BTreeSet<String>,
) -> Result<(), StoreError> {
    let inserted: Option<String> = row.try_get(0)?;
    let existing: Option<String> = row.try_get(1)?;
    if let Some(existing) = existing.filter(|e| e != link.user_id.as_str()) {
        // A customer never moves between users by itself; an operator decides.
        tracing::warn!(
            customer_id = %link.customer_id,
            kept_user = %existing,
            refused_user = %link.user_id,
            "customer already linked to another user"
        );
    }
    let Some(user) = inserted else {
        return Ok(());
    };
    let attached: i64 = db
        .query_one(
            "WITH p AS (UPDATE purchases SET user_id = $2, updated_at = now()
                         WHERE customer_id = $1 AND user_id IS NULL RETURNING 1),
                  s AS (UPDATE subscriptions SET user_id = $2, updated_at = now()
                         WHERE customer_id = $1 AND user_id IS NULL RETURNING 1)
             SELECT (SELECT count(*) FROM p) + (SELECT count(*) FROM s)",
            &[(&link.customer_id, Type::TEXT), (&user, Type::TEXT)],
        )
        .await?
        .try_get(0)?;
    if attached > 0 {
        users.insert(user);
    }
    Ok(())
}

async fn customer_user(
    db: Db<'_>,
    customer: Option<&String>,
) -> Result<Option<String>, StoreError> {
    let Some(customer) = customer else {
        return Ok(None);
    };
    Ok(db
        .query_opt(
            "SELECT user_id FROM customers WHERE customer_id = $1",
            &[(customer, Type::TEXT)],
        )
        .await?
        .map(|row| row.try_get(0))
        .transpose()?)
}

fn purchase_from_row(row: &Row) -> Result<(i64, PurchaseFacts), StoreError> {
    let refund_amount: i64 = row.try_get("refund_amount_cents")?;
    let refund_id: Option<String> = row.try_get("stripe_refund_id")?;
    let reason: Option<String> = row.try_get("refund_reason")?;
    let refund =
        (refund_amount > 0 || refund_id.is_some() || reason.is_some()).then_some(RefundFact {
            amount_cents: refund_amount,
            refund_id,
            reason,
        });
    let dispute: String = row.try_get("dispute_status")?;
    Ok((
        row.try_get("id")?,
        PurchaseFacts {
            checkout_session_id: row.try_get("checkout_session_id")?,
            payment_intent_id: row.try_get("payment_intent_id")?,
            charge_id: row.try_get("charge_id")?,
            user_id: row.try_get("user_id")?,
            customer_id: row.try_get("customer_id")?,
            product_key: row.try_get("product_key")?,
            amount_cents: row.try_get("amount_paid_cents")?,
            currency: row.try_get("currency")?,
            paid: row.try_get("paid")?,
            paid_at: secs(row.try_get("purchased_at")?),
            failed: row.try_get("payment_failed")?,
            refund,
            fully_refunded: row.try_get("fully_refunded")?,
            refunded_at: secs(row.try_get("refunded_at")?),
            dispute: DisputeState::from_column(&dispute).ok_or(StoreError::Corrupt {
                column: "dispute_status",
            })?,
            dispute_id: row.try_get("dispute_id")?,
        },
    ))
}

/// The rows sharing one of the delta's Stripe ids, oldest first, locked.
async fn load_purchases(db: Db<'_>, delta: &PurchaseFacts) -> Result<Vec<Row>, StoreError> {
    Ok(db
        .query(
            &format!(
                "SELECT {PURCHASE_COLUMNS} FROM purchases
                  WHERE checkout_session_id = $1 OR payment_intent_id = $2 OR charge_id = $3
                  ORDER BY id FOR UPDATE"
            ),
            &[
                (&delta.checkout_session_id, Type::TEXT),
                (&delta.payment_intent_id, Type::TEXT),
                (&delta.charge_id, Type::TEXT),
            ],
        )
        .await?)
}

/// Merges a purchase delta into the rows sharing one of its Stripe ids (joining rows that
/// turn out to be the same payment into the oldest one).
async fn merge_purchase(
    db: Db<'_>,
    delta: PurchaseFacts,
    rows: &[Row],
    users: &mut BTreeSet<String>,
) -> Result<(), StoreError> {
    let mut ids = Vec::with_capacity(rows.len());
    let mut merged = delta;
    for row in rows {
        let (id, facts) = purchase_from_row(row)?;
        users.extend(facts.user_id.clone());
        ids.push(id);
        merged = merged.merge(facts);
    }
    if merged.user_id.is_none() {
        merged.user_id = customer_user(db, merged.customer_id.as_ref()).await?;
    }
    users.extend(merged.user_id.clone());

    // Free the unique Stripe ids of the rows folded into the oldest one before writing it.
    if ids.len() > 1 {
        db.execute(
            "DELETE FROM purchases WHERE id = ANY($1)",
            &[(&ids[1..].to_vec(), Type::INT8_ARRAY)],
        )
        .await?;
    }
    let status = merged.status().as_str();
    let split = merged.amount_cents.map(FeeSplit::of);
    let refund = merged.refund.clone();
    let purchased_at = opt_timestamp(merged.paid_at)?;
    let refunded_at = opt_timestamp(merged.refunded_at)?;
    let dispute = merged.dispute.as_str();
    let platform_fee = split.map(|s| s.platform_fee_cents);
    let organization_fee = split.map(|s| s.organization_fee_cents);
    let creator_payout = split.map(|s| s.creator_payout_cents);
    let refund_reason = refund.as_ref().and_then(|r| r.reason.clone());
    let refund_amount = refund.as_ref().map_or(0, |r| r.amount_cents);
    let refund_id = refund.as_ref().and_then(|r| r.refund_id.clone());
    let mut params: Vec<(&(dyn ToSql + Sync), Type)> = vec![
        (&merged.user_id, Type::TEXT),
        (&merged.customer_id, Type::TEXT),
        (&merged.product_key, Type::TEXT),
        (&merged.checkout_session_id, Type::TEXT),
        (&merged.payment_intent_id, Type::TEXT),
        (&merged.charge_id, Type::TEXT),
        (&merged.amount_cents, Type::INT8),
        (&merged.currency, Type::TEXT),
        (&platform_fee, Type::INT8),
        (&organization_fee, Type::INT8),
        (&creator_payout, Type::INT8),
        (&status, Type::TEXT),
        (&merged.paid, Type::BOOL),
        (&merged.failed, Type::BOOL),
        (&merged.fully_refunded, Type::BOOL),
        (&dispute, Type::TEXT),
        (&merged.dispute_id, Type::TEXT),
        (&purchased_at, Type::TIMESTAMPTZ),
        (&refunded_at, Type::TIMESTAMPTZ),
        (&refund_reason, Type::TEXT),
        (&refund_amount, Type::INT8),
        (&refund_id, Type::TEXT),
    ];
    let result = match ids.first() {
        None => {
            db.execute(
                "INSERT INTO purchases (user_id, customer_id, product_key, checkout_session_id,
                     payment_intent_id, charge_id, amount_paid_cents, currency,
                     platform_fee_cents, organization_fee_cents, creator_payout_cents, status,
                     paid, payment_failed, fully_refunded, dispute_status, dispute_id,
                     purchased_at, refunded_at, refund_reason, refund_amount_cents,
                     stripe_refund_id)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16,
                         $17, $18, $19, $20, $21, $22)",
                &params,
            )
            .await
        }
        Some(id) => {
            params.push((id, Type::INT8));
            db.execute(
                "UPDATE purchases SET user_id = $1, customer_id = $2, product_key = $3,
                     checkout_session_id = $4, payment_intent_id = $5, charge_id = $6,
                     amount_paid_cents = $7, currency = $8, platform_fee_cents = $9,
                     organization_fee_cents = $10, creator_payout_cents = $11, status = $12,
                     paid = $13, payment_failed = $14, fully_refunded = $15,
                     dispute_status = $16, dispute_id = $17, purchased_at = $18,
                     refunded_at = $19, refund_reason = $20, refund_amount_cents = $21,
                     stripe_refund_id = $22, updated_at = now()
                 WHERE id = $23",
                &params,
            )
            .await
        }
    };
    match result {
        Ok(_) => Ok(()),
        Err(e) if is_violation_of(&e, "purchases_one_completed_per_user_product") => {
            Err(StoreError::DuplicatePurchase {
                product_key: merged.product_key.unwrap_or_default(),
            })
        }
        Err(e) => Err(e.into()),
    }
}

fn is_violation_of(error: &tokio_postgres::Error, constraint: &str) -> bool {
    error.as_db_error().is_some_and(|db| {
        *db.code() == tokio_postgres::error::SqlState::UNIQUE_VIOLATION
            && db.constraint() == Some(constraint)
    })
}

fn subscription_status(raw: &str, column: &'static str) -> Result<SubscriptionStatus, StoreError> {
    SubscriptionStatus::from_stripe(raw).ok_or(StoreError::Corrupt { column })
}

fn subscription_from_row(row: &Row) -> Result<SubscriptionFacts, StoreError> {
    let claim_status: Option<String> = row.try_get("status_claim")?;
    let claim_at: Option<DateTime<Utc>> = row.try_get("status_claim_at")?;
    let claim = match (claim_status, claim_at) {
        (Some(status), Some(at)) => Some(StatusClaim {
            at: at.timestamp(),
            status: subscription_status(&status, "status_claim")?,
            cancel_at_period_end: row.try_get("cancel_at_period_end")?,
        }),
        _ => None,
    };
    let terminal: Option<String> = row.try_get("terminal_status")?;
    Ok(SubscriptionFacts {
        id: row.try_get("id")?,
        user_id: row.try_get("user_id")?,
        customer_id: row.try_get("customer_id")?,
        product_key: row.try_get("product_key")?,
        claim,
        terminal: terminal
            .map(|t| subscription_status(&t, "terminal_status"))
            .transpose()?,
        current_period_end: secs(row.try_get("current_period_end")?),
        ended_at: secs(row.try_get("ended_at")?),
    })
}

async fn load_subscription(
    db: Db<'_>,
    delta: &SubscriptionFacts,
) -> Result<Option<Row>, StoreError> {
    Ok(db
        .query_opt(
            &format!("SELECT {SUBSCRIPTION_COLUMNS} FROM subscriptions WHERE id = $1 FOR UPDATE"),
            &[(&delta.id, Type::TEXT)],
        )
        .await?)
}

async fn merge_subscription(
    db: Db<'_>,
    delta: SubscriptionFacts,
    row: Option<&Row>,
    users: &mut BTreeSet<String>,
) -> Result<(), StoreError> {
    let mut merged = match row {
        Some(row) => {
            let stored = subscription_from_row(row)?;
            users.extend(stored.user_id.clone());
            stored.merge(delta)
        }
        None => delta,
    };
    if merged.user_id.is_none() {
        merged.user_id = customer_user(db, merged.customer_id.as_ref()).await?;
    }
    users.extend(merged.user_id.clone());
    let claim_at = opt_timestamp(merged.claim.map(|c| c.at))?;
    let period_end = opt_timestamp(merged.current_period_end)?;
    let ended_at = opt_timestamp(merged.ended_at)?;
    let status = merged.status().as_str();
    let claim = merged.claim.map(|c| c.status.as_str());
    let terminal = merged.terminal.map(SubscriptionStatus::as_str);
    let cancel_at_period_end = merged.cancel_at_period_end();
    db.execute(
        "INSERT INTO subscriptions AS s (id, user_id, customer_id, product_key, status,
             status_claim, status_claim_at, terminal_status, current_period_end,
             cancel_at_period_end, ended_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
         ON CONFLICT (id) DO UPDATE SET user_id = $2, customer_id = $3, product_key = $4,
             status = $5, status_claim = $6, status_claim_at = $7, terminal_status = $8,
             current_period_end = $9, cancel_at_period_end = $10, ended_at = $11,
             updated_at = now()",
        &[
            (&merged.id, Type::TEXT),
            (&merged.user_id, Type::TEXT),
            (&merged.customer_id, Type::TEXT),
            (&merged.product_key, Type::TEXT),
            (&status, Type::TEXT),
            (&claim, Type::TEXT),
            (&claim_at, Type::TIMESTAMPTZ),
            (&terminal, Type::TEXT),
            (&period_end, Type::TIMESTAMPTZ),
            (&cancel_at_period_end, Type::BOOL),
            (&ended_at, Type::TIMESTAMPTZ),
        ],
    )
    .await?;
    Ok(())
}

async fn record_abandoned(db: Db<'_>, abandoned: &AbandonedCheckout) -> Result<(), StoreError> {
    let user = match &abandoned.user_id {
        Some(user) => Some(user.as_str().to_owned()),
        None => customer_user(db, abandoned.customer_id.as_ref()).await?,
    };
    let payload = serde_json::json!({
        "checkoutSessionId": abandoned.session_id,
        "productKey": abandoned.product_key,
        "recoveryUrl": abandoned.recovery_url,
    });
    let dedupe_key = format!("checkout_abandoned:{}", abandoned.session_id);
    db.execute(
        "INSERT INTO notifications (kind, user_id, dedupe_key, payload)
         VALUES ('checkout_abandoned', $1, $2, $3)
         ON CONFLICT (dedupe_key) DO NOTHING",
        &[
            (&user, Type::TEXT),
            (&dedupe_key, Type::TEXT),
            (&payload, Type::JSONB),
        ],
    )
    .await?;
    Ok(())
}

/// One user's recomputation, before it is written.
struct Recomputed {
    user: String,
    views: Vec<EntitlementView>,
    /// Entitlements whose stored row differs (or is missing).
    changed: Vec<DerivedEntitlement>,
    /// `(kind, dedupe key, payload)` of the notifications to queue.
    notices: Vec<(&'static str, String, serde_json::Value)>,
    /// Stored keys no source grants any more (a row moved to another user).
    stale: Vec<String>,
}

/// Compares `derived` with the user's stored entitlements (`existing`: key → row and its
/// `updated_at`) at the server's `now`.
fn diff_entitlements(
    user: &str,
    derived: Vec<DerivedEntitlement>,
    mut existing: BTreeMap<String, (DerivedEntitlement, DateTime<Utc>)>,
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
            status: entitlement.status.as_str().to_owned(),
            source: entitlement.source.as_str().to_owned(),
            source_id: entitlement.source_id.clone(),
            expires_at,
            updated_at,
        });
        let kind = match entitlement.status {
            EntitlementStatus::Revoked => Some("entitlement_revoked"),
            EntitlementStatus::Suspended => Some("entitlement_suspended"),
            _ => None,
        };
        let unchanged_status = before
            .as_ref()
            .is_some_and(|(stored, _)| stored.status == entitlement.status);
        if let Some(kind) = kind.filter(|_| !unchanged_status) {
            // Keyed by the source, so the same revocation reached through another event order
            // (or a replay) is queued once.
            let dedupe_key = format!(
                "{kind}:{user}:{}:{}:{}",
                entitlement.key,
                entitlement.source.as_str(),
                entitlement.source_id
            );
            let payload = serde_json::json!({
                "userId": user,
                "entitlementKey": entitlement.key,
                "status": entitlement.status.as_str(),
                "source": entitlement.source.as_str(),
                "sourceId": entitlement.source_id,
            });
            notices.push((kind, dedupe_key, payload));
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
    })
}

fn entitlement_from_row(row: &Row) -> Result<DerivedEntitlement, StoreError> {
    let status: String = row.try_get("status")?;
    let source: String = row.try_get("source")?;
    Ok(DerivedEntitlement {
        key: row.try_get("key")?,
        status: EntitlementStatus::from_column(&status)
            .ok_or(StoreError::Corrupt { column: "status" })?,
        source: match source.as_str() {
            "purchase" => EntitlementSource::Purchase,
            "subscription" => EntitlementSource::Subscription,
            _ => return Err(StoreError::Corrupt { column: "source" }),
        },
        source_id: row.try_get("source_id")?,
        expires_at: secs(row.try_get("expires_at")?),
    })
}

/// Recomputes the entitlements of `users` (user id → applied events that concerned them) from
/// their rows, writes what changed, queues notifications for transitions into
/// `revoked`/`suspended`, bumps each version by the user's event count and returns the new
/// snapshots, sorted by user id. The caller holds the users' advisory locks.
///
/// Set-based: whatever the number of users, the reads are one pipeline of three statements and
/// the writes one pipeline of at most four, so a recomputation costs two round trips.
async fn recompute(
    db: Db<'_>,
    users: &BTreeMap<String, i64>,
) -> Result<Vec<UserSnapshot>, StoreError> {
    let ids: Vec<&str> = users.keys().map(String::as_str).collect();
    let by_users: [Param<'_>; 1] = [(&ids, Type::TEXT_ARRAY)];
    let purchases_sql = format!("SELECT {PURCHASE_COLUMNS} FROM purchases WHERE user_id = ANY($1)");
    let subscriptions_sql =
        format!("SELECT {SUBSCRIPTION_COLUMNS} FROM subscriptions WHERE user_id = ANY($1)");
    let (purchase_rows, subscription_rows, entitlement_rows) = try_join3(
        db.query(&purchases_sql, &by_users),
        db.query(&subscriptions_sql, &by_users),
        db.query(
            "SELECT n.now, e.user_id, e.key, e.status, e.source, e.source_id, e.expires_at,
                    e.updated_at
               FROM (SELECT now() AS now) n
               LEFT JOIN entitlements e ON e.user_id = ANY($1)",
            &by_users,
        ),
    )
    .await?;
    let mut purchases: BTreeMap<String, Vec<PurchaseFacts>> = BTreeMap::new();
    for row in &purchase_rows {
        let (_, facts) = purchase_from_row(row)?;
        if let Some(user) = facts.user_id.clone() {
            purchases.entry(user).or_default().push(facts);
        }
    }
    let mut subscriptions: BTreeMap<String, Vec<SubscriptionFacts>> = BTreeMap::new();
    for row in &subscription_rows {
        let facts = subscription_from_row(row)?;
        if let Some(user) = facts.user_id.clone() {
            subscriptions.entry(user).or_default().push(facts);
        }
    }
    let mut now: DateTime<Utc> = DateTime::UNIX_EPOCH;
    let mut existing: BTreeMap<String, BTreeMap<String, (DerivedEntitlement, DateTime<Utc>)>> =
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
            );
            diff_entitlements(
                user,
                derived,
                existing.remove(user).unwrap_or_default(),
                now,
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    let versions = write_recomputed(db, &recomputed, users).await?;
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
            })
        })
        .collect()
}

/// Writes recomputations in one pipeline; returns each user's new version.
async fn write_recomputed(
    db: Db<'_>,
    recomputed: &[Recomputed],
    users: &BTreeMap<String, i64>,
) -> Result<BTreeMap<String, i64>, StoreError> {
    let mut upsert = EntitlementColumns::default();
    let (mut kinds, mut notice_users, mut dedupe_keys, mut payloads) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut stale_users, mut stale_keys) = (Vec::new(), Vec::new());
    for r in recomputed {
        for e in &r.changed {
            upsert.push(&r.user, e)?;
        }
        for (kind, dedupe_key, payload) in &r.notices {
            kinds.push(*kind);
            notice_users.push(r.user.as_str());
            dedupe_keys.push(dedupe_key.as_str());
            payloads.push(payload);
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
                 updated_at)
             SELECT u, k, st, src, sid, exp, now()
               FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                           $6::timestamptz[]) AS e(u, k, st, src, sid, exp)
             ON CONFLICT (user_id, key) DO UPDATE SET status = EXCLUDED.status,
                 source = EXCLUDED.source, source_id = EXCLUDED.source_id,
                 expires_at = EXCLUDED.expires_at, updated_at = now()",
            &[
                (&upsert.users, Type::TEXT_ARRAY),
                (&upsert.keys, Type::TEXT_ARRAY),
                (&upsert.statuses, Type::TEXT_ARRAY),
                (&upsert.sources, Type::TEXT_ARRAY),
                (&upsert.source_ids, Type::TEXT_ARRAY),
                (&upsert.expires_at, Type::TIMESTAMPTZ_ARRAY),
            ],
        )
        .await
    };
    let inserts = async {
        if kinds.is_empty() {
            return Ok(0);
        }
        db.execute(
            "INSERT INTO notifications (kind, user_id, dedupe_key, payload)
             SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::jsonb[])
             ON CONFLICT (dedupe_key) DO NOTHING",
            &[
                (&kinds, Type::TEXT_ARRAY),
                (&notice_users, Type::TEXT_ARRAY),
                (&dedupe_keys, Type::TEXT_ARRAY),
                (&payloads, Type::JSONB_ARRAY),
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
    let bump_counts: Vec<i64> = users.values().copied().collect();
    let bump_params: [Param<'_>; 2] = [
        (&bump_users, Type::TEXT_ARRAY),
        (&bump_counts, Type::INT8_ARRAY),
    ];
    let bump = db.query(
        "INSERT INTO user_entitlement_versions (user_id, version)
         SELECT * FROM unnest($1::text[], $2::int8[])
         ON CONFLICT (user_id) DO UPDATE
             SET version = user_entitlement_versions.version + EXCLUDED.version
         RETURNING user_id, version",
        &bump_params,
    );
    let (_, _, _, version_rows) = try_join4(upserts, inserts, deletes, bump).await?;
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
}

impl<'a> EntitlementColumns<'a> {
    fn push(&mut self, user: &'a str, e: &'a DerivedEntitlement) -> Result<(), StoreError> {
        self.users.push(user);
        self.keys.push(&e.key);
        self.statuses.push(e.status.as_str());
        self.sources.push(e.source.as_str());
        self.source_ids.push(&e.source_id);
        self.expires_at.push(opt_timestamp(e.expires_at)?);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_ids_are_stable_across_processes() {
        // FNV-1a test vectors: the ids must never change between releases, or two versions
        // running side by side would stop serializing on the same keys.
        assert_eq!(
            lock_id(""),
            i32::from_ne_bytes(0x811c_9dc5_u32.to_ne_bytes())
        );
        assert_eq!(
            lock_id("a"),
            i32::from_ne_bytes(0xe40c_292c_u32.to_ne_bytes())
        );
        assert_ne!(lock_id("user:u1"), lock_id("user:u2"));
    }
}
