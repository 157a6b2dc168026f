//! Postgres I/O around the pure projection: the one way to apply events. [`apply_events`]
//! dedupes a set of events on `processed_events`, merges their facts into the rows,
//! recomputes the affected users' entitlements, bumps their versions and queues
//! notifications — all inside the caller's transaction — and says what became of each event.
//!
//! Invariants:
//! - Nothing here commits: the caller owns the transaction. What this module undoes, it undoes
//!   with its own savepoints, so an event the projection refuses leaves nothing behind, its
//!   `processed_events` row included, and the rest of the set still applies.
//! - Rows only ever hold the join of their facts ([`crate::domain::projection`]), so the final rows do not
//!   depend on the order events arrive in, nor on how they are grouped into sets;
//!   entitlements are always recomputed from the rows.
//! - Serialization: a transaction first takes transaction-scoped advisory locks on the Stripe
//!   objects its events name (customer, session, payment intent, charge, subscription), sorted,
//!   then — once the rows have revealed them — on the users whose entitlements it recomputes,
//!   sorted. Object locks are always all taken before any user lock, so two transactions
//!   cannot wait on each other in a cycle. A user's entitlements are therefore recomputed by
//!   one transaction at a time, and the last to commit saw every earlier commit.
//! - A user's version is bumped in the same transaction as every recomputation of their
//!   entitlements; [`user_snapshot`] reads version and entitlements in one statement.
//! - Failures are sorted in one place, [`StoreError::failure`]: the database being unavailable
//!   fails the whole call (nothing of it may commit); anything else is charged to its event.
//!
//! For callers: run at READ COMMITTED (Postgres' default). Each statement then sees what
//! committed before it, which is what makes "wait for the lock, then read" correct; a
//! REPEATABLE READ snapshot taken before the wait would recompute from stale rows. Two
//! transactions touching the same users in different orders can still deadlock on the user
//! locks; Postgres then aborts one with `40P01`, a [`Failure::Unavailable`]: apply that set
//! again.
//!
//! How: [`merge`] handles any number of events in a fixed number of set-based, pipelined
//! statements, and [`recompute`] any number of users in two. The whole set goes through them at
//! once (five round trips). If any event makes that fail, the set is redone with a savepoint
//! per event, so the failure is charged to its own event, and the users are recomputed once
//! after the last; if even that recomputation fails (a stored row the projection cannot read),
//! each event is recomputed inside its own savepoint.
//!
//! Direction: the store is an adapter of [`crate::domain`] alone (rows ↔ facts); the message
//! bodies it writes into the outbox come from [`crate::domain::message`], never from the API or
//! the outbox modules above it.

mod columns;
pub mod members;
mod merge;
pub mod offers;
mod recompute;
mod registry;

use crate::domain::events::CheckoutMode;
use crate::domain::events::{Event, SubscriptionStatus};
use crate::domain::projection::{
    EntitlementSource, EntitlementStatus, FeatureClaim, FeatureFacts, GrantSource, PriceClaim,
    Product, ProductStatus, PurchaseFacts, RefundFact, SoldAmount, StatusClaim, SubscriptionFacts,
};
use crate::domain::view::{EntitlementView, UserSnapshot};
use chrono::{DateTime, Utc};
use deadpool_postgres::StatementCache;
use futures_util::future::try_join;
use shared::ids::UserId;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{GenericClient, Row, Statement, Transaction};

/// What became of one event. The store yields every variant but [`Outcome::Busy`],
/// [`Outcome::Waiting`] and [`Outcome::NeedsStripe`], which the consumer sets before asking the
/// store.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Applied now (its effects, possibly none), with the snapshots of the users whose
    /// entitlements it concerned.
    Applied(Vec<UserSnapshot>),
    /// Applied before (`processed_events` has it, or it repeats an earlier event of the set).
    Replay,
    /// Can never be applied: the event or the data it leads to is refused.
    Rejected(String),
    /// Cannot be applied yet; retrying later may succeed. Nothing of it was kept.
    Later(String),
    /// Another consumer holds the event's claim right now.
    Busy,
    /// An outside service the event needs (Stripe, to read a session's line items) cannot
    /// answer now: it waits and is tried again, never parked for it and never counting an
    /// attempt. Nothing of it was kept.
    Waiting(String),
    /// Needs a Stripe read before it can be applied (a session created elsewhere): moved to the
    /// Stripe queue, which the completions consume at the rate Stripe allows. Nothing of it was
    /// kept.
    NeedsStripe,
}

/// How a failure is handled. [`StoreError::failure`] is the one place that decides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The database is unreachable, or gave up on the transaction (connection loss, timeout,
    /// deadlock, serialization failure, shutdown): the whole set must be applied again later.
    Unavailable,
    /// This event cannot be applied yet (an error the server reported that is neither an
    /// outage nor refused data): retry it later.
    Later,
    /// This event can never be applied: data the database or the projection refuses.
    Rejected,
}

/// Why applying events, or reading a snapshot, failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A database error: the database is unavailable, or (SQLSTATE classes 22 and 23) it
    /// refuses the data.
    #[error("database error: {0}")]
    Db(#[from] tokio_postgres::Error),
    /// No connection could be had from the pool in time.
    #[error("postgres unavailable: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    /// The event carries a timestamp Postgres cannot store.
    #[error("timestamp {0} is out of range")]
    InvalidTimestamp(i64),
    /// A stored value the projection does not recognise (a schema/code mismatch).
    #[error("unexpected value in column `{column}`")]
    Corrupt { column: &'static str },
}

impl StoreError {
    /// How this failure is handled; see [`Failure`].
    #[must_use]
    pub fn failure(&self) -> Failure {
        match self {
            Self::Pool(_) => Failure::Unavailable,
            Self::Db(error) if refused_data(error).is_some() => Failure::Rejected,
            Self::Db(error) if unavailable(error) => Failure::Unavailable,
            // Anything else the server says (an aborted transaction reported by a pipelined
            // statement instead of the one that failed, a schema mismatch…) is charged to the
            // event, to be retried: the set is redone event by event.
            Self::Db(_) => Failure::Later,
            Self::InvalidTimestamp(_) | Self::Corrupt { .. } => Failure::Rejected,
        }
    }

    /// A one-line reason for logs and the dead-letter header, without driver detail.
    #[must_use]
    pub fn reason(&self) -> String {
        match self {
            Self::Db(error) => refused_data(error).unwrap_or_else(|| self.to_string()),
            other => other.to_string(),
        }
    }

    fn outcome(&self) -> Outcome {
        match self.failure() {
            Failure::Rejected => Outcome::Rejected(self.reason()),
            Failure::Later | Failure::Unavailable => Outcome::Later(self.reason()),
        }
    }
}

/// `Some(reason)` when the database refused the data itself (SQLSTATE classes 22 and 23): no
/// retry of the same event can succeed.
fn refused_data(error: &tokio_postgres::Error) -> Option<String> {
    let code = error.code()?.code();
    (code.starts_with("22") || code.starts_with("23")).then(|| {
        let constraint = error
            .as_db_error()
            .and_then(|d| d.constraint())
            .map(|c| format!(" ({c})"))
            .unwrap_or_default();
        format!("database rejected the event: SQLSTATE {code}{constraint}")
    })
}

/// True when the database itself is unavailable or gave up on the transaction: no SQLSTATE
/// (connection closed, I/O, timeout) or classes 08 (connection), 40 (deadlock, serialization),
/// 53 (insufficient resources), 55 (lock not available), 57 (shutdown, cancel), 58 (system) and
/// XX (internal).
fn unavailable(error: &tokio_postgres::Error) -> bool {
    error.code().is_none_or(|code| {
        ["08", "40", "53", "55", "57", "58", "XX"]
            .iter()
            .any(|class| code.code().starts_with(class))
    })
}

/// Namespace of the projection's advisory locks (the two-key form keeps them apart from any
/// single-key lock other code takes).
const LOCK_CLASS: i32 = 0x454e_5431;

/// The `purchases` columns [`purchase_facts`] reads.
pub const PURCHASE_COLUMNS: &str = "id, user_id, customer_id, product_key, price_id, \
     checkout_session_id, payment_intent_id, charge_id, amount_paid_cents, currency, paid, purchased_at, \
     payment_failed, refund_amount_cents, stripe_refund_id, refund_reason, fully_refunded, \
     refunded_at, disputes, duplicate, unknown_to_stripe, invoice_id, subscription_id";

/// The `purchases` rows that are purchases of their own: not a subscription's payment (the SQL
/// twin of [`PurchaseFacts::is_invoice_payment`]).
pub const A_PURCHASE: &str =
    "subscription_id IS NULL AND (invoice_id IS NULL OR checkout_session_id IS NOT NULL)";

/// The `subscriptions` columns [`subscription_facts`] reads.
pub const SUBSCRIPTION_COLUMNS: &str = "id, user_id, customer_id, product_key, price_id, \
     price_claim_at, quantity, status_claim, status_claim_at, cancel_at_period_end, terminal_status, current_period_end, ended_at, \
     recovered_at, past_due_claims";

/// The facts of a `purchases` row (selected with [`PURCHASE_COLUMNS`]).
///
/// # Errors
/// [`StoreError`] on a missing column or an unknown stored value.
pub fn purchase_facts(row: &Row) -> Result<PurchaseFacts, StoreError> {
    purchase_from_row(row).map(|(_, facts)| facts)
}

/// The facts of a `subscriptions` row (selected with [`SUBSCRIPTION_COLUMNS`]).
///
/// # Errors
/// [`StoreError`] on a missing column or an unknown stored value.
pub fn subscription_facts(row: &Row) -> Result<SubscriptionFacts, StoreError> {
    subscription_from_row(row)
}

const FEATURE_COLUMNS: &str = "customer_id, user_id, lookup_keys, claim_at";

fn feature_from_row(row: &Row) -> Result<FeatureFacts, StoreError> {
    let at: DateTime<Utc> = row.try_get("claim_at")?;
    Ok(FeatureFacts {
        customer_id: row.try_get("customer_id")?,
        user_id: row.try_get("user_id")?,
        claim: Some(FeatureClaim {
            at: at.timestamp(),
            lookup_keys: row.try_get("lookup_keys")?,
        }),
    })
}

/// The `products` columns [`product_from_row`] reads.
/// The retired prices and amounts are those of its history (`product_prices`, `product_amounts`)
/// other than the current ones.
pub const PRODUCT_COLUMNS: &str = "key, title, price_id, amount_cents, currency, mode, \
     grants, feature_lookup_key, creator_id, platform_fee_bps, organization_fee_bps, status, \
     ARRAY(SELECT h.price_id FROM product_prices h WHERE h.product_key = products.key \
            AND h.price_id IS DISTINCT FROM products.price_id ORDER BY h.price_id) \
       AS retired_price_ids, \
     ARRAY(SELECT a.amount_cents FROM product_amounts a WHERE a.product_key = products.key \
            AND (a.amount_cents, a.currency) IS DISTINCT FROM \
                (products.amount_cents, products.currency) \
            ORDER BY a.amount_cents, a.currency) AS retired_amounts_cents, \
     ARRAY(SELECT a.currency FROM product_amounts a WHERE a.product_key = products.key \
            AND (a.amount_cents, a.currency) IS DISTINCT FROM \
                (products.amount_cents, products.currency) \
            ORDER BY a.amount_cents, a.currency) AS retired_amounts_currency";

/// A `products` row (selected with [`PRODUCT_COLUMNS`]).
///
/// # Errors
/// [`StoreError::Db`] on a missing column, [`StoreError::Corrupt`] on an unknown mode or status.
pub fn product_from_row(row: &Row) -> Result<Product, StoreError> {
    let mode = CheckoutMode::from_stripe(row.try_get("mode")?)
        .ok_or(StoreError::Corrupt { column: "mode" })?;
    let status = ProductStatus::from_column(row.try_get("status")?)
        .ok_or(StoreError::Corrupt { column: "status" })?;
    Ok(Product {
        key: row.try_get("key")?,
        title: row.try_get("title")?,
        price_id: row.try_get("price_id")?,
        amount_cents: row.try_get("amount_cents")?,
        currency: row.try_get("currency")?,
        mode,
        grants: row.try_get("grants")?,
        feature_lookup_key: row.try_get("feature_lookup_key")?,
        creator_id: row.try_get("creator_id")?,
        platform_fee_bps: i64::from(row.try_get::<_, i32>("platform_fee_bps")?),
        organization_fee_bps: i64::from(row.try_get::<_, i32>("organization_fee_bps")?),
        status,
        retired_price_ids: row.try_get("retired_price_ids")?,
        retired_amounts: row
            .try_get::<_, Vec<i64>>("retired_amounts_cents")?
            .into_iter()
            .zip(row.try_get::<_, Vec<String>>("retired_amounts_currency")?)
            .map(|(amount_cents, currency)| SoldAmount {
                amount_cents,
                currency,
            })
            .collect(),
    })
}

/// Applies `events` inside the caller's transaction and returns what became of each, in input
/// order. `statements` is the connection's statement cache, when it has one: each statement is
/// then prepared once per connection. See the module documentation for how.
///
/// # Errors
/// A [`StoreError`] whose [`failure`](StoreError::failure) is [`Failure::Unavailable`]: the
/// transaction is unusable, roll it back and apply the set again later. Every other failure is
/// charged to its event as [`Outcome::Rejected`] or [`Outcome::Later`].
pub async fn apply_events(
    tx: &Transaction<'_>,
    statements: Option<&StatementCache>,
    events: &[&Event],
) -> Result<Vec<Outcome>, StoreError> {
    if events.is_empty() {
        return Ok(Vec::new());
    }
    let db = Db { tx, statements };
    // The savepoint is pipelined with the set's first statement.
    let whole = try_join(
        async { Ok::<_, StoreError>(tx.batch_execute("SAVEPOINT apply_set").await?) },
        all_at_once(db, events),
    )
    .await;
    let error = match whole {
        Ok(((), outcomes)) => return Ok(outcomes),
        Err(error) if error.failure() == Failure::Unavailable => return Err(error),
        Err(error) => error,
    };
    metrics::counter!("worker_batch_fallbacks_total").increment(1);
    tracing::debug!(%error, events = events.len(), "set failed as a whole; applying it event by event");
    tx.batch_execute("ROLLBACK TO SAVEPOINT apply_set").await?;
    match one_by_one(db, events, RecomputeAt::End).await {
        Err(error) if error.failure() != Failure::Unavailable => {
            // Which event brought the unreadable row in is unknown: recompute after each.
            tracing::warn!(%error, events = events.len(), "recomputation failed; recomputing event by event");
            tx.batch_execute("ROLLBACK TO SAVEPOINT apply_set").await?;
            one_by_one(db, events, RecomputeAt::EachEvent).await
        }
        other => other,
    }
}

/// [`apply_events`] in a transaction of its own on a pooled connection (with its statement
/// cache), committed before returning.
///
/// # Errors
/// As [`apply_events`]; nothing is committed then.
pub async fn apply_and_commit(
    pool: &deadpool_postgres::Pool,
    events: &[&Event],
) -> Result<Vec<Outcome>, StoreError> {
    let mut client = pool.get().await?;
    let statements = std::sync::Arc::clone(&client.statement_cache);
    let tx = client.transaction().await?;
    let outcomes = apply_events(&tx, Some(&statements), events).await?;
    tx.commit().await?;
    Ok(outcomes)
}

/// The whole set in one go: merge, then recompute every concerned user.
async fn all_at_once(db: Db<'_>, events: &[&Event]) -> Result<Vec<Outcome>, StoreError> {
    let merged = merge::merge(db, events).await?;
    let snapshots = recompute_users(db, concerns(events, &merged.users)).await?;
    Ok(merged.outcomes(&snapshots))
}

/// When [`one_by_one`] recomputes the users.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RecomputeAt {
    /// Once, after the last event: every user lock is taken after every object lock.
    End,
    /// Inside each event's savepoint, so a failing recomputation is charged to its event.
    EachEvent,
}

/// A savepoint per event: an event that fails is rolled back alone and charged its failure.
async fn one_by_one(
    db: Db<'_>,
    events: &[&Event],
    recompute_at: RecomputeAt,
) -> Result<Vec<Outcome>, StoreError> {
    let mut outcomes = Vec::with_capacity(events.len());
    // The users each kept event concerns, when recomputed at the end.
    let mut kept: Vec<(usize, BTreeSet<String>)> = Vec::new();
    let mut savepoint_open = false;
    for event in events {
        // Releasing the previous savepoint and opening the next are pipelined with the
        // event's first statement.
        let begin = if savepoint_open {
            "RELEASE SAVEPOINT apply_event; SAVEPOINT apply_event"
        } else {
            "SAVEPOINT apply_event"
        };
        let attempt = try_join(
            async { Ok::<_, StoreError>(db.tx.batch_execute(begin).await?) },
            async {
                let merged = merge::merge(db, std::slice::from_ref(event)).await?;
                match recompute_at {
                    RecomputeAt::End => Ok((merged, None)),
                    RecomputeAt::EachEvent => {
                        let concerned = concerns(std::slice::from_ref(event), &merged.users);
                        let snapshots = recompute_users(db, concerned).await?;
                        Ok((merged, Some(snapshots)))
                    }
                }
            },
        )
        .await;
        savepoint_open = true;
        match attempt {
            Ok(((), (merged, Some(snapshots)))) => outcomes.extend(merged.outcomes(&snapshots)),
            Ok(((), (mut merged, None))) => {
                if merged.fresh[0] {
                    kept.push((outcomes.len(), merged.users.swap_remove(0)));
                    outcomes.push(Outcome::Applied(Vec::new()));
                } else {
                    outcomes.push(Outcome::Replay);
                }
            }
            Err(error) if error.failure() == Failure::Unavailable => return Err(error),
            Err(error) => {
                // Undoes this event's writes, its processed_events row included.
                db.tx
                    .batch_execute("ROLLBACK TO SAVEPOINT apply_event")
                    .await?;
                tracing::debug!(event_id = %event.id, %error, "event not applied");
                outcomes.push(error.outcome());
            }
        }
    }
    if !kept.is_empty() {
        // An event's outcome index is its index in `events`.
        let mut concerned = Vec::new();
        for (i, users) in &kept {
            concerned.extend(users.iter().map(|u| (u, Some(events[*i]))));
        }
        let snapshots = recompute_users(db, concerned).await?;
        let by_user: HashMap<&str, &UserSnapshot> =
            snapshots.iter().map(|s| (s.user_id.as_str(), s)).collect();
        for (index, users) in kept {
            outcomes[index] = Outcome::Applied(snapshots_of(&users, &by_user));
        }
    }
    Ok(outcomes)
}

/// The users each event concerns, paired with the event (`users[i]` belongs to `events[i]`).
fn concerns<'a>(
    events: &'a [&'a Event],
    users: &'a [BTreeSet<String>],
) -> Vec<(&'a String, Option<&'a Event>)> {
    // Collected, not lazy: a closure-laden iterator held across an await makes the future
    // fail to be `Send` for every lifetime.
    let mut pairs = Vec::new();
    for (event, users) in events.iter().zip(users) {
        pairs.extend(users.iter().map(|u| (u, Some(*event))));
    }
    pairs
}

/// Locks and recomputes every user named (once per event that concerned them: the version
/// grows by that count; the last such event is the change's cause), returning the new
/// snapshots sorted by user id.
async fn recompute_users<'u>(
    db: Db<'_>,
    concerned: Vec<(&'u String, Option<&'u Event>)>,
) -> Result<Vec<UserSnapshot>, StoreError> {
    let mut bumps: BTreeMap<String, recompute::Bump<'u>> = BTreeMap::new();
    for (user, event) in concerned {
        let bump = bumps.entry(user.clone()).or_insert(recompute::Bump {
            count: 0,
            cause: event,
            announce: false,
        });
        bump.count += 1;
        bump.cause = event;
    }
    lock_and_recompute(db, &bumps).await
}

/// Takes the user locks of `bumps` and recomputes them.
async fn lock_and_recompute(
    db: Db<'_>,
    bumps: &BTreeMap<String, recompute::Bump<'_>>,
) -> Result<Vec<UserSnapshot>, StoreError> {
    if bumps.is_empty() {
        return Ok(Vec::new());
    }
    let user_keys = bumps.keys().map(|u| format!("user:{u}")).collect();
    // The lock statement goes first in the pipeline: every read runs under the locks.
    let ((), snapshots) = try_join(lock(db, user_keys), recompute::recompute(db, bumps)).await?;
    Ok(snapshots)
}

/// Re-derives the stored entitlements of `user` (or of every user with a purchase, a
/// subscription or an entitlement) from their rows and the current product registry, through
/// the same recomputation events use, in transactions of up to 500 users each; versions are
/// bumped and marked for the cache healer as for any change. Returns the number of users.
///
/// # Errors
/// [`StoreError`] when the database fails; the users of committed chunks stay recomputed.
pub async fn recompute_stored(
    pool: &deadpool_postgres::Pool,
    user: Option<&UserId>,
) -> Result<usize, StoreError> {
    let users: Vec<String> = match user {
        Some(user) => vec![user.as_str().to_owned()],
        None => {
            let client = pool.get().await?;
            client
                .query(
                    "SELECT user_id FROM purchases WHERE user_id IS NOT NULL
                     UNION SELECT user_id FROM subscriptions WHERE user_id IS NOT NULL
                     UNION SELECT user_id FROM entitlements
                     ORDER BY 1",
                    &[],
                )
                .await?
                .iter()
                .map(|r| r.try_get(0))
                .collect::<Result<_, _>>()?
        }
    };
    for chunk in users.chunks(500) {
        let mut client = pool.get().await?;
        let statements = std::sync::Arc::clone(&client.statement_cache);
        let tx = client.transaction().await?;
        let db = Db {
            tx: &tx,
            statements: Some(&statements),
        };
        recompute_users(db, chunk.iter().map(|u| (u, None)).collect()).await?;
        tx.commit().await?;
    }
    Ok(users.len())
}

/// The snapshots of `users`, from `by_user`.
fn snapshots_of(
    users: &BTreeSet<String>,
    by_user: &HashMap<&str, &UserSnapshot>,
) -> Vec<UserSnapshot> {
    users
        .iter()
        .filter_map(|u| by_user.get(u.as_str()).map(|s| (*s).clone()))
        .collect()
}

/// A user's version and entitlement rows. One statement, one MVCC snapshot: the version always
/// matches the entitlements read.
const SNAPSHOT_SQL: &str = "SELECT v.version, v.organizations, e.key, e.status, e.source,
        e.source_id, e.expires_at, e.updated_at, e.sources
   FROM (SELECT COALESCE((SELECT version FROM user_entitlement_versions
                           WHERE user_id = $1), 0) AS version,
                (SELECT COALESCE(jsonb_agg(jsonb_build_object('organizationId', organization_id,
                            'role', role, 'seat', seat) ORDER BY organization_id), '[]')
                   FROM organization_members WHERE user_id = $1 AND NOT removed)
                    AS organizations) v
   LEFT JOIN entitlements e ON e.user_id = $1
  ORDER BY e.key";

/// Reads a user's current entitlements and version (0 and no entitlements for an unknown user).
///
/// # Errors
/// [`StoreError::Db`] when the query fails, [`StoreError::Corrupt`] on an unexpected row.
pub async fn user_snapshot(
    client: &impl GenericClient,
    user: &UserId,
) -> Result<UserSnapshot, StoreError> {
    let rows = client
        .query_typed(SNAPSHOT_SQL, &[(&user.as_str(), Type::TEXT)])
        .await?;
    snapshot_of_rows(user, rows)
}

/// [`user_snapshot`] through the pooled connection's statement cache, so the statement is parsed
/// once per connection instead of once per read (the API's miss path).
///
/// # Errors
/// As [`user_snapshot`].
pub async fn cached_user_snapshot(
    client: &deadpool_postgres::Client,
    user: &UserId,
) -> Result<UserSnapshot, StoreError> {
    let statement = client
        .prepare_typed_cached(SNAPSHOT_SQL, &[Type::TEXT])
        .await?;
    let rows = client.query(&statement, &[&user.as_str()]).await?;
    snapshot_of_rows(user, rows)
}

fn snapshot_of_rows(
    user: &UserId,
    rows: Vec<tokio_postgres::Row>,
) -> Result<UserSnapshot, StoreError> {
    let mut snapshot = UserSnapshot {
        user_id: user.as_str().to_owned(),
        version: 0,
        entitlements: Vec::new(),
        organizations: Vec::new(),
    };
    for row in rows {
        snapshot.version = row.try_get(0)?;
        snapshot.organizations =
            serde_json::from_value(row.try_get(1)?).map_err(|_| StoreError::Corrupt {
                column: "organization_members",
            })?;
        if let Some(key) = row.try_get::<_, Option<String>>(2)? {
            snapshot.entitlements.push(EntitlementView {
                key,
                status: entitlement_status(row.try_get(3)?)?,
                source: entitlement_source(row.try_get(4)?)?,
                source_id: row.try_get(5)?,
                expires_at: row.try_get(6)?,
                updated_at: row.try_get(7)?,
                sources: grant_sources(row.try_get(8)?)?,
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
    let disputes: serde_json::Value = row.try_get("disputes")?;
    Ok((
        row.try_get("id")?,
        PurchaseFacts {
            checkout_session_id: row.try_get("checkout_session_id")?,
            payment_intent_id: row.try_get("payment_intent_id")?,
            charge_id: row.try_get("charge_id")?,
            user_id: row.try_get("user_id")?,
            customer_id: row.try_get("customer_id")?,
            product_key: row.try_get("product_key")?,
            price_id: row.try_get("price_id")?,
            amount_cents: row.try_get("amount_paid_cents")?,
            currency: row.try_get("currency")?,
            paid: row.try_get("paid")?,
            paid_at: secs(row.try_get("purchased_at")?),
            failed: row.try_get("payment_failed")?,
            refund,
            fully_refunded: row.try_get("fully_refunded")?,
            refunded_at: secs(row.try_get("refunded_at")?),
            disputes: columns::disputes_from_column(&disputes)?,
            unknown_to_stripe: row.try_get("unknown_to_stripe")?,
            invoice_id: row.try_get("invoice_id")?,
            subscription_id: row.try_get("subscription_id")?,
        },
    ))
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
    let price_id: Option<String> = row.try_get("price_id")?;
    let price_at: Option<DateTime<Utc>> = row.try_get("price_claim_at")?;
    let price = match (price_id, price_at) {
        (Some(price_id), Some(at)) => Some(PriceClaim {
            at: at.timestamp(),
            price_id,
            quantity: row.try_get("quantity")?,
        }),
        _ => None,
    };
    Ok(SubscriptionFacts {
        id: row.try_get("id")?,
        user_id: row.try_get("user_id")?,
        customer_id: row.try_get("customer_id")?,
        product_key: row.try_get("product_key")?,
        price,
        claim,
        terminal: terminal
            .map(|t| subscription_status(&t, "terminal_status"))
            .transpose()?,
        current_period_end: secs(row.try_get("current_period_end")?),
        ended_at: secs(row.try_get("ended_at")?),
        recovered_at: secs(row.try_get("recovered_at")?),
        past_due_claims: row
            .try_get::<_, Vec<DateTime<Utc>>>("past_due_claims")?
            .iter()
            .map(DateTime::timestamp)
            .collect(),
    })
}

/// The `entitlements.sources` column.
fn grant_sources(raw: serde_json::Value) -> Result<Vec<GrantSource>, StoreError> {
    serde_json::from_value(raw).map_err(|_| StoreError::Corrupt { column: "sources" })
}

fn entitlement_status(raw: &str) -> Result<EntitlementStatus, StoreError> {
    EntitlementStatus::from_column(raw).ok_or(StoreError::Corrupt { column: "status" })
}

fn entitlement_source(raw: &str) -> Result<EntitlementSource, StoreError> {
    EntitlementSource::from_column(raw).ok_or(StoreError::Corrupt { column: "source" })
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
