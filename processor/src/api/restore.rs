//! `POST /api/pro/restore`: rebuild a user's purchases, subscriptions and entitlements from the
//! Stripe API when webhooks were missed.
//!
//! Invariants: nothing the client sends is used (the route takes no body; the customers come from
//! the `customers` table, the objects from Stripe); every Stripe object becomes a synthetic event
//! of the type the real webhook would have had, parsed by [`crate::domain::events::parse`] and applied by
//! [`crate::store::apply_events`], the processor's own apply path; a synthetic event's id is derived from
//! the object's id and content, so restoring an unchanged object twice applies it once
//! (`processed_events`, as for real events); all of a restore commits in one transaction and the
//! cache is refreshed after the commit; one restore per user per 10 s (429 otherwise).
//!
//! Disputes come from the charge when it carries them expanded, otherwise from
//! `GET /v1/disputes?charge=…` for every charge marked `disputed`. A customer Stripe answers
//! `resource_missing` for is marked gone and skipped.
//!
//! Bounds, since any user can call this: the rate limit fails closed (Redis down → 503 with
//! `Retry-After`, never an unlimited restore); each Stripe list is read for at most
//! [`RESTORE_MAX_PAGES`] pages (more fails the restore, 502, rather than reading on); disputes
//! are looked up for at most [`RESTORE_MAX_DISPUTE_LOOKUPS`] disputed charges (the newest; older
//! ones are left to the webhooks and `processor reconcile`); and at most
//! [`RESTORE_CONCURRENCY`] dispute lookups run at once.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use chrono::Utc;
use futures_util::{StreamExt, TryStreamExt};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use shared::ids::UserId;

use super::ApiState;
use super::customers::{customers_of, mark_gone};
use super::entitlements::read_from_postgres;
use super::error::ApiError;
use super::organizations::{OrganizationBody, payer};
use crate::auth::AuthCaller;
use crate::domain::events::{self, Event, EventKind};
use crate::domain::view::{ProEntitlement, pro_view};
use crate::store::{self, Outcome};
use crate::stripe::{StripeClient, StripeError};

/// The minimum interval between two restores of one user.
pub const RESTORE_INTERVAL: Duration = super::limits::RESTORE.window;

/// Most pages (of 100 objects) read from each Stripe list by one restore.
pub const RESTORE_MAX_PAGES: usize = 5;

/// Most disputed charges whose disputes one restore looks up.
pub const RESTORE_MAX_DISPUTE_LOOKUPS: usize = 20;

/// Most dispute lookups one restore runs at once.
pub const RESTORE_CONCURRENCY: usize = 4;

/// Redis key of the per-user restore rate limit.
#[must_use]
pub fn rate_limit_key(user: &UserId) -> String {
    super::limits::key(&super::limits::RESTORE, user)
}

/// The answer of `POST /api/pro/restore`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RestoreAnswer {
    /// Whether Stripe holds anything of this user that the projection acts on (whether or not
    /// it had been applied before).
    pub restored: bool,
    pub entitlement: ProEntitlement,
}

/// The kinds of Stripe objects a restore reads, in the order their events are applied (a
/// purchase exists before its refund).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectKind {
    CheckoutSession,
    PaymentIntent,
    Charge,
    Dispute,
    Subscription,
    /// A customer's active Stripe Entitlements, as the summary a webhook would carry.
    FeatureSummary,
}

/// The synthetic event bodies for one Stripe object (none when the object says nothing the
/// projection uses, e.g. an open checkout session). `now` is the restore time (unix seconds).
#[must_use]
pub fn synthetic_events(kind: ObjectKind, object: &Value, now: i64) -> Vec<Value> {
    let Some(id) = object.get("id").and_then(Value::as_str) else {
        return Vec::new();
    };
    let created = object.get("created").and_then(Value::as_i64).unwrap_or(now);
    let str_field = |name: &str| object.get(name).and_then(Value::as_str).unwrap_or("");
    // (event type, event created, data.object): facts keep the object's time; state registers
    // (refunds, disputes, subscription status) take the restore time, since the object shows
    // the state as of now.
    let mut types: Vec<(&str, i64, Value)> = Vec::new();
    match kind {
        ObjectKind::CheckoutSession => match str_field("status") {
            "complete" => types.push(("checkout.session.completed", created, object.clone())),
            "expired" => types.push(("checkout.session.expired", created, object.clone())),
            _ => {}
        },
        ObjectKind::PaymentIntent => {
            if str_field("status") == "succeeded" {
                types.push(("payment_intent.succeeded", created, object.clone()));
            }
        }
        ObjectKind::Charge => {
            let refunded = object.get("refunded").and_then(Value::as_bool) == Some(true)
                || object
                    .get("amount_refunded")
                    .and_then(Value::as_i64)
                    .unwrap_or(0)
                    > 0;
            if refunded {
                types.push(("charge.refunded", now, object.clone()));
            }
        }
        ObjectKind::Dispute => {
            let ty = match str_field("status") {
                "won" | "lost" | "warning_closed" => "charge.dispute.closed",
                "" => return Vec::new(),
                _ => "charge.dispute.created",
            };
            types.push((ty, now, object.clone()));
        }
        ObjectKind::Subscription => {
            let ended = matches!(str_field("status"), "canceled" | "incomplete_expired");
            let ty = if ended {
                "customer.subscription.deleted"
            } else {
                "customer.subscription.updated"
            };
            types.push((ty, now, object.clone()));
        }
        ObjectKind::FeatureSummary => types.push((
            "entitlements.active_entitlement_summary.updated",
            now,
            object.clone(),
        )),
    }
    let digest = Sha256::digest(object.to_string().as_bytes());
    let hash: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    types
        .into_iter()
        .map(|(ty, created, data)| {
            json!({
                "id": format!("restore:{ty}:{id}:{hash}"),
                "object": "event",
                "type": ty,
                "created": created,
                "data": {"object": data},
            })
        })
        .collect()
}

/// The dispute a charge carries expanded (`dispute` as an object, as with
/// `expand[]=data.dispute` or older API versions), completed with the charge's ids.
fn expanded_dispute(charge: &Value) -> Option<Value> {
    let dispute = charge.get("dispute").filter(|d| d.is_object())?;
    dispute.get("id").and_then(Value::as_str)?;
    Some(with_charge_ids(dispute.clone(), charge))
}

/// A dispute with `charge` and `payment_intent` filled from its charge when it lacks them (the
/// projection finds the purchase through either).
fn with_charge_ids(mut dispute: Value, charge: &Value) -> Value {
    for (field, source) in [("charge", "id"), ("payment_intent", "payment_intent")] {
        if dispute.get(field).is_none_or(Value::is_null)
            && let Some(id) = charge.get(source).filter(|v| !v.is_null())
        {
            dispute[field] = id.clone();
        }
    }
    dispute
}

/// The disputes of `charges` (newest charge first, as listed): the expanded ones as they are,
/// the others of the newest [`RESTORE_MAX_DISPUTE_LOOKUPS`] charges marked `disputed` read from
/// `GET /v1/disputes`, [`RESTORE_CONCURRENCY`] at a time. Newest first.
async fn disputes_of(stripe: &StripeClient, charges: &[Value]) -> Result<Vec<Value>, StripeError> {
    let mut expanded = Vec::new();
    let mut to_fetch = Vec::new();
    for charge in charges {
        if let Some(dispute) = expanded_dispute(charge) {
            expanded.push(dispute);
        } else if charge.get("disputed").and_then(Value::as_bool) == Some(true)
            && let Some(id) = charge.get("id").and_then(Value::as_str)
        {
            to_fetch.push((id, charge));
        }
    }
    if to_fetch.len() > RESTORE_MAX_DISPUTE_LOOKUPS {
        tracing::warn!(
            disputed = to_fetch.len(),
            looked_up = RESTORE_MAX_DISPUTE_LOOKUPS,
            "restore looks up the disputes of the newest disputed charges only"
        );
        to_fetch.truncate(RESTORE_MAX_DISPUTE_LOOKUPS);
    }
    // Owned ids: a stream over borrowed items is not provably `Send` for the handler.
    let ids: Vec<String> = to_fetch.iter().map(|(id, _)| (*id).to_owned()).collect();
    let fetched: Vec<Vec<Value>> = futures_util::stream::iter(ids)
        .map(move |id| async move { stripe.list_disputes(&id).await })
        .buffered(RESTORE_CONCURRENCY)
        .try_collect()
        .await?;
    let mut all = expanded;
    for ((_, charge), disputes) in to_fetch.iter().zip(fetched) {
        all.extend(disputes.into_iter().map(|d| with_charge_ids(d, charge)));
    }
    all.sort_by_key(|d| std::cmp::Reverse(d.get("created").and_then(Value::as_i64)));
    Ok(all)
}

/// The customer's complete list of active Stripe Entitlements as one summary object (none when
/// Stripe cannot be read: the stored features then stay as they are, rather than being taken
/// away by a partial read).
async fn feature_summary(stripe: &StripeClient, customer: &str) -> Vec<Value> {
    match stripe.list_active_entitlements(customer).await {
        Ok(list) => vec![json!({
            "id": customer, "object": "entitlements.active_entitlement_summary",
            "customer": customer,
            "entitlements": {"object": "list", "data": list, "has_more": false},
        })],
        Err(error) => {
            tracing::warn!(customer, %error, "active entitlements not read by restore");
            Vec::new()
        }
    }
}

/// Every Stripe object of `customer` the projection uses, as synthetic events in apply order.
/// `None` when Stripe no longer knows the customer.
async fn read_customer(
    stripe: &StripeClient,
    customer: &str,
    now: i64,
) -> Result<Option<Vec<Event>>, StripeError> {
    let listed = tokio::try_join!(
        stripe.list_checkout_sessions(customer),
        stripe.list_payment_intents(customer),
        stripe.list_charges(customer),
        stripe.list_subscriptions(customer),
    );
    let (sessions, intents, charges, subscriptions) = match listed {
        Ok(lists) => lists,
        Err(error) if error.is_missing_customer() => return Ok(None),
        Err(error) => return Err(error),
    };
    let disputes = disputes_of(stripe, &charges).await?;
    let features = feature_summary(stripe, customer).await;
    let mut out = Vec::new();
    for (kind, objects) in [
        (ObjectKind::CheckoutSession, sessions),
        (ObjectKind::PaymentIntent, intents),
        (ObjectKind::Charge, charges),
        (ObjectKind::Dispute, disputes),
        (ObjectKind::Subscription, subscriptions),
        (ObjectKind::FeatureSummary, features),
    ] {
        // Lists come newest first; apply oldest first, as the webhooks would have arrived.
        for object in objects.iter().rev() {
            for body in synthetic_events(kind, object, now) {
                match events::parse(body.to_string().as_bytes()) {
                    Ok(event) => out.push(event),
                    // One malformed object must not block the rest of the user's restore.
                    Err(error) => {
                        let object_id = object.get("id").and_then(Value::as_str).unwrap_or("");
                        tracing::warn!(customer, object_id, %error, "stripe object skipped by restore");
                    }
                }
            }
        }
    }
    Ok(Some(out))
}

/// Applies `events` through the processor's own apply path, in one transaction; returns how
/// many were new. An event the projection refuses is rolled back alone and logged.
pub(super) async fn apply_all(state: &ApiState, events: &[Event]) -> Result<usize, ApiError> {
    let refs: Vec<&Event> = events.iter().collect();
    let outcomes = store::apply_and_commit(&state.pool, &refs)
        .await
        .map_err(ApiError::database)?;
    let mut applied = 0;
    for (event, outcome) in events.iter().zip(outcomes) {
        match outcome {
            Outcome::Applied(_) => applied += 1,
            Outcome::Rejected(reason) | Outcome::Later(reason) => {
                tracing::warn!(event_id = %event.id, event_type = %event.event_type, %reason,
                    "restore event refused by the projection");
            }
            Outcome::Replay | Outcome::Busy | Outcome::Waiting(_) | Outcome::NeedsStripe => {}
        }
    }
    Ok(applied)
}

pub(crate) async fn restore(
    State(state): State<ApiState>,
    AuthCaller(caller): AuthCaller,
    body: axum::body::Bytes,
) -> Result<Json<RestoreAnswer>, ApiError> {
    // The caller's own state, or the organisation's they bill for.
    let organization = OrganizationBody::read(&body)?.organization_id;
    let user = payer(&state, &caller, organization.as_deref()).await?;
    let stripe = state.stripe()?;
    // Without Redis the limit cannot be counted, and an unlimited restore lets one user drive
    // the Stripe fan-out below at will: it fails closed.
    super::limits::take(&state, &super::limits::RESTORE, &caller.user).await?;
    let stripe = stripe.with_max_pages(RESTORE_MAX_PAGES);
    let stripe = &stripe;
    let now = Utc::now().timestamp();
    let mut events = Vec::new();
    for customer in customers_of(&state, &user).await? {
        match read_customer(stripe, &customer, now).await? {
            Some(found) => events.extend(found),
            None => mark_gone(&state, &customer).await?,
        }
    }
    let applied = if events.is_empty() {
        0
    } else {
        apply_all(&state, &events).await?
    };
    let snapshot = read_from_postgres(&state, &user).await?;
    state.cache.refresh(&snapshot).await;
    tracing::info!(user_id = %user, found = events.len(), applied, "restore finished");
    // An empty feature list is read for every customer: it restores nothing by itself.
    let restored = events.iter().any(
        |e| !matches!(&e.kind, EventKind::FeatureSummaryUpdated(f) if f.lookup_keys.is_empty()),
    );
    Ok(Json(RestoreAnswer {
        restored,
        entitlement: pro_view(&snapshot, Utc::now()),
    }))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn parse_all(kind: ObjectKind, object: &Value) -> Vec<Event> {
        synthetic_events(kind, object, 1_800_000_000)
            .iter()
            .map(|b| events::parse(b.to_string().as_bytes()).unwrap())
            .collect()
    }

    #[test]
    fn a_paid_checkout_session_becomes_a_completion_at_its_own_time() {
        let session = json!({"id": "cs_1", "object": "checkout.session", "status": "complete",
            "mode": "payment", "payment_status": "paid", "customer": "cus_1",
            "client_reference_id": "u1", "metadata": {"product_key": "pro"},
            "amount_total": 4900, "currency": "usd", "created": 1_700_000_000});
        let events = parse_all(ObjectKind::CheckoutSession, &session);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].event_type, "checkout.session.completed");
        assert_eq!(events[0].created, 1_700_000_000);
        assert!(matches!(
            events[0].kind,
            EventKind::CheckoutSessionCompleted(_)
        ));
    }

    #[test]
    fn open_sessions_and_unfinished_intents_say_nothing() {
        let open = json!({"id": "cs_2", "status": "open", "mode": "payment"});
        assert!(synthetic_events(ObjectKind::CheckoutSession, &open, 1).is_empty());
        let pending = json!({"id": "pi_1", "status": "requires_payment_method"});
        assert!(synthetic_events(ObjectKind::PaymentIntent, &pending, 1).is_empty());
        let paid_charge = json!({"id": "ch_1", "refunded": false, "amount_refunded": 0});
        assert!(synthetic_events(ObjectKind::Charge, &paid_charge, 1).is_empty());
        assert!(
            synthetic_events(ObjectKind::Subscription, &json!({"status": "active"}), 1).is_empty()
        );
    }

    #[test]
    fn refunds_and_subscriptions_take_the_restore_time() {
        let charge = json!({"id": "ch_1", "object": "charge", "amount": 4900,
            "amount_refunded": 4900, "refunded": true, "payment_intent": "pi_1",
            "customer": "cus_1", "currency": "usd", "created": 1});
        let events = parse_all(ObjectKind::Charge, &charge);
        assert_eq!(events[0].event_type, "charge.refunded");
        assert_eq!(events[0].created, 1_800_000_000);
        let canceled = json!({"id": "sub_1", "object": "subscription", "status": "canceled",
            "customer": "cus_1", "cancel_at_period_end": false, "ended_at": 5, "created": 1,
            "metadata": {"user_id": "u1", "product_key": "pro"}});
        let events = parse_all(ObjectKind::Subscription, &canceled);
        assert_eq!(events[0].event_type, "customer.subscription.deleted");
        let mut active = canceled.clone();
        active["status"] = json!("active");
        let events = parse_all(ObjectKind::Subscription, &active);
        assert_eq!(events[0].event_type, "customer.subscription.updated");
    }

    #[test]
    fn an_expanded_dispute_on_a_charge_becomes_a_dispute_event_with_the_charge_ids() {
        let mut charge = json!({"id": "ch_1", "object": "charge", "amount": 4900,
            "amount_refunded": 0, "refunded": false, "disputed": true, "payment_intent": "pi_1",
            "customer": "cus_1", "currency": "usd", "created": 1,
            "dispute": {"id": "dp_1", "object": "dispute", "status": "needs_response"}});
        assert!(
            parse_all(ObjectKind::Charge, &charge).is_empty(),
            "a charge yields its refund only; its disputes are objects of their own"
        );
        let dispute = expanded_dispute(&charge).unwrap();
        let events = parse_all(ObjectKind::Dispute, &dispute);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].event_type, "charge.dispute.created");
        let EventKind::ChargeDispute(parsed) = &events[0].kind else {
            panic!("{:?}", events[0].kind);
        };
        assert_eq!(parsed.charge.as_deref(), Some("ch_1"));
        assert_eq!(parsed.payment_intent.as_deref(), Some("pi_1"));
        // A bare id names no status: it is read from the disputes list instead.
        charge["dispute"] = json!("dp_1");
        assert!(expanded_dispute(&charge).is_none());
    }

    #[test]
    fn closed_disputes_become_closures_and_listed_ids_are_kept() {
        let charge = json!({"id": "ch_1", "payment_intent": "pi_1"});
        for (status, ty) in [
            ("needs_response", "charge.dispute.created"),
            ("under_review", "charge.dispute.created"),
            ("won", "charge.dispute.closed"),
            ("lost", "charge.dispute.closed"),
            ("warning_closed", "charge.dispute.closed"),
        ] {
            // As listed by GET /v1/disputes: the dispute names its own charge.
            let dispute = with_charge_ids(
                json!({"id": "dp_1", "object": "dispute", "status": status,
                       "charge": "ch_own", "payment_intent": null, "created": 5}),
                &charge,
            );
            assert_eq!(dispute["charge"], "ch_own");
            assert_eq!(dispute["payment_intent"], "pi_1");
            let events = parse_all(ObjectKind::Dispute, &dispute);
            assert_eq!(events[0].event_type, ty, "{status}");
        }
        assert!(synthetic_events(ObjectKind::Dispute, &json!({"id": "dp_2"}), 1).is_empty());
    }

    #[test]
    fn ids_are_stable_for_an_unchanged_object_and_change_with_it() {
        let sub = json!({"id": "sub_1", "status": "active", "customer": "cus_1"});
        let a = synthetic_events(ObjectKind::Subscription, &sub, 10);
        let b = synthetic_events(ObjectKind::Subscription, &sub, 20);
        assert_eq!(a[0]["id"], b[0]["id"]);
        let mut changed = sub.clone();
        changed["status"] = json!("past_due");
        let c = synthetic_events(ObjectKind::Subscription, &changed, 10);
        assert_ne!(a[0]["id"], c[0]["id"]);
        assert!(a[0]["id"].as_str().unwrap().starts_with("restore:"));
    }
}
