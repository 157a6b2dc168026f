//! A minimal app endpoint for the processor's outbound webhooks: verifies the Standard Webhooks
//! signature, drops redeliveries and stale versions, and prints what it would act on.
//!
//! ```text
//! APP_WEBHOOK_SECRET=whsec_… cargo run -p processor --example webhook_receiver -- 127.0.0.1:3000
//! # and run the processor with APP_WEBHOOK_URL=http://127.0.0.1:3000/hooks and the same secret
//! ```
//!
//! What a real receiver keeps from it: verify before parsing (reject with 400 otherwise); answer
//! 2xx quickly (anything else is retried); apply `entitlements.changed` only when its `version`
//! is newer than the last one applied for the user — deliveries are at least once, so a message
//! can come again, and a replayed old message must not undo a newer one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use secrecy::SecretString;

#[derive(Default)]
struct Seen {
    /// The newest version applied per user.
    versions: HashMap<String, i64>,
}

struct App {
    secret: SecretString,
    seen: Mutex<Seen>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let env = shared::config::Env::load();
    let secret = env
        .secret("APP_WEBHOOK_SECRET")
        .ok_or_else(|| anyhow::anyhow!("APP_WEBHOOK_SECRET is not set"))?;
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:3000".into());
    let app = Arc::new(App {
        secret,
        seen: Mutex::new(Seen::default()),
    });
    let router = axum::Router::new()
        .route("/hooks", axum::routing::post(receive))
        .with_state(app);
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on http://{addr}/hooks");
    axum::serve(listener, router).await?;
    Ok(())
}

async fn receive(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    };
    let verified = processor::outbox::webhook::verify(
        &app.secret,
        header("webhook-id"),
        header("webhook-timestamp"),
        &body,
        header("webhook-signature"),
        chrono::Utc::now().timestamp(),
        Duration::from_secs(300),
    );
    if !verified {
        return StatusCode::BAD_REQUEST;
    }
    let Ok(message) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return StatusCode::BAD_REQUEST;
    };
    let user = message["userId"].as_str().unwrap_or_default().to_owned();
    let version = message["version"].as_i64().unwrap_or_default();
    match message["type"].as_str().unwrap_or_default() {
        "entitlements.changed" => {
            let Ok(mut seen) = app.seen.lock() else {
                return StatusCode::INTERNAL_SERVER_ERROR;
            };
            let last = seen.versions.entry(user.clone()).or_default();
            if version <= *last {
                println!("{user}: version {version} already applied (newest {last}); ignored");
            } else {
                *last = version;
                println!("{user}: version {version}: {}", message["entitlements"]);
            }
        }
        kind => println!("{user}: {kind} (version {version}): {message}"),
    }
    StatusCode::NO_CONTENT
}
