//! `ingress` binary: read config, set up telemetry, bind, run until SIGINT/SIGTERM.

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    let (config, listener) = match ingress::configure_and_bind().await {
        Ok(ready) => ready,
        Err(code) => return code,
    };
    match ingress::run(config, listener, shared::shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "ingress failed");
            ExitCode::from(1)
        }
    }
}
