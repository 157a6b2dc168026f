//! The Stripe request budget: every request of every client built from one
//! [`super::StripeConfig`] draws from it (checkout, portal, restore, reconcile and the worker's
//! completions alike), so the service stays under Stripe's rate limit (about 100 requests/s in
//! live mode, 25 in test mode, per account) and the worker's reads cannot starve the users'
//! checkouts. Stripe's own 429 is still honoured by the client's retries.
//!
//! Shared ([`Budget::shared_in`]): the budget is kept in Redis for the account (a GCRA, one
//! atomic script per request), so every process of the account (workers, APIs) draws from the
//! same one. While Redis cannot answer, each process falls back to its own bucket of the same
//! size (`stripe_budget_fallbacks_total`): the account may then see up to one budget per
//! process, and Stripe's 429 is what remains.
//!
//! Precedence: user-triggered requests (checkout, portal, restore: the API's) draw from
//! [`Budget::for_users`], a share of [`USER_SHARE`] of the budget kept beside it, before the
//! budget itself; the worker's reads draw from the budget alone. However many users call,
//! they never take more than the share, so the worker always finds the rest.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use redis::aio::ConnectionManager;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use tokio::time::Instant;

/// How long a Redis answer may take before the process' own bucket decides.
const REDIS_TIMEOUT: Duration = Duration::from_millis(250);

/// After a failed connection, how long the process' own bucket decides before trying again.
const RECONNECT_COOLDOWN: Duration = Duration::from_secs(5);

/// The generic cell rate algorithm over one key: `ARGV[1]` the interval between requests and
/// `ARGV[2]` the burst tolerance, in microseconds. Returns how many microseconds to wait (0:
/// the request is taken). The time is Redis' own, so every process agrees on it.
const GCRA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local allowed_at = tat - tonumber(ARGV[2])
if now < allowed_at then return allowed_at - now end
redis.call('SET', KEYS[1], tat + interval, 'PX', math.floor((tat + interval - now) / 1000) + 1000)
return 0
";

/// The default budget: below test mode's limit, a fifth of live mode's.
pub const DEFAULT_PER_SECOND: u32 = 20;

/// The share of the budget user-triggered requests may take; the rest is the worker's.
pub const USER_SHARE: f64 = 0.75;

/// Requests per second, with a burst of one second's worth. Clones share the bucket.
#[derive(Debug, Clone)]
pub struct Budget {
    per_second: f64,
    bucket: Arc<Mutex<(f64, Instant)>>,
    shared: Option<Arc<Shared>>,
    /// The share a request takes from first (user-triggered requests: [`Budget::for_users`]).
    share: Option<Arc<Budget>>,
}

/// The account's budget in Redis.
struct Shared {
    client: redis::Client,
    key: String,
    script: redis::Script,
    connection: tokio::sync::Mutex<(Option<ConnectionManager>, Option<Instant>)>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl Default for Budget {
    fn default() -> Self {
        Self::new(DEFAULT_PER_SECOND)
    }
}

impl Budget {
    /// `per_second` requests per second (at least 1).
    #[must_use]
    pub fn new(per_second: u32) -> Self {
        let per_second = f64::from(per_second.max(1));
        Self {
            per_second,
            bucket: Arc::new(Mutex::new((per_second, Instant::now()))),
            shared: None,
            share: None,
        }
    }

    /// This budget as user-triggered requests draw from it: from a share of [`USER_SHARE`] of
    /// it first (kept beside it, in Redis when it is shared), then from it. Clones share both.
    #[must_use]
    pub fn for_users(&self) -> Self {
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let rate = (self.per_second * USER_SHARE).floor().max(1.0) as u32;
        let mut share = Self::new(rate);
        share.shared = self
            .shared
            .as_ref()
            .map(|s| Arc::new(Shared::new(s.client.clone(), format!("{}:users", s.key))));
        Self {
            share: Some(Arc::new(share)),
            ..self.clone()
        }
    }

    /// This budget kept in the Redis at `redis_url` for the account of `secret_key` (its key is
    /// a digest of the secret key, never the key itself), shared by every process of the
    /// account.
    ///
    /// # Errors
    /// The URL is not a Redis URL.
    pub fn shared_in(
        mut self,
        redis_url: &str,
        secret_key: &SecretString,
    ) -> Result<Self, redis::RedisError> {
        let digest = Sha256::digest(secret_key.expose_secret().as_bytes());
        let account: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        self.shared = Some(Arc::new(Shared::new(
            crate::redis_link::client(redis_url)?,
            format!("stripe_budget:v1:{account}"),
        )));
        Ok(self)
    }

    /// Waits until a request may be sent, and takes it from the budget (from its share first,
    /// for user-triggered requests).
    pub async fn take(&self) {
        let started = Instant::now();
        if let Some(share) = &self.share {
            share.take_one().await;
        }
        self.take_one().await;
        let waited = started.elapsed();
        if waited > Duration::from_millis(1) {
            metrics::histogram!("stripe_budget_wait_seconds").record(waited.as_secs_f64());
        }
    }

    /// Takes a request from this budget alone: the account's in Redis, else this process'.
    async fn take_one(&self) {
        let taken = match &self.shared {
            Some(shared) => shared.take(self.per_second).await,
            None => false,
        };
        if !taken {
            self.take_here().await;
        }
    }

    /// Takes a request from this process' own bucket.
    async fn take_here(&self) {
        loop {
            let wait = {
                let mut bucket = self.bucket.lock().unwrap_or_else(PoisonError::into_inner);
                let (tokens, at) = &mut *bucket;
                let now = Instant::now();
                *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.per_second)
                    .min(self.per_second);
                *at = now;
                if *tokens >= 1.0 {
                    *tokens -= 1.0;
                    None
                } else {
                    Some(Duration::from_secs_f64((1.0 - *tokens) / self.per_second))
                }
            };
            match wait {
                None => break,
                Some(wait) => tokio::time::sleep(wait).await,
            }
        }
    }
}

impl Shared {
    /// The budget at `key` in the Redis of `client`, not connected yet.
    fn new(client: redis::Client, key: String) -> Self {
        Self {
            client,
            key,
            script: redis::Script::new(GCRA),
            connection: tokio::sync::Mutex::new((None, None)),
        }
    }

    /// Takes a request from the account's budget, waiting as it says. False when Redis could
    /// not answer (the caller's own bucket decides).
    async fn take(&self, per_second: f64) -> bool {
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let interval = (1_000_000.0 / per_second) as i64;
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let tolerance = interval * (per_second as i64 - 1).max(0);
        loop {
            let Some(mut connection) = self.connection().await else {
                return false;
            };
            let mut invocation = self.script.key(&self.key);
            invocation.arg(interval).arg(tolerance);
            let answer = tokio::time::timeout(
                REDIS_TIMEOUT,
                invocation.invoke_async::<i64>(&mut connection),
            )
            .await;
            match answer {
                Ok(Ok(0)) => return true,
                Ok(Ok(wait)) => {
                    let wait = u64::try_from(wait).unwrap_or(0);
                    tokio::time::sleep(Duration::from_micros(wait)).await;
                }
                Ok(Err(_)) | Err(_) => {
                    metrics::counter!("stripe_budget_fallbacks_total").increment(1);
                    return false;
                }
            }
        }
    }

    /// The connection, or `None` while Redis cannot be reached (tried again after
    /// [`RECONNECT_COOLDOWN`]).
    async fn connection(&self) -> Option<ConnectionManager> {
        let mut slot = self.connection.lock().await;
        if let Some(connection) = &slot.0 {
            return Some(connection.clone());
        }
        if slot.1.is_some_and(|at| at.elapsed() < RECONNECT_COOLDOWN) {
            metrics::counter!("stripe_budget_fallbacks_total").increment(1);
            return None;
        }
        match crate::redis_link::open(&self.client, REDIS_TIMEOUT).await {
            Ok(connection) => {
                *slot = (Some(connection.clone()), None);
                Some(connection)
            }
            _ => {
                slot.1 = Some(Instant::now());
                metrics::counter!("stripe_budget_fallbacks_total").increment(1);
                tracing::warn!("Redis unreachable: the Stripe budget is this process' own");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_burst_is_one_seconds_worth_then_requests_are_spaced() {
        let budget = Budget::new(50);
        let started = Instant::now();
        for _ in 0..50 {
            budget.take().await;
        }
        assert!(
            started.elapsed() < Duration::from_millis(50),
            "the burst is free"
        );
        let shared = budget.clone();
        for _ in 0..10 {
            shared.take().await;
        }
        let elapsed = started.elapsed();
        assert!(
            elapsed >= Duration::from_millis(180) && elapsed < Duration::from_secs(1),
            "ten more take a fifth of a second, clones sharing the bucket: {elapsed:?}"
        );
    }

    /// Two processes' budgets of 20/s for one account, kept in the machine's Redis: together
    /// they take the burst and then 20 a second, not 40.
    #[tokio::test]
    async fn budgets_of_one_account_in_redis_are_one_budget() {
        let account = SecretString::from(format!("sk_test_{}", uuid::Uuid::new_v4().simple()));
        let url = "redis://127.0.0.1:6379";
        let first = Budget::new(20).shared_in(url, &account).unwrap();
        let second = Budget::new(20).shared_in(url, &account).unwrap();
        let started = Instant::now();
        let take = |budget: Budget| async move {
            for _ in 0..20 {
                budget.take().await;
            }
        };
        tokio::join!(take(first), take(second));
        let elapsed = started.elapsed();
        // 40 requests: the burst of 20, then 20 more at 20/s, about a second; two budgets of
        // their own would have taken them all at once.
        assert!(
            elapsed >= Duration::from_millis(850) && elapsed < Duration::from_secs(3),
            "one budget for the account: {elapsed:?}"
        );
        // Another account is not held back by this one.
        let other = SecretString::from(format!("sk_test_{}", uuid::Uuid::new_v4().simple()));
        let alone = Budget::new(20).shared_in(url, &other).unwrap();
        let started = Instant::now();
        take(alone).await;
        assert!(started.elapsed() < Duration::from_millis(300));
    }

    #[tokio::test]
    async fn without_redis_each_process_keeps_its_own_budget() {
        let account = SecretString::from("sk_test_unreachable".to_owned());
        // Nothing listens on port 1.
        let budget = Budget::new(50)
            .shared_in("redis://127.0.0.1:1", &account)
            .unwrap();
        let started = Instant::now();
        for _ in 0..60 {
            budget.take().await;
        }
        let elapsed = started.elapsed();
        assert!(
            elapsed >= Duration::from_millis(180) && elapsed < Duration::from_secs(2),
            "the burst of 50 then 10 at 50/s: {elapsed:?}"
        );
    }

    /// Users hammering the API take at most their share: the worker's reads, drawing from the
    /// same account budget in Redis, still get through at the rest of it.
    #[tokio::test]
    async fn the_workers_reads_find_the_budget_however_many_users_call() {
        let account = SecretString::from(format!("sk_test_{}", uuid::Uuid::new_v4().simple()));
        let url = "redis://127.0.0.1:6379";
        let worker = Budget::new(20).shared_in(url, &account).unwrap();
        // Another process: the API, its requests user-triggered.
        let users = Budget::new(20)
            .shared_in(url, &account)
            .unwrap()
            .for_users();
        let hammer = {
            let users = users.clone();
            tokio::spawn(async move {
                let calls = (0..8).map(|_| {
                    let users = users.clone();
                    async move {
                        for _ in 0..20 {
                            users.take().await;
                        }
                    }
                });
                futures_util::future::join_all(calls).await;
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        // The worker's 20 reads while 160 user requests queue: they go at the worker's part
        // of the rate (at least 5/s), not behind the users' queue (about 8 s at 20/s).
        let started = Instant::now();
        for _ in 0..20 {
            worker.take().await;
        }
        let elapsed = started.elapsed();
        hammer.abort();
        assert!(
            elapsed < Duration::from_millis(4500),
            "the worker's reads took {elapsed:?}"
        );
    }
}
