//! The export file format: one JSON object per line and per parked message.
//!
//! ```json
//! {"eventId":"evt_…","type":"invoice.paid","headers":{"attempts":6,…},
//!  "properties":{"messageId":"evt_…","type":"invoice.paid","timestamp":1700000000,…},
//!  "body":"{\"id\":…}","bodyBase64":"eyJpZCI6…"}
//! ```
//!
//! Invariant: `bodyBase64` is always present and is what `replay --from-file` publishes, so
//! the bytes round-trip exactly even when the body is not UTF-8 or not JSON; `body` is only a
//! readable copy, present when the bytes are valid UTF-8 JSON.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use lapin::BasicProperties;
use lapin::types::ShortString;
use serde::{Deserialize, Serialize};

use super::message::{ParkedMessage, json_to_table, table_to_json};

/// One line of an export file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ExportRecord {
    pub(crate) event_id: Option<String>,
    #[serde(rename = "type")]
    pub(crate) event_type: Option<String>,
    #[serde(default)]
    pub(crate) headers: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    pub(crate) properties: ExportProperties,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) body: Option<String>,
    pub(crate) body_base64: String,
}

/// The AMQP basic properties other than headers; absent ones are omitted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ExportProperties {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    message_id: Option<String>,
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    timestamp: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    content_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    content_encoding: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    delivery_mode: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    priority: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    correlation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reply_to: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expiration: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    user_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    app_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cluster_id: Option<String>,
}

fn text(value: &Option<ShortString>) -> Option<String> {
    value.as_ref().map(|s| s.as_str().to_owned())
}

fn short(field: &str, value: Option<&String>) -> Result<Option<ShortString>, String> {
    value
        .map(|v| ShortString::try_new(v.as_str()).map_err(|e| format!("properties.{field}: {e}")))
        .transpose()
}

impl ExportRecord {
    pub(crate) fn from_message(message: &ParkedMessage) -> Self {
        let p = &message.properties;
        let headers = match p.headers().as_ref().map(table_to_json) {
            Some(serde_json::Value::Object(map)) => map,
            _ => serde_json::Map::new(),
        };
        let body = std::str::from_utf8(&message.body)
            .ok()
            .filter(|s| serde_json::from_str::<serde_json::Value>(s).is_ok())
            .map(str::to_owned);
        Self {
            event_id: message.event_id(),
            event_type: message.event_type(),
            headers,
            properties: ExportProperties {
                message_id: text(p.message_id()),
                kind: text(p.kind()),
                timestamp: *p.timestamp(),
                content_type: text(p.content_type()),
                content_encoding: text(p.content_encoding()),
                delivery_mode: *p.delivery_mode(),
                priority: *p.priority(),
                correlation_id: text(p.correlation_id()),
                reply_to: text(p.reply_to()),
                expiration: text(p.expiration()),
                user_id: text(p.user_id()),
                app_id: text(p.app_id()),
                cluster_id: text(p.cluster_id()),
            },
            body,
            body_base64: STANDARD.encode(&message.body),
        }
    }

    /// The message as it was parked: exact body bytes, properties and headers.
    ///
    /// # Errors
    /// When `bodyBase64` is not base64 or a property does not fit AMQP's limits.
    pub(crate) fn to_message(&self) -> Result<ParkedMessage, String> {
        let body = STANDARD
            .decode(&self.body_base64)
            .map_err(|e| format!("bodyBase64: {e}"))?;
        let p = &self.properties;
        let mut props = BasicProperties::default();
        macro_rules! set_short {
            ($field:ident, $with:ident) => {
                if let Some(v) = short(stringify!($field), p.$field.as_ref())? {
                    props = props.$with(v);
                }
            };
        }
        set_short!(message_id, with_message_id);
        set_short!(kind, with_type);
        set_short!(content_type, with_content_type);
        set_short!(content_encoding, with_content_encoding);
        set_short!(correlation_id, with_correlation_id);
        set_short!(reply_to, with_reply_to);
        set_short!(expiration, with_expiration);
        set_short!(user_id, with_user_id);
        set_short!(app_id, with_app_id);
        set_short!(cluster_id, with_cluster_id);
        if let Some(ts) = p.timestamp {
            props = props.with_timestamp(ts);
        }
        if let Some(mode) = p.delivery_mode {
            props = props.with_delivery_mode(mode);
        }
        if let Some(priority) = p.priority {
            props = props.with_priority(priority);
        }
        if !self.headers.is_empty() {
            let table = json_to_table(&serde_json::Value::Object(self.headers.clone()))
                .map_err(|e| format!("headers: {e}"))?;
            props = props.with_headers(table);
        }
        Ok(ParkedMessage::new(body, props))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use lapin::types::{AMQPValue, FieldTable, LongString};

    #[test]
    fn records_round_trip_any_body_and_every_property() {
        let mut headers = FieldTable::default();
        headers.insert("attempts".into(), AMQPValue::LongLongInt(6));
        headers.insert(
            "last_error".into(),
            AMQPValue::LongString(LongString::from("db down")),
        );
        for body in [
            br#"{"id":"evt_1","type":"invoice.paid"}"#.to_vec(),
            vec![0xff, 0x00, 0xfe, b'{'],
            b"not json".to_vec(),
        ] {
            let message = ParkedMessage::new(
                body.clone(),
                BasicProperties::default()
                    .with_message_id("evt_1".into())
                    .with_type("invoice.paid".into())
                    .with_timestamp(1_700_000_000)
                    .with_content_type("application/json".into())
                    .with_delivery_mode(2)
                    .with_headers(headers.clone()),
            );
            let record = ExportRecord::from_message(&message);
            let line = serde_json::to_string(&record).unwrap();
            let back: ExportRecord = serde_json::from_str(&line).unwrap();
            assert_eq!(back, record);
            assert_eq!(back.to_message().unwrap(), message);
            assert_eq!(record.body.is_some(), body.starts_with(b"{\"id"));
        }
    }

    proptest::proptest! {
        #[test]
        fn any_body_and_text_headers_round_trip_through_a_line(
            body in proptest::collection::vec(proptest::num::u8::ANY, 0..512),
            id in "[a-zA-Z0-9_]{1,40}",
            error in ".{0,80}",
            attempts in proptest::num::i64::ANY,
        ) {
            let mut headers = FieldTable::default();
            headers.insert("attempts".into(), AMQPValue::LongLongInt(attempts));
            headers.insert("last_error".into(), AMQPValue::LongString(LongString::from(error)));
            let message = ParkedMessage::new(
                body,
                BasicProperties::default().with_message_id(id.into()).with_headers(headers),
            );
            let line = serde_json::to_string(&ExportRecord::from_message(&message)).unwrap();
            let back: ExportRecord = serde_json::from_str(&line).unwrap();
            proptest::prop_assert_eq!(back.to_message().unwrap(), message);
        }

        #[test]
        fn arbitrary_lines_never_panic(line in ".{0,200}") {
            if let Ok(record) = serde_json::from_str::<ExportRecord>(&line) {
                let _ = record.to_message();
            }
        }
    }
}
