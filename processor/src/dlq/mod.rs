//! `processor dlq …`: the operator's view of the dead-letter queue — list, show, replay, purge
//! and export parked events — plus the alerting that tells the operator to look
//! ([`monitor()`], [`record_attempts`]).
//!
//! Invariants:
//! - Reading (`list`, `show`, `export`, the planning step of every command) never removes
//!   anything: messages are held unacknowledged and handed back in their original order
//!   (see the `browse` module).
//! - `replay` removes a parked copy only after the broker confirmed its republication to the
//!   main exchange; an interruption at any point leaves every event either parked, or
//!   republished, or both (a duplicate the processor's dedupe by event id absorbs).
//! - `replay` and `purge` print their plan and change nothing without `--yes` or an
//!   interactive confirmation; without a terminal they exit 2 (a usage error).

mod browse;
mod export;
mod message;
pub mod monitor;
mod purge;
mod replay;

use std::collections::HashSet;
use std::fmt::Write as _;
use std::io::{IsTerminal as _, Write as _};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use shared::topology::{Topology, headers};

pub use browse::{BrowseError, queue_depth};
use browse::{Held, Snapshot};
use export::ExportRecord;
use message::ParkedMessage;
pub use monitor::{monitor, record_attempts};

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
    /// without it, their message timestamp.
    #[arg(long, value_name = "DURATION", value_parser = shared::config::parse_duration)]
    pub older_than: Option<std::time::Duration>,
}

#[derive(Debug, clap::Args)]
pub struct PurgeArgs {
    #[command(flatten)]
    pub selection: PurgeSelection,
    /// Do not ask for confirmation.
    #[arg(long)]
    pub yes: bool,
}

#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// The JSON-lines file to write (one parked event per line).
    #[arg(long, value_name = "FILE.jsonl")]
    pub out: PathBuf,
    /// Overwrite the file if it exists.
    #[arg(long)]
    pub force: bool,
}

/// A command that cannot run as asked (e.g. a destructive command without `--yes` and without
/// a terminal to confirm on). The binary maps it to exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// The exit code for an error returned by [`execute`]: 2 for a [`UsageError`], 1 otherwise.
#[must_use]
pub fn exit_code(error: &anyhow::Error) -> u8 {
    if error.downcast_ref::<UsageError>().is_some() {
        2
    } else {
        1
    }
}

/// Runs one `processor dlq` subcommand against the dead-letter queue of `topology`.
///
/// # Errors
/// A [`UsageError`] when a confirmation is needed but impossible; otherwise broker, file or
/// input errors, and an interrupted replay (what was not replayed stays parked).
pub async fn execute(args: DlqArgs, amqp_url: &str, topology: &Topology) -> anyhow::Result<()> {
    match args.command {
        DlqCommand::List(a) => list(a, amqp_url, topology).await,
        DlqCommand::Show(a) => show(a, amqp_url, topology).await,
        DlqCommand::Replay(a) => replay::run(a, amqp_url, topology).await,
        DlqCommand::Purge(a) => purge::run(a, amqp_url, topology).await,
        DlqCommand::Export(a) => export_to_file(a, amqp_url, topology).await,
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

    /// Requested ids that are not among `selected` (reported, not fatal: a rerun after an
    /// interrupted replay legitimately finds some already gone).
    fn missing<'a>(&self, selected: impl Iterator<Item = &'a ParkedMessage>) -> Vec<String> {
        let Self::Ids(ids) = self else {
            return Vec::new();
        };
        let found: HashSet<String> = selected.filter_map(ParkedMessage::event_id).collect();
        let mut missing: Vec<String> = ids.difference(&found).cloned().collect();
        missing.sort();
        missing
    }

    /// The held messages this selector picks, in queue order; requested ids that are not
    /// parked are reported on stderr.
    fn select<'a>(&self, snapshot: &'a Snapshot) -> Vec<&'a Held> {
        let selected: Vec<&Held> = snapshot
            .held
            .iter()
            .filter(|h| self.matches(&h.message))
            .collect();
        let missing = self.missing(selected.iter().map(|h| &h.message));
        if !missing.is_empty() {
            eprintln!("not parked (skipped): {}", missing.join(", "));
        }
        selected
    }
}

async fn list(args: ListArgs, amqp_url: &str, topology: &Topology) -> anyhow::Result<()> {
    let queue = topology.dead_letter_queue();
    let limit = args.limit.unwrap_or(usize::MAX);
    let selector = args.event_type.map_or(Selector::All, Selector::Type);
    let mut matched = 0usize;
    let snapshot = Snapshot::take(amqp_url, &queue, |m| {
        matched += usize::from(selector.matches(m));
        matched >= limit
    })
    .await?;
    let rows: Vec<&ParkedMessage> = snapshot
        .messages()
        .filter(|m| selector.matches(m))
        .take(limit)
        .collect();
    let output = if args.json {
        let array: Vec<serde_json::Value> = rows.iter().map(|m| summary_json(m)).collect();
        serde_json::to_string_pretty(&array).context("render JSON")?
    } else {
        format!(
            "{}{} shown, {} parked in {queue}\n",
            table(&rows),
            rows.len(),
            snapshot.depth
        )
    };
    snapshot.release().await;
    println!("{output}");
    Ok(())
}

async fn show(args: ShowArgs, amqp_url: &str, topology: &Topology) -> anyhow::Result<()> {
    let queue = topology.dead_letter_queue();
    let wanted = Some(args.event_id.clone());
    let snapshot = Snapshot::take(amqp_url, &queue, |m| m.event_id() == wanted).await?;
    let rendered = snapshot
        .messages()
        .find(|m| m.event_id() == wanted)
        .map(render_message);
    let checked = snapshot.held.len();
    snapshot.release().await;
    match rendered {
        Some(text) => {
            println!("{text}");
            Ok(())
        }
        None => anyhow::bail!(
            "event {} is not parked in {queue} ({checked} parked messages checked)",
            args.event_id
        ),
    }
}

async fn export_to_file(
    args: ExportArgs,
    amqp_url: &str,
    topology: &Topology,
) -> anyhow::Result<()> {
    let queue = topology.dead_letter_queue();
    // Open before reading so a refused overwrite changes nothing and holds nothing.
    let file = open_export(&args.out, args.force)?;
    let snapshot = match Snapshot::take(amqp_url, &queue, |_| false).await {
        Ok(s) => s,
        Err(e) => {
            let _ = std::fs::remove_file(&args.out);
            return Err(e.into());
        }
    };
    let written = write_export(file, snapshot.messages());
    let count = snapshot.held.len();
    snapshot.release().await;
    if let Err(e) = written {
        let _ = std::fs::remove_file(&args.out);
        return Err(e.context(format!("write {}", args.out.display())));
    }
    println!(
        "exported {} from {queue} to {} (they stay parked)",
        n_events(count),
        args.out.display()
    );
    Ok(())
}

fn open_export(path: &Path, force: bool) -> anyhow::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true);
    if force {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    options.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            anyhow::Error::new(UsageError(format!(
                "{} already exists; choose another file or pass --force to overwrite it",
                path.display()
            )))
        } else {
            anyhow::Error::new(e).context(format!("create {}", path.display()))
        }
    })
}

fn write_export<'a>(
    file: std::fs::File,
    messages: impl Iterator<Item = &'a ParkedMessage>,
) -> anyhow::Result<()> {
    let mut out = std::io::BufWriter::new(file);
    for message in messages {
        serde_json::to_writer(&mut out, &ExportRecord::from_message(message))?;
        out.write_all(b"\n")?;
    }
    let file = out
        .into_inner()
        .map_err(std::io::IntoInnerError::into_error)?;
    // The export is the operator's copy before a purge: make sure it is on disk.
    file.sync_all()?;
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
fn table(rows: &[&ParkedMessage]) -> String {
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

/// The plan printed before a replay or purge: at most 20 rows, then a count.
fn plan(rows: &[&ParkedMessage]) -> String {
    const SHOWN: usize = 20;
    let mut out = table(&rows[..rows.len().min(SHOWN)]);
    if rows.len() > SHOWN {
        let _ = writeln!(out, "… and {} more", rows.len() - SHOWN);
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
