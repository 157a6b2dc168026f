//! Support for the system tests: every test gets its own database, its own queues and its own
//! ids, so tests run in parallel against the machine's shared services without seeing each
//! other. Waiting is done by polling with a deadline, never by fixed sleeps.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    missing_debug_implementations,
    unreachable_pub
)]

pub mod amqp;
pub mod api;
pub mod chaos;
pub mod db;
pub mod ingress;
pub mod scenarios;
pub mod servers;
pub mod stack;
pub mod stripe_fake;
pub mod worker;

use std::future::Future;
use std::time::{Duration, Instant};

/// A short random suffix for names that must not collide between tests.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

/// Polls `check` until it returns `Some`, or panics after `deadline` naming `what`.
pub async fn eventually<T, F, Fut>(deadline: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The path of one of the workspace's binaries (`processor`, `ingress`), built next to the
/// test binaries (`cargo build --bins`; `cargo nextest run --workspace` builds them too).
pub fn binary(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let path = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target directory")
        .join(name);
    assert!(
        path.exists(),
        "{} is not built: run `cargo build -p {name} --bins` first",
        path.display()
    );
    path
}

/// `AMQP_URL` for tests (the machine's broker unless overridden).
pub fn amqp_url() -> String {
    std::env::var("TEST_AMQP_URL").unwrap_or_else(|_| shared::amqp::DEFAULT_AMQP_URL.into())
}

/// Redis URL for tests.
pub fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// `GET url` with bearer `token`, answered as JSON (for the admin routes).
pub async fn get_json(http: &reqwest::Client, url: &str, token: &str) -> serde_json::Value {
    http.get(url)
        .bearer_auth(token)
        .send()
        .await
        .expect("the request is answered")
        .json()
        .await
        .expect("a JSON answer")
}
