//! The app's side: messages about entitlement changes, written to the `outbox` table by the one
//! apply path and delivered by a relay to RabbitMQ and to a signed webhook.
//!
//! Invariants:
//! - a message exists if and only if its change committed: the store writes the row in the
//!   transaction that bumps the user's version ([`crate::store`]), so nothing is announced that
//!   rolled back and nothing committed goes unannounced;
//! - delivery is at least once, per user in `(version, seq)` order on each channel: the relay
//!   marks a row sent only after the broker's confirm (RabbitMQ) or a 2xx answer (webhook), and
//!   never hands out a user's row before the earlier ones on that channel. A crash between the
//!   delivery and the mark delivers the row again; receivers drop a message whose `version` is
//!   not newer than the last they applied (every `entitlements.changed` carries the full set);
//! - one relay per database delivers at a time (a session advisory lock on a connection of its
//!   own, released by Postgres when the holder dies), so several processors never interleave a
//!   user's messages.
//!
//! Modules: [`relay`] (the delivery loop), [`webhook`] (Standard Webhooks signing and sending),
//! [`admin`] (`processor outbox list|replay`).
//!
//! Direction: the message bodies are the domain's ([`crate::domain::message`], written by the
//! store); this module only stores the envelope's fields and delivers, over `config` and `db`.

pub mod admin;
mod relay;
pub mod webhook;

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Map, Value, json};
use tokio_postgres::Row;
use uuid::Uuid;

pub use relay::{RELAY_LOCK_KEY, STANDBY_RETRY, run};

/// One outbox row, as the relay delivers it.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub id: Uuid,
    pub user_id: String,
    pub version: i64,
    /// `entitlements.changed` or `notification.*`; also the routing key.
    pub kind: String,
    /// The type's own fields.
    pub body: Value,
    pub created_at: DateTime<Utc>,
}

/// The columns [`Message::from_row`] reads.
pub const MESSAGE_COLUMNS: &str = "id, user_id, version, type, body, created_at";

impl Message {
    /// Reads the [`MESSAGE_COLUMNS`] of a row.
    ///
    /// # Errors
    /// When a column is missing or of another type.
    pub fn from_row(row: &Row) -> Result<Self, tokio_postgres::Error> {
        Ok(Self {
            id: row.try_get("id")?,
            user_id: row.try_get("user_id")?,
            version: row.try_get("version")?,
            kind: row.try_get("type")?,
            body: row.try_get("body")?,
            created_at: row.try_get("created_at")?,
        })
    }

    /// The delivered JSON: `{"id","type","userId","version",…the type's fields…,"occurredAt"}`.
    #[must_use]
    pub fn to_json(&self) -> Value {
        let mut out = Map::new();
        out.insert("id".into(), json!(self.id));
        out.insert("type".into(), json!(self.kind));
        out.insert("userId".into(), json!(self.user_id));
        out.insert("version".into(), json!(self.version));
        if let Value::Object(fields) = &self.body {
            for (key, value) in fields {
                out.entry(key.clone()).or_insert_with(|| value.clone());
            }
        }
        out.insert(
            "occurredAt".into(),
            json!(self.created_at.to_rfc3339_opts(SecondsFormat::Millis, true)),
        );
        Value::Object(out)
    }

    /// [`Self::to_json`] as bytes.
    #[must_use]
    pub fn to_bytes(&self) -> Vec<u8> {
        self.to_json().to_string().into_bytes()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::domain::message::{MESSAGE_TYPES, NoticeKind};

    #[test]
    fn the_envelope_wraps_the_body_and_the_body_cannot_override_it() {
        let message = Message {
            id: Uuid::nil(),
            user_id: "u_1".into(),
            version: 7,
            kind: "notification.revoked".into(),
            body: json!({"userId": "someone_else", "entitlementKey": "pro", "version": 1}),
            created_at: DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
        };
        let json = message.to_json();
        assert_eq!(json["userId"], "u_1");
        assert_eq!(json["version"], 7);
        assert_eq!(json["type"], "notification.revoked");
        assert_eq!(json["entitlementKey"], "pro");
        assert_eq!(json["occurredAt"], "2023-11-14T22:13:20.000Z");
        assert_eq!(json["id"], "00000000-0000-0000-0000-000000000000");
    }

    #[test]
    fn the_asyncapi_document_names_every_message_type() {
        let doc = include_str!("../../../docs/asyncapi.yaml");
        for kind in MESSAGE_TYPES {
            assert!(doc.contains(&format!("name: {kind}")), "{kind}");
        }
    }

    #[test]
    fn the_migrations_trigger_writes_the_abandoned_checkouts_message_type() {
        // The one message type spelled in SQL (a migration cannot read the domain's rule).
        let migration = include_str!("../../../migrations/0005_outbox.sql");
        let kind = NoticeKind::CheckoutAbandoned;
        assert!(migration.contains(&format!("'{}'", kind.message_type())));
        assert!(migration.contains(&format!("NEW.kind = '{}'", kind.column())));
    }
}
