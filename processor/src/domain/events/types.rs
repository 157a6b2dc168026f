//! The event types the projection acts on, and the metric label of any type.

/// Every event type the projection acts on; any other is [`EventKind::Unhandled`].
pub const HANDLED_TYPES: [&str; 18] = [
    "checkout.session.completed",
    "checkout.session.async_payment_succeeded",
    "checkout.session.async_payment_failed",
    "checkout.session.expired",
    "payment_intent.succeeded",
    "charge.refunded",
    "charge.dispute.created",
    "charge.dispute.updated",
    "charge.dispute.closed",
    "charge.dispute.funds_withdrawn",
    "charge.dispute.funds_reinstated",
    "invoice.paid",
    "invoice.payment_failed",
    "invoice_payment.paid",
    "customer.subscription.created",
    "customer.subscription.updated",
    "customer.subscription.deleted",
    "entitlements.active_entitlement_summary.updated",
];

/// The `type` label of an event's metrics: a handled type by name, any other `other` (a
/// delivery's type is whatever its sender wrote; each would be a new series).
#[must_use]
pub fn type_label(event_type: &str) -> &'static str {
    // A thin twin (`v1.<type>`) counts as its snapshot type.
    let event_type = event_type.strip_prefix("v1.").unwrap_or(event_type);
    HANDLED_TYPES
        .iter()
        .find(|t| **t == event_type)
        .copied()
        .unwrap_or("other")
}
