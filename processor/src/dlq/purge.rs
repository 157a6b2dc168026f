//! `dlq purge`: deleting parked events for good.
//!
//! Invariant: nothing is deleted before the plan was printed and the operator said yes
//! (`--yes`, or `y` on a terminal, after being offered an export); without a terminal and
//! without `--yes` the command changes nothing and exits 2. Exactly the planned messages are
//! deleted: they are held from the plan to the deletion, so an event parked meanwhile is not
//! swept up by `--all`.

use std::collections::HashSet;
use std::path::PathBuf;

use chrono::Utc;
use shared::topology::Topology;

use super::browse::Snapshot;
use super::message::ParkedMessage;
use super::{
    PurgeArgs, Selector, ask, confirmed, interactive, n_events, open_export, plan, write_export,
};

pub(super) async fn run(
    args: PurgeArgs,
    amqp_url: &str,
    topology: &Topology,
) -> anyhow::Result<()> {
    let selection = args.selection;
    let selector = if selection.all {
        Selector::All
    } else if let Some(age) = selection.older_than {
        let age = chrono::Duration::from_std(age)
            .map_err(|_| super::UsageError("--older-than is too large".to_owned()))?;
        Selector::ParkedBefore(Utc::now() - age)
    } else {
        Selector::Ids(selection.event_ids.into_iter().collect::<HashSet<_>>())
    };
    let queue = topology.dead_letter_queue();
    let snapshot = Snapshot::take(amqp_url, &queue, |_| false).await?;
    let outcome = purge_held(&snapshot, &selector, args.yes, &queue).await;
    snapshot.release().await;
    outcome
}

async fn purge_held(
    snapshot: &Snapshot,
    selector: &Selector,
    yes: bool,
    queue: &str,
) -> anyhow::Result<()> {
    let selected = selector.select(snapshot);
    let messages: Vec<&ParkedMessage> = selected.iter().map(|h| &h.message).collect();
    if selected.is_empty() {
        println!("nothing to purge ({} parked in {queue})", snapshot.depth);
        return Ok(());
    }
    println!(
        "{}{} of {} parked events in {queue} would be deleted permanently",
        plan(&messages),
        selected.len(),
        snapshot.depth
    );
    if !yes && interactive() {
        offer_export(&messages).await?;
    }
    let question = format!("Delete {} permanently?", n_events(selected.len()));
    let refusal = "pass --yes to purge without a terminal (keep a copy first with \
                   `processor dlq export --out FILE.jsonl`)";
    if !confirmed(yes, question, refusal).await? {
        println!("cancelled: nothing changed");
        return Ok(());
    }
    let mut purged = 0usize;
    for held in selected {
        Snapshot::remove(held).await.map_err(|e| {
            anyhow::anyhow!("{e}; {purged} events purged before the failure, the rest stay parked")
        })?;
        tracing::info!(
            event_id = held.message.event_id().unwrap_or_default(),
            "purged"
        );
        purged += 1;
    }
    println!("purged {} from {queue}", n_events(purged));
    Ok(())
}

/// Offers to write the planned events to an export file before they are deleted.
async fn offer_export(messages: &[&ParkedMessage]) -> anyhow::Result<()> {
    loop {
        let answer = ask(format!(
            "Export {} to a file first? Path to write (empty to skip): ",
            n_events(messages.len())
        ))
        .await?;
        if answer.is_empty() {
            return Ok(());
        }
        let path = PathBuf::from(answer);
        match open_export(&path, false).and_then(|f| write_export(f, messages.iter().copied())) {
            Ok(()) => {
                println!(
                    "exported {} to {}",
                    n_events(messages.len()),
                    path.display()
                );
                return Ok(());
            }
            Err(e) => eprintln!("cannot export there: {e:#}"),
        }
    }
}
