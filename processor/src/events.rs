//! Parsing of raw Stripe event bodies into [`Event`]s (interim version: recognises only the
//! user a payload names, enough for the consumer to be exercised end to end).
//!
//! Invariant: an [`EventError`] is permanent — the same bytes never parse on a later attempt.

use shared::ids::{StripeEventId, UserId};

/// A parsed Stripe event.
#[derive(Debug, Clone)]
pub struct Event {
    pub id: StripeEventId,
    pub event_type: String,
    pub created: i64,
    pub kind: EventKind,
}

/// What the event is about.
#[derive(Debug, Clone)]
pub enum EventKind {
    /// An event whose object names the application user.
    ForUser { user: UserId },
    /// A type the projection ignores.
    Unhandled,
}

/// Why a body can never become an [`Event`].
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("body is not JSON: {0}")]
    NotJson(#[from] serde_json::Error),
    #[error("missing or invalid field {0}")]
    Field(&'static str),
}

/// Parses a raw event body.
///
/// # Errors
/// [`EventError`] when the body is not JSON or lacks `id`, `type` or `created`.
pub fn parse(body: &[u8]) -> Result<Event, EventError> {
    let value: serde_json::Value = serde_json::from_slice(body)?;
    let id = value
        .get("id")
        .and_then(serde_json::Value::as_str)
        .and_then(|s| StripeEventId::parse(s).ok())
        .ok_or(EventError::Field("id"))?;
    let event_type = value
        .get("type")
        .and_then(serde_json::Value::as_str)
        .ok_or(EventError::Field("type"))?
        .to_owned();
    let created = value
        .get("created")
        .and_then(serde_json::Value::as_i64)
        .ok_or(EventError::Field("created"))?;
    let object = value
        .pointer("/data/object")
        .ok_or(EventError::Field("data.object"))?;
    let user = object
        .get("client_reference_id")
        .and_then(serde_json::Value::as_str)
        .or_else(|| {
            object
                .pointer("/metadata/user_id")
                .and_then(serde_json::Value::as_str)
        })
        .and_then(|s| UserId::parse(s).ok());
    let kind = match user {
        Some(user) => EventKind::ForUser { user },
        None => EventKind::Unhandled,
    };
    Ok(Event {
        id,
        event_type,
        created,
        kind,
    })
}
