//! An index of parked events in Postgres, so that reading the dead-letter queue is a query
//! instead of a pass.
//!
//! The queue stays the truth and the durable hand-off; the index is a copy kept by the passes:
//! every pass adds the messages it keeps that the index lacks (one `COPY` stream, in queue
//! order), and a pass that went through the whole queue ends by dropping the rows of messages
//! it did not keep (replayed, purged, or gone some other way) and marking the index *trusted*.
//!
//! Invariants:
//! - A trusted index holds only events that are parked: only `processor dlq` removes parked
//!   messages, and every pass marks the index untrusted when it starts and trusted again only
//!   when it has covered the whole queue, so a command killed half-way leaves it untrusted
//!   until the next full pass. `show` trusts a row it finds; for an id it does not find it
//!   falls back to the queue (the event may have been parked since the last pass).
//! - A read that needs the whole queue (`list`, `export`, dry runs, plans) is answered from the
//!   index only when it is *current*: trusted and holding exactly as many events as the broker
//!   counts, taken while the command holds the queue. Events are only added meanwhile (the
//!   consumer parks, only passes remove), so equal counts mean the same events.
//! - The index never acts on the queue: replay and purge act on the messages themselves (the
//!   plan's fingerprints may come from it), and the parked count always comes from the broker.
//! - Without Postgres (unreachable, not migrated, or no permission) every command works from the
//!   queue alone. The tables are created by the migrations (`migrations/0006_dlq_index.sql`).

use std::collections::HashSet;
use std::time::Duration;

use tokio_postgres::Client;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::Type;

use futures_util::TryStreamExt as _;

use super::Selector;
use super::export::ExportRecord;
use super::message::ParkedMessage;
use super::message::{Action, Fingerprint};

/// How long a command waits for Postgres before working without the index.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Unlogged: the index is a cache the next full pass rebuilds, so it need not cost WAL writes
/// (Postgres empties unlogged tables after a crash, which leaves the index untrusted).
/// The index could not be read or written; the command goes on from the queue.
#[derive(Debug, thiserror::Error)]
pub(crate) enum IndexError {
    #[error("cannot reach Postgres for the dead-letter index")]
    Connect(#[source] crate::db::DbError),
    #[error("dead-letter index query failed")]
    Query(#[from] tokio_postgres::Error),
}

/// The index of one dead-letter queue, on a connection of its own.
#[derive(Debug)]
pub(crate) struct Index {
    client: Client,
    queue: String,
}

/// An index being brought up to date by one pass.
pub(crate) struct Update<'a> {
    index: &'a Index,
    /// The newest row when the pass began: rows added since (at park time, for messages behind
    /// the pass) are not the pass's to judge.
    newest: i64,
    known: HashSet<Fingerprint>,
    kept: Vec<uuid::Uuid>,
    writer: std::pin::Pin<Box<BinaryCopyInWriter>>,
    /// A write failed: nothing more is written and the index stays untrusted.
    broken: bool,
}

impl std::fmt::Debug for Update<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Update")
            .field("queue", &self.index.queue)
            .field("kept", &self.kept.len())
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

/// The value a selector's condition compares with.
enum Filter {
    None,
    Ids(Vec<String>),
    Text(String),
    Time(chrono::DateTime<chrono::Utc>),
}

/// A message and its fingerprint from a row of `record, body, fingerprint`.
fn message_of(row: &tokio_postgres::Row) -> Option<(ParkedMessage, Fingerprint)> {
    let record: String = row.get(0);
    let body: Vec<u8> = row.get(1);
    let fingerprint: uuid::Uuid = row.get(2);
    let message = serde_json::from_str::<ExportRecord>(&record)
        .ok()?
        .to_message()
        .ok()?;
    Some((
        ParkedMessage::new(body, message.properties),
        Fingerprint::from_u128(fingerprint.as_u128()),
    ))
}

fn uuid_of(fingerprint: Fingerprint) -> uuid::Uuid {
    uuid::Uuid::from_u128(fingerprint.as_u128())
}

impl Index {
    /// Connects (the tables are the migrations').
    ///
    /// # Errors
    /// When Postgres cannot be reached within [`CONNECT_TIMEOUT`] or refuses the schema.
    pub(crate) async fn open(database_url: &str, queue: &str) -> Result<Self, IndexError> {
        let mut config: tokio_postgres::Config = database_url
            .parse()
            .map_err(|e: tokio_postgres::Error| IndexError::Connect(e.into()))?;
        config.connect_timeout(CONNECT_TIMEOUT);
        config.application_name("processor-dlq");
        let (client, connection) = crate::db::connect(&config, CONNECT_TIMEOUT)
            .await
            .map_err(IndexError::Connect)?;
        tokio::spawn(connection);
        Ok(Self {
            client,
            queue: queue.to_owned(),
        })
    }

    /// The parked copy of `event_id`, if the index is trusted and holds it.
    ///
    /// # Errors
    /// The query's error.
    pub(crate) async fn find(&self, event_id: &str) -> Result<Option<ParkedMessage>, IndexError> {
        let row = self
            .client
            .query_opt(
                "SELECT i.record, i.body, i.fingerprint FROM dlq_index i
                   JOIN dlq_index_state s ON s.queue = i.queue AND s.trusted
                  WHERE i.queue = $1 AND i.event_id = $2
                  ORDER BY i.seq LIMIT 1",
                &[&self.queue, &event_id],
            )
            .await?;
        // A row that no longer parses is as good as absent: the queue answers instead.
        Ok(row.as_ref().and_then(message_of).map(|(m, _)| m))
    }

    /// Whether the index holds exactly the queue's `depth` parked events (see the module doc).
    ///
    /// # Errors
    /// The query's error.
    pub(crate) async fn is_current(&self, depth: u32) -> Result<bool, IndexError> {
        let row = self
            .client
            .query_opt(
                "SELECT s.trusted, (SELECT count(*) FROM dlq_index i WHERE i.queue = s.queue)
                   FROM dlq_index_state s WHERE s.queue = $1",
                &[&self.queue],
            )
            .await?;
        Ok(
            row.is_some_and(|row| {
                row.get::<_, bool>(0) && row.get::<_, i64>(1) == i64::from(depth)
            }),
        )
    }

    /// Calls `each` with every indexed event `selector` picks, in queue order, up to `limit`;
    /// rows are streamed, never all held.
    ///
    /// # Errors
    /// The query's error; `each` may have seen some rows.
    pub(crate) async fn each(
        &self,
        selector: &Selector,
        limit: Option<usize>,
        mut each: impl FnMut(&ParkedMessage, Fingerprint),
    ) -> Result<(), IndexError> {
        let (condition, value) = match selector {
            Selector::All => ("true", Filter::None),
            Selector::Ids(ids) => (
                "event_id = ANY($2)",
                Filter::Ids(ids.iter().cloned().collect()),
            ),
            Selector::Type(t) => ("event_type = $2", Filter::Text(t.clone())),
            Selector::ParkedBefore(cutoff) => ("parked_at < $2", Filter::Time(*cutoff)),
        };
        let limit = limit.map_or(i64::MAX, |l| i64::try_from(l).unwrap_or(i64::MAX));
        let sql = format!(
            "SELECT record, body, fingerprint FROM dlq_index
              WHERE queue = $1 AND {condition}
              ORDER BY seq LIMIT {limit}"
        );
        let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![&self.queue];
        match &value {
            Filter::None => {}
            Filter::Ids(ids) => params.push(ids),
            Filter::Text(t) => params.push(t),
            Filter::Time(t) => params.push(t),
        }
        let rows = self.client.query_raw(&sql, params).await?;
        futures_util::pin_mut!(rows);
        while let Some(row) = rows.try_next().await? {
            if let Some((message, fingerprint)) = message_of(&row) {
                each(&message, fingerprint);
            }
        }
        Ok(())
    }

    async fn set_trusted(&self, trusted: bool) -> Result<(), IndexError> {
        self.client
            .execute(
                "INSERT INTO dlq_index_state (queue, trusted) VALUES ($1, $2)
                 ON CONFLICT (queue) DO UPDATE SET trusted = EXCLUDED.trusted",
                &[&self.queue, &trusted],
            )
            .await?;
        Ok(())
    }

    /// Starts the update a pass makes: marks the index untrusted, reads what it holds and opens
    /// the `COPY` stream new rows go to.
    ///
    /// # Errors
    /// The queries' errors.
    pub(crate) async fn begin(&self) -> Result<Update<'_>, IndexError> {
        self.set_trusted(false).await?;
        let newest: i64 = self
            .client
            .query_one(
                "SELECT coalesce(max(seq), 0) FROM dlq_index WHERE queue = $1",
                &[&self.queue],
            )
            .await?
            .get(0);
        let known = self
            .client
            .query(
                "SELECT fingerprint FROM dlq_index WHERE queue = $1",
                &[&self.queue],
            )
            .await?
            .iter()
            .map(|row| Fingerprint::from_u128(row.get::<_, uuid::Uuid>(0).as_u128()))
            .collect();
        let sink = self
            .client
            .copy_in(
                "COPY dlq_index (queue, fingerprint, event_id, event_type, parked_at, record, body)
                 FROM STDIN BINARY",
            )
            .await?;
        let writer = BinaryCopyInWriter::new(
            sink,
            &[
                Type::TEXT,
                Type::UUID,
                Type::TEXT,
                Type::TEXT,
                Type::TIMESTAMPTZ,
                Type::TEXT,
                Type::BYTEA,
            ],
        );
        Ok(Update {
            index: self,
            newest,
            known,
            kept: Vec::new(),
            writer: Box::pin(writer),
            broken: false,
        })
    }
}

/// The columns of one row, as the pass and the park-time insert both write them.
struct Row {
    event_id: Option<String>,
    event_type: Option<String>,
    parked_at: Option<chrono::DateTime<chrono::Utc>>,
    record: String,
}

impl Row {
    fn of(message: &ParkedMessage) -> Option<Self> {
        let mut record = ExportRecord::from_message(message);
        record.body = None;
        record.body_base64 = String::new();
        Some(Self {
            event_id: message.event_id(),
            event_type: message.event_type(),
            parked_at: message.dead_lettered_at(),
            record: serde_json::to_string(&record).ok()?,
        })
    }
}

/// Adds events to the index when they are parked, so that no pass is needed to find them: the
/// consumer calls [`Self::record`] once the dead-letter publish is confirmed. Optional: an
/// event the index misses is found by the next pass.
#[derive(Debug)]
pub struct ParkedIndex {
    index: Index,
}

/// The park-time index could not be written (the event is parked all the same).
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct ParkedIndexError(#[from] IndexError);

impl ParkedIndex {
    /// Connects to Postgres for the dead-letter queue of `topology`.
    ///
    /// # Errors
    /// When Postgres cannot be reached or refuses the index's tables.
    pub async fn open(
        database_url: &str,
        topology: &shared::topology::Topology,
    ) -> Result<Self, ParkedIndexError> {
        Ok(Self {
            index: Index::open(database_url, &topology.dead_letter_queue()).await?,
        })
    }

    /// Whether the index holds a parked copy of `event_id`: a redelivered event that is
    /// already parked need not be parked twice. Rows leave the index only through passes, so
    /// it is believed when no pass ever ran or the last one completed; an index a killed pass
    /// left untrusted answers `false`, so a doubt parks again (a copy too many, never one too
    /// few).
    ///
    /// # Errors
    /// The query's error.
    pub async fn holds(&self, event_id: &str) -> Result<bool, ParkedIndexError> {
        let row = self
            .index
            .client
            .query_opt(
                "SELECT 1 FROM dlq_index i
                   LEFT JOIN dlq_index_state s ON s.queue = i.queue
                  WHERE i.queue = $1 AND i.event_id = $2 AND coalesce(s.trusted, true)
                  LIMIT 1",
                &[&self.index.queue, &event_id],
            )
            .await
            .map_err(IndexError::from)?;
        Ok(row.is_some())
    }

    /// Records one parked event: `body` and `properties` exactly as they were published to the
    /// dead-letter queue (headers included; `shared::amqp::Publisher` adds delivery mode 2).
    ///
    /// # Errors
    /// The insert's error.
    pub async fn record(
        &self,
        body: &[u8],
        properties: &lapin::BasicProperties,
    ) -> Result<(), ParkedIndexError> {
        let message = ParkedMessage::new(body.to_vec(), properties.clone());
        let Some(row) = Row::of(&message) else {
            return Ok(());
        };
        let fingerprint = uuid_of(Fingerprint::of(&message));
        self.index
            .client
            .execute(
                "INSERT INTO dlq_index
                   (queue, fingerprint, event_id, event_type, parked_at, record, body)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)
                 ON CONFLICT DO NOTHING",
                &[
                    &self.index.queue,
                    &fingerprint,
                    &row.event_id,
                    &row.event_type,
                    &row.parked_at,
                    &row.record,
                    &body,
                ],
            )
            .await
            .map_err(IndexError::from)?;
        Ok(())
    }
}

impl Update<'_> {
    /// Records what the pass did with one message: a kept message the index lacks is added.
    pub(crate) async fn note(
        &mut self,
        message: &ParkedMessage,
        fingerprint: Fingerprint,
        action: Action,
    ) {
        if action != Action::Keep || self.broken {
            return;
        }
        let id = uuid_of(fingerprint);
        self.kept.push(id);
        if self.known.contains(&fingerprint) {
            return;
        }
        let Some(row) = Row::of(message) else {
            self.broken = true;
            return;
        };
        let written = self
            .writer
            .as_mut()
            .write(&[
                &self.index.queue,
                &id,
                &row.event_id,
                &row.event_type,
                &row.parked_at,
                &row.record,
                &message.body.as_slice(),
            ])
            .await;
        if let Err(error) = written {
            tracing::warn!(%error, "dead-letter index not updated; commands use the queue");
            self.broken = true;
        }
    }

    /// Ends the update. After a pass over the whole queue (`complete`), rows of messages the
    /// pass did not keep are dropped and the index is trusted again; otherwise it stays
    /// untrusted until the next full pass.
    ///
    /// # Errors
    /// The queries' errors; the index then stays untrusted.
    pub(crate) async fn finish(mut self, complete: bool) -> Result<(), IndexError> {
        if self.broken {
            // Dropping the writer unfinished aborts the COPY.
            return Ok(());
        }
        self.writer.as_mut().finish().await?;
        if !complete {
            return Ok(());
        }
        self.index
            .client
            .execute(
                "DELETE FROM dlq_index
                  WHERE queue = $1 AND seq <= $2 AND fingerprint <> ALL($3)",
                &[&self.index.queue, &self.newest, &self.kept],
            )
            .await?;
        self.index.set_trusted(true).await
    }
}
