//! `ingress` binary: read config, set up telemetry, bind, run until SIGINT/SIGTERM.

use std::process::ExitCode;

// glibc's malloc took a fifth of ingress's CPU (most requests allocate a few KiB: hyper's read
// buffer, the frame lapin builds); mimalloc takes about a tenth less CPU per request (see
// BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
