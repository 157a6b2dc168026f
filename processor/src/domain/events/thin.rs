//! Thin events (`object: "v2.core.event"`): what one names, read from its envelope.

use serde::Deserialize;

use super::{EventError, EventKind, HANDLED_TYPES, wire};

/// The event Stripe sends once it generates events again after failing to.
pub const GENERATION_FAILURE_RESOLVED: &str = "v2.core.health.event_generation_failure.resolved";

/// `GET /v2/core/events/{id}` of a generation failure: `data.impact` names the event Stripe
/// failed to generate and its object.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct FailureEvent {
    data: FailureData,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct FailureData {
    impact: Impact,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Impact {
    event_type: wire::Maybe<String>,
    related_object: wire::Maybe<wire::RelatedObject>,
}

/// What a generation failure (`body`: the v2 event as `GET /v2/core/events/{id}` answers)
/// missed: the thin twin of the event Stripe failed to generate when it is a handled type
/// (named with or without `v1.`), else [`EventKind::Unhandled`].
///
/// # Errors
/// [`EventError`] for a body that is not such an event, or an object id that is not one.
pub fn missed_event(body: &[u8]) -> Result<EventKind, EventError> {
    let event: FailureEvent = serde_json::from_slice(body)?;
    let Some(missed) = event.data.impact.event_type.text() else {
        return Err(EventError::MissingField("data.impact.event_type"));
    };
    let missed = missed.strip_prefix("v1.").unwrap_or(&missed);
    if !HANDLED_TYPES.contains(&missed) {
        return Ok(EventKind::Unhandled);
    }
    thin_kind(
        &format!("v1.{missed}"),
        event.data.impact.related_object.get(),
    )
}

/// What a thin event names: the type its snapshot twin has, and the object to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThinEvent {
    /// The snapshot twin's type (`v1.` taken off), one of [`HANDLED_TYPES`].
    pub snapshot_type: String,
    /// `related_object.type` (`checkout.session`, `subscription`, …).
    pub object_type: String,
    /// `related_object.id`: letters, digits and `_` only.
    pub object_id: String,
}

impl ThinEvent {
    /// The API path of the related object, built from its type and id (never from the
    /// payload's `url`); `None` for an object type this service does not read.
    #[must_use]
    pub fn object_path(&self) -> Option<String> {
        let collection = match self.object_type.as_str() {
            "checkout.session" => "checkout/sessions",
            "payment_intent" => "payment_intents",
            "charge" => "charges",
            "dispute" => "disputes",
            "invoice" => "invoices",
            "invoice_payment" => "invoice_payments",
            "subscription" => "subscriptions",
            _ => return None,
        };
        Some(format!("/v1/{collection}/{}", self.object_id))
    }

    /// What the read expands, so the twin needs no second request: a session's line items
    /// (which decide what was paid for).
    #[must_use]
    pub fn expand(&self) -> &'static [&'static str] {
        match self.object_type.as_str() {
            "checkout.session" => &["line_items"],
            _ => &[],
        }
    }
}

/// A thin event's kind: [`EventKind::Thin`] for a `v1.` twin of a handled type, else
/// [`EventKind::Unhandled`] (`v2.*` events and other v1 types).
pub(super) fn thin_kind(
    event_type: &str,
    related: Option<wire::RelatedObject>,
) -> Result<EventKind, EventError> {
    if event_type == GENERATION_FAILURE_RESOLVED {
        return Ok(EventKind::GenerationFailureResolved);
    }
    let Some(snapshot_type) = event_type
        .strip_prefix("v1.")
        .filter(|t| HANDLED_TYPES.contains(t))
    else {
        return Ok(EventKind::Unhandled);
    };
    let related = related.ok_or(EventError::MissingField("related_object"))?;
    let object_id = related
        .id
        .text()
        .ok_or(EventError::MissingField("related_object.id"))?;
    let object_type = related
        .object_type
        .text()
        .ok_or(EventError::MissingField("related_object.type"))?;
    let id_ok = object_id.len() <= 255
        && object_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !id_ok {
        return Err(EventError::InvalidField {
            field: "related_object.id",
        });
    }
    Ok(EventKind::Thin(ThinEvent {
        snapshot_type: snapshot_type.to_owned(),
        object_type,
        object_id,
    }))
}
