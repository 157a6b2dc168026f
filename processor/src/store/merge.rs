//! Events merged into the rows as a set: deduplicated on `processed_events`, their facts joined
//! with the stored rows and written back, with a fixed number of set-based statements whatever
//! the number of events.
//!
//! Any grouping of events gives the same rows: the join itself is the domain's
//! ([`crate::domain::fold`]); this module reads the rows it needs and writes what it returns.
//! (`tests/store_batch.rs` checks it against Postgres.)
//!
//! Invariants:
//! - All or nothing: on any error the caller rolls back to its savepoint. Nothing here commits.
//! - Every object lock of the set is taken at once, sorted, in the first pipeline, before any
//!   user lock (those are the recomputation's).
//! - The `processed_events` rows are inserted in the first statement; an event whose row
//!   existed (or that repeats an earlier id of the set) is a replay and contributes nothing.
//!
//! Round trips: dedupe and object locks; links and reads; writes.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use futures_util::future::{try_join, try_join_all, try_join5};
use tokio_postgres::Row;
use tokio_postgres::types::Type;

use super::columns::{PurchaseColumns, SubscriptionColumns, purchase_unnest};
use super::{
    Db, FEATURE_COLUMNS, Outcome, PURCHASE_COLUMNS, Param, SUBSCRIPTION_COLUMNS, StoreError,
    feature_from_row, lock, opt_timestamp, purchase_from_row, registry, snapshots_of,
    subscription_from_row,
};
use crate::domain::events::{Event, SubscriptionStatus};
use crate::domain::fold::{self, Purchases};
use crate::domain::message::Notice;
use crate::domain::offer::CheckoutOffer;
use crate::domain::projection::{
    self, AbandonedCheckout, FeatureFacts, Plan, PurchaseFacts, Registry, SubscriptionFacts,
};
use crate::domain::view::UserSnapshot;

/// What merging found, per event in input order.
pub(super) struct Merged {
    /// Whether the event is new: its `processed_events` row was inserted here.
    pub(super) fresh: Vec<bool>,
    /// The users whose entitlements each event concerns (none for a replay).
    pub(super) users: Vec<BTreeSet<String>>,
}

impl Merged {
    /// Each event's outcome, given the recomputed snapshots of its users.
    pub(super) fn outcomes(&self, snapshots: &[UserSnapshot]) -> Vec<Outcome> {
        let by_user: HashMap<&str, &UserSnapshot> =
            snapshots.iter().map(|s| (s.user_id.as_str(), s)).collect();
        self.fresh
            .iter()
            .zip(&self.users)
            .map(|(fresh, users)| {
                if *fresh {
                    Outcome::Applied(snapshots_of(users, &by_user))
                } else {
                    Outcome::Replay
                }
            })
            .collect()
    }
}

type Pending<'a> =
    Pin<Box<dyn Future<Output = Result<Vec<Row>, tokio_postgres::Error>> + Send + 'a>>;

/// Merges `events` into the rows in the caller's transaction. See the module documentation.
///
/// # Errors
/// Any [`StoreError`]: the caller rolls back to its savepoint.
pub(super) async fn merge(db: Db<'_>, events: &[&Event]) -> Result<Merged, StoreError> {
    let plans: Vec<Plan> = events.iter().map(|e| projection::plan(e)).collect();
    let fresh = dedupe_and_lock(db, events, &plans).await?;

    // The facts of the fresh events.
    let mut links: Vec<(&str, &str, Vec<usize>)> = Vec::new();
    let mut purchase_deltas: Vec<(usize, &PurchaseFacts)> = Vec::new();
    let mut subscription_deltas: Vec<(usize, &SubscriptionFacts)> = Vec::new();
    let mut abandoned = Vec::new();
    let mut feature_deltas: Vec<(usize, &FeatureFacts)> = Vec::new();
    let mut customers: BTreeSet<&str> = BTreeSet::new();
    for (i, plan) in plans.iter().enumerate().filter(|(i, _)| fresh[*i]) {
        if let Some(link) = &plan.link {
            customers.insert(&link.customer_id);
            // The first link of a customer wins, as in the table.
            match links.iter_mut().find(|(c, _, _)| *c == link.customer_id) {
                Some((_, _, owners)) => owners.push(i),
                None => links.push((&link.customer_id, link.user_id.as_str(), vec![i])),
            }
        }
        if let Some(delta) = &plan.purchase {
            customers.extend(delta.customer_id.as_deref());
            purchase_deltas.push((i, delta));
        }
        if let Some(delta) = &plan.subscription {
            customers.extend(delta.customer_id.as_deref());
            subscription_deltas.push((i, delta));
        }
        if let Some(a) = &plan.abandoned {
            customers.extend(a.customer_id.as_deref());
            abandoned.push(a);
        }
        if let Some(delta) = &plan.features {
            customers.insert(&delta.customer_id);
            feature_deltas.push((i, delta));
        }
    }

    let reads = read_state(
        db,
        &links,
        &purchase_deltas,
        &subscription_deltas,
        &feature_deltas,
        &abandoned,
        &customers,
    )
    .await?;
    let mut owners = reads.customer_users;
    resolve_missing_customers(
        db,
        &reads.purchase_rows,
        &reads.subscription_rows,
        &mut owners,
    )
    .await?;
    for (customer, user, _) in &links {
        if let Some(kept) = owners.get(*customer).filter(|kept| kept != user) {
            tracing::warn!(customer_id = %customer, kept_user = %kept, refused_user = %user,
                "customer already linked to another user");
        }
    }

    // users[i]: the users whose entitlements event i concerns.
    let mut users: Vec<BTreeSet<String>> = vec![BTreeSet::new(); events.len()];
    let stored_purchases = reads
        .purchase_rows
        .iter()
        .map(purchase_from_row)
        .collect::<Result<Vec<_>, _>>()?;
    let stored_subscriptions = reads
        .subscription_rows
        .iter()
        .map(subscription_from_row)
        .collect::<Result<Vec<_>, _>>()?;
    let stored_features = reads
        .feature_rows
        .iter()
        .map(feature_from_row)
        .collect::<Result<Vec<_>, _>>()?;
    let purchases = fold::purchases(stored_purchases, &purchase_deltas, &owners, &mut users);
    let subscriptions = fold::subscriptions(
        stored_subscriptions,
        &subscription_deltas,
        &owners,
        &mut users,
    );
    let features = fold::features(stored_features, &feature_deltas, &owners, &mut users);
    count_unmatched(&purchases, &subscriptions, &reads.registry);
    let notices = fold::abandoned_notices(&abandoned, &owners, &reads.offers, &reads.registry);
    let new_links: Vec<(&str, &str)> = links
        .iter()
        .filter(|(c, _, _)| reads.new_links.contains(*c))
        .map(|(c, u, _)| (*c, *u))
        .collect();

    let attached = write_state(
        db,
        &new_links,
        Writes {
            purchases: &purchases,
            subscriptions: &subscriptions,
            features: &features,
            notices: &notices,
        },
        &reads.registry,
    )
    .await?;
    for (customer, user, owners) in &links {
        if attached.contains(*customer) {
            for &i in owners {
                users[i].insert((*user).to_owned());
            }
        }
    }

    Ok(Merged { fresh, users })
}

/// Inserts every event's `processed_events` row and takes every object lock, in one pipeline;
/// returns which events are fresh.
async fn dedupe_and_lock(
    db: Db<'_>,
    events: &[&Event],
    plans: &[Plan],
) -> Result<Vec<bool>, StoreError> {
    let ids: Vec<&str> = events.iter().map(|e| e.id.as_str()).collect();
    let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
    let created: Vec<Option<DateTime<Utc>>> = events
        .iter()
        .map(|e| DateTime::from_timestamp(e.created, 0))
        .collect();
    let params: [Param<'_>; 3] = [
        (&ids, Type::TEXT_ARRAY),
        (&types, Type::TEXT_ARRAY),
        (&created, Type::TIMESTAMPTZ_ARRAY),
    ];
    let keys = plans.iter().flat_map(|p| p.lock_keys()).collect();
    let (inserted, ()) = try_join(
        async {
            Ok(db
                .query(
                    "INSERT INTO processed_events (event_id, event_type, event_created)
                     SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[])
                     ON CONFLICT (event_id) DO NOTHING
                     RETURNING event_id",
                    &params,
                )
                .await?)
        },
        lock(db, keys),
    )
    .await?;
    let mut new: HashSet<String> = inserted
        .iter()
        .map(|row| row.try_get(0))
        .collect::<Result<_, _>>()?;
    // `remove`: a repeated id is fresh at its first occurrence only.
    Ok(ids.iter().map(|id| new.remove(*id)).collect())
}

/// What the batch reads before merging.
struct State {
    /// Customers whose link this batch inserted.
    new_links: HashSet<String>,
    purchase_rows: Vec<Row>,
    subscription_rows: Vec<Row>,
    /// customer → user, after the batch's links.
    customer_users: HashMap<String, String>,
    /// The product registry.
    registry: Arc<Registry>,
    /// The stored Stripe feature rows of the deltas' customers.
    feature_rows: Vec<Row>,
    /// What this service offered at the abandoned sessions it created, by session id.
    offers: Vec<CheckoutOffer>,
}

/// One pipeline: the links inserted first (so the customer lookup sees them), then the purchase
/// rows sharing an id with a delta, the subscription rows, and the customers' users.
async fn read_state(
    db: Db<'_>,
    links: &[(&str, &str, Vec<usize>)],
    purchase_deltas: &[(usize, &PurchaseFacts)],
    subscription_deltas: &[(usize, &SubscriptionFacts)],
    feature_deltas: &[(usize, &FeatureFacts)],
    abandoned: &[&AbandonedCheckout],
    customers: &BTreeSet<&str>,
) -> Result<State, StoreError> {
    let abandoned_sessions: Vec<&str> = abandoned.iter().map(|a| a.session_id.as_str()).collect();
    let feature_customers: Vec<&str> = feature_deltas
        .iter()
        .map(|(_, d)| d.customer_id.as_str())
        .collect();
    let feature_params: [Param<'_>; 1] = [(&feature_customers, Type::TEXT_ARRAY)];
    let features_sql = format!(
        "SELECT {FEATURE_COLUMNS} FROM stripe_features WHERE customer_id = ANY($1) FOR UPDATE"
    );
    let link_customers: Vec<&str> = links.iter().map(|(c, _, _)| *c).collect();
    let link_users: Vec<&str> = links.iter().map(|(_, u, _)| *u).collect();
    let ids = |f: fn(&PurchaseFacts) -> Option<&String>| -> Vec<&str> {
        purchase_deltas
            .iter()
            .filter_map(|(_, d)| f(d).map(String::as_str))
            .collect()
    };
    let sessions = ids(|d| d.checkout_session_id.as_ref());
    let intents = ids(|d| d.payment_intent_id.as_ref());
    let charges = ids(|d| d.charge_id.as_ref());
    let invoices = ids(|d| d.invoice_id.as_ref());
    let subscription_ids: Vec<&str> = subscription_deltas
        .iter()
        .map(|(_, d)| d.id.as_str())
        .collect();
    let customer_ids: Vec<&str> = customers.iter().copied().collect();
    let link_params: [Param<'_>; 2] = [
        (&link_customers, Type::TEXT_ARRAY),
        (&link_users, Type::TEXT_ARRAY),
    ];
    let purchase_params: [Param<'_>; 4] = [
        (&sessions, Type::TEXT_ARRAY),
        (&intents, Type::TEXT_ARRAY),
        (&charges, Type::TEXT_ARRAY),
        (&invoices, Type::TEXT_ARRAY),
    ];
    // The stored purchases sharing an id with a delta ($1 sessions, $2 intents, $3 charges,
    // $4 invoices).
    const SHARING: &str = "checkout_session_id = ANY($1) OR payment_intent_id = ANY($2) \
         OR charge_id = ANY($3) OR invoice_id = ANY($4)";
    let purchases_sql =
        format!("SELECT {PURCHASE_COLUMNS} FROM purchases WHERE {SHARING} ORDER BY id FOR UPDATE");
    let subscription_params: [Param<'_>; 1] = [(&subscription_ids, Type::TEXT_ARRAY)];
    let subscriptions_sql =
        format!("SELECT {SUBSCRIPTION_COLUMNS} FROM subscriptions WHERE id = ANY($1) FOR UPDATE");
    let customer_params: [Param<'_>; 1] = [(&customer_ids, Type::TEXT_ARRAY)];
    let rows = try_join(
        try_join5(
            when(!links.is_empty(), async {
                db.query(
                    "INSERT INTO customers (customer_id, user_id)
                 SELECT * FROM unnest($1::text[], $2::text[])
                 ON CONFLICT (customer_id) DO NOTHING
                 RETURNING customer_id",
                    &link_params,
                )
                .await
            }),
            when(!purchase_deltas.is_empty(), async {
                db.query(&purchases_sql, &purchase_params).await
            }),
            when(!subscription_deltas.is_empty(), async {
                db.query(&subscriptions_sql, &subscription_params).await
            }),
            when(!customer_ids.is_empty(), async {
                db.query(
                    "SELECT customer_id, user_id FROM customers WHERE customer_id = ANY($1)",
                    &customer_params,
                )
                .await
            }),
            db.query(registry::GENERATION_SQL, &[]),
        ),
        when(!feature_deltas.is_empty(), async {
            db.query(&features_sql, &feature_params).await
        }),
    );
    let (
        ((new_links, purchase_rows, subscription_rows, customer_rows, generation), feature_rows),
        offers,
    ) = try_join(
        async { rows.await.map_err(StoreError::from) },
        super::offers::find(db.tx, &abandoned_sessions),
    )
    .await?;
    Ok(State {
        new_links: new_links
            .iter()
            .map(|r| r.try_get(0))
            .collect::<Result<_, _>>()?,
        purchase_rows,
        subscription_rows,
        customer_users: customer_rows
            .iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect::<Result<_, tokio_postgres::Error>>()?,
        registry: registry::at(db, &registry::Stamp::from_rows(&generation)?).await?,
        feature_rows,
        offers,
    })
}

/// Runs `query` only when `needed`, else yields no rows without a round trip.
async fn when(
    needed: bool,
    query: impl Future<Output = Result<Vec<Row>, tokio_postgres::Error>>,
) -> Result<Vec<Row>, tokio_postgres::Error> {
    if needed { query.await } else { Ok(Vec::new()) }
}

/// Looks up the users of customers that only stored rows named (rare: an extra round trip).
async fn resolve_missing_customers(
    db: Db<'_>,
    purchase_rows: &[Row],
    subscription_rows: &[Row],
    owners: &mut HashMap<String, String>,
) -> Result<(), StoreError> {
    let mut missing: BTreeSet<String> = BTreeSet::new();
    for row in purchase_rows.iter().chain(subscription_rows) {
        let user: Option<String> = row.try_get("user_id")?;
        let customer: Option<String> = row.try_get("customer_id")?;
        if let (None, Some(customer)) = (user, customer)
            && !owners.contains_key(&customer)
        {
            missing.insert(customer);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let ids: Vec<&str> = missing.iter().map(String::as_str).collect();
    let rows = db
        .query(
            "SELECT customer_id, user_id FROM customers WHERE customer_id = ANY($1)",
            &[(&ids, Type::TEXT_ARRAY)],
        )
        .await?;
    for row in rows {
        owners.insert(row.try_get(0)?, row.try_get(1)?);
    }
    Ok(())
}

/// Counts, in `payments_unmatched_total{kind}`, the merged rows that took money (a paid
/// purchase, a subscription past `incomplete`) but resolve to no registered product: recorded
/// with their money trail, granting nothing (`GET /v1/payments/unmatched` lists them).
fn count_unmatched(
    purchases: &Purchases,
    subscriptions: &[SubscriptionFacts],
    registry: &Registry,
) {
    let purchases = purchases
        .writes
        .iter()
        .filter(|w| {
            w.facts.paid
                && !w.facts.is_invoice_payment()
                && registry.purchase_product(&w.facts).is_none()
        })
        .count();
    let subscriptions = subscriptions
        .iter()
        .filter(|s| {
            s.status() != SubscriptionStatus::Incomplete
                && registry.subscription_product(s).is_none()
        })
        .count();
    for (kind, n) in [("purchase", purchases), ("subscription", subscriptions)] {
        if n > 0 {
            metrics::counter!("payments_unmatched_total", "kind" => kind).increment(n as u64);
            tracing::warn!(
                kind,
                rows = n,
                "payment matches no registered product; it grants nothing"
            );
        }
    }
}

/// One pipeline: the new links attach the rows that waited for a user, then the folded rows
/// are deleted, the purchases updated and inserted, the subscriptions upserted and the
/// abandoned checkouts queued. Returns the customers whose link attached a stored row.
/// The merged rows [`write_state`] writes.
struct Writes<'a> {
    purchases: &'a Purchases,
    subscriptions: &'a [SubscriptionFacts],
    features: &'a [FeatureFacts],
    notices: &'a [Notice],
}

async fn write_state(
    db: Db<'_>,
    new_links: &[(&str, &str)],
    writes: Writes<'_>,
    registry: &Registry,
) -> Result<HashSet<String>, StoreError> {
    let Writes {
        purchases,
        subscriptions,
        features,
        notices,
    } = writes;
    let feature_customers: Vec<&str> = features.iter().map(|f| f.customer_id.as_str()).collect();
    let feature_users: Vec<Option<&str>> = features.iter().map(|f| f.user_id.as_deref()).collect();
    // Postgres arrays cannot nest: the lists travel as JSON arrays.
    let feature_lists: Vec<serde_json::Value> = features
        .iter()
        .map(|f| serde_json::json!(f.lookup_keys()))
        .collect();
    let feature_at: Vec<Option<DateTime<Utc>>> = features
        .iter()
        .map(|f| opt_timestamp(f.claim.as_ref().map(|c| c.at)))
        .collect::<Result<_, _>>()?;
    let feature_params: [Param<'_>; 4] = [
        (&feature_customers, Type::TEXT_ARRAY),
        (&feature_users, Type::TEXT_ARRAY),
        (&feature_lists, Type::JSONB_ARRAY),
        (&feature_at, Type::TIMESTAMPTZ_ARRAY),
    ];
    let link_customers: Vec<&str> = new_links.iter().map(|(c, _)| *c).collect();
    let link_users: Vec<&str> = new_links.iter().map(|(_, u)| *u).collect();
    let link_params: [Param<'_>; 2] = [
        (&link_customers, Type::TEXT_ARRAY),
        (&link_users, Type::TEXT_ARRAY),
    ];
    let deletes: [Param<'_>; 1] = [(&purchases.deletes, Type::INT8_ARRAY)];
    let mut updates = PurchaseColumns::default();
    let mut inserts = PurchaseColumns::default();
    for write in &purchases.writes {
        match write.id {
            Some(id) => updates.push(Some(id), &write.facts, registry)?,
            None => inserts.push(None, &write.facts, registry)?,
        }
    }
    let mut update_params = updates.params();
    update_params.push((&updates.id, Type::INT8_ARRAY));
    let insert_params = inserts.params();
    let mut subs = SubscriptionColumns::default();
    for s in subscriptions {
        subs.push(s)?;
    }
    let subscription_params: [Param<'_>; 16] = [
        (&subs.id, Type::TEXT_ARRAY),
        (&subs.user_id, Type::TEXT_ARRAY),
        (&subs.customer_id, Type::TEXT_ARRAY),
        (&subs.product_key, Type::TEXT_ARRAY),
        (&subs.status, Type::TEXT_ARRAY),
        (&subs.claim, Type::TEXT_ARRAY),
        (&subs.claim_at, Type::TIMESTAMPTZ_ARRAY),
        (&subs.terminal, Type::TEXT_ARRAY),
        (&subs.period_end, Type::TIMESTAMPTZ_ARRAY),
        (&subs.cancel_at_period_end, Type::BOOL_ARRAY),
        (&subs.ended_at, Type::TIMESTAMPTZ_ARRAY),
        (&subs.price_id, Type::TEXT_ARRAY),
        (&subs.price_claim_at, Type::TIMESTAMPTZ_ARRAY),
        (&subs.quantity, Type::INT8_ARRAY),
        (&subs.recovered_at, Type::TIMESTAMPTZ_ARRAY),
        (&subs.past_due_claims, Type::JSONB_ARRAY),
    ];
    let notice_kinds: Vec<&str> = notices.iter().map(|n| n.kind.column()).collect();
    let notice_users: Vec<Option<&str>> = notices.iter().map(|n| n.user_id.as_deref()).collect();
    let notice_keys: Vec<&str> = notices.iter().map(|n| n.dedupe_key.as_str()).collect();
    let notice_payloads: Vec<&serde_json::Value> = notices.iter().map(|n| &n.payload).collect();
    let notice_params: [Param<'_>; 4] = [
        (&notice_kinds, Type::TEXT_ARRAY),
        (&notice_users, Type::TEXT_ARRAY),
        (&notice_keys, Type::TEXT_ARRAY),
        (&notice_payloads, Type::JSONB_ARRAY),
    ];
    let update_sql = format!(
        "UPDATE purchases p SET user_id = u.user_id, customer_id = u.customer_id,
             product_key = u.product_key, checkout_session_id = u.checkout_session_id,
             payment_intent_id = u.payment_intent_id, charge_id = u.charge_id,
             amount_paid_cents = u.amount_paid_cents, currency = u.currency,
             platform_fee_cents = u.platform_fee_cents,
             organization_fee_cents = u.organization_fee_cents,
             creator_payout_cents = u.creator_payout_cents, status = u.status, paid = u.paid,
             payment_failed = u.payment_failed, fully_refunded = u.fully_refunded,
             dispute_status = u.dispute_status, dispute_id = u.dispute_id,
             purchased_at = u.purchased_at, refunded_at = u.refunded_at,
             refund_reason = u.refund_reason, refund_amount_cents = u.refund_amount_cents,
             stripe_refund_id = u.stripe_refund_id, price_id = u.price_id,
             disputes = u.disputes, unknown_to_stripe = u.unknown_to_stripe,
             invoice_id = u.invoice_id, subscription_id = u.subscription_id,
             updated_at = now()
           FROM {}
          WHERE p.id = u.id",
        purchase_unnest(true)
    );
    let insert_sql = format!(
        "INSERT INTO purchases (user_id, customer_id, product_key, checkout_session_id,
             payment_intent_id, charge_id, amount_paid_cents, currency, platform_fee_cents,
             organization_fee_cents, creator_payout_cents, status, paid, payment_failed,
             fully_refunded, dispute_status, dispute_id, purchased_at, refunded_at,
             refund_reason, refund_amount_cents, stripe_refund_id, price_id, disputes,
             unknown_to_stripe, invoice_id, subscription_id)
         SELECT * FROM {}",
        purchase_unnest(false)
    );
    let mut pending: Vec<Pending<'_>> = Vec::new();
    if !new_links.is_empty() {
        pending.push(Box::pin(db.query(
            "WITH l AS (SELECT * FROM unnest($1::text[], $2::text[]) AS l(c, u)),
                  p AS (UPDATE purchases SET user_id = l.u, updated_at = now() FROM l
                         WHERE purchases.customer_id = l.c AND purchases.user_id IS NULL
                         RETURNING l.c),
                  s AS (UPDATE subscriptions SET user_id = l.u, updated_at = now() FROM l
                         WHERE subscriptions.customer_id = l.c AND subscriptions.user_id IS NULL
                         RETURNING l.c),
                  f AS (UPDATE stripe_features SET user_id = l.u, updated_at = now() FROM l
                         WHERE stripe_features.customer_id = l.c
                           AND stripe_features.user_id IS NULL
                         RETURNING l.c)
             SELECT c FROM p UNION ALL SELECT c FROM s UNION ALL SELECT c FROM f",
            &link_params,
        )));
    }
    if !purchases.deletes.is_empty() {
        pending.push(Box::pin(
            db.query("DELETE FROM purchases WHERE id = ANY($1)", &deletes),
        ));
    }
    if !updates.id.is_empty() {
        pending.push(Box::pin(db.query(&update_sql, &update_params)));
    }
    if !inserts.status.is_empty() {
        pending.push(Box::pin(db.query(&insert_sql, &insert_params)));
    }
    if !subs.id.is_empty() {
        pending.push(Box::pin(db.query(
            "INSERT INTO subscriptions AS s (id, user_id, customer_id, product_key, status,
                 status_claim, status_claim_at, terminal_status, current_period_end,
                 cancel_at_period_end, ended_at, price_id, price_claim_at, quantity,
                 recovered_at, past_due_claims)
             SELECT x.id, x.u, x.c, x.p, x.st, x.cl, x.cl_at, x.t, x.pe, x.cape, x.ended,
                    x.price, x.price_at, x.q, x.rec,
                    ARRAY(SELECT to_timestamp(j::float8) FROM jsonb_array_elements_text(x.pd) j)
               FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                 $6::text[], $7::timestamptz[], $8::text[], $9::timestamptz[], $10::bool[],
                 $11::timestamptz[], $12::text[], $13::timestamptz[], $14::int8[],
                 $15::timestamptz[], $16::jsonb[])
                 AS x(id, u, c, p, st, cl, cl_at, t, pe, cape, ended, price, price_at, q, rec, pd)
             ON CONFLICT (id) DO UPDATE SET user_id = EXCLUDED.user_id,
                 customer_id = EXCLUDED.customer_id, product_key = EXCLUDED.product_key,
                 status = EXCLUDED.status, status_claim = EXCLUDED.status_claim,
                 status_claim_at = EXCLUDED.status_claim_at,
                 terminal_status = EXCLUDED.terminal_status,
                 current_period_end = EXCLUDED.current_period_end,
                 cancel_at_period_end = EXCLUDED.cancel_at_period_end,
                 ended_at = EXCLUDED.ended_at, price_id = EXCLUDED.price_id,
                 price_claim_at = EXCLUDED.price_claim_at, quantity = EXCLUDED.quantity,
                 recovered_at = EXCLUDED.recovered_at, past_due_claims = EXCLUDED.past_due_claims,
                 updated_at = now()",
            &subscription_params,
        )));
    }
    if !features.is_empty() {
        pending.push(Box::pin(db.query(
            "INSERT INTO stripe_features AS f (customer_id, user_id, lookup_keys, claim_at)
             SELECT c, u, ARRAY(SELECT jsonb_array_elements_text(k)), at
               FROM unnest($1::text[], $2::text[], $3::jsonb[], $4::timestamptz[])
                    AS x(c, u, k, at)
             ON CONFLICT (customer_id) DO UPDATE SET user_id = EXCLUDED.user_id,
                 lookup_keys = EXCLUDED.lookup_keys, claim_at = EXCLUDED.claim_at,
                 updated_at = now()",
            &feature_params,
        )));
    }
    if !notices.is_empty() {
        pending.push(Box::pin(db.query(
            // The migration's trigger gives each one with a user its outbox row.
            "INSERT INTO notifications (kind, user_id, dedupe_key, payload)
             SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::jsonb[])
             ON CONFLICT (dedupe_key) DO NOTHING",
            &notice_params,
        )));
    }
    let results = try_join_all(pending).await?;
    let attached = if new_links.is_empty() {
        HashSet::new()
    } else {
        results[0]
            .iter()
            .map(|row| row.try_get(0))
            .collect::<Result<_, _>>()?
    };
    Ok(attached)
}
