//! `processor reconcile`: re-enqueues the events Stripe still lists (`GET /v1/events`, kept for
//! 30 days) through the normal queue, to recover from an ingress outage longer than Stripe's
//! webhook retries, or to backfill.
//!
//! Invariants:
//! - an event counts as enqueued only after the broker confirmed its persistent publish to the
//!   main exchange; the summary never claims more than that;
//! - a message looks exactly like one ingress publishes (same body, `message_id`, `type`,
//!   `timestamp`, `received_at`), plus a `source: reconcile` header, so the consumer needs no
//!   special case;
//! - re-enqueueing an event the processor already handled is harmless: it dedupes by event id,
//!   so running this twice, or over a window ingress already delivered, changes nothing twice;
//! - nothing is published in a dry run, and a window older than Stripe's 30 days is refused
//!   rather than silently truncated.

use std::collections::BTreeMap;
use std::io::{IsTerminal as _, Write};
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use futures_util::StreamExt as _;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use serde_json::Value;
use shared::amqp::{PublishError, Publisher};
use shared::topology::headers;

use crate::config::{Config, redact_url};
use crate::stripe::{EventQuery, StripeClient, StripeConfig, StripeError};

/// How far back Stripe lists events.
pub const MAX_WINDOW: Duration = Duration::from_secs(30 * 86_400);
/// Header naming where a message came from; ingress does not set it.
pub const SOURCE_HEADER: &str = "source";
/// The value of [`SOURCE_HEADER`] on reconciled messages.
pub const SOURCE: &str = "reconcile";

/// How long to wait for a broker channel, at start and after a lost connection.
const BROKER_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Confirms awaited at once within a page: throughput comes from confirms in flight.
const IN_FLIGHT: usize = 32;
/// Attempts per message before the run stops (an event published twice is deduped).
const PUBLISH_ATTEMPTS: usize = 3;
/// Retries of one Stripe page: a batch job can afford more patience than a user-facing call.
const STRIPE_RETRIES: usize = 4;

const DEDUPE_NOTE: &str = "the processor dedupes by event id, so events it already processed \
     are skipped: re-enqueueing them is safe, and so is running reconcile again";

/// `processor reconcile` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct ReconcileArgs {
    /// Oldest events to re-enqueue: an RFC3339 time (2026-11-20T00:00:00Z) or a duration back
    /// from now (72h, 30d). At most 30 days, as long as Stripe keeps events.
    #[arg(long, value_name = "RFC3339|DURATION")]
    pub since: String,
    /// Only events of this type (repeatable), e.g. --type charge.refunded.
    #[arg(long = "type", value_name = "TYPE")]
    pub types: Vec<String>,
    /// Only events whose webhook delivery has not succeeded (delivery_success=false).
    #[arg(long)]
    pub undelivered_only: bool,
    /// List what would be enqueued without publishing anything.
    #[arg(long)]
    pub dry_run: bool,
    /// Also compare every customer's active Stripe Entitlements with the features the
    /// projection holds, and report where they differ (`processor` then applies the newer
    /// summaries the re-enqueued events carry; `POST /api/pro/restore` repairs one user).
    #[arg(long)]
    pub features_drift: bool,
}

/// Why a reconcile run failed.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// Bad arguments or configuration (exit code 2); the message names the flag or variable.
    #[error("{0}")]
    Usage(String),
    /// Stripe could not be read (after the client's retries).
    #[error("reading events from Stripe failed")]
    Stripe(#[source] StripeError),
    /// No broker channel could be opened.
    #[error("the broker at {url} is unreachable (no channel within {waited:?})")]
    BrokerUnavailable { url: String, waited: Duration },
    /// The broker did not confirm an event after several attempts.
    #[error("the broker did not take event {event_id}")]
    Publish {
        event_id: String,
        #[source]
        source: PublishError,
    },
}

/// What a run read and enqueued (or, in a dry run, would have enqueued).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub since: DateTime<Utc>,
    pub until: DateTime<Utc>,
    pub dry_run: bool,
    /// Pages of `GET /v1/events` read.
    pub pages: usize,
    /// Confirmed by the broker (or listed, in a dry run), per event type.
    pub enqueued: BTreeMap<String, usize>,
    /// Listed objects without a string `id` and `type`, left out.
    pub skipped: usize,
}

impl Summary {
    /// Events enqueued (or listed, in a dry run) over all types.
    #[must_use]
    pub fn total(&self) -> usize {
        self.enqueued.values().sum()
    }

    fn write(&self, out: &mut dyn Write, exchange: &str, complete: bool) -> std::io::Result<()> {
        let window = self.until - self.since;
        let span = if window.num_days() > 0 {
            format!("{}d {}h", window.num_days(), window.num_hours() % 24)
        } else {
            format!("{}h {}m", window.num_hours(), window.num_minutes() % 60)
        };
        writeln!(
            out,
            "window: {} .. {} ({span})",
            rfc3339(self.since),
            rfc3339(self.until),
        )?;
        writeln!(out, "pages read: {}", self.pages)?;
        let verb = if self.dry_run {
            "would enqueue"
        } else {
            "enqueued"
        };
        writeln!(
            out,
            "{verb} {} to exchange {exchange}{}",
            n_events(self.total()),
            if complete { "" } else { " before stopping" }
        )?;
        for (event_type, n) in &self.enqueued {
            writeln!(out, "  {n:>6}  {event_type}")?;
        }
        if self.skipped > 0 {
            writeln!(
                out,
                "skipped {} without an id and type",
                n_events(self.skipped)
            )?;
        }
        if self.dry_run {
            writeln!(out, "dry run: nothing was published")?;
        } else {
            writeln!(out, "{DEDUPE_NOTE}")?;
        }
        Ok(())
    }
}

/// Runs `processor reconcile` for the binary: prints to stdout and maps a usage error to the
/// command line's exit code 2.
///
/// # Errors
/// A [`crate::dlq::UsageError`] for bad arguments or configuration, otherwise the
/// [`ReconcileError`] that stopped the run.
pub async fn execute(args: ReconcileArgs, config: &Config) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout();
    let result = match run(&args, config, &mut stdout).await {
        Ok(_) if args.features_drift => report_feature_drift(config, &mut stdout).await,
        other => other.map(|_| ()),
    };
    result.map_err(ReconcileError::into_command_error)
}

impl ReconcileError {
    /// The error as the command line reports it: a usage error becomes
    /// [`crate::dlq::UsageError`], so the binary exits with 2 for it and 1 for the rest.
    #[must_use]
    pub fn into_command_error(self) -> anyhow::Error {
        match self {
            Self::Usage(message) => crate::dlq::UsageError(message).into(),
            error => error.into(),
        }
    }
}

/// One customer whose active Stripe Entitlements differ from the features the projection
/// holds for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureDrift {
    pub customer: String,
    pub user: Option<String>,
    /// Listed by Stripe, missing from the projection.
    pub missing: Vec<String>,
    /// Held by the projection, no longer listed by Stripe.
    pub extra: Vec<String>,
}

async fn report_feature_drift(
    config: &Config,
    out: &mut (dyn Write + Send),
) -> Result<(), ReconcileError> {
    let stripe = StripeClient::new(stripe_config(config)?).map_err(ReconcileError::Stripe)?;
    let pool = crate::db::pool(config).map_err(|e| ReconcileError::Usage(e.to_string()))?;
    let drift = feature_drift(&pool, &stripe)
        .await
        .map_err(|e| ReconcileError::Usage(format!("comparing Stripe features: {e}")))?;
    for d in &drift {
        let _ = writeln!(
            out,
            "feature drift: customer {} (user {}): Stripe lists {:?} we lack, we hold {:?} Stripe no longer lists",
            d.customer,
            d.user.as_deref().unwrap_or("-"),
            d.missing,
            d.extra
        );
    }
    let _ = writeln!(out, "{} customer(s) with feature drift", drift.len());
    Ok(())
}

/// Compares, for every customer the projection holds Stripe features for, Stripe's active
/// entitlements (`GET /v1/entitlements/active_entitlements`) with the stored list.
///
/// # Errors
/// A message when Postgres or Stripe cannot be read.
pub async fn feature_drift(
    pool: &deadpool_postgres::Pool,
    stripe: &StripeClient,
) -> Result<Vec<FeatureDrift>, String> {
    let client = pool.get().await.map_err(|e| e.to_string())?;
    let rows = client
        .query(
            "SELECT customer_id, user_id, lookup_keys FROM stripe_features ORDER BY customer_id",
            &[],
        )
        .await
        .map_err(|e| e.to_string())?;
    let mut drift = Vec::new();
    for row in rows {
        let customer: String = row.get(0);
        let ours: Vec<String> = row.get(2);
        let listed = stripe
            .list_active_entitlements(&customer)
            .await
            .map_err(|e| e.to_string())?;
        let theirs: std::collections::BTreeSet<String> = listed
            .iter()
            .filter_map(|e| e.get("lookup_key")?.as_str().map(str::to_owned))
            .collect();
        let ours: std::collections::BTreeSet<String> = ours.into_iter().collect();
        if theirs != ours {
            drift.push(FeatureDrift {
                user: row.get(1),
                missing: theirs.difference(&ours).cloned().collect(),
                extra: ours.difference(&theirs).cloned().collect(),
                customer,
            });
        }
    }
    Ok(drift)
}

/// Reconciles with the Stripe settings of `config` (`STRIPE_SECRET_KEY`, `STRIPE_API_BASE`,
/// `STRIPE_API_VERSION`), writing the plan, a dry run's listing and the summary to `out`.
///
/// # Errors
/// [`ReconcileError::Usage`] for a bad `--since` or a missing `STRIPE_SECRET_KEY`; otherwise
/// what stopped the run (the summary of what was enqueued until then is written first).
pub async fn run(
    args: &ReconcileArgs,
    config: &Config,
    out: &mut (dyn Write + Send),
) -> Result<Summary, ReconcileError> {
    let stripe = stripe_config(config)?;
    run_with(args, config, stripe, out).await
}

/// [`run`] with an explicit Stripe configuration (tests shorten its timeouts and backoff).
///
/// # Errors
/// As [`run`].
pub async fn run_with(
    args: &ReconcileArgs,
    config: &Config,
    stripe: StripeConfig,
    out: &mut (dyn Write + Send),
) -> Result<Summary, ReconcileError> {
    let until = Utc::now();
    let since = parse_since(&args.since, until)?;
    let client = StripeClient::new(stripe).map_err(ReconcileError::Stripe)?;
    let query = EventQuery {
        created_gte: Some(since.timestamp()),
        types: args.types.clone(),
        delivery_success: args.undelivered_only.then_some(false),
    };
    let exchange = config.topology.exchange();
    let mut summary = Summary {
        since,
        until,
        dry_run: args.dry_run,
        pages: 0,
        enqueued: BTreeMap::new(),
        skipped: 0,
    };
    let _ = writeln!(
        out,
        "{} Stripe events created since {}{}{} {} exchange {exchange}",
        if args.dry_run {
            "listing"
        } else {
            "re-enqueueing"
        },
        rfc3339(since),
        if args.types.is_empty() {
            String::new()
        } else {
            format!(" of type {}", args.types.join(", "))
        },
        if args.undelivered_only {
            " whose webhook delivery failed"
        } else {
            ""
        },
        if args.dry_run { "for" } else { "to" },
    );

    let broker = if args.dry_run {
        None
    } else {
        let (publisher, task) = Publisher::start(
            config.amqp_url.clone(),
            "processor-reconcile".into(),
            config.topology.clone(),
            config.publish_confirm_timeout,
        );
        if !publisher.wait_ready(BROKER_READY_TIMEOUT).await {
            task.shutdown().await;
            let _ = writeln!(out, "nothing was enqueued");
            return Err(ReconcileError::BrokerUnavailable {
                url: redact_url(&config.amqp_url),
                waited: BROKER_READY_TIMEOUT,
            });
        }
        Some((publisher, task))
    };

    let bar = progress(since, until);
    let outcome = walk(
        &client,
        &query,
        broker.as_ref().map(|(p, _)| p),
        exchange,
        &bar,
        &mut summary,
        out,
    )
    .await;
    bar.finish_and_clear();
    if let Some((_, task)) = broker {
        task.shutdown().await;
    }
    let _ = summary.write(out, exchange, outcome.is_ok());
    let _ = out.flush();
    outcome.map(|()| summary)
}

/// Pages through the events newest first, publishing each page before reading the next.
async fn walk(
    client: &StripeClient,
    query: &EventQuery,
    publisher: Option<&Publisher>,
    exchange: &str,
    bar: &ProgressBar,
    summary: &mut Summary,
    out: &mut (dyn Write + Send),
) -> Result<(), ReconcileError> {
    let mut cursor: Option<String> = None;
    loop {
        let page = client
            .list_events_page(query, cursor.as_deref())
            .await
            .map_err(ReconcileError::Stripe)?;
        summary.pages += 1;
        let last_id = page.data.last().and_then(|o| str_field(o, "id"));
        let mut events = Vec::with_capacity(page.data.len());
        for object in &page.data {
            match Outgoing::from_object(object) {
                Some(event) => events.push(event),
                None => summary.skipped += 1,
            }
        }
        let oldest = events.iter().filter_map(|e| e.created).min();
        match publisher {
            None => {
                bar.suspend(|| {
                    for event in &events {
                        let _ = writeln!(
                            out,
                            "would enqueue {} {} created {}",
                            event.id,
                            event.event_type,
                            event
                                .created
                                .and_then(|c| DateTime::from_timestamp(c, 0))
                                .map_or_else(|| "?".to_owned(), rfc3339)
                        );
                    }
                });
                for event in events {
                    *summary.enqueued.entry(event.event_type).or_default() += 1;
                }
            }
            Some(publisher) => publish_page(publisher, exchange, events, summary).await?,
        }
        if let Some(oldest) = oldest {
            let back = (summary.until.timestamp() - oldest).max(0);
            bar.set_position(u64::try_from(back).unwrap_or(0));
        }
        bar.set_message(format!(
            "{} pages, {} {}",
            summary.pages,
            n_events(summary.total()),
            if publisher.is_some() {
                "enqueued"
            } else {
                "listed"
            }
        ));
        if !page.has_more {
            return Ok(());
        }
        cursor = Some(last_id.ok_or_else(|| {
            ReconcileError::Stripe(StripeError::Decode {
                message: "/v1/events: has_more without an id on the last event".into(),
            })
        })?);
    }
}

/// Publishes one page with confirms in flight; counts only confirmed events, and on a failure
/// still waits for the publishes already started so the count stays true.
async fn publish_page(
    publisher: &Publisher,
    exchange: &str,
    events: Vec<Outgoing>,
    summary: &mut Summary,
) -> Result<(), ReconcileError> {
    let mut results = futures_util::stream::iter(events)
        .map(|event| async move {
            let outcome = publish_one(publisher, exchange, &event).await;
            (event, outcome)
        })
        .buffer_unordered(IN_FLIGHT);
    let mut failure = None;
    while let Some((event, outcome)) = results.next().await {
        match outcome {
            Ok(()) => {
                tracing::info!(event_id = %event.id, event_type = %event.event_type, "re-enqueued");
                *summary.enqueued.entry(event.event_type).or_default() += 1;
            }
            Err(source) => {
                tracing::warn!(event_id = %event.id, event_type = %event.event_type, error = %source, "not re-enqueued");
                failure.get_or_insert(ReconcileError::Publish {
                    event_id: event.id,
                    source,
                });
            }
        }
    }
    failure.map_or(Ok(()), Err)
}

async fn publish_one(
    publisher: &Publisher,
    exchange: &str,
    event: &Outgoing,
) -> Result<(), PublishError> {
    publisher
        .publish_retrying(
            (
                exchange,
                &event.event_type,
                &event.body,
                &event.properties(),
            ),
            PUBLISH_ATTEMPTS,
            BROKER_READY_TIMEOUT,
        )
        .await
}

/// One event as it goes to the broker.
#[derive(Debug)]
struct Outgoing {
    id: String,
    event_type: String,
    created: Option<i64>,
    /// The event object as Stripe listed it, serialized once.
    body: Vec<u8>,
}

impl Outgoing {
    fn from_object(object: &Value) -> Option<Self> {
        Some(Self {
            id: str_field(object, "id")?,
            event_type: str_field(object, "type")?,
            created: object.get("created").and_then(Value::as_i64),
            body: serde_json::to_vec(object).ok()?,
        })
    }

    /// The properties ingress sets (see the contract), plus [`SOURCE_HEADER`].
    fn properties(&self) -> BasicProperties {
        let mut table = FieldTable::default();
        table.insert(
            headers::RECEIVED_AT.into(),
            AMQPValue::LongString(Utc::now().to_rfc3339().into()),
        );
        table.insert(SOURCE_HEADER.into(), AMQPValue::LongString(SOURCE.into()));
        let mut props = BasicProperties::default()
            .with_message_id(self.id.as_str().into())
            .with_type(self.event_type.as_str().into())
            .with_content_type("application/json".into())
            .with_headers(table);
        if let Some(created) = self.created.and_then(|c| u64::try_from(c).ok()) {
            props = props.with_timestamp(created);
        }
        props
    }
}

/// Parses `--since`: an RFC3339 time, or a duration back from `now` (`72h`, `30d`). Refuses a
/// time in the future and a window longer than [`MAX_WINDOW`].
///
/// # Errors
/// [`ReconcileError::Usage`] naming `--since`.
pub fn parse_since(raw: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, ReconcileError> {
    let raw = raw.trim();
    let since = if let Ok(time) = DateTime::parse_from_rfc3339(raw) {
        time.with_timezone(&Utc)
    } else {
        shared::config::parse_duration(raw)
            .ok()
            .and_then(|d| chrono::Duration::from_std(d).ok())
            .and_then(|d| now.checked_sub_signed(d))
            .ok_or_else(|| {
                ReconcileError::Usage(format!(
                    "--since {raw:?} is neither an RFC3339 time (e.g. 2026-11-20T00:00:00Z) \
                     nor a duration back from now (e.g. 72h or 30d)"
                ))
            })?
    };
    if since > now {
        return Err(ReconcileError::Usage(format!(
            "--since {raw:?} is in the future"
        )));
    }
    let max = chrono::Duration::from_std(MAX_WINDOW).unwrap_or(chrono::Duration::MAX);
    if now - since > max {
        return Err(ReconcileError::Usage(format!(
            "--since {raw:?} reaches back {} days, but Stripe keeps events for 30 days only; \
             use at most --since 30d",
            (now - since).num_days()
        )));
    }
    Ok(since)
}

/// The Stripe client settings from `config`, with a batch job's patience.
///
/// # Errors
/// [`ReconcileError::Usage`] naming `STRIPE_SECRET_KEY` or `STRIPE_API_BASE`.
pub fn stripe_config(config: &Config) -> Result<StripeConfig, ReconcileError> {
    let mut stripe = config.stripe.clone().ok_or_else(|| {
        ReconcileError::Usage(
            "STRIPE_SECRET_KEY is not set: reconcile reads events from the Stripe API".into(),
        )
    })?;
    stripe.max_retries = STRIPE_RETRIES;
    Ok(stripe)
}

/// A bar over the time window (events come newest first), drawn on stderr only when stdout is
/// a terminal: piped output stays clean.
fn progress(since: DateTime<Utc>, until: DateTime<Utc>) -> ProgressBar {
    if !std::io::stdout().is_terminal() {
        return ProgressBar::hidden();
    }
    let window = u64::try_from((until - since).num_seconds()).unwrap_or(0);
    let bar = ProgressBar::with_draw_target(Some(window.max(1)), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template("{spinner} [{bar:40}] {percent:>3}% {msg}") {
        bar.set_style(style);
    }
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

fn str_field(object: &Value, key: &str) -> Option<String> {
    object.get(key).and_then(Value::as_str).map(str::to_owned)
}

fn rfc3339(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn n_events(n: usize) -> String {
    if n == 1 {
        "1 event".to_owned()
    } else {
        format!("{n} events")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use clap::Parser as _;
    use shared::config::Env;

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-11-23T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    fn usage(result: Result<DateTime<Utc>, ReconcileError>) -> String {
        match result {
            Err(ReconcileError::Usage(message)) => message,
            other => panic!("expected a usage error, got {other:?}"),
        }
    }

    #[test]
    fn since_accepts_a_duration_back_from_now() {
        let since = parse_since("72h", now()).unwrap();
        assert_eq!(rfc3339(since), "2026-11-20T12:00:00Z");
        assert_eq!(
            parse_since("30d", now()).unwrap(),
            now() - chrono::Duration::days(30)
        );
    }

    #[test]
    fn since_accepts_an_rfc3339_time_with_an_offset() {
        let since = parse_since("2026-11-21T02:00:00+02:00", now()).unwrap();
        assert_eq!(rfc3339(since), "2026-11-21T00:00:00Z");
    }

    #[test]
    fn since_older_than_stripes_retention_is_refused() {
        let message = usage(parse_since("31d", now()));
        assert!(message.contains("30 days"), "{message}");
        let message = usage(parse_since("2026-10-01T00:00:00Z", now()));
        assert!(message.contains("reaches back 53 days"), "{message}");
    }

    #[test]
    fn since_that_is_neither_time_nor_duration_names_the_flag() {
        let message = usage(parse_since("last tuesday", now()));
        assert!(message.starts_with("--since"), "{message}");
        let message = usage(parse_since("2026-11-24T00:00:00Z", now()));
        assert!(message.contains("future"), "{message}");
    }

    fn config(pairs: &[(&str, &str)]) -> Config {
        let mut vars = vec![
            ("DATABASE_URL", "postgres://localhost/x"),
            ("REDIS_URL", "redis://localhost"),
            ("AMQP_URL", "amqp://localhost"),
        ];
        vars.extend_from_slice(pairs);
        Config::from_env(&Env::from_pairs(vars)).unwrap()
    }

    #[test]
    fn a_missing_secret_key_is_a_usage_error_naming_the_variable() {
        let err = stripe_config(&config(&[])).unwrap_err();
        assert!(err.to_string().contains("STRIPE_SECRET_KEY"), "{err}");
        assert_eq!(crate::dlq::exit_code(&err.into_command_error()), 2);
    }

    #[test]
    fn stripe_settings_come_from_the_config() {
        let stripe = stripe_config(&config(&[
            ("STRIPE_SECRET_KEY", "sk_test_1"),
            ("STRIPE_API_BASE", "http://127.0.0.1:1234/"),
            ("STRIPE_API_VERSION", "2024-06-20"),
        ]))
        .unwrap();
        assert_eq!(stripe.api_base, "http://127.0.0.1:1234");
        assert_eq!(stripe.api_version, "2024-06-20");
        assert_eq!(stripe.max_retries, STRIPE_RETRIES);
    }

    #[test]
    fn runtime_failures_exit_with_one() {
        let err = ReconcileError::BrokerUnavailable {
            url: "amqp://x".into(),
            waited: BROKER_READY_TIMEOUT,
        };
        assert!(err.to_string().contains("broker"), "{err}");
        assert_eq!(crate::dlq::exit_code(&err.into_command_error()), 1);
        let err = ReconcileError::Stripe(StripeError::Timeout);
        assert!(err.to_string().contains("Stripe"), "{err}");
        // The command line prints the whole chain: the cause once, after what failed.
        let text = format!("{:#}", anyhow::Error::new(err));
        assert_eq!(
            text,
            "reading events from Stripe failed: stripe did not answer in time"
        );
    }

    #[test]
    fn command_line_repeats_type_and_takes_the_flags() {
        let cli = crate::cli::Cli::try_parse_from([
            "processor",
            "reconcile",
            "--since",
            "72h",
            "--type",
            "charge.refunded",
            "--type",
            "invoice.paid",
            "--undelivered-only",
            "--dry-run",
        ])
        .unwrap();
        let Some(crate::cli::Command::Reconcile(args)) = cli.command else {
            panic!("not the reconcile command");
        };
        assert_eq!(args.since, "72h");
        assert_eq!(args.types, ["charge.refunded", "invoice.paid"]);
        assert!(args.undelivered_only && args.dry_run);
        assert!(crate::cli::Cli::try_parse_from(["processor", "reconcile"]).is_err());
    }

    #[test]
    fn messages_carry_the_ingress_properties_and_the_source() {
        let object = serde_json::json!({"id": "evt_1", "type": "invoice.paid", "created": 1_700_000_000, "data": {}});
        let event = Outgoing::from_object(&object).unwrap();
        assert_eq!(event.body, serde_json::to_vec(&object).unwrap());
        let props = event.properties();
        assert_eq!(props.message_id().as_ref().unwrap().as_str(), "evt_1");
        assert_eq!(props.kind().as_ref().unwrap().as_str(), "invoice.paid");
        assert_eq!(*props.timestamp(), Some(1_700_000_000));
        assert_eq!(
            props.content_type().as_ref().unwrap().as_str(),
            "application/json"
        );
        let table = props.headers().as_ref().unwrap();
        let source = table.inner().get(SOURCE_HEADER).unwrap();
        assert!(matches!(source, AMQPValue::LongString(s) if s.to_string() == SOURCE));
        assert!(table.inner().contains_key(headers::RECEIVED_AT));
        assert!(Outgoing::from_object(&serde_json::json!({"id": "evt_2"})).is_none());
    }
}
