//! The `processor` binary: parses the command line and hands over to the library.
use std::process::ExitCode;

use clap::Parser;
use shared::config::Env;
use shared::telemetry::{LogFormat, init_tracing};
use shared::topology::Topology;

/// Stripe events to entitlements.
#[derive(Debug, Parser)]
#[command(name = "processor", version)]
struct Cli {
    /// Base name of the RabbitMQ topology (tests isolate themselves with it).
    #[arg(long, global = true, hide = true)]
    topology_base: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Inspect, replay, purge and export the dead-letter queue.
    Dlq(processor::dlq::DlqArgs),
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let env = Env::load();
    init_tracing(
        env.parse_or("LOG_FORMAT", LogFormat::Pretty)
            .unwrap_or_default(),
        "warn",
    );
    let result = match Topology::from_env(&env) {
        Err(e) => Err(anyhow::Error::new(processor::dlq::UsageError(
            e.to_string(),
        ))),
        Ok(topology) => {
            let topology = cli
                .topology_base
                .map_or(topology.clone(), |b| topology.with_base(b));
            let amqp_url = env.string_or("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f");
            let Command::Dlq(args) = cli.command;
            processor::dlq::execute(args, &amqp_url, &topology).await
        }
    };
    result.map_or_else(
        |e| {
            eprintln!("error: {e:#}");
            ExitCode::from(processor::dlq::exit_code(&e))
        },
        |()| ExitCode::SUCCESS,
    )
}
