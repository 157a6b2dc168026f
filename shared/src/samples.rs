//! Stripe-shaped sample events, used by `send-test-event`, the benchmarks and tests.
//!
//! The shapes follow the API version pinned by the project (basil: `current_period_end` on the
//! subscription items, the invoice's subscription under `parent.subscription_details`), with the
//! fields the projection reads. Related events built with the same `object` suffix refer to the
//! same customer, payment intent, charge and subscription.

use serde_json::{Value, json};

pub mod history;

/// What a sample event is about.
#[derive(Debug, Clone)]
pub struct Sample<'a> {
    /// The application's user id.
    pub user: &'a str,
    /// Product key written to the metadata; subscription items are priced `price_{product}`.
    pub product: &'a str,
    /// Suffix of the Stripe object ids (`cus_{object}`, `pi_{object}`, `sub_{object}`, …).
    pub object: &'a str,
    /// Amount in cents.
    pub amount: i64,
    /// The event's `created` (unix seconds).
    pub created: i64,
    /// Checkout in subscription mode (carries `subscription`) instead of payment mode.
    pub subscription: bool,
}

impl<'a> Sample<'a> {
    /// A one-time `pro` purchase of $49.00 by `user`, happening now.
    #[must_use]
    pub fn pro(user: &'a str, object: &'a str) -> Self {
        Self {
            user,
            product: "pro",
            object,
            amount: 4900,
            created: chrono::Utc::now().timestamp(),
            subscription: false,
        }
    }
}

/// The event types of simulated customer `k` of a realistic mix, in the order Stripe typically
/// sends them: half one-time purchases, one in ten refunded, three in ten subscriptions with
/// checkout, invoice and update, and one in ten only types the processor ignores.
#[must_use]
pub fn mix_scenario(k: usize) -> &'static [&'static str] {
    match k % 10 {
        0..=4 => &["checkout.session.completed", "payment_intent.succeeded"],
        5 => &[
            "checkout.session.completed",
            "payment_intent.succeeded",
            "charge.refunded",
        ],
        6..=8 => &[
            "customer.subscription.created",
            "checkout.session.completed",
            "invoice.paid",
            "customer.subscription.updated",
        ],
        _ => &["customer.updated", "product.created"],
    }
}

/// Whether customer `k` of the mix buys through a session created elsewhere (a Payment Link, the
/// Dashboard): the fifth of each `every` customers (`0`: none).
#[must_use]
pub fn mix_foreign(k: usize, every: usize) -> bool {
    every > 0 && k % every == 4 % every
}

/// The checkout this service created for customer `k` of the mix of run `run`, as the API
/// records it: `(session id, user, product key, mode, price id)`. `None` when the customer's
/// scenario has no checkout, or it bought through a session created elsewhere
/// ([`mix_foreign`]). Subscriptions sell `pro_monthly` at `price_pro_monthly`, one-time
/// purchases `pro` at `price_pro`.
#[must_use]
pub fn mix_offer(
    run: &str,
    k: usize,
    foreign_every: usize,
) -> Option<(String, String, &'static str, &'static str, &'static str)> {
    if !mix_scenario(k).contains(&"checkout.session.completed") || mix_foreign(k, foreign_every) {
        return None;
    }
    let (product, mode, price) = if (6..=8).contains(&(k % 10)) {
        ("pro_monthly", "subscription", "price_pro_monthly")
    } else {
        ("pro", "payment", "price_pro")
    };
    Some((
        format!("cs_{run}_{k}"),
        format!("u_{run}_{k}"),
        product,
        mode,
        price,
    ))
}

/// The events of customer `k` of the mix ([`mix_scenario`]) of run `run`: user `u_{run}_{k}`,
/// objects `{run}_{k}`, ids `evt_{run}_{k}_{step}`, created `created + step`. Each customer is
/// a distinct user.
#[must_use]
pub fn mix_customer(run: &str, k: usize, created: i64) -> Vec<Value> {
    let user = format!("u_{run}_{k}");
    let object = format!("{run}_{k}");
    let subscription = (6..=8).contains(&(k % 10));
    mix_scenario(k)
        .iter()
        .zip(0i64..)
        .map(|(event_type, step)| {
            let sample = Sample {
                user: &user,
                product: if subscription { "pro_monthly" } else { "pro" },
                object: &object,
                amount: 1999,
                created: created + step,
                subscription,
            };
            event(&format!("evt_{run}_{k}_{step}"), event_type, &sample)
        })
        .collect()
}

/// A complete event envelope of `event_type` with id `id`.
#[must_use]
pub fn event(id: &str, event_type: &str, sample: &Sample<'_>) -> Value {
    json!({
        "id": id,
        "object": "event",
        "api_version": "2025-03-31.basil",
        "created": sample.created,
        "livemode": false,
        "pending_webhooks": 1,
        "request": {"id": null, "idempotency_key": null},
        "type": event_type,
        "data": {"object": object(event_type, sample)},
    })
}

/// The `data.object` of a sample event.
#[must_use]
pub fn object(event_type: &str, s: &Sample<'_>) -> Value {
    let o = s.object;
    let customer = format!("cus_{o}");
    let pi = format!("pi_{o}");
    let sub = format!("sub_{o}");
    let metadata = json!({"user_id": s.user, "product_key": s.product});
    let now = s.created;
    let period_end = now + 30 * 86_400;
    match event_type {
        "checkout.session.completed"
        | "checkout.session.async_payment_succeeded"
        | "checkout.session.async_payment_failed"
        | "checkout.session.expired" => json!({
            "id": format!("cs_{o}"), "object": "checkout.session",
            "mode": if s.subscription { "subscription" } else { "payment" },
            "subscription": if s.subscription { json!(sub) } else { Value::Null },
            "payment_status": if event_type == "checkout.session.expired" { "unpaid" } else { "paid" },
            "status": if event_type == "checkout.session.expired" { "expired" } else { "complete" },
            "client_reference_id": s.user, "customer": customer,
            "payment_intent": if s.subscription { Value::Null } else { json!(pi) },
            "amount_total": s.amount, "currency": "usd", "metadata": metadata,
            "after_expiration": {"recovery": {"enabled": true, "url": format!("https://buy.stripe.com/r/{o}")}},
        }),
        "payment_intent.succeeded" => json!({
            "id": pi, "object": "payment_intent", "amount": s.amount, "amount_received": s.amount,
            "currency": "usd", "customer": customer, "status": "succeeded", "metadata": metadata,
        }),
        "charge.refunded" => json!({
            "id": format!("ch_{o}"), "object": "charge", "amount": s.amount,
            "amount_refunded": s.amount, "refunded": true, "currency": "usd",
            "customer": customer, "payment_intent": pi, "metadata": metadata,
            "refunds": {"data": [{"id": format!("re_{o}"), "amount": s.amount, "reason": "requested_by_customer"}]},
        }),
        t if t.starts_with("charge.dispute.") => json!({
            "id": format!("dp_{o}"), "object": "dispute", "amount": s.amount,
            "charge": format!("ch_{o}"), "payment_intent": pi, "currency": "usd",
            "status": if t == "charge.dispute.closed" { "lost" } else { "needs_response" },
            "reason": "fraudulent",
        }),
        "invoice.paid" | "invoice.payment_failed" => json!({
            "id": format!("in_{o}"), "object": "invoice", "customer": customer,
            "status": if event_type == "invoice.paid" { "paid" } else { "open" },
            "amount_paid": s.amount, "currency": "usd",
            "parent": {"subscription_details": {"subscription": sub, "metadata": metadata}},
            "lines": {"data": [{"period": {"start": now, "end": period_end}}]},
            "period_end": period_end,
        }),
        t if t.starts_with("customer.subscription.") => json!({
            "id": sub, "object": "subscription", "customer": customer,
            "status": if t.ends_with("deleted") { "canceled" } else { "active" },
            "cancel_at_period_end": false, "metadata": metadata,
            "ended_at": if t.ends_with("deleted") { json!(now) } else { Value::Null },
            "items": {"data": [{"current_period_end": period_end, "quantity": 1,
                "price": {"id": format!("price_{}", s.product)}}]},
        }),
        _ => json!({"id": format!("obj_{o}"), "object": "unknown", "metadata": metadata}),
    }
}
