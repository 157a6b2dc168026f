//! The type-specific fields of the messages the app receives, built from the domain's own view:
//! the outbox stores them in the transaction that commits the change, the relay wraps them in
//! the envelope ([`crate::outbox::Message`]).

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use super::events::Event;
use super::view::{EntitlementView, item_view};

/// The `cause` of a message: the event whose commit it announces.
#[must_use]
pub fn cause(event: &Event) -> Value {
    json!({"eventId": event.id.as_str(), "eventType": event.event_type})
}

/// The type-specific fields of `entitlements.changed`: the user's entitlements exactly as
/// `GET /api/entitlements` lists them, at the transaction's time `now`.
#[must_use]
pub fn entitlements_body(views: &[EntitlementView], now: DateTime<Utc>) -> Value {
    let items: Vec<_> = views.iter().map(|e| item_view(e, now)).collect();
    json!({ "entitlements": items })
}
