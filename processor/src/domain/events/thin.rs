//! Thin events (`object: "v2.core.event"`): what one names, read from its envelope.

use super::{EventError, EventKind, HANDLED_TYPES, wire};

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
}

/// A thin event's kind: [`EventKind::Thin`] for a `v1.` twin of a handled type, else
/// [`EventKind::Unhandled`] (`v2.*` events and other v1 types).
pub(super) fn thin_kind(
    event_type: &str,
    related: Option<wire::RelatedObject>,
) -> Result<EventKind, EventError> {
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
