//! `dlq replay`: parked events back to the main exchange.
//!
//! Invariant: a parked copy is acknowledged (removed) only after the broker confirmed the
//! republished copy as stored and routed. Killed at any point, every event is parked, or in
//! the main queue, or both; rerunning finishes the job, and an event that ends up in the main
//! queue twice is processed once because the processor dedupes by event id.

use std::collections::HashSet;
use std::io::BufRead as _;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use indicatif::{ProgressBar, ProgressStyle};
use shared::amqp::Publisher;
use shared::topology::Topology;

use super::export::ExportRecord;
use super::message::Action;
use super::message::ParkedMessage;
use super::pass::{Session, Tally};
use super::{
    Broker, ReplayArgs, Selection, Selector, UsageError, confirmed, n_events, note_duplicates,
    plan_pass, table,
};

/// Confirms waited for at once when replaying a file.
const IN_FLIGHT: usize = 256;
/// How long one publish may wait for its confirm.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);
/// How long to wait for the broker (at start and after a lost connection).
const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// Attempts per message before a file replay stops.
const PUBLISH_ATTEMPTS: usize = 5;
/// Below this many events a progress bar is noise.
const PROGRESS_FROM: u64 = 100;

const DEDUPE_NOTE: &str = "an event republished just before an interruption may reach the main \
     queue twice; that is harmless, the processor dedupes by event id";

pub(super) async fn run(args: ReplayArgs, broker: &Broker<'_>) -> anyhow::Result<()> {
    let (amqp_url, topology) = (broker.amqp_url, broker.topology);
    let selection = args.selection;
    if let Some(path) = selection.from_file {
        return from_file(&path, args.dry_run, args.yes, amqp_url, topology).await;
    }
    let selector = if selection.all {
        Selector::All
    } else if let Some(t) = selection.event_type {
        Selector::Type(t)
    } else {
        Selector::Ids(selection.event_ids.into_iter().collect::<HashSet<_>>())
    };
    let session = broker.session().await?;
    let outcome = if args.yes && !args.dry_run {
        replay_at_once(&session, &selector, topology).await
    } else {
        plan_then_replay(&session, &selector, args.dry_run, topology).await
    };
    session.close().await;
    outcome
}

/// `--yes`: one pass that republishes what the selector picks and keeps the rest.
async fn replay_at_once(
    session: &Session,
    selector: &Selector,
    topology: &Topology,
) -> anyhow::Result<()> {
    println!(
        "replaying {selector} from {} ({} parked) to exchange {} (attempts reset to 0)",
        session.queue(),
        session.depth,
        topology.exchange()
    );
    let bar = progress(u64::from(session.depth));
    let mut selection = Selection::default();
    let outcome = session
        .pass(|m, fingerprint| {
            bar.inc(1);
            if selection.offer(selector, m, fingerprint) {
                Action::Replay
            } else {
                Action::Keep
            }
        })
        .await;
    bar.finish_and_clear();
    selection.report_missing(selector);
    finish(outcome, selection.count, topology)
}

async fn plan_then_replay(
    session: &Session,
    selector: &Selector,
    dry_run: bool,
    topology: &Topology,
) -> anyhow::Result<()> {
    let selection = plan_pass(session, selector).await?;
    if selection.count == 0 {
        println!(
            "nothing to replay ({} parked in {})",
            session.depth,
            session.queue()
        );
        return Ok(());
    }
    println!(
        "{}{} of {} parked events {} to exchange {} (attempts reset to 0)",
        selection.plan(),
        selection.count,
        session.depth,
        if dry_run {
            "would be replayed"
        } else {
            "to replay"
        },
        topology.exchange()
    );
    if dry_run {
        println!("dry run: nothing changed");
        return Ok(());
    }
    let question = format!("Replay {}?", n_events(selection.count));
    if !confirmed(false, question, "pass --yes to replay without a terminal").await? {
        println!("cancelled: nothing changed");
        return Ok(());
    }
    let bar = progress(u64::from(session.depth));
    let outcome = session
        .pass(|_, fingerprint| {
            bar.inc(1);
            if selection.fingerprints.contains(&fingerprint) {
                Action::Replay
            } else {
                Action::Keep
            }
        })
        .await;
    bar.finish_and_clear();
    finish(outcome, selection.count, topology)
}

/// The summary of a replay pass, or the error that says what happened and how to finish.
fn finish(
    outcome: Result<Tally, super::PassError>,
    selected: usize,
    topology: &Topology,
) -> anyhow::Result<()> {
    let (outcome, failure) = match outcome {
        Ok(o) => (o, None),
        Err(e) => (Tally::default(), Some(e)),
    };
    note_duplicates(outcome.duplicates);
    let replayed = usize::try_from(outcome.replayed).unwrap_or(usize::MAX);
    if let Some(e) = failure {
        return Err(anyhow::Error::new(e).context(format!(
            "replay stopped; the events not yet replayed are still parked. Rerun the same \
             command to finish ({DEDUPE_NOTE})"
        )));
    }
    if outcome.interrupted {
        anyhow::bail!(
            "interrupted: {replayed} of {selected} events replayed; the others are still where \
             they were. Rerun the same command to finish ({DEDUPE_NOTE})"
        );
    }
    println!(
        "replayed {} to exchange {} ({DEDUPE_NOTE})",
        n_events(replayed),
        topology.exchange()
    );
    Ok(())
}

/// The records of an export file, one per non-empty line, read as they are needed.
fn records(path: &Path) -> anyhow::Result<impl Iterator<Item = anyhow::Result<ParkedMessage>>> {
    let file = std::fs::File::open(path).with_context(|| format!("read {}", path.display()))?;
    let shown = path.display().to_string();
    Ok(std::io::BufReader::new(file)
        .lines()
        .enumerate()
        .filter(|(_, line)| line.as_ref().map_or(true, |l| !l.trim().is_empty()))
        .map(move |(n, line)| {
            let line = line.with_context(|| format!("read {shown}"))?;
            let record: ExportRecord = serde_json::from_str(&line)
                .map_err(|e| UsageError(format!("{shown}:{}: not an export record: {e}", n + 1)))?;
            let message = record
                .to_message()
                .map_err(|e| UsageError(format!("{shown}:{}: {e}", n + 1)))?;
            Ok(message)
        }))
}

/// `--from-file`: checks every line and prints the plan, then (confirmed) reads the file again
/// and publishes each record; memory holds one window of records, whatever the file's size.
async fn from_file(
    path: &Path,
    dry_run: bool,
    yes: bool,
    amqp_url: &str,
    topology: &Topology,
) -> anyhow::Result<()> {
    let mut count = 0usize;
    let mut first = Vec::new();
    for message in records(path)? {
        let message = message?;
        if first.len() < super::PLAN_ROWS {
            first.push(message);
        }
        count += 1;
    }
    let refs: Vec<&ParkedMessage> = first.iter().collect();
    let more = if count > refs.len() {
        format!("… and {} more\n", count - refs.len())
    } else {
        String::new()
    };
    println!(
        "{}{more}{} from {} {} to exchange {} (attempts reset to 0; the dead-letter queue is \
         not touched)",
        table(&refs),
        n_events(count),
        path.display(),
        if dry_run {
            "would be replayed"
        } else {
            "to replay"
        },
        topology.exchange()
    );
    if dry_run {
        println!("dry run: nothing changed");
        return Ok(());
    }
    if count == 0 {
        return Ok(());
    }
    let question = format!("Replay {}?", n_events(count));
    if !confirmed(yes, question, "pass --yes to replay without a terminal").await? {
        println!("cancelled: nothing changed");
        return Ok(());
    }
    publish_file(path, count, amqp_url, topology).await
}

/// Publishes each record with confirms, [`IN_FLIGHT`] at a time. Stops launching new publishes
/// on Ctrl-C/SIGTERM or the first failure and waits for those in flight.
async fn publish_file(
    path: &Path,
    total: usize,
    amqp_url: &str,
    topology: &Topology,
) -> anyhow::Result<()> {
    let (publisher, task) = Publisher::start(
        amqp_url.to_owned(),
        "processor-dlq-replay".to_owned(),
        topology.clone(),
        CONFIRM_TIMEOUT,
    );
    if !publisher.wait_ready(READY_TIMEOUT).await {
        task.shutdown().await;
        anyhow::bail!(
            "cannot open a publishing channel within {READY_TIMEOUT:?} (broker down, or the \
             topology differs: check RETRY_DELAYS); nothing was replayed"
        );
    }
    let bar = progress(total as u64);
    let exchange = topology.exchange();
    let mut pending = records(path)?;
    let mut in_flight = FuturesUnordered::new();
    let mut replayed = 0usize;
    let mut failure: Option<anyhow::Error> = None;
    let mut interrupted = false;
    let shutdown = shared::shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        while !interrupted && failure.is_none() && in_flight.len() < IN_FLIGHT {
            match pending.next() {
                Some(Ok(message)) => {
                    in_flight.push(replay_one(&publisher, exchange, message));
                }
                Some(Err(e)) => {
                    failure = Some(e);
                }
                None => break,
            }
        }
        if in_flight.is_empty() {
            break;
        }
        tokio::select! {
            () = &mut shutdown, if !interrupted => interrupted = true,
            Some(result) = in_flight.next() => match result {
                Ok(()) => {
                    replayed += 1;
                    bar.inc(1);
                }
                Err(e) => {
                    failure.get_or_insert(e);
                }
            },
        }
    }
    bar.finish_and_clear();
    task.shutdown().await;
    if interrupted || failure.is_some() {
        let why = failure.map_or_else(|| "interrupted".to_owned(), |e| super::describe(&e));
        anyhow::bail!(
            "{why}: {replayed} of {total} events replayed. Rerun the same command to finish \
             ({DEDUPE_NOTE})"
        );
    }
    println!(
        "replayed {} to exchange {exchange} ({DEDUPE_NOTE})",
        n_events(replayed)
    );
    Ok(())
}

async fn replay_one(
    publisher: &Publisher,
    exchange: &str,
    parked: ParkedMessage,
) -> anyhow::Result<()> {
    let message = parked.for_replay();
    let event_id = message.event_id().unwrap_or_default();
    let routing_key = message.event_type().unwrap_or_default();
    publisher
        .publish_retrying(
            (exchange, &routing_key, &message.body, &message.properties),
            PUBLISH_ATTEMPTS,
            READY_TIMEOUT,
        )
        .await
        .map_err(|e| anyhow::Error::new(e).context(format!("replay {event_id}")))?;
    tracing::info!(event_id, event_type = routing_key, "replayed");
    Ok(())
}

fn progress(total: u64) -> ProgressBar {
    if total < PROGRESS_FROM {
        return ProgressBar::hidden();
    }
    // indicatif draws on stderr and stays silent when stderr is not a terminal.
    let bar = ProgressBar::new(total);
    if let Ok(style) =
        ProgressStyle::with_template("{bar:40} {pos}/{len} read ({per_sec}, eta {eta})")
    {
        bar.set_style(style);
    }
    bar
}
