//! What the operator commands know about one parked message: its identity, the dead-letter
//! headers the consumer wrote, and the exact body and properties it arrived with.
//!
//! Invariant: a replayed message carries the parked body and properties unchanged, except that
//! its headers lose everything the dead-lettering added (`last_error`, `dead_lettered_at`,
//! `x-death`, …) and `attempts` starts again at 0, so the processor gives it a full retry
//! budget and never counts from an earlier life.

use std::collections::BTreeMap;

use chrono::{DateTime, TimeZone, Utc};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use sha2::{Digest, Sha256};
use shared::topology::headers;

/// Headers that only describe the message's stay in the dead-letter queue or its path there,
/// dropped on replay. `x-*` headers set by the broker (`x-death`, `x-first-death-*`, …) go too.
const DEAD_LETTER_HEADERS: [&str; 2] = [headers::LAST_ERROR, headers::DEAD_LETTERED_AT];

/// One message read from the dead-letter queue (or from an export file).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ParkedMessage {
    pub(crate) body: Vec<u8>,
    pub(crate) properties: BasicProperties,
}

impl ParkedMessage {
    pub(crate) fn new(body: Vec<u8>, properties: BasicProperties) -> Self {
        Self { body, properties }
    }

    /// The event id: `message_id`, or the body's `id` for a message published without one.
    pub(crate) fn event_id(&self) -> Option<String> {
        self.properties
            .message_id()
            .as_ref()
            .map(|id| id.as_str().to_owned())
            .or_else(|| self.body_field("id"))
    }

    /// The event type: the `type` property, or the body's `type`.
    pub(crate) fn event_type(&self) -> Option<String> {
        self.properties
            .kind()
            .as_ref()
            .map(|t| t.as_str().to_owned())
            .or_else(|| self.body_field("type"))
    }

    fn body_field(&self, field: &str) -> Option<String> {
        let value: serde_json::Value = serde_json::from_slice(&self.body).ok()?;
        // Only what fits an AMQP short string can serve as a routing key or message id.
        value
            .get(field)?
            .as_str()
            .filter(|s| s.len() <= lapin::types::MAX_SHORT_STRING_LENGTH)
            .map(str::to_owned)
    }

    pub(crate) fn header(&self, name: &str) -> Option<&AMQPValue> {
        self.properties.headers().as_ref()?.inner().get(name)
    }

    pub(crate) fn attempts(&self) -> Option<i64> {
        self.header(headers::ATTEMPTS).and_then(headers::integer)
    }

    pub(crate) fn header_text(&self, name: &str) -> Option<String> {
        self.header(name).and_then(headers::text)
    }

    /// When the message was parked: the `dead_lettered_at` header the consumer writes, else the
    /// time of the broker's most recent `x-death` entry (a message the main queue dead-lettered
    /// by itself, e.g. past its delivery limit). Never the event's own `created`/timestamp: an
    /// event created long ago but parked today is not old.
    pub(crate) fn dead_lettered_at(&self) -> Option<DateTime<Utc>> {
        self.header_text(headers::DEAD_LETTERED_AT)
            .and_then(|raw| DateTime::parse_from_rfc3339(&raw).ok())
            .map(|t| t.with_timezone(&Utc))
            .or_else(|| self.x_death_time())
    }

    /// The `time` of the first (most recent) `x-death` entry.
    fn x_death_time(&self) -> Option<DateTime<Utc>> {
        let AMQPValue::FieldArray(deaths) = self.header("x-death")? else {
            return None;
        };
        deaths
            .as_slice()
            .iter()
            .filter_map(|death| match death {
                AMQPValue::FieldTable(t) => t.inner().get("time").and_then(headers::integer),
                _ => None,
            })
            .max()
            .and_then(|secs| Utc.timestamp_opt(secs, 0).single())
    }

    pub(crate) fn timestamp(&self) -> Option<DateTime<Utc>> {
        let secs = i64::try_from((*self.properties.timestamp())?).ok()?;
        Utc.timestamp_opt(secs, 0).single()
    }

    /// The message a replay publishes: the same body with [`Self::replay_properties`].
    pub(crate) fn for_replay(&self) -> Self {
        Self::new(self.body.clone(), self.replay_properties())
    }

    /// The properties a replay publishes: unchanged except for the headers (see the module doc).
    pub(crate) fn replay_properties(&self) -> BasicProperties {
        let mut table: BTreeMap<ShortString, AMQPValue> = self
            .properties
            .headers()
            .as_ref()
            .map(|h| h.inner().clone())
            .unwrap_or_default();
        table.retain(|name, _| {
            !DEAD_LETTER_HEADERS.contains(&name.as_str()) && !name.as_str().starts_with("x-")
        });
        // Keep the integer width the consumer wrote, so whatever reads it back sees its own type.
        let zero = match table.get(headers::ATTEMPTS) {
            Some(AMQPValue::ShortShortInt(_)) => AMQPValue::ShortShortInt(0),
            Some(AMQPValue::ShortShortUInt(_)) => AMQPValue::ShortShortUInt(0),
            Some(AMQPValue::ShortInt(_)) => AMQPValue::ShortInt(0),
            Some(AMQPValue::ShortUInt(_)) => AMQPValue::ShortUInt(0),
            Some(AMQPValue::LongInt(_)) => AMQPValue::LongInt(0),
            Some(AMQPValue::LongUInt(_)) => AMQPValue::LongUInt(0),
            _ => AMQPValue::LongLongInt(0),
        };
        table.insert(ShortString::from(headers::ATTEMPTS), zero);
        self.properties
            .clone()
            .with_headers(FieldTable::from(table))
    }
}

/// A header value as JSON, for `show --json`-style output and export files. Strings, numbers,
/// booleans, arrays and tables map to their JSON kinds; byte arrays become their UTF-8 text
/// when they are text; decimals become numbers.
pub(crate) fn value_to_json(value: &AMQPValue) -> serde_json::Value {
    use serde_json::Value;
    match value {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::Float(f) => {
            serde_json::Number::from_f64(f64::from(*f)).map_or(Value::Null, Value::Number)
        }
        AMQPValue::Double(f) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
        AMQPValue::DecimalValue(d) => {
            let v = f64::from(d.value) / 10f64.powi(i32::from(d.scale));
            serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number)
        }
        AMQPValue::LongString(_) | AMQPValue::ShortString(_) => {
            Value::String(headers::text(value).unwrap_or_default())
        }
        AMQPValue::ByteArray(b) => {
            Value::String(String::from_utf8_lossy(b.as_slice()).into_owned())
        }
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(value_to_json).collect()),
        AMQPValue::FieldTable(t) => table_to_json(t),
        AMQPValue::Void => Value::Null,
        other => headers::integer(other).map_or(Value::Null, Value::from),
    }
}

pub(crate) fn table_to_json(table: &FieldTable) -> serde_json::Value {
    serde_json::Value::Object(
        table
            .inner()
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), value_to_json(v)))
            .collect(),
    )
}

/// The inverse of [`value_to_json`] by JSON kind: strings become long strings, integers 64-bit
/// integers, other numbers doubles.
///
/// # Errors
/// When a table key is longer than AMQP allows (255 bytes).
pub(crate) fn json_to_value(value: &serde_json::Value) -> Result<AMQPValue, String> {
    use serde_json::Value;
    Ok(match value {
        Value::Null => AMQPValue::Void,
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => AMQPValue::LongLongInt(i),
            None => AMQPValue::Double(n.as_f64().unwrap_or_default()),
        },
        Value::String(s) => AMQPValue::LongString(s.as_str().into()),
        Value::Array(items) => AMQPValue::FieldArray(
            items
                .iter()
                .map(json_to_value)
                .collect::<Result<Vec<_>, _>>()?
                .into(),
        ),
        Value::Object(_) => AMQPValue::FieldTable(json_to_table(value)?),
    })
}

/// # Errors
/// When `value` is not an object, or a key is longer than 255 bytes.
pub(crate) fn json_to_table(value: &serde_json::Value) -> Result<FieldTable, String> {
    let object = value
        .as_object()
        .ok_or_else(|| "headers must be a JSON object".to_owned())?;
    let mut table = BTreeMap::new();
    for (key, value) in object {
        let key = ShortString::try_new(key.as_str()).map_err(|e| e.to_string())?;
        table.insert(key, json_to_value(value)?);
    }
    Ok(FieldTable::from(table))
}

/// What a pass does with one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    /// Leave it parked (a confirmed copy at the tail, then the original acknowledged).
    Keep,
    /// Republish it to the main exchange for processing (attempts reset), then remove it.
    Replay,
    /// Delete it.
    Remove,
}

/// Identity of one parked copy: a hash of its body and every property, headers included. Two
/// messages with the same fingerprint are copies of one parking (only a pass interrupted
/// between a confirm and its ack makes them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Fingerprint(u128);

impl Fingerprint {
    pub(crate) fn as_u128(self) -> u128 {
        self.0
    }

    pub(crate) fn from_u128(value: u128) -> Self {
        Self(value)
    }

    pub(crate) fn of(message: &ParkedMessage) -> Self {
        let mut hash = Sha256::new();
        hash.update((message.body.len() as u64).to_be_bytes());
        hash.update(&message.body);
        // Properties' Debug is deterministic: headers are an ordered map.
        hash.update(format!("{:?}", message.properties).as_bytes());
        let digest = hash.finalize();
        let mut first = [0u8; 16];
        first.copy_from_slice(&digest[..16]);
        Self(u128::from_be_bytes(first))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use lapin::types::LongString;

    fn parked(headers: &[(&str, AMQPValue)]) -> ParkedMessage {
        let table: BTreeMap<ShortString, AMQPValue> = headers
            .iter()
            .map(|(k, v)| (ShortString::from(*k), v.clone()))
            .collect();
        ParkedMessage::new(
            br#"{"id":"evt_1","type":"charge.refunded"}"#.to_vec(),
            BasicProperties::default()
                .with_message_id("evt_1".into())
                .with_type("charge.refunded".into())
                .with_timestamp(1_700_000_000)
                .with_headers(FieldTable::from(table)),
        )
    }

    #[test]
    fn replay_resets_attempts_and_drops_only_dead_letter_headers() {
        let message = parked(&[
            ("attempts", AMQPValue::LongUInt(6)),
            (
                "last_error",
                AMQPValue::LongString(LongString::from("boom")),
            ),
            (
                "first_seen_at",
                AMQPValue::LongString(LongString::from("2026-01-01T00:00:00Z")),
            ),
            (
                "dead_lettered_at",
                AMQPValue::LongString(LongString::from("2026-01-02T00:00:00Z")),
            ),
            (
                "received_at",
                AMQPValue::LongString(LongString::from("2026-01-01T00:00:00Z")),
            ),
            ("x-death", AMQPValue::FieldArray(Vec::new().into())),
        ]);
        let props = message.replay_properties();
        let replayed = ParkedMessage::new(message.body.clone(), props.clone());
        let names: Vec<&str> = props
            .headers()
            .as_ref()
            .unwrap()
            .inner()
            .keys()
            .map(ShortString::as_str)
            .collect();
        assert_eq!(names, ["attempts", "first_seen_at", "received_at"]);
        assert_eq!(replayed.header("attempts"), Some(&AMQPValue::LongUInt(0)));
        assert_eq!(props.message_id(), message.properties.message_id());
        assert_eq!(props.kind(), message.properties.kind());
        assert_eq!(props.timestamp(), message.properties.timestamp());
    }

    #[test]
    fn age_comes_from_the_dead_letter_header_then_x_death_never_the_event_timestamp() {
        let with_header = parked(&[(
            "dead_lettered_at",
            AMQPValue::LongString(LongString::from("2026-01-02T03:04:05Z")),
        )]);
        assert_eq!(
            with_header.dead_lettered_at().unwrap().to_rfc3339(),
            "2026-01-02T03:04:05+00:00"
        );
        let death = |time: u64| {
            let mut t = FieldTable::default();
            t.insert("reason".into(), AMQPValue::LongString("expired".into()));
            t.insert("time".into(), AMQPValue::Timestamp(time));
            AMQPValue::FieldTable(t)
        };
        let by_broker = parked(&[(
            "x-death",
            AMQPValue::FieldArray(vec![death(1_800_000_000), death(1_790_000_000)].into()),
        )]);
        assert_eq!(
            by_broker.dead_lettered_at().unwrap().timestamp(),
            1_800_000_000
        );
        // The message timestamp is the event's `created`: it says nothing about parking.
        assert_eq!(parked(&[]).dead_lettered_at(), None);
    }

    #[test]
    fn identity_falls_back_to_the_body() {
        let message = ParkedMessage::new(
            br#"{"id":"evt_9","type":"invoice.paid"}"#.to_vec(),
            BasicProperties::default(),
        );
        assert_eq!(message.event_id().as_deref(), Some("evt_9"));
        assert_eq!(message.event_type().as_deref(), Some("invoice.paid"));
        assert_eq!(
            ParkedMessage::new(vec![0xff], BasicProperties::default()).event_id(),
            None
        );
        let long_type = format!(r#"{{"id":"evt_9","type":"{}"}}"#, "x".repeat(300));
        let message = ParkedMessage::new(long_type.into_bytes(), BasicProperties::default());
        assert_eq!(message.event_type(), None);
    }

    #[test]
    fn header_tables_round_trip_through_json_by_kind() {
        let json = serde_json::json!({
            "attempts": 3, "last_error": "timeout", "ratio": 0.5, "ok": true,
            "nested": {"list": [1, "two", null]}
        });
        let table = json_to_table(&json).unwrap();
        assert_eq!(table_to_json(&table), json);
    }
}
