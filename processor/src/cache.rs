//! Redis: the two-phase dedupe marker and the entitlement cache. Redis is a fast path here and
//! Postgres the truth; Redis runs without persistence, so every key may vanish at any time.
//!
//! Invariants:
//! - dedupe: `dedupe:v1:{eventId}` holds a short-lived `processing:<token>` claim while a worker
//!   works on the event, and `done` (for `DEDUPE_TTL_SECONDS`) only after the Postgres commit. A
//!   failed attempt releases only its own claim (compare-and-delete), so a crash between claim and
//!   commit delays the event by at most the claim's TTL and never drops it;
//! - cache: `entitlements:v1:{userId}` is a hash `{v: version, d: snapshot JSON}` written only by
//!   a compare-and-set script that refuses a version older than the stored one, so two writers
//!   that committed in one order and write in the other cannot leave it stale. A failed write
//!   deletes the key, so readers fall back to Postgres;
//! - a Redis failure never fails an event: the functions used by the consumer log and count it.
//!
//! The connection is a `ConnectionManager` created lazily (the processor starts while Redis is
//! down); a command that hits a broken connection is retried once, since the manager reconnects
//! but fails the command in flight.

use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use redis::{RedisError, Script};
use shared::ids::{StripeEventId, UserId};
use tokio::sync::Mutex;

use crate::config::Config;
use crate::domain::view::UserSnapshot;

/// How long one Redis command or connection attempt may take.
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);

/// After a failed connection attempt, commands fail at once for this long.
const RECONNECT_COOLDOWN: Duration = Duration::from_secs(1);

/// Takes a claim, or says why not: 1 = claimed, 2 = already done, 0 = claimed by someone else.
const CLAIM_SCRIPT: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == 'done' then return 2 end
return 0
";

/// Deletes the key only while it still holds the caller's claim.
const RELEASE_SCRIPT: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

/// Writes `{v, d}` unless the stored version is newer; 1 = written, 0 = refused as older.
const CAS_SCRIPT: &str = r"
local current = redis.call('HGET', KEYS[1], 'v')
if current and tonumber(current) > tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'd', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
";

/// A Redis operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("redis error: {0}")]
    Redis(#[from] RedisError),
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("redis unreachable at the last attempt; not retrying yet")]
    Unavailable,
    #[error("cached snapshot is not valid JSON: {0}")]
    Corrupt(#[from] serde_json::Error),
}

/// Outcome of trying to claim an event before working on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This worker holds the claim; release it on failure with this token.
    Acquired(ClaimToken),
    /// A `done` marker exists: the event was committed before (skip it).
    Done,
    /// Another worker holds a live claim: leave the event for now.
    HeldElsewhere,
    /// Redis is unavailable: go ahead, Postgres decides (`processed_events`).
    Unavailable,
}

/// The random value stored in a claim, proving it is ours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimToken(String);

/// Key of the dedupe marker of an event.
#[must_use]
pub fn dedupe_key(event: &StripeEventId) -> String {
    format!("dedupe:v1:{event}")
}

/// What every key of the entitlement cache starts with.
pub const ENTITLEMENTS_PREFIX: &str = "entitlements:v1:";

/// Key of a user's cached entitlements.
#[must_use]
pub fn entitlements_key(user: &str) -> String {
    format!("{ENTITLEMENTS_PREFIX}{user}")
}

/// The shared connection, or when the last attempt to open it failed.
#[derive(Default)]
struct Slot {
    connected: Option<ConnectionManager>,
    failed_at: Option<Instant>,
}

/// Handle on Redis; cheap to clone.
#[derive(Clone)]
pub struct Cache {
    client: redis::Client,
    manager: Arc<Mutex<Slot>>,
    entitlement_ttl: Duration,
    dedupe_ttl: Duration,
    claim_ttl: Duration,
    claim: Arc<Script>,
    release: Arc<Script>,
    cas: Arc<Script>,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("entitlement_ttl", &self.entitlement_ttl)
            .field("dedupe_ttl", &self.dedupe_ttl)
            .field("claim_ttl", &self.claim_ttl)
            .finish_non_exhaustive()
    }
}

impl Cache {
    /// Prepares the handle without connecting (the first command connects).
    ///
    /// # Errors
    /// [`CacheError::Redis`] when `REDIS_URL` is not a Redis URL.
    pub fn new(config: &Config) -> Result<Self, CacheError> {
        Ok(Self {
            client: crate::redis_link::client(config.redis_url.as_str())?,
            manager: Arc::new(Mutex::new(Slot::default())),
            entitlement_ttl: config.entitlement_cache_ttl,
            dedupe_ttl: config.dedupe_ttl,
            claim_ttl: config.claim_ttl,
            claim: Arc::new(Script::new(CLAIM_SCRIPT)),
            release: Arc::new(Script::new(RELEASE_SCRIPT)),
            cas: Arc::new(Script::new(CAS_SCRIPT)),
        })
    }

    /// A client for the same server speaking RESP3, which carries the invalidation pushes of
    /// client-side caching ([`crate::local_cache`]).
    ///
    /// # Errors
    /// [`CacheError::Redis`] when the client cannot be built.
    pub fn tracking_client(&self) -> Result<redis::Client, CacheError> {
        let mut info = self.client.get_connection_info().clone();
        info.redis.protocol = redis::ProtocolVersion::RESP3;
        Ok(crate::redis_link::client(info)?)
    }

    async fn connection(&self) -> Result<ConnectionManager, CacheError> {
        let mut slot = self.manager.lock().await;
        if let Some(manager) = slot.connected.as_ref() {
            return Ok(manager.clone());
        }
        // While Redis is down, fail fast instead of paying a connection attempt per command:
        // the consumer must keep its pace without the cache.
        if slot
            .failed_at
            .is_some_and(|at| at.elapsed() < RECONNECT_COOLDOWN)
        {
            return Err(CacheError::Unavailable);
        }
        let connected = crate::redis_link::open(&self.client, REDIS_TIMEOUT)
            .await
            .map_err(|error| match error {
                crate::redis_link::OpenError::Timeout(after) => CacheError::Timeout(after),
                crate::redis_link::OpenError::Redis(error) => CacheError::from(error),
            });
        match connected {
            Ok(manager) => {
                slot.connected = Some(manager.clone());
                slot.failed_at = None;
                Ok(manager)
            }
            Err(error) => {
                slot.failed_at = Some(Instant::now());
                Err(error)
            }
        }
    }

    /// Runs `op` on the connection, once more if the first attempt hit a dropped connection.
    async fn run<T, F, Fut>(&self, op: F) -> Result<T, CacheError>
    where
        F: Fn(ConnectionManager) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        let connection = self.connection().await?;
        match op(connection.clone()).await {
            Err(e) if is_connection_error(&e) => {
                metrics::counter!("redis_command_retries_total").increment(1);
                Ok(op(connection).await?)
            }
            other => Ok(other?),
        }
    }

    /// Answers PING (readiness).
    ///
    /// # Errors
    /// [`CacheError`] when Redis does not answer.
    pub async fn ping(&self) -> Result<(), CacheError> {
        self.run(|mut c| async move { redis::cmd("PING").query_async::<String>(&mut c).await })
            .await
            .map(drop)
    }

    /// Counts one more call in the fixed window at `key` (`SET key 0 NX PX window`, `INCR`,
    /// `PTTL`, in one transaction): the calls counted in the window so far, this one included,
    /// and the time left until it closes (rate limits).
    ///
    /// # Errors
    /// [`CacheError`] when Redis fails.
    pub async fn count_in_window(
        &self,
        key: &str,
        window: Duration,
    ) -> Result<(u64, Duration), CacheError> {
        let ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX).max(1);
        let (count, left): (u64, i64) = self
            .run(|mut c| async move {
                let mut pipe = redis::pipe();
                pipe.atomic()
                    .cmd("SET")
                    .arg(key)
                    .arg(0)
                    .arg("NX")
                    .arg("PX")
                    .arg(ms)
                    .ignore()
                    .cmd("INCR")
                    .arg(key)
                    .cmd("PTTL")
                    .arg(key);
                pipe.query_async(&mut c).await
            })
            .await?;
        let left = u64::try_from(left).map_or(window, Duration::from_millis);
        Ok((count, left))
    }

    /// Takes the short-lived `processing` claim on `event`. Never fails: an unreachable Redis
    /// yields [`Claim::Unavailable`] (logged and counted), and the caller relies on Postgres.
    pub async fn claim(&self, event: &StripeEventId) -> Claim {
        let token = format!("processing:{}", uuid::Uuid::new_v4().simple());
        let key = dedupe_key(event);
        let ttl_ms = u64::try_from(self.claim_ttl.as_millis()).unwrap_or(u64::MAX);
        let result = self
            .run(|mut c| {
                let script = Arc::clone(&self.claim);
                let (key, token) = (key.clone(), token.clone());
                async move {
                    script
                        .key(key)
                        .arg(token)
                        .arg(ttl_ms)
                        .invoke_async::<i64>(&mut c)
                        .await
                }
            })
            .await;
        match result {
            Ok(1) => Claim::Acquired(ClaimToken(token)),
            Ok(2) => Claim::Done,
            Ok(_) => Claim::HeldElsewhere,
            Err(error) => {
                failed("claim", &error);
                Claim::Unavailable
            }
        }
    }

    /// Gives up our claim after a failed attempt (no-op if it expired or was replaced).
    pub async fn release(&self, event: &StripeEventId, token: &ClaimToken) {
        let key = dedupe_key(event);
        let result = self
            .run(|mut c| {
                let script = Arc::clone(&self.release);
                let (key, token) = (key.clone(), token.0.clone());
                async move { script.key(key).arg(token).invoke_async::<i64>(&mut c).await }
            })
            .await;
        if let Err(error) = result {
            failed("release", &error);
        }
    }

    /// Writes the `done` marker; call only after the event's Postgres commit.
    pub async fn mark_done(&self, event: &StripeEventId) {
        let key = dedupe_key(event);
        let ttl = self.dedupe_ttl.as_secs().max(1);
        let result = self
            .run(|mut c| {
                let key = key.clone();
                async move {
                    redis::cmd("SET")
                        .arg(key)
                        .arg("done")
                        .arg("EX")
                        .arg(ttl)
                        .query_async::<()>(&mut c)
                        .await
                }
            })
            .await;
        if let Err(error) = result {
            failed("mark_done", &error);
        }
    }

    /// The version each user's entry holds (`None`: no entry), in one pipeline.
    ///
    /// # Errors
    /// [`CacheError`] when Redis fails.
    pub async fn cached_versions(&self, users: &[String]) -> Result<Vec<Option<i64>>, CacheError> {
        let keys: Vec<String> = users.iter().map(|u| entitlements_key(u)).collect();
        self.run(|mut c| {
            let mut pipe = redis::pipe();
            for key in &keys {
                pipe.cmd("HGET").arg(key).arg("v");
            }
            async move { pipe.query_async::<Vec<Option<i64>>>(&mut c).await }
        })
        .await
    }

    /// Compare-and-set of a user's snapshot. Returns `Ok(false)` when the cache already holds a
    /// newer version (the write was refused).
    ///
    /// # Errors
    /// [`CacheError`] when Redis fails; the key may then hold anything, see [`Self::refresh`].
    pub async fn write_snapshot(&self, snapshot: &UserSnapshot) -> Result<bool, CacheError> {
        let key = entitlements_key(&snapshot.user_id);
        let data = serde_json::to_string(snapshot)?;
        let ttl = self.entitlement_ttl.as_secs().max(1);
        let version = snapshot.version;
        self.run(|mut c| {
            let script = Arc::clone(&self.cas);
            let (key, data) = (key.clone(), data.clone());
            async move {
                script
                    .key(key)
                    .arg(version)
                    .arg(data)
                    .arg(ttl)
                    .invoke_async::<i64>(&mut c)
                    .await
            }
        })
        .await
        .map(|written| written == 1)
    }

    /// Writes the snapshot after a commit, or after a read from Postgres (a refill), through the
    /// versioned compare-and-set, so a reader holding an old snapshot never overwrites a newer
    /// one; on failure deletes the key so readers fall back to Postgres. Never fails.
    pub async fn refresh(&self, snapshot: &UserSnapshot) {
        match self.write_snapshot(snapshot).await {
            Ok(true) => metrics::counter!("entitlement_cache_writes_total", "outcome" => "written")
                .increment(1),
            Ok(false) => {
                metrics::counter!("entitlement_cache_writes_total", "outcome" => "stale_refused")
                    .increment(1);
            }
            Err(error) => {
                failed("refresh", &error);
                self.invalidate(&snapshot.user_id).await;
            }
        }
    }

    /// Deletes a user's cache entry. Never fails (logged and counted); returns whether Redis
    /// confirmed the delete.
    pub async fn invalidate(&self, user_id: &str) -> bool {
        let key = entitlements_key(user_id);
        let result = self
            .run(|mut c| {
                let key = key.clone();
                async move { redis::cmd("DEL").arg(key).query_async::<i64>(&mut c).await }
            })
            .await;
        if let Err(error) = &result {
            failed("invalidate", error);
        }
        result.is_ok()
    }

    /// The cached snapshot of `user`, or `None` on a miss, an unreadable entry or a Redis
    /// failure (readers then go to Postgres and a refill through [`Self::refresh`]).
    pub async fn read_snapshot(&self, user: &UserId) -> Option<UserSnapshot> {
        let key = entitlements_key(user.as_str());
        let raw = self
            .run(|mut c| {
                let key = key.clone();
                async move {
                    redis::cmd("HGET")
                        .arg(key)
                        .arg("d")
                        .query_async::<Option<String>>(&mut c)
                        .await
                }
            })
            .await;
        match raw {
            Ok(Some(json)) => match serde_json::from_str(&json) {
                Ok(snapshot) => {
                    metrics::counter!("entitlement_cache_reads_total", "outcome" => "hit")
                        .increment(1);
                    Some(snapshot)
                }
                Err(error) => {
                    failed("read", &CacheError::Corrupt(error));
                    None
                }
            },
            Ok(None) => {
                metrics::counter!("entitlement_cache_reads_total", "outcome" => "miss")
                    .increment(1);
                None
            }
            Err(error) => {
                failed("read", &error);
                None
            }
        }
    }
}

fn is_connection_error(error: &RedisError) -> bool {
    error.is_connection_dropped()
        || error.is_io_error()
        || error.is_connection_refusal()
        || error.is_timeout()
}

fn failed(operation: &'static str, error: &CacheError) {
    tracing::warn!(operation, %error, "redis operation failed; continuing without it");
    metrics::counter!("redis_failures_total", "operation" => operation).increment(1);
}
