//! `processor dlq …`: the operator's view of the dead-letter queue — list, show, replay, purge
//! and export parked events — plus the alerting that tells the operator to look
//! ([`monitor()`], [`record_attempts`]).
//!
//! Invariants:
//! - Reading (`list`, `show`, `export`, dry runs, the planning step of every command) never
//!   removes anything and never leaves anything in limbo: it either peeks at the first few
//!   messages and hands them straight back, or makes one pass that moves each message to the
//!   tail with a confirm before acknowledging it (see the `pass` module). After any command,
//!   nothing is unacknowledged and the queue is in its original order.
//! - Memory is bounded by one window of messages plus what is printed: nothing holds the
//!   whole queue.
//! - `replay` removes a parked copy only after the broker confirmed its republication to the
//!   main exchange; an interruption at any point (even `kill -9`) leaves every event either
//!   parked, or republished, or both (a duplicate the processor's dedupe by event id absorbs).
//! - `replay` and `purge` print their plan and change nothing without `--yes` or an
//!   interactive confirmation; without a terminal they exit 2 (a usage error). After a
//!   confirmation, exactly the planned messages are acted on (by their fingerprints).
//! - One command at a time per queue: a second one fails at once instead of seeing a queue
//!   half-way through a pass.
//! - Reads that the Postgres index can answer exactly are queries (`index` module: `show` of an
//!   indexed event; `list`, `export` and plans while the index holds exactly the parked
//!   events); the queue stays the truth, and only passes change it.

mod export;
mod index;
mod message;
pub mod monitor;
mod pass;
mod purge;
mod replay;

use std::collections::HashSet;
use std::fmt::Write as _;
use std::io::{IsTerminal as _, Write as _};
use std::path::PathBuf;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use shared::topology::{Topology, headers};

use export::{ExportFile, ExportFileError};
pub use index::{ParkedIndex, ParkedIndexError};
use message::ParkedMessage;
use message::{Action, Fingerprint};
pub use monitor::{monitor, record_attempts};
use pass::{PEEK_MAX, Session};
pub use pass::{PassError, QueueCounts, queue_counts, queue_depth};

/// `processor dlq` and its subcommands.
#[derive(Debug, clap::Args)]
pub struct DlqArgs {
    #[command(subcommand)]
    pub command: DlqCommand,
}

/// What to do with the dead-letter queue.
#[derive(Debug, clap::Subcommand)]
pub enum DlqCommand {
    /// Table of parked events (id, type, attempts, last error, first seen, dead-lettered);
    /// leaves every message parked.
    List(ListArgs),
    /// Headers and pretty-printed body of one parked event; leaves it parked.
    Show(ShowArgs),
    /// Republish parked events to the main exchange (attempts reset), removing each parked
    /// copy only after the broker confirmed it. Safe to interrupt and rerun.
    Replay(ReplayArgs),
    /// Delete parked events for good (prints the plan; needs --yes or a confirmation).
    Purge(PurgeArgs),
    /// Write every parked event to a JSON-lines file; leaves them parked.
    Export(ExportArgs),
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// Show at most N events.
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// Only events of this type (e.g. invoice.paid).
    #[arg(long = "type", value_name = "T")]
    pub event_type: Option<String>,
    /// One JSON array instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct ShowArgs {
    /// The Stripe event id (evt_…).
    pub event_id: String,
}

#[derive(Debug, clap::Args)]
#[group(required = true, multiple = false)]
pub struct ReplaySelection {
    /// Every parked event.
    #[arg(long)]
    pub all: bool,
    /// These events (repeat the flag or list several ids).
    #[arg(long = "event-id", value_name = "ID", num_args = 1..)]
    pub event_ids: Vec<String>,
    /// Every parked event of this type.
    #[arg(long = "type", value_name = "T")]
    pub event_type: Option<String>,
    /// The events of an export file (published as exported; the dead-letter queue is untouched).
    #[arg(long, value_name = "FILE.jsonl")]
    pub from_file: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    #[command(flatten)]
    pub selection: ReplaySelection,
    /// Print what would be replayed and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Do not ask for confirmation.
    #[arg(long)]
    pub yes: bool,
}

#[derive(Debug, clap::Args)]
#[group(required = true, multiple = false)]
pub struct PurgeSelection {
    /// Every parked event.
    #[arg(long)]
    pub all: bool,
    /// These events (repeat the flag or list several ids).
    #[arg(long = "event-id", value_name = "ID", num_args = 1..)]
    pub event_ids: Vec<String>,
    /// Events parked longer ago than this (e.g. 7d, 12h), by their dead_lettered_at header or,
    /// without it, the broker's x-death time (never the event's own creation time).
    #[arg(long, value_name = "DURATION", value_parser = shared::config::parse_duration)]
    pub older_than: Option<std::time::Duration>,
}

#[derive(Debug, clap::Args)]
pub struct PurgeArgs {
    #[command(flatten)]
    pub selection: PurgeSelection,
    /// Print what would be deleted and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Do not ask for confirmation.
    #[arg(long)]
    pub yes: bool,
}

#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// The JSON-lines file to write (one parked event per line).
    #[arg(long, value_name = "FILE.jsonl")]
    pub out: PathBuf,
    /// Replace the file if it exists (only once the new export is complete and on disk).
    #[arg(long)]
    pub force: bool,
}

/// A command that cannot run as asked (e.g. a destructive command without `--yes` and without
/// a terminal to confirm on). The binary maps it to exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// The exit code for an error returned by [`execute`]: 2 for a [`UsageError`] (or an export
/// target that exists), 1 otherwise.
#[must_use]
pub fn exit_code(error: &anyhow::Error) -> u8 {
    let usage = error.downcast_ref::<UsageError>().is_some()
        || matches!(
            error.downcast_ref::<ExportFileError>(),
            Some(ExportFileError::Exists(_))
        );
    if usage { 2 } else { 1 }
}

/// The error as one line naming each cause once: `context: cause: root cause`. Libraries
/// (lapin among them) often repeat their source in their own message; a cause whose text is
/// already part of the line so far is left out.
#[must_use]
pub fn describe(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if text.is_empty() || line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// Runs one `processor dlq` subcommand against the dead-letter queue of `topology`.
///
/// # Errors
/// A [`UsageError`] when a confirmation is needed but impossible; otherwise broker, file or
/// input errors, and an interrupted replay (what was not replayed stays parked).
pub async fn execute(args: DlqArgs, broker: &Broker<'_>) -> anyhow::Result<()> {
    match args.command {
        DlqCommand::List(a) => list(a, broker).await,
        DlqCommand::Show(a) => show(a, broker).await,
        DlqCommand::Replay(a) => replay::run(a, broker).await,
        DlqCommand::Purge(a) => purge::run(a, broker).await,
        DlqCommand::Export(a) => export_to_file(a, broker).await,
    }
}

/// Where the dead-letter queue and its index live.
#[derive(Debug, Clone, Copy)]
pub struct Broker<'a> {
    pub amqp_url: &'a str,
    pub topology: &'a Topology,
    /// Postgres for the index of parked events; `None` works from the queue alone.
    pub database_url: Option<&'a str>,
}

impl Broker<'_> {
    async fn session(&self) -> Result<Session, PassError> {
        Session::open(self.amqp_url, self.topology, self.database_url).await
    }
}

/// Which parked messages a command acts on.
#[derive(Debug)]
enum Selector {
    All,
    Ids(HashSet<String>),
    Type(String),
    ParkedBefore(DateTime<Utc>),
}

impl Selector {
    fn matches(&self, message: &ParkedMessage) -> bool {
        match self {
            Self::All => true,
            Self::Ids(ids) => message.event_id().is_some_and(|id| ids.contains(&id)),
            Self::Type(t) => message.event_type().as_deref() == Some(t.as_str()),
            // A message of unknown age is never "old": purging it needs --all or its id.
            Self::ParkedBefore(cutoff) => message.dead_lettered_at().is_some_and(|at| at < *cutoff),
        }
    }
}

impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::All => write!(f, "every parked event"),
            Self::Ids(ids) => write!(f, "{} requested by id", n_events(ids.len())),
            Self::Type(t) => write!(f, "the events of type {t}"),
            Self::ParkedBefore(cutoff) => {
                write!(f, "the events parked before {}", cutoff.to_rfc3339())
            }
        }
    }
}

/// What a selection found in one pass: how many, their fingerprints, the first rows of the
/// plan, and the requested ids that were seen.
#[derive(Debug, Default)]
struct Selection {
    count: usize,
    fingerprints: HashSet<Fingerprint>,
    first: Vec<ParkedMessage>,
    ids_seen: HashSet<String>,
}

impl Selection {
    /// Records `message` if `selector` picks it; returns whether it did.
    fn offer(
        &mut self,
        selector: &Selector,
        message: &ParkedMessage,
        fingerprint: Fingerprint,
    ) -> bool {
        if !selector.matches(message) {
            return false;
        }
        self.count += 1;
        self.fingerprints.insert(fingerprint);
        if self.first.len() < PLAN_ROWS {
            self.first.push(message.clone());
        }
        if let (Selector::Ids(_), Some(id)) = (selector, message.event_id()) {
            self.ids_seen.insert(id);
        }
        true
    }

    /// Requested ids that were not found are reported on stderr (not fatal: a rerun after an
    /// interrupted replay legitimately finds some already gone).
    fn report_missing(&self, selector: &Selector) {
        let Selector::Ids(ids) = selector else {
            return;
        };
        let mut missing: Vec<&String> = ids.difference(&self.ids_seen).collect();
        missing.sort();
        if !missing.is_empty() {
            let missing: Vec<&str> = missing.iter().map(|s| s.as_str()).collect();
            eprintln!("not parked (skipped): {}", missing.join(", "));
        }
    }

    /// The plan: at most [`PLAN_ROWS`] rows, then a count of the rest.
    fn plan(&self) -> String {
        let rows: Vec<&ParkedMessage> = self.first.iter().collect();
        let mut out = table(&rows);
        if self.count > rows.len() {
            let _ = writeln!(out, "… and {} more", self.count - rows.len());
        }
        out
    }
}

/// Rows a plan shows before "… and N more".
const PLAN_ROWS: usize = 20;

/// What `selector` picks among the parked events: a query when the index is current, else one
/// pass that only reads (every message stays parked, in order).
///
/// # Errors
/// The broker's error, or an interruption (nothing changed either way).
async fn plan_pass(session: &Session, selector: &Selector) -> anyhow::Result<Selection> {
    let mut selection = Selection::default();
    if let Some(index) = session.current_index().await {
        let read = index
            .each(selector, None, |m, fingerprint| {
                selection.offer(selector, m, fingerprint);
            })
            .await;
        match read {
            Ok(()) => {
                selection.report_missing(selector);
                return Ok(selection);
            }
            Err(error) => {
                tracing::warn!(
                    error = describe(&error.into()),
                    "dead-letter index not read"
                );
                selection = Selection::default();
            }
        }
    }
    let outcome = session
        .pass(|m, fingerprint| {
            selection.offer(selector, m, fingerprint);
            Action::Keep
        })
        .await?;
    if outcome.interrupted {
        anyhow::bail!("interrupted: nothing changed");
    }
    note_duplicates(outcome.duplicates);
    selection.report_missing(selector);
    Ok(selection)
}

fn note_duplicates(duplicates: u64) {
    if duplicates > 0 {
        eprintln!(
            "removed {duplicates} duplicate parked copies left by an interrupted earlier command"
        );
    }
}

async fn list(args: ListArgs, broker: &Broker<'_>) -> anyhow::Result<()> {
    let session = broker.session().await?;
    let result = list_in(&session, args).await;
    session.close().await;
    println!("{}", result?);
    Ok(())
}

async fn list_in(session: &Session, args: ListArgs) -> anyhow::Result<String> {
    let limit = args.limit.unwrap_or(usize::MAX);
    let selector = args.event_type.map_or(Selector::All, Selector::Type);
    let mut rows: Vec<ParkedMessage> = Vec::new();
    let mut matched = 0usize;
    let mut complete = false;
    if limit <= PEEK_MAX {
        // The first few are at the head: look and hand them back, no pass needed.
        let (seen, all_seen) = session
            .peek(PEEK_MAX, |m| {
                matched += usize::from(selector.matches(m));
                matched >= limit
            })
            .await?;
        rows = seen
            .into_iter()
            .filter(|m| selector.matches(m))
            .take(limit)
            .collect();
        complete = rows.len() >= limit || all_seen;
    }
    if !complete && let Some(index) = session.current_index().await {
        rows.clear();
        let read = index
            .each(&selector, Some(limit), |m, _| rows.push(summary_only(m)))
            .await;
        complete = read.is_ok();
    }
    if !complete {
        rows.clear();
        let outcome = session
            .pass(|m, _| {
                if rows.len() < limit && selector.matches(m) {
                    rows.push(summary_only(m));
                }
                Action::Keep
            })
            .await?;
        if outcome.interrupted {
            anyhow::bail!("interrupted: nothing changed");
        }
        note_duplicates(outcome.duplicates);
    }
    let refs: Vec<&ParkedMessage> = rows.iter().collect();
    if args.json {
        let array: Vec<serde_json::Value> = refs.iter().map(|m| summary_json(m)).collect();
        return serde_json::to_string_pretty(&array).context("render JSON");
    }
    Ok(format!(
        "{}{} shown, {} parked in {}\n",
        table(&refs),
        refs.len(),
        session.depth,
        session.queue()
    ))
}

/// What a listing keeps of each row: the properties, and the body only when the identity has
/// to come from it (a message published without `message_id` or `type`).
fn summary_only(message: &ParkedMessage) -> ParkedMessage {
    let p = &message.properties;
    let body = if p.message_id().is_some() && p.kind().is_some() {
        Vec::new()
    } else {
        message.body.clone()
    };
    ParkedMessage::new(body, p.clone())
}

async fn show(args: ShowArgs, broker: &Broker<'_>) -> anyhow::Result<()> {
    let session = broker.session().await?;
    let result = show_in(&session, &args.event_id).await;
    let queue = session.queue().to_owned();
    let depth = session.depth;
    session.close().await;
    match result? {
        Some(text) => {
            println!("{text}");
            Ok(())
        }
        None => anyhow::bail!(
            "event {} is not parked in {queue} ({depth} parked messages checked)",
            args.event_id
        ),
    }
}

async fn show_in(session: &Session, event_id: &str) -> anyhow::Result<Option<String>> {
    let wanted = Some(event_id.to_owned());
    if let Some(index) = session.index() {
        match index.find(event_id).await {
            Ok(Some(found)) if found.event_id() == wanted => {
                return Ok(Some(render_message(&found)));
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(
                error = describe(&anyhow::Error::new(error)),
                "dead-letter index not read"
            ),
        }
    }
    let (seen, all_seen) = session.peek(PEEK_MAX, |m| m.event_id() == wanted).await?;
    if let Some(found) = seen.iter().find(|m| m.event_id() == wanted) {
        return Ok(Some(render_message(found)));
    }
    if all_seen {
        return Ok(None);
    }
    let mut found = None;
    let outcome = session
        .pass(|m, _| {
            if found.is_none() && m.event_id() == wanted {
                found = Some(render_message(m));
            }
            Action::Keep
        })
        .await?;
    if outcome.interrupted {
        anyhow::bail!("interrupted: nothing changed");
    }
    note_duplicates(outcome.duplicates);
    Ok(found)
}

async fn export_to_file(args: ExportArgs, broker: &Broker<'_>) -> anyhow::Result<()> {
    // Refuse an existing target before reading anything.
    let mut file = ExportFile::create(&args.out, args.force)?;
    let session = broker.session().await?;
    let queue = session.queue().to_owned();
    if let Some(index) = session.current_index().await {
        let mut failed: Option<ExportFileError> = None;
        let read = index
            .each(&Selector::All, None, |m, _| {
                if failed.is_none()
                    && let Err(e) = file.write(m)
                {
                    failed = Some(e);
                }
            })
            .await;
        if read.is_ok() {
            session.close().await;
            return finish_export(file, failed, &queue, &args.out);
        }
        // A failed query leaves a partial file: start again from the queue.
        file = ExportFile::create(&args.out, args.force)?;
    }
    let mut failed: Option<ExportFileError> = None;
    let outcome = session
        .pass(|m, _| {
            if failed.is_none()
                && let Err(e) = file.write(m)
            {
                failed = Some(e);
            }
            Action::Keep
        })
        .await;
    session.close().await;
    let outcome = outcome?;
    if outcome.interrupted {
        anyhow::bail!(
            "interrupted: {} not written, nothing changed",
            args.out.display()
        );
    }
    note_duplicates(outcome.duplicates);
    finish_export(file, failed, &queue, &args.out)
}

/// Moves a complete export into place and says so, unless writing it failed.
fn finish_export(
    file: ExportFile,
    failed: Option<ExportFileError>,
    queue: &str,
    out: &std::path::Path,
) -> anyhow::Result<()> {
    if let Some(e) = failed {
        return Err(e.into());
    }
    let count = file.commit()?;
    println!(
        "exported {} from {queue} to {} (they stay parked)",
        n_events(usize::try_from(count).unwrap_or(usize::MAX)),
        out.display()
    );
    Ok(())
}

fn summary_json(message: &ParkedMessage) -> serde_json::Value {
    serde_json::json!({
        "eventId": message.event_id(),
        "type": message.event_type(),
        "attempts": message.attempts(),
        "lastError": message.header_text(headers::LAST_ERROR),
        "firstSeenAt": message.header_text(headers::FIRST_SEEN_AT),
        "deadLetteredAt": message.header_text(headers::DEAD_LETTERED_AT),
    })
}

/// Shortens free text for one table cell (on a character boundary).
fn cell(text: Option<String>, width: usize) -> String {
    let text = text
        .unwrap_or_else(|| "-".to_owned())
        .replace(['\n', '\r', '\t'], " ");
    if text.chars().count() <= width {
        text
    } else {
        let mut short: String = text.chars().take(width.saturating_sub(1)).collect();
        short.push('…');
        short
    }
}

fn time_cell(raw: Option<String>) -> String {
    match raw {
        Some(raw) => match DateTime::parse_from_rfc3339(&raw) {
            Ok(t) => t
                .with_timezone(&Utc)
                .format("%Y-%m-%d %H:%M:%SZ")
                .to_string(),
            Err(_) => cell(Some(raw), 20),
        },
        None => "-".to_owned(),
    }
}

/// The table of `list` and of every plan.
pub(super) fn table(rows: &[&ParkedMessage]) -> String {
    let header = [
        "EVENT ID",
        "TYPE",
        "ATTEMPTS",
        "LAST ERROR",
        "FIRST SEEN",
        "DEAD-LETTERED",
    ];
    let cells: Vec<[String; 6]> = rows
        .iter()
        .map(|m| {
            [
                cell(m.event_id(), 40),
                cell(m.event_type(), 40),
                m.attempts()
                    .map_or_else(|| "-".to_owned(), |a| a.to_string()),
                cell(m.header_text(headers::LAST_ERROR), 50),
                time_cell(m.header_text(headers::FIRST_SEEN_AT)),
                time_cell(m.header_text(headers::DEAD_LETTERED_AT)),
            ]
        })
        .collect();
    let mut widths = header.map(|h| h.chars().count());
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |row: &[String]| {
        let padded: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", padded.join("  ").trim_end());
    };
    line(&header.map(str::to_owned));
    for row in &cells {
        line(row);
    }
    out
}

fn render_message(message: &ParkedMessage) -> String {
    let mut out = String::new();
    let p = &message.properties;
    let _ = writeln!(
        out,
        "event id:   {}",
        message.event_id().unwrap_or_else(|| "-".into())
    );
    let _ = writeln!(
        out,
        "type:       {}",
        message.event_type().unwrap_or_else(|| "-".into())
    );
    if let Some(ts) = message.timestamp() {
        let _ = writeln!(
            out,
            "timestamp:  {} ({})",
            ts.to_rfc3339(),
            p.timestamp().unwrap_or_default()
        );
    }
    if let Some(ct) = p.content_type() {
        let _ = writeln!(out, "content:    {ct}");
    }
    let _ = writeln!(out, "headers:");
    if let Some(headers) = p.headers() {
        for (name, value) in headers.inner() {
            let _ = writeln!(out, "  {name}: {}", message::value_to_json(value));
        }
    }
    let _ = writeln!(out, "body ({} bytes):", message.body.len());
    match serde_json::from_slice::<serde_json::Value>(&message.body) {
        Ok(json) => {
            let _ = writeln!(
                out,
                "{}",
                serde_json::to_string_pretty(&json).unwrap_or_default()
            );
        }
        Err(_) => {
            use base64::Engine as _;
            let _ = writeln!(
                out,
                "(not JSON; base64) {}",
                base64::engine::general_purpose::STANDARD.encode(&message.body)
            );
        }
    }
    out
}

/// "1 event", "2 events".
fn n_events(n: usize) -> String {
    if n == 1 {
        "1 event".to_owned()
    } else {
        format!("{n} events")
    }
}

/// Whether the operator can be asked (stdin is a terminal).
fn interactive() -> bool {
    std::io::stdin().is_terminal()
}

/// Asks a question on the terminal and returns the trimmed answer.
async fn ask(question: String) -> anyhow::Result<String> {
    // Reading stdin blocks; keep it off the runtime so the broker connection's heartbeats and
    // held messages stay healthy while the operator thinks.
    tokio::task::spawn_blocking(move || {
        eprint!("{question}");
        std::io::stderr().flush()?;
        let mut answer = String::new();
        std::io::stdin().read_line(&mut answer)?;
        Ok(answer.trim().to_owned())
    })
    .await
    .context("read the answer")?
}

/// `--yes`, or a y/N answer on a terminal; without either, a [`UsageError`] naming `--yes`.
async fn confirmed(yes: bool, question: String, refusal: &str) -> anyhow::Result<bool> {
    if yes {
        return Ok(true);
    }
    if !interactive() {
        return Err(UsageError(format!("nothing changed: {refusal}")).into());
    }
    let answer = ask(format!("{question} [y/N] ")).await?;
    Ok(matches!(answer.to_ascii_lowercase().as_str(), "y" | "yes"))
}
