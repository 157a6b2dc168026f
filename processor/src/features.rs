//! Stripe Entitlements as a source: an `entitlements.active_entitlement_summary.updated` event
//! means "this customer's features changed". Its own list stops at 10, so before it reaches the
//! projection the complete list is read from `GET /v1/entitlements/active_entitlements` through
//! the Stripe client (with its retries); the projection then maps each feature `lookup_key` to
//! entitlement keys through the product registry (source `stripe_feature`).
//!
//! Invariant: a summary reaches the store with a complete list, or not at all — when Stripe
//! cannot be read the event is retried later, never applied with a partial list (which would
//! take away features the customer still has). Without `STRIPE_SECRET_KEY`, only summaries
//! whose own list is complete are applied.

use crate::events::{Event, EventKind};
use crate::stripe::{StripeClient, StripeError};

/// Why a summary could not be completed.
#[derive(Debug, thiserror::Error)]
pub enum CompleteError {
    #[error("reading the customer's active entitlements failed: {0}")]
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
    let EventKind::FeatureSummaryUpdated(summary) = event.kind else {
        return Ok(event);
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
