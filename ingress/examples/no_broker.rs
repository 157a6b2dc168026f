//! The no-broker reference of the ingress benchmark (`bench/ingress.sh`): the service's own
//! router and listener — limits, signature check, envelope parse, message properties, metrics,
//! logging — configured from the same variables as `ingress`, with a publisher that keeps
//! nothing and answers at once. Ingress beside it shows what the broker adds to a request.
//!
//! Every 200 it gives is a lie by design: it exists only as a measuring stick and is built only
//! as an example, never as part of the service.

use std::process::ExitCode;

use lapin::BasicProperties;
use shared::amqp::PublishError;

// The same allocator as the `ingress` binary, so the reference measures the same program.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Keeps nothing and says it did.
#[derive(Debug)]
struct Discard;

impl ingress::Publish for Discard {
    fn is_ready(&self) -> bool {
        true
    }

    async fn publish(
        &self,
        _exchange: &str,
        _routing_key: &str,
        _body: &[u8],
        _properties: BasicProperties,
    ) -> Result<(), PublishError> {
        Ok(())
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let (config, listener) = match ingress::configure_and_bind().await {
        Ok(ready) => ready,
        Err(code) => return code,
    };
    match ingress::serve(config, listener, Discard, shared::shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "no-broker reference failed");
            ExitCode::from(1)
        }
    }
}
