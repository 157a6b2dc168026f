//! `dlq purge`: deleting parked events for good.
//!
//! Invariant: nothing is deleted before the plan was printed and the operator said yes
//! (`--yes`, or `y` on a terminal, after being offered an export); without a terminal and
//! without `--yes` the command changes nothing and exits 2, and `--dry-run` only prints the
//! plan. After a confirmation exactly the planned messages are deleted (matched by
//! fingerprint), so an event parked meanwhile is not swept up by `--all`. With `--yes` the plan
//! and the deletion are one pass over the messages parked when the command started.

use std::collections::HashSet;
use std::path::PathBuf;

use chrono::Utc;

use super::export::ExportFile;
use super::message::ParkedMessage;
use super::message::{Action, Fingerprint};
use super::pass::Session;
use super::{
    Broker, PurgeArgs, Selection, Selector, UsageError, ask, confirmed, interactive, n_events,
    note_duplicates, plan_pass,
};

pub(super) async fn run(args: PurgeArgs, broker: &Broker<'_>) -> anyhow::Result<()> {
    let selection = args.selection;
    let selector = if selection.all {
        Selector::All
    } else if let Some(age) = selection.older_than {
        let age = chrono::Duration::from_std(age)
            .map_err(|_| UsageError("--older-than is too large".to_owned()))?;
        Selector::ParkedBefore(Utc::now() - age)
    } else {
        Selector::Ids(selection.event_ids.into_iter().collect::<HashSet<_>>())
    };
    let session = broker.session().await?;
    let outcome = if args.yes && !args.dry_run {
        purge_at_once(&session, &selector).await
    } else {
        plan_then_purge(&session, &selector, args.dry_run).await
    };
    session.close().await;
    outcome
}

/// `--yes`: one pass that deletes what the selector picks and keeps the rest.
async fn purge_at_once(session: &Session, selector: &Selector) -> anyhow::Result<()> {
    let queue = session.queue();
    println!("purging {selector} from {queue} ({} parked)", session.depth);
    let mut selection = Selection::default();
    let deleted = delete(session, |m, fingerprint| {
        selection.offer(selector, m, fingerprint)
    })
    .await;
    selection.report_missing(selector);
    if selection.count > 0 {
        print!("{}", selection.plan());
    }
    deleted
}

/// One pass deleting the messages `chosen` picks and keeping the rest; prints the summary.
async fn delete(
    session: &Session,
    mut chosen: impl FnMut(&ParkedMessage, Fingerprint) -> bool,
) -> anyhow::Result<()> {
    let outcome = session
        .pass(|m, fingerprint| {
            if chosen(m, fingerprint) {
                Action::Remove
            } else {
                Action::Keep
            }
        })
        .await
        .map_err(|e| {
            anyhow::Error::new(e).context("purge stopped; what was not deleted stays parked")
        })?;
    note_duplicates(outcome.duplicates);
    let purged = n_events(count(outcome.removed));
    if outcome.interrupted {
        anyhow::bail!("interrupted: {purged} purged, the rest stay parked");
    }
    println!("purged {purged} from {}", session.queue());
    Ok(())
}

fn count(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

async fn plan_then_purge(
    session: &Session,
    selector: &Selector,
    dry_run: bool,
) -> anyhow::Result<()> {
    let queue = session.queue();
    let selection = plan_pass(session, selector).await?;
    if selection.count == 0 {
        println!("nothing to purge ({} parked in {queue})", session.depth);
        return Ok(());
    }
    println!(
        "{}{} of {} parked events in {queue} would be deleted permanently",
        selection.plan(),
        selection.count,
        session.depth
    );
    if dry_run {
        println!("dry run: nothing changed");
        return Ok(());
    }
    if interactive() {
        offer_export(session, &selection).await?;
    }
    let question = format!("Delete {} permanently?", n_events(selection.count));
    let refusal = "pass --yes to purge without a terminal (keep a copy first with \
                   `processor dlq export --out FILE.jsonl`)";
    if !confirmed(false, question, refusal).await? {
        println!("cancelled: nothing changed");
        return Ok(());
    }
    delete(session, |_, fingerprint| {
        selection.fingerprints.contains(&fingerprint)
    })
    .await
}

/// Offers to write the planned events to an export file before they are deleted.
async fn offer_export(session: &Session, selection: &Selection) -> anyhow::Result<()> {
    loop {
        let answer = ask(format!(
            "Export {} to a file first? Path to write (empty to skip): ",
            n_events(selection.count)
        ))
        .await?;
        if answer.is_empty() {
            return Ok(());
        }
        let path = PathBuf::from(answer);
        match export_selection(session, selection, &path).await {
            Ok(written) => {
                println!("exported {} to {}", n_events(written), path.display());
                return Ok(());
            }
            Err(e) => eprintln!("cannot export there: {}", super::describe(&e)),
        }
    }
}

async fn export_selection(
    session: &Session,
    selection: &Selection,
    path: &std::path::Path,
) -> anyhow::Result<usize> {
    let mut file = ExportFile::create(path, false)?;
    let mut failed = None;
    let outcome = session
        .pass(|m, fingerprint| {
            if failed.is_none()
                && selection.fingerprints.contains(&fingerprint)
                && let Err(e) = file.write(m)
            {
                failed = Some(e);
            }
            Action::Keep
        })
        .await?;
    if let Some(e) = failed {
        return Err(e.into());
    }
    if outcome.interrupted {
        anyhow::bail!("interrupted");
    }
    Ok(count(file.commit()?))
}
