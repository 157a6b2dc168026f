//! `dlq replay`: parked events back to the main exchange.
//!
//! Invariant: a parked copy is acknowledged (removed) only after the broker confirmed the
//! republished copy as stored and routed. Killed at any point, every event is parked, or in
//! the main queue, or both; rerunning finishes the job, and an event that ends up in the main
//! queue twice is processed once because the processor dedupes by event id.

use std::collections::HashSet;
use std::time::Duration;

use anyhow::Context as _;
use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use indicatif::{ProgressBar, ProgressStyle};
use shared::amqp::{PublishError, Publisher};
use shared::topology::Topology;

use super::browse::{Held, Snapshot};
use super::export::ExportRecord;
use super::message::ParkedMessage;
use super::{ReplayArgs, Selector, UsageError, confirmed, n_events, plan};

/// Confirms waited for at once: throughput comes from confirms in flight, not faster publishes.
const IN_FLIGHT: usize = 32;
/// How long one publish may wait for its confirm.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);
/// How long to wait for the broker (at start and after a lost connection).
const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// Attempts per message before the replay stops (the message stays parked).
const PUBLISH_ATTEMPTS: u32 = 5;
/// Below this many events a progress bar is noise.
const PROGRESS_FROM: usize = 100;

const DEDUPE_NOTE: &str = "an event republished just before an interruption may reach the main \
     queue twice; that is harmless, the processor dedupes by event id";

pub(super) async fn run(
    args: ReplayArgs,
    amqp_url: &str,
    topology: &Topology,
) -> anyhow::Result<()> {
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
    let queue = topology.dead_letter_queue();
    let snapshot = Snapshot::take(amqp_url, &queue, |_| false).await?;
    let outcome = replay_parked(
        &snapshot,
        &selector,
        args.dry_run,
        args.yes,
        amqp_url,
        topology,
    )
    .await;
    // Whatever was not replayed (not selected, refused, interrupted, failed) goes back parked.
    snapshot.release().await;
    outcome
}

async fn replay_parked(
    snapshot: &Snapshot,
    selector: &Selector,
    dry_run: bool,
    yes: bool,
    amqp_url: &str,
    topology: &Topology,
) -> anyhow::Result<()> {
    let selected = selector.select(snapshot);
    let messages: Vec<&ParkedMessage> = selected.iter().map(|h| &h.message).collect();
    if selected.is_empty() {
        println!(
            "nothing to replay ({} parked in {})",
            snapshot.depth,
            topology.dead_letter_queue()
        );
        return Ok(());
    }
    println!(
        "{}{} of {} parked events {} to exchange {} (attempts reset to 0)",
        plan(&messages),
        selected.len(),
        snapshot.depth,
        if dry_run {
            "would be replayed"
        } else {
            "to replay"
        },
        topology.exchange()
    );
    let items = selected.into_iter().map(|h| (&h.message, Some(h)));
    confirm_and_publish(items.collect(), dry_run, yes, amqp_url, topology).await
}

async fn from_file(
    path: &std::path::Path,
    dry_run: bool,
    yes: bool,
    amqp_url: &str,
    topology: &Topology,
) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let mut messages = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let record: ExportRecord = serde_json::from_str(line).map_err(|e| {
            UsageError(format!(
                "{}:{}: not an export record: {e}",
                path.display(),
                n + 1
            ))
        })?;
        let message = record
            .to_message()
            .map_err(|e| UsageError(format!("{}:{}: {e}", path.display(), n + 1)))?;
        messages.push(message);
    }
    let refs: Vec<&ParkedMessage> = messages.iter().collect();
    println!(
        "{}{} from {} {} to exchange {} (attempts reset to 0; the dead-letter queue is not touched)",
        plan(&refs),
        n_events(messages.len()),
        path.display(),
        if dry_run {
            "would be replayed"
        } else {
            "to replay"
        },
        topology.exchange()
    );
    let items = messages.iter().map(|m| (m, None));
    confirm_and_publish(items.collect(), dry_run, yes, amqp_url, topology).await
}

/// Publishes `items` unless this is a dry run or the operator does not confirm (each says
/// that nothing changed).
async fn confirm_and_publish(
    items: Vec<(&ParkedMessage, Option<&Held>)>,
    dry_run: bool,
    yes: bool,
    amqp_url: &str,
    topology: &Topology,
) -> anyhow::Result<()> {
    if dry_run {
        println!("dry run: nothing changed");
        return Ok(());
    }
    if items.is_empty() {
        return Ok(());
    }
    let question = format!("Replay {}?", n_events(items.len()));
    if !confirmed(yes, question, "pass --yes to replay without a terminal").await? {
        println!("cancelled: nothing changed");
        return Ok(());
    }
    publish_all(items, amqp_url, topology).await
}

/// Publishes each message with confirms, removing its parked copy (when it has one) right after
/// its own confirm. Stops launching new publishes on Ctrl-C/SIGTERM or the first failure and
/// waits for those in flight, so an interruption never leaves a confirmed copy unremoved for
/// longer than necessary.
async fn publish_all(
    items: Vec<(&ParkedMessage, Option<&Held>)>,
    amqp_url: &str,
    topology: &Topology,
) -> anyhow::Result<()> {
    let total = items.len();
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
    let bar = progress(total);
    let exchange = topology.exchange();
    let mut pending = items.into_iter();
    let mut in_flight = FuturesUnordered::new();
    let mut replayed = 0usize;
    let mut failure: Option<anyhow::Error> = None;
    let mut interrupted = false;
    let shutdown = shared::shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        while !interrupted && failure.is_none() && in_flight.len() < IN_FLIGHT {
            let Some((message, held)) = pending.next() else {
                break;
            };
            in_flight.push(replay_one(&publisher, exchange, message, held));
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
        let why = failure.map_or_else(|| "interrupted".to_owned(), |e| format!("{e:#}"));
        anyhow::bail!(
            "{why}: {replayed} of {total} events replayed; the others are still where they \
             were. Rerun the same command to finish ({DEDUPE_NOTE})"
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
    parked: &ParkedMessage,
    held: Option<&Held>,
) -> anyhow::Result<()> {
    let message = parked.for_replay();
    let event_id = message.event_id().unwrap_or_default();
    let routing_key = message.event_type().unwrap_or_default();
    let mut attempt = 0;
    loop {
        attempt += 1;
        let result = publisher
            .publish(
                exchange,
                &routing_key,
                &message.body,
                message.properties.clone(),
            )
            .await;
        match result {
            Ok(()) => break,
            // Unroutable means the main queue is not bound: retrying cannot help.
            Err(e @ PublishError::Unroutable) => {
                return Err(anyhow::Error::new(e).context(format!("replay {event_id}")));
            }
            Err(e) if attempt >= PUBLISH_ATTEMPTS => {
                return Err(anyhow::Error::new(e).context(format!("replay {event_id}")));
            }
            Err(e) => {
                tracing::warn!(event_id, error = %e, attempt, "republish failed; retrying");
                publisher.wait_ready(READY_TIMEOUT).await;
                tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
            }
        }
    }
    if let Some(held) = held {
        Snapshot::remove(held)
            .await
            .with_context(|| format!("{event_id} was republished but its parked copy remains"))?;
    }
    tracing::info!(event_id, event_type = routing_key, "replayed");
    Ok(())
}

fn progress(total: usize) -> ProgressBar {
    if total < PROGRESS_FROM {
        return ProgressBar::hidden();
    }
    // indicatif draws on stderr and stays silent when stderr is not a terminal.
    let bar = ProgressBar::new(total as u64);
    if let Ok(style) =
        ProgressStyle::with_template("{bar:40} {pos}/{len} replayed ({per_sec}, eta {eta})")
    {
        bar.set_style(style);
    }
    bar
}
