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
//! Both go through the Stripe client and its retries.
//!
//! Invariant: a summary reaches the store with a complete list, or not at all — when Stripe
//! cannot be read the event is retried later, never applied with a partial list (which would
//! take away features the customer still has). Without `STRIPE_SECRET_KEY`, only summaries
//! whose own list is complete are applied, and sessions keep the payload's shape (resolved by
//! our metadata, amount and currency).

use crate::domain::events::{CheckoutSession, Event, EventKind};
use crate::domain::offer::{CheckoutOffer, LinkPrice};
use crate::stripe::{StripeClient, StripeError};

/// Why a summary could not be completed.
#[derive(Debug, thiserror::Error)]
pub enum CompleteError {
    #[error("reading from Stripe failed: {0}")]
    Stripe(#[from] StripeError),
    #[error("the summary lists more than 10 features and STRIPE_SECRET_KEY is not set")]
    NotConfigured,
}

/// `event` with its feature summary replaced by the customer's complete list; any other event
/// unchanged.
///
/// # Errors
/// [`CompleteError`] when the list cannot be read (retry later).
pub async fn complete(stripe: Option<&StripeClient>, event: Event) -> Result<Event, CompleteError> {
    let summary = match event.kind {
        EventKind::FeatureSummaryUpdated(summary) => summary,
        EventKind::CheckoutSessionCompleted(session) => {
            let session = with_line_item(stripe, session).await?;
            return Ok(Event {
                kind: EventKind::CheckoutSessionCompleted(session),
                ..event
            });
        }
        EventKind::CheckoutSessionAsyncPaymentSucceeded(session) => {
            let session = with_line_item(stripe, session).await?;
            return Ok(Event {
                kind: EventKind::CheckoutSessionAsyncPaymentSucceeded(session),
                ..event
            });
        }
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

/// The session a checkout event completes, when its line items are not known yet.
#[must_use]
pub fn session_to_complete(event: &Event) -> Option<&str> {
    match &event.kind {
        EventKind::CheckoutSessionCompleted(s)
        | EventKind::CheckoutSessionAsyncPaymentSucceeded(s)
            if !s.line_items_known && s.mode.is_some() =>
        {
            Some(&s.id)
        }
        _ => None,
    }
}

/// The Payment Link a checkout event's session was opened from, when its line items are not
/// known yet.
#[must_use]
pub fn link_to_complete(event: &Event) -> Option<&str> {
    match &event.kind {
        EventKind::CheckoutSessionCompleted(s)
        | EventKind::CheckoutSessionAsyncPaymentSucceeded(s)
            if !s.line_items_known && s.mode.is_some() =>
        {
            s.payment_link.as_deref()
        }
        _ => None,
    }
}

/// `event` completed without Stripe: from this service's own offer for its session, else from
/// its Payment Link's learned price; `None` when neither is known.
#[must_use]
pub fn without_stripe(
    event: &Event,
    offers: &[CheckoutOffer],
    links: &[LinkPrice],
) -> Option<Event> {
    let (EventKind::CheckoutSessionCompleted(session)
    | EventKind::CheckoutSessionAsyncPaymentSucceeded(session)) = &event.kind
    else {
        return None;
    };
    let completed = offers
        .iter()
        .find(|o| o.session_id == session.id)
        .and_then(|o| o.complete(session))
        .or_else(|| links.iter().find_map(|l| l.complete(session)))?;
    let kind = match event.kind {
        EventKind::CheckoutSessionCompleted(_) => EventKind::CheckoutSessionCompleted(completed),
        _ => EventKind::CheckoutSessionAsyncPaymentSucceeded(completed),
    };
    Some(Event {
        kind,
        ..event.clone()
    })
}

/// What a session completed from Stripe teaches about its Payment Link's price.
#[must_use]
pub fn learned_link_price(event: &Event) -> Option<LinkPrice> {
    match &event.kind {
        EventKind::CheckoutSessionCompleted(s)
        | EventKind::CheckoutSessionAsyncPaymentSucceeded(s) => LinkPrice::learned_from(s),
        _ => None,
    }
}

/// True for the events [`complete`] has to read Stripe for (or, without a key, fails for):
/// a feature summary (its newest complete list is read when a key is set; without one, only a
/// list cut short needs it), and, when a key is set, a paid session whose line items are not
/// known yet. Without a key a session keeps its payload's shape.
#[must_use]
pub fn needs_stripe(event: &Event, has_key: bool) -> bool {
    match &event.kind {
        EventKind::FeatureSummaryUpdated(summary) => has_key || !summary.complete,
        EventKind::CheckoutSessionCompleted(s)
        | EventKind::CheckoutSessionAsyncPaymentSucceeded(s) => {
            has_key && !s.line_items_known && s.mode.is_some()
        }
        _ => false,
    }
}

/// `session` with the price of its first line item, read from Stripe when the payload had none.
/// A session Stripe does not know (another account or mode) keeps its payload's shape.
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
        Err(error) if error.is_resource_missing() => Ok(session),
        Err(error) => Err(error.into()),
    }
}
