//! One user's events with fixed ids, for the projection's tests (the pure unit properties and
//! the same histories against Postgres): the purchase is `cs_1` → `pi_1` → `ch_1` of customer
//! `cus_1`, the subscription `sub_1` of customer `cus_2`. Each event carries only what Stripe
//! sends it with: refunds and disputes name no user, subscription events and invoices only their
//! customer, so the projection must link them.

use serde_json::{Value, json};

/// Seconds in a day.
pub const DAY: i64 = 86_400;

/// An event envelope of `event_type` around `object`.
#[must_use]
pub fn event(id: &str, event_type: &str, created: i64, object: Value) -> Value {
    json!({
        "id": id, "object": "event", "type": event_type, "created": created,
        "api_version": "2025-03-31.basil", "livemode": false, "pending_webhooks": 1,
        "request": { "id": null, "idempotency_key": null },
        "data": { "object": object }
    })
}

/// A `pro` checkout in payment mode (`cs_1`, $49) in `payment_status`.
#[must_use]
pub fn checkout(
    id: &str,
    event_type: &str,
    created: i64,
    payment_status: &str,
    user: &str,
) -> Value {
    event(
        id,
        event_type,
        created,
        json!({
            "id": "cs_1", "object": "checkout.session", "mode": "payment",
            "payment_status": payment_status, "customer": "cus_1", "payment_intent": "pi_1",
            "client_reference_id": user, "amount_total": 4900, "currency": "usd",
            "metadata": { "user_id": user, "product_key": "pro" }
        }),
    )
}

/// The purchase's payment intent succeeding.
#[must_use]
pub fn payment_intent_succeeded(id: &str, created: i64, user: &str) -> Value {
    event(
        id,
        "payment_intent.succeeded",
        created,
        json!({ "id": "pi_1", "object": "payment_intent", "amount": 4900,
            "amount_received": 4900, "currency": "usd", "customer": "cus_1",
            "metadata": { "user_id": user, "product_key": "pro" } }),
    )
}

/// A refund of `refunded` cents in all, without user metadata: the purchase is found through
/// its payment intent.
#[must_use]
pub fn refund(id: &str, created: i64, refunded: i64) -> Value {
    event(
        id,
        "charge.refunded",
        created,
        json!({ "id": "ch_1", "object": "charge", "amount": 4900,
            "amount_refunded": refunded, "refunded": refunded >= 4900,
            "payment_intent": "pi_1", "customer": "cus_1", "currency": "usd",
            "refunds": { "data": [ { "id": format!("re_{refunded}"), "created": created,
                "reason": "requested_by_customer" } ] } }),
    )
}

/// A dispute event; disputes carry neither user nor customer, only the charge and payment
/// intent.
#[must_use]
pub fn dispute(id: &str, event_type: &str, created: i64, status: &str) -> Value {
    dispute_on(id, event_type, created, "dp_1", status)
}

/// An event of dispute `dispute` of the purchase's charge (a later chargeback on the same charge
/// is a new dispute).
#[must_use]
pub fn dispute_on(id: &str, event_type: &str, created: i64, dispute: &str, status: &str) -> Value {
    event(
        id,
        event_type,
        created,
        json!({ "id": dispute, "object": "dispute", "charge": "ch_1",
            "payment_intent": "pi_1", "amount": 4900, "status": status }),
    )
}

/// A subscription event without metadata: the user is known only through the customer.
#[must_use]
pub fn subscription(
    id: &str,
    event_type: &str,
    created: i64,
    status: &str,
    period_end: i64,
) -> Value {
    subscription_with(
        id,
        event_type,
        created,
        status,
        json!({ "id": "sub_1", "customer": "cus_2",
            "items": { "data": [ { "id": "si_1", "current_period_end": period_end } ] } }),
    )
}

/// A subscription event in `status` with `fields` (id, customer, items, …) added.
fn subscription_with(
    id: &str,
    event_type: &str,
    created: i64,
    status: &str,
    fields: Value,
) -> Value {
    let ended = matches!(status, "canceled" | "incomplete_expired");
    let mut object = json!({ "object": "subscription", "status": status,
        "cancel_at_period_end": false,
        "ended_at": if ended { json!(created) } else { Value::Null } });
    if let (Some(object), Value::Object(fields)) = (object.as_object_mut(), fields) {
        object.extend(fields);
    }
    event(id, event_type, created, object)
}

/// An invoice of `sub_1` in the pinned API version's shape (the subscription under
/// `parent.subscription_details`).
#[must_use]
pub fn invoice(id: &str, event_type: &str, created: i64, reason: &str, period_end: i64) -> Value {
    invoice_with(
        id,
        event_type,
        created,
        reason,
        period_end,
        (
            "parent",
            json!({ "type": "subscription_details",
            "subscription_details": { "subscription": "sub_1" } }),
        ),
    )
}

/// [`invoice`] in the shape of older API versions (`subscription` at the top level).
#[must_use]
pub fn legacy_invoice(
    id: &str,
    event_type: &str,
    created: i64,
    reason: &str,
    period_end: i64,
) -> Value {
    invoice_with(
        id,
        event_type,
        created,
        reason,
        period_end,
        ("subscription", json!("sub_1")),
    )
}

fn invoice_with(
    id: &str,
    event_type: &str,
    created: i64,
    reason: &str,
    period_end: i64,
    (field, subscription): (&str, Value),
) -> Value {
    let mut object = json!({ "id": format!("in_{id}"), "object": "invoice", "customer": "cus_2",
        "billing_reason": reason,
        "lines": { "data": [ { "period": { "start": period_end - 30 * DAY,
            "end": period_end } } ] } });
    object[field] = subscription;
    event(id, event_type, created, object)
}

/// A subscription of a user on a price, as this service's checkout created it (bought as
/// `pro_monthly`: the metadata keeps naming that, whatever the price becomes).
#[derive(Debug, Clone, Copy)]
pub struct On<'a> {
    pub sub: &'a str,
    pub user: &'a str,
    pub price: &'a str,
}

/// A subscription event of `on` in `status` (quantity 2) whose period ends at `period_end`.
#[must_use]
pub fn priced_subscription(
    id: &str,
    event_type: &str,
    created: i64,
    status: &str,
    on: &On<'_>,
    period_end: i64,
) -> Value {
    subscription_with(
        id,
        event_type,
        created,
        status,
        json!({ "id": on.sub, "customer": "cus_1",
            "metadata": { "user_id": on.user, "product_key": "pro_monthly" },
            "items": { "data": [ { "id": "si_1", "quantity": 2,
                "current_period_end": period_end, "price": { "id": on.price } } ] } }),
    )
}

/// The subscription's checkout (`cs_sub`, subscription mode).
#[must_use]
pub fn subscription_checkout(id: &str, created: i64, user: &str) -> Value {
    event(
        id,
        "checkout.session.completed",
        created,
        json!({ "id": "cs_sub", "object": "checkout.session", "mode": "subscription",
            "payment_status": "paid", "customer": "cus_2", "subscription": "sub_1",
            "client_reference_id": user, "metadata": { "product_key": "pro" } }),
    )
}
