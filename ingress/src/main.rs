//! `ingress` binary: read config, set up telemetry, bind, run until SIGINT/SIGTERM.

use std::process::ExitCode;

use shared::config::Env;
use tokio::net::TcpListener;

#[tokio::main]
async fn main() -> ExitCode {
    let config = match ingress::Config::from_env(&Env::load()) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("ingress: {error}");
            return ExitCode::from(2);
        }
    };
    shared::telemetry::init_tracing(config.log_format, "info");
    let listener = match TcpListener::bind(config.addr).await {
        Ok(listener) => listener,
        Err(error) => {
            tracing::error!(addr = %config.addr, %error, "cannot bind INGRESS_ADDR");
            return ExitCode::from(1);
        }
    };
    match ingress::run(config, listener, shared::shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "ingress failed");
            ExitCode::from(1)
        }
    }
}
