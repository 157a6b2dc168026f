//! Events completed from Stripe before they are applied, where the payload lacks what the
//! projection needs to know what was paid or granted:
//!
//! - Stripe Entitlements: an `entitlements.active_entitlement_summary.updated` event means
//!   "this customer's features changed"; its own list stops at 10, so the complete list is read
//!   from `GET /v1/entitlements/active_entitlements` (the projection then maps each feature
//!   `lookup_key` through the product registry, source `stripe_feature`);
//! - a paid Checkout Session without `line_items` in the payload (webhooks never carry them):
//!   a session this service created is completed from its recorded offer, and a Payment
//!   Link's session from the link's learned price ([`without_stripe`], no request); any other
//!   session's line items are read from
//!   `GET /v1/checkout/sessions/{id}/line_items`, so the price paid, not only the metadata,
//!   decides the product.
//!
//! - a dispute of a payment nothing here ties to a purchase or an invoice yet: since API
//!   version basil a charge no longer names its invoice, so a chargeback on a subscription's
//!   payment reaches its subscription through the payment's `InvoicePayment`, read from
//!   `GET /v1/invoice_payments` (and the invoice's subscription from `GET /v1/invoices/{id}`)
//!   when no `invoice_payment.paid` event has tied them first.
//!
//! - a thin event (`v1.<type>` from an event destination): its related object is read
//!   (`GET /v1/<collection>/<id>`, the path built from the object's type, never taken from the
//!   payload) and the event becomes its snapshot twin: the same id, type and `created`, the
//!   object as Stripe holds it now (never older than the event), then completed as that twin
//!   would be. So it is deduplicated, ordered and applied exactly as the snapshot event.
//!
//! All go through the Stripe client and its retries.
//!
//! Invariant: a summary reaches the store with a complete list, or not at all — when Stripe
//! cannot be read the event is retried later, never applied with a partial list (which would
//! take away features the customer still has). Without `STRIPE_SECRET_KEY`, only summaries
//! whose own list is complete are applied, and sessions keep the payload's shape (resolved by
//! our metadata, amount and currency).

use crate::domain::events::{CheckoutSession, Dispute, Event, EventKind, PaidFor};
use crate::domain::offer::{CheckoutOffer, LinkPrice};
use crate::stripe::{StripeClient, StripeError};

/// Why a summary could not be completed.
#[derive(Debug, thiserror::Error)]
pub enum CompleteError {
    #[error("reading from Stripe failed: {0}")]
    Stripe(#[from] StripeError),
    #[error("the summary lists more than 10 features and STRIPE_SECRET_KEY is not set")]
    NotConfigured,
    #[error("a thin event's object is read from Stripe, and STRIPE_SECRET_KEY is not set")]
    ThinWithoutKey,
    #[error("a thin event names a {0} object, which this service does not read")]
    ThinObject(String),
    #[error("the object read for a thin event does not make its snapshot twin: {0}")]
    ThinTwin(#[from] crate::domain::events::EventError),
}

/// `event` with its feature summary replaced by the customer's complete list; any other event
/// unchanged.
///
/// # Errors
/// [`CompleteError`] when the list cannot be read (retry later).
pub async fn complete(stripe: Option<&StripeClient>, event: Event) -> Result<Event, CompleteError> {
    if let EventKind::GenerationFailureResolved = &event.kind {
        // The event Stripe failed to generate, read from the failure's own event; its object
        // is then read as a thin event's.
        let stripe = stripe.ok_or(CompleteError::ThinWithoutKey)?;
        let failure = stripe
            .get_object(&format!("/v2/core/events/{}", event.id.as_str()), &[])
            .await?;
        let kind = crate::domain::events::missed_event(failure.to_string().as_bytes())?;
        tracing::info!(event_id = %event.id, missed = ?kind, "an event Stripe failed to generate");
        return Box::pin(complete(Some(stripe), Event { kind, ..event })).await;
    }
    if let EventKind::Thin(thin) = &event.kind {
        let stripe = stripe.ok_or(CompleteError::ThinWithoutKey)?;
        let path = thin
            .object_path()
            .ok_or_else(|| CompleteError::ThinObject(thin.object_type.clone()))?;
        let object = stripe.get_object(&path, thin.expand()).await?;
        let twin = serde_json::json!({
            "id": event.id.as_str(), "object": "event", "type": thin.snapshot_type,
            "created": event.created, "livemode": event.origin.livemode,
            "account": event.origin.account, "data": {"object": object},
        });
        let twin = crate::domain::events::parse(twin.to_string().as_bytes())?;
        // The twin may itself need Stripe (a session's line items, a dispute's invoice).
        return Box::pin(complete(Some(stripe), twin)).await;
    }
    if let Some(session) = event.paid_session() {
        let session = with_line_item(stripe, session.clone()).await?;
        return Ok(event.with_paid_session(session));
    }
    if let EventKind::ChargeDispute(dispute) = event.kind {
        let dispute = with_invoice(stripe, dispute).await?;
        return Ok(Event {
            kind: EventKind::ChargeDispute(dispute),
            ..event
        });
    }
    let summary = match event.kind {
        EventKind::FeatureSummaryUpdated(summary) => summary,
        _ => return Ok(event),
    };
    let summary = match stripe {
        Some(stripe) => {
            let list = stripe.list_active_entitlements(&summary.customer).await?;
            let keys = list
                .iter()
                .filter_map(|e| e.get("lookup_key")?.as_str().map(str::to_owned))
                .collect();
            summary.completed(keys)
        }
        None if summary.complete => summary,
        None => return Err(CompleteError::NotConfigured),
    };
    Ok(Event {
        kind: EventKind::FeatureSummaryUpdated(summary),
        ..event
    })
}

/// The paid session of a checkout event whose line items are not known yet.
fn incomplete_session(event: &Event) -> Option<&CheckoutSession> {
    event.paid_session().filter(|s| s.line_items_missing())
}

/// The session a checkout event completes, when its line items are not known yet.
#[must_use]
pub fn session_to_complete(event: &Event) -> Option<&str> {
    incomplete_session(event).map(|s| s.id.as_str())
}

/// The Payment Link a checkout event's session was opened from, when its line items are not
/// known yet.
#[must_use]
pub fn link_to_complete(event: &Event) -> Option<&str> {
    incomplete_session(event).and_then(|s| s.payment_link.as_deref())
}

/// `event` completed without Stripe, with what completed it (the metric's `from`): this
/// service's own offer for its session, else its Payment Link's learned price; `None` when
/// neither is known.
#[must_use]
pub fn without_stripe(
    event: &Event,
    offers: &[CheckoutOffer],
    links: &[LinkPrice],
) -> Option<(Event, &'static str)> {
    let session = incomplete_session(event)?;
    let (completed, from) = offers
        .iter()
        .find(|o| o.session_id == session.id)
        .and_then(|o| o.complete(session))
        .map(|s| (s, "offer"))
        .or_else(|| {
            links
                .iter()
                .find_map(|l| l.complete(session))
                .map(|s| (s, "payment_link"))
        })?;
    Some((event.clone().with_paid_session(completed), from))
}

/// What a session completed from Stripe teaches about its Payment Link's price.
#[must_use]
pub fn learned_link_price(event: &Event) -> Option<LinkPrice> {
    event.paid_session().and_then(LinkPrice::learned_from)
}

/// True for the events [`complete`] has to read Stripe for (or, without a key, fails for):
/// a feature summary (its newest complete list is read when a key is set; without one, only a
/// list cut short needs it), and, when a key is set, a paid session whose line items are not
/// known yet or a dispute whose payment nothing here ties yet. Without a key a session keeps
/// its payload's shape and a dispute is applied as it is.
#[must_use]
pub fn needs_stripe(event: &Event, has_key: bool) -> bool {
    match &event.kind {
        // Read from Stripe; without a key the completion fails and says why.
        EventKind::Thin(_) | EventKind::GenerationFailureResolved => true,
        EventKind::FeatureSummaryUpdated(summary) => has_key || !summary.complete,
        EventKind::ChargeDispute(dispute) => has_key && dispute.needs_invoice(),
        _ => has_key && incomplete_session(event).is_some(),
    }
}

/// `dispute` with what its payment paid, read from Stripe when nothing here ties it yet. A
/// request Stripe refuses for what it is (a 4xx other than a rate limit: an unknown payment, an
/// endpoint a fake does not serve) settles it as paying no invoice; only an outage is retried.
async fn with_invoice(
    stripe: Option<&StripeClient>,
    dispute: Dispute,
) -> Result<Dispute, CompleteError> {
    let (Some(stripe), Some(payment)) = (
        stripe.filter(|_| dispute.needs_invoice()),
        dispute.payment(),
    ) else {
        return Ok(dispute);
    };
    let paid_for = match stripe.invoice_of_payment(payment).await {
        Ok(Some((invoice, subscription))) => PaidFor::Invoice {
            invoice,
            subscription,
        },
        Ok(None) => PaidFor::Settled,
        Err(error) if !error.is_transient() && !matches!(error.status(), Some(401 | 403)) => {
            tracing::warn!(%error, dispute_id = %dispute.id,
                "the disputed payment's invoice cannot be read; applied as paying none");
            PaidFor::Settled
        }
        Err(error) => return Err(error.into()),
    };
    Ok(dispute.with_invoice(paid_for))
}

/// `session` with the price of its first line item, read from Stripe when the payload had none.
/// A session Stripe does not know (another account or mode) is marked so: it grants nothing,
/// whatever its metadata says.
async fn with_line_item(
    stripe: Option<&StripeClient>,
    mut session: CheckoutSession,
) -> Result<CheckoutSession, CompleteError> {
    let Some(stripe) = stripe.filter(|_| !session.line_items_known) else {
        return Ok(session);
    };
    match stripe.list_checkout_line_items(&session.id).await {
        Ok(items) => {
            session.price_id = items.first().and_then(|item| {
                let price = item.get("price")?;
                price
                    .as_str()
                    .or_else(|| price.get("id")?.as_str())
                    .map(str::to_owned)
            });
            session.line_items_known = true;
            Ok(session)
        }
        Err(error) if error.is_resource_missing() => {
            session.line_items_known = true;
            session.unknown_to_stripe = true;
            Ok(session)
        }
        Err(error) => Err(error.into()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::domain::events::{self, CheckoutMode};
    use crate::domain::offer::OfferedPrice;
    use shared::samples::{self, Sample};

    fn paid(event_type: &str, link: Option<&str>) -> Event {
        let mut body = samples::event("evt_c", event_type, &Sample::pro("u_1", "c1"));
        if let Some(link) = link {
            body["data"]["object"]["payment_link"] = serde_json::json!(link);
        }
        events::parse(body.to_string().as_bytes()).unwrap()
    }

    fn offer(price: &str) -> CheckoutOffer {
        CheckoutOffer {
            session_id: "cs_c1".into(),
            user_id: "u_1".into(),
            product_key: "pro".into(),
            mode: CheckoutMode::Payment,
            price: OfferedPrice::Stripe(price.into()),
        }
    }

    fn link(price: &str) -> LinkPrice {
        LinkPrice {
            payment_link: "plink_1".into(),
            price_id: price.into(),
        }
    }

    #[test]
    fn both_paid_kinds_are_completed_without_stripe_the_offer_first() {
        for event_type in [
            "checkout.session.completed",
            "checkout.session.async_payment_succeeded",
        ] {
            let event = paid(event_type, Some("plink_1"));
            assert!(needs_stripe(&event, true), "{event_type}");
            assert!(
                !needs_stripe(&event, false),
                "without a key the payload decides"
            );
            let (done, from) =
                without_stripe(&event, &[offer("price_offer")], &[link("price_link")]).unwrap();
            assert_eq!(from, "offer");
            assert_eq!(done.event_type, event_type);
            let session = done.paid_session().unwrap();
            assert_eq!(session.price_id.as_deref(), Some("price_offer"));
            assert!(!needs_stripe(&done, true), "completed once");
            assert_eq!(without_stripe(&done, &[offer("price_offer")], &[]), None);

            let (done, from) = without_stripe(&event, &[], &[link("price_link")]).unwrap();
            assert_eq!(from, "payment_link");
            assert_eq!(
                done.paid_session().unwrap().price_id.as_deref(),
                Some("price_link")
            );
            assert_eq!(learned_link_price(&done), Some(link("price_link")));
            assert_eq!(
                without_stripe(&event, &[], &[]),
                None,
                "unknown: read from Stripe"
            );
        }
    }
}
