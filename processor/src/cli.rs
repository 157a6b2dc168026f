//! The `processor` command line: subcommands, exit codes, and the long-running service that
//! combines the consumer with the HTTP server.
//!
//! Invariants: exit code 0 on success, 1 on a runtime failure, 2 on a usage or configuration
//! error (the message names the variable); configuration is read once, before anything starts;
//! on SIGINT/SIGTERM the consumer and the HTTP server both drain before the process exits.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use clap::{Parser, Subcommand};
use deadpool_postgres::Pool;
use shared::amqp::Publisher;
use shared::config::{ConfigError, Env};
use shared::shutdown::Stop;
use tokio::net::TcpListener;

use crate::api::{ApiConfig, ApiState};
use crate::cache::Cache;
use crate::config::Config;
use crate::db;
use crate::worker::Worker;

/// How long a readiness probe waits for each dependency.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Consumes Stripe events into entitlements, serves the entitlement API and hosts operator
/// commands. Configuration comes from the environment (and `.env`).
#[derive(Debug, Parser)]
#[command(name = "processor", version, about, long_about = None)]
pub struct Cli {
    /// Base name of the RabbitMQ topology, overriding AMQP_TOPOLOGY_BASE (tests isolate
    /// themselves with it).
    #[arg(long, global = true, hide = true)]
    pub topology_base: Option<String>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Consumer and HTTP API in one process (the default).
    Run,
    /// Only the consumer (plus /healthz, /readyz and /metrics on API_ADDR).
    Worker,
    /// Only the HTTP API.
    Api,
    /// Create the database if needed and apply pending migrations, then exit.
    Migrate,
    /// Inspect, replay, purge and export the dead-letter queue.
    Dlq(crate::dlq::DlqArgs),
    /// Re-enqueue events Stripe still lists (GET /v1/events, 30 days) through the normal queue.
    Reconcile(crate::reconcile::ReconcileArgs),
    /// Re-derive entitlements from the stored rows through the projection (after a change to
    /// the product registry or the catalog).
    Recompute(RecomputeArgs),
    /// See and replay the app's messages (entitlements.changed, notifications) the relay has not
    /// delivered.
    Outbox(crate::outbox::admin::OutboxArgs),
    /// Print a user bearer token signed with AUTH_JWT_SECRET, for local use (curl).
    DevToken(crate::devtoken::DevTokenArgs),
}

/// `processor recompute (--user U | --all)`.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("who").required(true).args(["user", "all"])))]
pub struct RecomputeArgs {
    /// Only this user.
    #[arg(long)]
    pub user: Option<String>,
    /// Every user with a purchase, a subscription or an entitlement.
    #[arg(long)]
    pub all: bool,
}

/// Parses the arguments, runs the subcommand and maps the outcome to the exit code.
pub async fn main_with_args<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(error) => {
            // clap prints help/version (exit 0) or the usage error (exit 2).
            let _ = error.print();
            return ExitCode::from(u8::try_from(error.exit_code()).unwrap_or(2));
        }
    };
    let env = Env::load();
    let mut config = match Config::from_env(&env) {
        Ok(config) => config,
        Err(error) => return config_failure(&error),
    };
    if let Some(base) = cli.topology_base {
        config.topology = config.topology.with_base(base);
    }
    let command = cli.command.unwrap_or(Command::Run);
    // The API's settings are read with the rest of the configuration: `run` and `api` refuse
    // to start (exit 2, naming the variable) without AUTH_JWT_SECRET; `worker` needs none.
    let api = if matches!(command, Command::Run | Command::Api) {
        match ApiConfig::from_env(&env, &config) {
            Ok(api) => Some(api),
            Err(error) => return config_failure(&error),
        }
    } else {
        None
    };
    if let Command::DevToken(args) = &command {
        return dev_token(args, &env);
    }
    // Operator commands print to stdout; only their warnings and errors are logged.
    // lapin logs a closed channel at ERROR on its own; the command reports the cause itself.
    let default_filter = if matches!(
        command,
        Command::Dlq(_) | Command::Reconcile(_) | Command::Recompute(_) | Command::Outbox(_)
    ) {
        "warn,lapin=off"
    } else {
        "info"
    };
    shared::telemetry::init_tracing(config.log_format, default_filter);
    let log_format = config.log_format;
    match execute(command, config, api).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // Once, each cause once: a JSON line for machines, plain text for people.
            let message = crate::dlq::describe(&error);
            if log_format == shared::telemetry::LogFormat::Json {
                tracing::error!(error = message, "processor failed");
            } else {
                eprintln!("processor: {message}");
            }
            // 2 for a usage error found after parsing (e.g. a destructive command without
            // --yes and without a terminal), 1 for everything else.
            ExitCode::from(crate::dlq::exit_code(&error))
        }
    }
}

/// `processor dev-token`: prints the token, or fails with exit code 2 naming `AUTH_JWT_SECRET`.
fn dev_token(args: &crate::devtoken::DevTokenArgs, env: &Env) -> ExitCode {
    let auth = match crate::auth::AuthConfig::from_env(env) {
        Ok(auth) => auth,
        Err(error) => return config_failure(&error),
    };
    match crate::devtoken::token(
        args,
        &auth.jwt_secret,
        auth.issuer.as_deref(),
        auth.audience.as_deref(),
    ) {
        Ok(token) => {
            println!("{token}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("processor: cannot sign the token: {error}");
            ExitCode::from(1)
        }
    }
}

fn config_failure(error: &ConfigError) -> ExitCode {
    eprintln!("processor: {error}");
    ExitCode::from(2)
}

async fn execute(command: Command, config: Config, api: Option<ApiConfig>) -> anyhow::Result<()> {
    match command {
        Command::Migrate => {
            let pool = db::pool(&config)?;
            let applied = db::prepare(&config, &pool)
                .await
                .context("migrating the database")?;
            crate::service::sync_catalog(&config, &pool).await?;
            tracing::info!(applied = applied.len(), "database is up to date");
            Ok(())
        }
        Command::Recompute(args) => {
            let pool = db::pool(&config)?;
            db::prepare(&config, &pool)
                .await
                .context("migrating the database")?;
            crate::service::sync_catalog(&config, &pool).await?;
            let user = args
                .user
                .as_deref()
                .map(shared::ids::UserId::parse)
                .transpose()
                .context("--user")?;
            let users = crate::store::recompute_stored(&pool, user.as_ref())
                .await
                .context("recomputing entitlements")?;
            println!("recomputed the entitlements of {users} user(s)");
            Ok(())
        }
        Command::Run | Command::Worker | Command::Api => {
            let listener = TcpListener::bind(config.api_addr)
                .await
                .with_context(|| format!("binding API_ADDR {}", config.api_addr))?;
            let with_worker = !matches!(command, Command::Api);
            serve_with_api(
                config,
                api,
                listener,
                shared::shutdown_signal(),
                with_worker,
            )
            .await
        }
        Command::Dlq(args) => {
            let broker = crate::dlq::Broker {
                amqp_url: &config.amqp_url,
                topology: &config.topology,
                database_url: Some(&config.database_url),
            };
            crate::dlq::execute(args, &broker).await
        }
        Command::Reconcile(args) => crate::reconcile::execute(args, &config).await,
        Command::Outbox(args) => crate::outbox::admin::execute(args, &config).await,
        // Handled before logging starts.
        Command::DevToken(_) => Ok(()),
    }
}

/// What the HTTP handlers need.
#[derive(Debug, Clone)]
pub struct AppState {
    pub pool: Pool,
    pub cache: Cache,
    pub publisher: Publisher,
    /// The consumer's view of the Stripe key, when this process consumes.
    pub stripe_key: Option<crate::worker::completions::StripeKeyHealth>,
}

/// The long-running service without the entitlement API: prepares the database, then runs the
/// consumer (if `with_worker`) and the operational routes on `listener` until `shutdown`
/// resolves.
///
/// # Errors
/// When the database cannot be prepared or the HTTP server fails.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
    with_worker: bool,
) -> anyhow::Result<()> {
    serve_with_api(config, None, listener, shutdown, with_worker).await
}

/// [`serve`], plus the entitlement API routes when `api` is given (`run` and `api` always give
/// it; without it the API paths answer 404 and only the operational routes exist).
///
/// # Errors
/// When the database cannot be prepared, the Stripe client cannot be built or the HTTP server
/// fails.
pub async fn serve_with_api(
    config: Config,
    api: Option<ApiConfig>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
    with_worker: bool,
) -> anyhow::Result<()> {
    let (deps, publisher_task) = crate::service::Dependencies::start(&config)
        .await
        .context("preparing the database and connections")?;
    let crate::service::Dependencies {
        pool,
        cache,
        publisher,
    } = deps;
    let worker = with_worker.then(|| {
        Worker::new(
            config.clone(),
            pool.clone(),
            cache.clone(),
            publisher.clone(),
        )
    });
    let state = AppState {
        pool: pool.clone(),
        cache: cache.clone(),
        publisher: publisher.clone(),
        stripe_key: worker.as_ref().map(Worker::stripe_key_health),
    };
    // The entitlement API's router is merged with the operational routes here.
    let metrics_listener = match config.metrics_addr {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding PROCESSOR_METRICS_ADDR {addr}"))?,
        ),
        None => None,
    };
    let mut router = ops_router(state, metrics_listener.is_none());
    if let Some(api) = api {
        let api_state = ApiState::new(api, pool.clone(), cache.clone())
            .context("building the Stripe client")?;
        router = router.merge(crate::api::router(api_state));
    }

    let stop = Stop::default();
    let wait = || stop.wait();
    let consumer = async {
        if let Some(worker) = &worker {
            worker.run(wait()).await;
        }
    };
    let http = async {
        tracing::info!(addr = ?listener.local_addr().ok(), "HTTP server listening");
        let served = shared::server::serve(listener, router, &config.api_limits, wait()).await;
        // The listener ending for any reason stops the consumer too.
        stop.trigger();
        served
    };
    let metrics = async {
        let Some(listener) = metrics_listener else {
            return Ok(());
        };
        tracing::info!(addr = ?listener.local_addr().ok(), "metrics listening");
        let router = shared::server::metrics_router();
        shared::server::serve(listener, router, &config.api_limits, wait()).await
    };
    let signal = async {
        tokio::select! {
            () = shutdown => {}
            () = wait() => {}
        }
        stop.trigger();
    };
    let ((), (), served, metrics) = tokio::join!(signal, consumer, http, metrics);
    publisher_task.shutdown().await;
    served.and(metrics).context("HTTP server")
}

/// `/healthz`, `/readyz`, and `/metrics` when `with_metrics` (`PROCESSOR_METRICS_ADDR` unset).
pub fn ops_router(state: AppState, with_metrics: bool) -> Router {
    let router = Router::new()
        .route(
            "/healthz",
            get(|| async { axum::Json(serde_json::json!({"status": "ok"})) }),
        )
        .route("/readyz", get(readyz))
        .with_state(state);
    if with_metrics {
        router.merge(shared::server::metrics_router())
    } else {
        router
    }
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let postgres = async {
        let client = state.pool.get().await.ok()?;
        client.simple_query("SELECT 1").await.ok().map(drop)
    };
    let (postgres, redis) = tokio::join!(
        tokio::time::timeout(PROBE_TIMEOUT, postgres),
        tokio::time::timeout(PROBE_TIMEOUT, state.cache.ping()),
    );
    let postgres = matches!(postgres, Ok(Some(())));
    let redis = matches!(redis, Ok(Ok(())));
    let broker = state.publisher.is_ready();
    let word = |ok: bool| if ok { "ok" } else { "unavailable" };
    let status = if postgres && redis && broker {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut body = serde_json::json!({
        "postgres": word(postgres),
        "redis": word(redis),
        "broker": word(broker),
    });
    // Said, not counted against readiness: reads and own checkouts still work; the purchases
    // that need Stripe wait until the key is fixed.
    if state.stripe_key.as_ref().is_some_and(|k| k.is_refused()) {
        body["stripe"] = serde_json::json!("key_refused");
    }
    (status, axum::Json(body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn no_subcommand_means_run() {
        let cli = Cli::try_parse_from(["processor"]).map(|c| c.command);
        assert!(matches!(cli, Ok(None)));
        let cli = Cli::try_parse_from(["processor", "migrate"]).map(|c| c.command);
        assert!(matches!(cli, Ok(Some(Command::Migrate))));
        assert!(Cli::try_parse_from(["processor", "frobnicate"]).is_err());
    }
}
