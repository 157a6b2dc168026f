//! `processor outbox list|replay`: what the relay has not delivered (or gave up on), and
//! sending it again.
//!
//! Invariants: listing changes nothing; a replay only sets the selected rows' channel back to
//! `pending` (webhook: attempts reset, due now) — the running relay delivers them, in each
//! user's order, with the usual confirms — and without `--yes` (or with `--dry-run`) it prints
//! its plan and changes nothing.

use anyhow::Context as _;
use chrono::{DateTime, SecondsFormat, Utc};
use tokio_postgres::Row;
use uuid::Uuid;

use crate::config::Config;
use crate::db;
use crate::dlq::UsageError;

#[derive(Debug, clap::Args)]
pub struct OutboxArgs {
    #[command(subcommand)]
    pub command: OutboxCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum OutboxCommand {
    /// Rows not yet delivered on some channel, or whose webhook failed for good (newest last).
    List(ListArgs),
    /// Deliver rows again: failed webhooks, or chosen rows on a chosen channel.
    Replay(ReplayArgs),
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// Only rows whose webhook failed for good.
    #[arg(long)]
    pub failed: bool,
    /// Only this user's rows.
    #[arg(long, value_name = "USER_ID")]
    pub user: Option<String>,
    /// Most rows shown.
    #[arg(long, default_value_t = 50)]
    pub limit: i64,
    /// One JSON array instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
#[group(required = true, multiple = false)]
pub struct ReplaySelection {
    /// Every row whose webhook failed for good.
    #[arg(long)]
    pub failed: bool,
    /// These rows (message ids; repeat the flag or list several).
    #[arg(long = "id", value_name = "ID", num_args = 1..)]
    pub ids: Vec<Uuid>,
}

/// A delivery channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Channel {
    Webhook,
    Amqp,
}

#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    #[command(flatten)]
    pub selection: ReplaySelection,
    /// The channel to deliver on again.
    #[arg(long, value_enum, default_value = "webhook")]
    pub channel: Channel,
    /// Print the plan and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Change the rows (without it, only the plan is printed and the exit code is 2).
    #[arg(long)]
    pub yes: bool,
}

const ROW_COLUMNS: &str = "id, user_id, version, type, created_at, amqp_status, webhook_status, \
     webhook_attempts, webhook_last_error";

/// Runs one `processor outbox` subcommand.
///
/// # Errors
/// A [`UsageError`] for a replay without `--yes`; database errors otherwise.
pub async fn execute(args: OutboxArgs, config: &Config) -> anyhow::Result<()> {
    let pool = db::pool(config)?;
    let client = pool.get().await.context("connecting to Postgres")?;
    match args.command {
        OutboxCommand::List(args) => {
            let rows = client
                .query(
                    &format!(
                        "SELECT * FROM (SELECT {ROW_COLUMNS}, seq FROM outbox
                          WHERE ($1 AND webhook_status = 'failed'
                                 OR NOT $1 AND (amqp_status = 'pending'
                                                OR webhook_status IN ('pending', 'failed')))
                            AND ($2::text IS NULL OR user_id = $2)
                          ORDER BY seq DESC LIMIT $3) newest ORDER BY seq"
                    ),
                    &[&args.failed, &args.user, &args.limit],
                )
                .await?;
            let rows = rows.iter().map(row_json).collect::<Result<Vec<_>, _>>()?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print!("{}", table(&rows));
            }
            Ok(())
        }
        OutboxCommand::Replay(args) => {
            let selected = client
                .query(
                    &format!(
                        "SELECT {ROW_COLUMNS} FROM outbox
                          WHERE ($1 AND webhook_status = 'failed') OR id = ANY($2) ORDER BY seq"
                    ),
                    &[&args.selection.failed, &args.selection.ids],
                )
                .await?;
            let rows = selected
                .iter()
                .map(row_json)
                .collect::<Result<Vec<_>, _>>()?;
            let found: Vec<&str> = rows.iter().filter_map(|r| r["id"].as_str()).collect();
            let missing: Vec<String> = args
                .selection
                .ids
                .iter()
                .map(Uuid::to_string)
                .filter(|id| !found.contains(&id.as_str()))
                .collect();
            if !missing.is_empty() {
                anyhow::bail!("no outbox row with id {}", missing.join(", "));
            }
            let channel = match args.channel {
                Channel::Webhook => "webhook",
                Channel::Amqp => "amqp",
            };
            println!(
                "{} row(s) to deliver again on the {channel} channel:",
                rows.len()
            );
            print!("{}", table(&rows));
            if args.dry_run || rows.is_empty() {
                return Ok(());
            }
            if !args.yes {
                return Err(UsageError("nothing changed: add --yes to replay".into()).into());
            }
            let ids: Vec<Uuid> = selected
                .iter()
                .map(|r| r.try_get("id"))
                .collect::<Result<_, _>>()?;
            let changed = client
                .execute(
                    match args.channel {
                        Channel::Webhook => {
                            "UPDATE outbox SET webhook_status = 'pending', webhook_attempts = 0,
                                 webhook_next_at = now(), webhook_last_error = NULL,
                                 webhook_at = NULL
                              WHERE id = ANY($1)"
                        }
                        Channel::Amqp => {
                            "UPDATE outbox SET amqp_status = 'pending', amqp_at = NULL
                              WHERE id = ANY($1)"
                        }
                    },
                    &[&ids],
                )
                .await?;
            println!("{changed} row(s) queued; the running relay delivers them");
            Ok(())
        }
    }
}

fn row_json(row: &Row) -> Result<serde_json::Value, tokio_postgres::Error> {
    let created_at: DateTime<Utc> = row.try_get("created_at")?;
    Ok(serde_json::json!({
        "id": row.try_get::<_, Uuid>("id")?,
        "userId": row.try_get::<_, String>("user_id")?,
        "version": row.try_get::<_, i64>("version")?,
        "type": row.try_get::<_, String>("type")?,
        "createdAt": created_at.to_rfc3339_opts(SecondsFormat::Secs, true),
        "amqp": row.try_get::<_, String>("amqp_status")?,
        "webhook": row.try_get::<_, String>("webhook_status")?,
        "webhookAttempts": row.try_get::<_, i32>("webhook_attempts")?,
        "lastError": row.try_get::<_, Option<String>>("webhook_last_error")?,
    }))
}

fn table(rows: &[serde_json::Value]) -> String {
    use std::fmt::Write as _;
    let mut out = format!(
        "{:<36}  {:<20}  {:>7}  {:<32}  {:<20}  {:<7}  {:<8}  {:>3}  {}\n",
        "id", "user", "version", "type", "created", "amqp", "webhook", "try", "last error"
    );
    for r in rows {
        let text = |key: &str| r[key].as_str().unwrap_or("").to_owned();
        let _ = writeln!(
            out,
            "{:<36}  {:<20}  {:>7}  {:<32}  {:<20}  {:<7}  {:<8}  {:>3}  {}",
            text("id"),
            text("userId"),
            r["version"],
            text("type"),
            text("createdAt"),
            text("amqp"),
            text("webhook"),
            r["webhookAttempts"],
            text("lastError"),
        );
    }
    if rows.is_empty() {
        out.push_str("(none)\n");
    }
    out
}
