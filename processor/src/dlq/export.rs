//! The export file format: one JSON object per line and per parked message.
//!
//! ```json
//! {"eventId":"evt_…","type":"invoice.paid","headers":{"attempts":6,…},
//!  "properties":{"messageId":"evt_…","type":"invoice.paid","timestamp":1700000000,…},
//!  "body":"{\"id\":…}","bodyBase64":"eyJpZCI6…"}
//! ```
//!
//! Invariants: `bodyBase64` is always present and is what `replay --from-file` publishes, so
//! the bytes round-trip exactly even when the body is not UTF-8 or not JSON; `body` is only a
//! readable copy, present when the bytes are valid UTF-8 JSON.
//!
//! An export file appears complete or not at all ([`ExportFile`]): lines go to a temporary file
//! (mode 0600, in the target's directory) that is fsynced and then moved into place, so a failed
//! or interrupted export never destroys an earlier one, even with `--force`.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

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

/// Why an export file could not be written.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ExportFileError {
    /// The target exists and `--force` was not given (a usage error: nothing was read).
    #[error("{0} already exists; choose another file or pass --force to overwrite it")]
    Exists(PathBuf),
    #[error("cannot write {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// An export in progress: a temporary file next to the target, moved into place by
/// [`Self::commit`] and deleted if dropped before.
#[derive(Debug)]
pub(crate) struct ExportFile {
    target: PathBuf,
    temporary: PathBuf,
    force: bool,
    out: Option<std::io::BufWriter<std::fs::File>>,
    /// Lines written.
    pub(crate) count: u64,
}

impl ExportFile {
    /// Starts an export to `target`: refuses an existing target without `force`, then creates
    /// the temporary file (mode 0600: parked events are customer data).
    ///
    /// # Errors
    /// [`ExportFileError::Exists`], or the file system's error.
    pub(crate) fn create(target: &Path, force: bool) -> Result<Self, ExportFileError> {
        if !force && target.symlink_metadata().is_ok() {
            return Err(ExportFileError::Exists(target.to_owned()));
        }
        let name = target
            .file_name()
            .map_or_else(|| "export".into(), |n| n.to_string_lossy().into_owned());
        let temporary = target.with_file_name(format!(
            ".{name}.{}.{}.tmp",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temporary)
            .map_err(|source| ExportFileError::Io {
                path: target.to_owned(),
                source,
            })?;
        Ok(Self {
            target: target.to_owned(),
            temporary,
            force,
            out: Some(std::io::BufWriter::with_capacity(1 << 16, file)),
            count: 0,
        })
    }

    fn io(&self, source: std::io::Error) -> ExportFileError {
        ExportFileError::Io {
            path: self.target.clone(),
            source,
        }
    }

    /// Appends one line.
    ///
    /// # Errors
    /// The file system's error.
    pub(crate) fn write(&mut self, message: &ParkedMessage) -> Result<(), ExportFileError> {
        let Some(out) = self.out.as_mut() else {
            return Ok(());
        };
        let written = serde_json::to_writer(&mut *out, &ExportRecord::from_message(message))
            .map_err(std::io::Error::from)
            .and_then(|()| out.write_all(b"\n"));
        written.map_err(|e| self.io(e))?;
        self.count += 1;
        Ok(())
    }

    /// Flushes and fsyncs the temporary file, then moves it into place (replacing the target
    /// only with `force`) and fsyncs the directory, so the export survives a crash.
    ///
    /// # Errors
    /// The file system's error, or [`ExportFileError::Exists`] when the target appeared
    /// meanwhile; the target is then untouched.
    pub(crate) fn commit(mut self) -> Result<u64, ExportFileError> {
        let Some(out) = self.out.take() else {
            return Ok(self.count);
        };
        let file = out
            .into_inner()
            .map_err(std::io::IntoInnerError::into_error)
            .map_err(|e| self.io(e))?;
        file.sync_all().map_err(|e| self.io(e))?;
        drop(file);
        if self.force {
            std::fs::rename(&self.temporary, &self.target).map_err(|e| self.io(e))?;
        } else {
            // A hard link never replaces an existing file: the no-clobber rename.
            std::fs::hard_link(&self.temporary, &self.target).map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    ExportFileError::Exists(self.target.clone())
                } else {
                    self.io(e)
                }
            })?;
            std::fs::remove_file(&self.temporary).map_err(|e| self.io(e))?;
        }
        let directory = match self.target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
        std::fs::File::open(&directory)
            .and_then(|d| d.sync_all())
            .map_err(|e| self.io(e))?;
        Ok(self.count)
    }
}

impl Drop for ExportFile {
    fn drop(&mut self) {
        if self.out.is_some() {
            let _ = std::fs::remove_file(&self.temporary);
        }
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

    fn message(id: &str) -> ParkedMessage {
        ParkedMessage::new(
            format!(r#"{{"id":"{id}"}}"#).into_bytes(),
            BasicProperties::default().with_message_id(id.into()),
        )
    }

    #[test]
    fn an_unfinished_export_leaves_the_earlier_file_and_no_temporary_behind() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("dlq-export-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir(&dir).unwrap();
        let target = dir.join("parked.jsonl");
        std::fs::write(&target, "earlier export\n").unwrap();

        assert!(matches!(
            ExportFile::create(&target, false),
            Err(ExportFileError::Exists(_))
        ));
        let mut export = ExportFile::create(&target, true).unwrap();
        export.write(&message("evt_1")).unwrap();
        let names = |dir: &Path| -> Vec<String> {
            let mut names: Vec<String> = std::fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        };
        let temporary = names(&dir)
            .into_iter()
            .find(|n| n.ends_with(".tmp"))
            .unwrap();
        let mode = std::fs::metadata(dir.join(&temporary))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        drop(export); // a failed export: never committed
        assert_eq!(
            std::fs::read_to_string(&target).unwrap(),
            "earlier export\n"
        );
        assert_eq!(names(&dir), ["parked.jsonl"]);

        let mut export = ExportFile::create(&target, true).unwrap();
        export.write(&message("evt_2")).unwrap();
        assert_eq!(export.commit().unwrap(), 1);
        assert!(std::fs::read_to_string(&target).unwrap().contains("evt_2"));
        assert_eq!(names(&dir), ["parked.jsonl"]);
        std::fs::remove_dir_all(&dir).unwrap();
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
