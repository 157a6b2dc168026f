//! The messages the app receives: their types ([`MESSAGE_TYPES`]) and their type-specific
//! fields, built from the domain's own view. The store writes them to the outbox in the
//! transaction that commits the change; the relay wraps them in the envelope
//! ([`crate::outbox::Message`]). `docs/asyncapi.yaml` documents each type.

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use super::events::Event;
use super::organization::SUBJECT_PREFIX;
use super::projection::{AbandonedCheckout, Entitlement, EntitlementStatus};
use super::view::{EntitlementView, Role, item_view};

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

/// One member of an organisation, as its messages list them (by seat).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Member {
    pub user_id: String,
    pub role: Role,
    pub seat: i64,
}

/// The body of an organisation's `entitlements.changed` (`subject` is `org:{id}`): its
/// entitlements, its id and its members by seat. Sent when its entitlements or its members
/// change; a member's access is theirs and the organisation's for the seats they hold.
#[must_use]
pub fn organization_body(
    views: &[EntitlementView],
    now: DateTime<Utc>,
    subject: &str,
    members: &[Member],
) -> Value {
    let mut body = entitlements_body(views, now);
    body["organizationId"] = json!(subject.strip_prefix(SUBJECT_PREFIX).unwrap_or(subject));
    body["members"] = json!(members);
    body
}

/// What a notification is about: its `notifications.kind` and its message's `type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoticeKind {
    /// An entitlement became `revoked` (a refund, a lost dispute, an ended subscription).
    Revoked,
    /// An entitlement became `suspended` (an open dispute).
    Suspended,
    /// A checkout session expired unpaid.
    CheckoutAbandoned,
}

impl NoticeKind {
    /// The `notifications.kind` column.
    #[must_use]
    pub fn column(self) -> &'static str {
        match self {
            Self::Revoked => "entitlement_revoked",
            Self::Suspended => "entitlement_suspended",
            Self::CheckoutAbandoned => "checkout_abandoned",
        }
    }

    /// The message `type` the app receives (also the routing key), as `docs/asyncapi.yaml`
    /// names it.
    #[must_use]
    pub const fn message_type(self) -> &'static str {
        match self {
            Self::Revoked => "notification.revoked",
            Self::Suspended => "notification.suspended",
            Self::CheckoutAbandoned => "notification.checkout_abandoned",
        }
    }
}

/// The message `type` of a user's entitlements after a change.
pub const ENTITLEMENTS_CHANGED: &str = "entitlements.changed";

/// Every message type the app can receive.
pub const MESSAGE_TYPES: [&str; 4] = [
    ENTITLEMENTS_CHANGED,
    NoticeKind::Revoked.message_type(),
    NoticeKind::Suspended.message_type(),
    NoticeKind::CheckoutAbandoned.message_type(),
];

/// One notification to queue: stored in `notifications` once per `dedupe_key` (the same event
/// reached through another order, or replayed, queues nothing new) and announced to the app as
/// a message of [`NoticeKind::message_type`] with `payload` as its fields.
#[derive(Debug, Clone, PartialEq)]
pub struct Notice {
    pub kind: NoticeKind,
    /// `None` while the checkout's user is unknown: stored, not announced.
    pub user_id: Option<String>,
    pub dedupe_key: String,
    pub payload: Value,
}

impl Notice {
    /// `entitlement` of `user` became revoked or suspended; `None` for any other status.
    #[must_use]
    pub fn status_change(user: &str, entitlement: &Entitlement) -> Option<Self> {
        let kind = match entitlement.status {
            EntitlementStatus::Revoked => NoticeKind::Revoked,
            EntitlementStatus::Suspended => NoticeKind::Suspended,
            _ => return None,
        };
        Some(Self {
            kind,
            user_id: Some(user.to_owned()),
            // Keyed by the source, so the same change reached through another event order (or
            // a replay) is queued once.
            dedupe_key: format!(
                "{}:{user}:{}:{}:{}",
                kind.column(),
                entitlement.key,
                entitlement.source.as_str(),
                entitlement.source_id
            ),
            payload: json!({
                "userId": user,
                "entitlementKey": entitlement.key,
                "status": entitlement.status.as_str(),
                "source": entitlement.source.as_str(),
                "sourceId": entitlement.source_id,
            }),
        })
    }

    /// `checkout` expired unpaid; `user_id` is its user when known.
    #[must_use]
    pub fn abandoned(checkout: &AbandonedCheckout, user_id: String, product_key: &str) -> Self {
        Self {
            kind: NoticeKind::CheckoutAbandoned,
            user_id: Some(user_id),
            dedupe_key: format!("checkout_abandoned:{}", checkout.session_id),
            payload: json!({
                "checkoutSessionId": checkout.session_id,
                "productKey": product_key,
                "recoveryUrl": checkout.recovery_url,
            }),
        }
    }
}
