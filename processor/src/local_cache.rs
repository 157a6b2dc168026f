//! The entitlement cache's in-process layer: cache hits served from memory, kept coherent with
//! Redis by client-side caching invalidation (RESP3 `CLIENT TRACKING ON BCAST PREFIX
//! entitlements:v1:` on a connection of its own).
//!
//! An entry in memory may be served only while it is known to equal what Redis holds. Invariants:
//! - **entries come from Redis only.** An entry is installed from a Redis read, never from a
//!   Postgres read (the refill after it may be refused as older, so that snapshot is not known to
//!   equal Redis);
//! - **no stale install.** Before the Redis read, a placeholder with a fresh token is put in the
//!   entry's place; the value read is installed only if that placeholder is still there. Every
//!   invalidation of the key, a flush and a lost connection remove placeholders, so a read that
//!   raced a write (the write's push arrived before the read's answer was installed) installs
//!   nothing. Placeholders are only taken while the tracking connection is up, so every write
//!   Redis applies after the read reaches this process as a push;
//! - **pushes are applied in order.** The connection's reader applies an invalidation before it
//!   delivers the next reply, so when a `PING` sent at `t` is answered, every invalidation Redis
//!   sent before it received that `PING` has been applied;
//! - **served only while tracking is confirmed.** An entry is served only while the tracking
//!   connection is up and has answered a `PING` sent less than [`MAX_LAG`] ago ([`HEARTBEAT`]
//!   apart). So a value served from memory is what Redis held at most [`MAX_LAG`] earlier —
//!   normally one network hop, since the push arrives as soon as Redis applies the write — even
//!   when the connection goes silent without closing. A lost connection (or a `null`
//!   invalidation: Redis flushed) clears every entry; reads then go to Redis and Postgres as
//!   without this layer until tracking is re-established;
//! - **bounded.** At most `ENTITLEMENT_LOCAL_CACHE_ENTRIES` entries (placeholders included); when
//!   full, an arbitrary entry makes room. `0` turns the layer off.
//!
//! The read-time status ([`crate::domain::access`]) is still computed per request from the snapshot, so
//! expiry stays exact.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, PushInfo, PushKind, Value};
use shared::backoff::Reconnect;
use shared::ids::UserId;

use crate::cache::{Cache, ENTITLEMENTS_PREFIX};
use crate::domain::view::UserSnapshot;

/// How often the tracking connection is checked with a `PING`.
pub const HEARTBEAT: Duration = Duration::from_millis(200);

/// Entries are served only while a `PING` sent less than this long ago has been answered.
pub const MAX_LAG: Duration = Duration::from_secs(1);

/// Default `ENTITLEMENT_LOCAL_CACHE_ENTRIES` (a one-entitlement snapshot takes about 0.5 kB).
pub const DEFAULT_ENTRIES: usize = 100_000;

/// How long connecting (and each command on the tracking connection) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Pause before re-establishing tracking; doubled after each failed attempt up to
/// [`RECONNECT_PAUSE_MAX`] (a Redis that refuses `CLIENT TRACKING` is not asked, nor logged,
/// four times a second).
const RECONNECT_PAUSE: Duration = Duration::from_millis(250);
const RECONNECT_PAUSE_MAX: Duration = Duration::from_secs(2);

/// The in-process layer; cheap to clone. Disabled (every read goes to Redis) when built with
/// zero entries.
#[derive(Clone)]
pub struct LocalCache {
    inner: Option<Arc<Inner>>,
}

impl std::fmt::Debug for LocalCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCache")
            .field("capacity", &self.inner.as_ref().map(|i| i.capacity))
            .finish_non_exhaustive()
    }
}

struct Inner {
    capacity: usize,
    state: Mutex<State>,
    hits: metrics::Counter,
    misses: metrics::Counter,
    bypassed: metrics::Counter,
}

#[derive(Default)]
struct State {
    /// The tracking connection in service (its number), `None` while down.
    connection: Option<u64>,
    /// When the last answered `PING` (or the tracking command) was sent on it.
    confirmed: Option<Instant>,
    next_token: u64,
    entries: HashMap<String, Slot>,
}

enum Slot {
    /// A Redis read began under this token; its answer may be installed.
    Filling(u64),
    Ready(Arc<UserSnapshot>),
}

/// Permission to install the answer of one Redis read.
#[derive(Debug)]
struct Ticket(u64);

impl State {
    fn serving(&self, now: Instant) -> bool {
        self.connection.is_some()
            && self
                .confirmed
                .is_some_and(|at| now.saturating_duration_since(at) < MAX_LAG)
    }

    fn clear(&mut self) {
        self.entries.clear();
    }
}

impl LocalCache {
    /// A disabled layer: every read goes to Redis.
    #[must_use]
    pub fn disabled() -> Self {
        Self { inner: None }
    }

    /// Starts the layer with room for `entries` snapshots (`0`: disabled) and its tracking task,
    /// which runs until the last clone is dropped. Call within a Tokio runtime.
    #[must_use]
    pub fn start(cache: &Cache, entries: usize) -> Self {
        if entries == 0 {
            return Self::disabled();
        }
        let client = match cache.tracking_client() {
            Ok(client) => client,
            Err(error) => {
                tracing::warn!(%error, "no RESP3 client for entitlement tracking; local cache off");
                return Self::disabled();
            }
        };
        let outcome = |o: &'static str| metrics::counter!("entitlement_local_cache_reads_total", "outcome" => o);
        let inner = Arc::new(Inner {
            capacity: entries,
            state: Mutex::new(State::default()),
            hits: outcome("hit"),
            misses: outcome("miss"),
            bypassed: outcome("bypassed"),
        });
        tokio::spawn(track(Arc::downgrade(&inner), client));
        Self { inner: Some(inner) }
    }

    /// The user's snapshot: from memory on a hit, else from Redis (installed in memory when no
    /// invalidation raced the read); `None` when Redis has no usable entry either (read Postgres
    /// then, and [`Cache::refresh`]).
    pub async fn read(&self, cache: &Cache, user: &UserId) -> Option<Arc<UserSnapshot>> {
        let Some(inner) = &self.inner else {
            return cache.read_snapshot(user).await.map(Arc::new);
        };
        let ticket = match inner.lookup(user.as_str()) {
            Lookup::Hit(snapshot) => return Some(snapshot),
            Lookup::Miss(ticket) => Some(ticket),
            Lookup::Bypass => None,
        };
        let snapshot = cache.read_snapshot(user).await.map(Arc::new);
        if let Some(ticket) = ticket {
            inner.install(user.as_str(), &ticket, snapshot.as_ref());
        }
        snapshot
    }

    /// Whether `user`'s snapshot would be served from memory right now.
    #[must_use]
    pub fn holds(&self, user: &str) -> bool {
        self.inner.as_ref().is_some_and(|inner| {
            let state = inner.lock();
            state.serving(Instant::now()) && matches!(state.entries.get(user), Some(Slot::Ready(_)))
        })
    }

    /// Whether tracking is established and confirmed (entries may be served).
    #[must_use]
    pub fn is_tracking(&self) -> bool {
        self.inner
            .as_ref()
            .is_some_and(|inner| inner.lock().serving(Instant::now()))
    }
}

enum Lookup {
    Hit(Arc<UserSnapshot>),
    /// Not in memory: read Redis, then install under this ticket.
    Miss(Ticket),
    /// Tracking is not confirmed: read Redis, install nothing.
    Bypass,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent whatever panicked while holding it: every change is one
        // map operation or one field store.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn lookup(&self, user: &str) -> Lookup {
        let mut state = self.lock();
        if !state.serving(Instant::now()) {
            drop(state);
            self.bypassed.increment(1);
            return Lookup::Bypass;
        }
        if let Some(Slot::Ready(snapshot)) = state.entries.get(user) {
            let snapshot = Arc::clone(snapshot);
            drop(state);
            self.hits.increment(1);
            return Lookup::Hit(snapshot);
        }
        state.next_token += 1;
        let token = state.next_token;
        if !state.entries.contains_key(user) && state.entries.len() >= self.capacity {
            let victim = state.entries.keys().next().cloned();
            if let Some(victim) = victim {
                state.entries.remove(&victim);
            }
        }
        state.entries.insert(user.to_owned(), Slot::Filling(token));
        drop(state);
        self.misses.increment(1);
        Lookup::Miss(Ticket(token))
    }

    /// Installs what the read under `ticket` found, if its placeholder survived.
    fn install(&self, user: &str, ticket: &Ticket, snapshot: Option<&Arc<UserSnapshot>>) {
        let mut state = self.lock();
        let Some(slot) = state.entries.get_mut(user) else {
            return;
        };
        if !matches!(slot, Slot::Filling(token) if *token == ticket.0) {
            return;
        }
        match snapshot {
            Some(snapshot) => *slot = Slot::Ready(Arc::clone(snapshot)),
            None => {
                state.entries.remove(user);
            }
        }
    }

    /// Applies a push of the tracking connection number `connection`.
    fn on_push(&self, connection: u64, push: &PushInfo) {
        match push.kind {
            PushKind::Invalidate => {
                let keys = match push.data.first() {
                    Some(Value::Array(keys)) => keys,
                    // `null`: Redis flushed its keys.
                    _ => {
                        self.lock().clear();
                        metrics::counter!("entitlement_local_cache_invalidations_total", "kind" => "flush")
                            .increment(1);
                        return;
                    }
                };
                let mut state = self.lock();
                for key in keys {
                    let user = match key {
                        Value::BulkString(bytes) => std::str::from_utf8(bytes).ok(),
                        Value::SimpleString(text) => Some(text.as_str()),
                        _ => None,
                    }
                    .and_then(|k| k.strip_prefix(ENTITLEMENTS_PREFIX));
                    if let Some(user) = user {
                        state.entries.remove(user);
                    }
                }
                drop(state);
                metrics::counter!("entitlement_local_cache_invalidations_total", "kind" => "key")
                    .increment(u64::try_from(keys.len()).unwrap_or(u64::MAX));
            }
            PushKind::Disconnection => self.lost(connection),
            _ => {}
        }
    }

    /// Tracking is established on connection `connection`, as of `since`.
    fn tracking(&self, connection: u64, since: Instant) {
        let mut state = self.lock();
        state.clear();
        state.connection = Some(connection);
        state.confirmed = Some(since);
    }

    /// A `PING` sent at `sent` on `connection` was answered.
    fn confirm(&self, connection: u64, sent: Instant) {
        let mut state = self.lock();
        if state.connection == Some(connection) {
            state.confirmed = Some(sent);
        }
    }

    /// The tracking connection `connection` is gone: nothing is served until tracking is back.
    fn lost(&self, connection: u64) {
        let mut state = self.lock();
        if state.connection == Some(connection) {
            state.connection = None;
            state.confirmed = None;
            state.clear();
            drop(state);
            metrics::counter!("entitlement_local_cache_invalidations_total", "kind" => "disconnect")
                .increment(1);
            tracing::warn!(
                "entitlement tracking connection lost; serving from Redis until it is back"
            );
        }
    }
}

/// Keeps a tracking connection up, and confirms it every [`HEARTBEAT`], while the layer lives.
async fn track(inner: Weak<Inner>, client: redis::Client) {
    let mut number = 0_u64;
    let mut pauses = Reconnect::new(RECONNECT_PAUSE, RECONNECT_PAUSE_MAX);
    loop {
        number += 1;
        let pause = match connect(&inner, &client, number).await {
            Ok(Some(connection)) => {
                pauses.reset();
                heartbeat(&inner, connection, number).await;
                pauses.next_pause()
            }
            Ok(None) => return,
            Err(error) => {
                let pause = pauses.next_pause();
                tracing::warn!(%error, retry_in = ?pause, "cannot establish entitlement tracking");
                pause
            }
        };
        let Some(layer) = inner.upgrade() else {
            return;
        };
        layer.lost(number);
        drop(layer);
        tokio::time::sleep(pause).await;
    }
}

/// Opens connection `number` with tracking on; `Ok(None)` when the layer is gone.
async fn connect(
    inner: &Weak<Inner>,
    client: &redis::Client,
    number: u64,
) -> Result<Option<MultiplexedConnection>, redis::RedisError> {
    let pushes = inner.clone();
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(CONNECT_TIMEOUT)
        .set_response_timeout(CONNECT_TIMEOUT)
        .set_push_sender(move |push: PushInfo| {
            // Runs in the connection's reader, before the next reply is delivered.
            let Some(layer) = pushes.upgrade() else {
                return Err(());
            };
            layer.on_push(number, &push);
            Ok(())
        });
    let mut connection = client
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    let sent = Instant::now();
    redis::cmd("CLIENT")
        .arg("TRACKING")
        .arg("ON")
        .arg("BCAST")
        .arg("PREFIX")
        .arg(ENTITLEMENTS_PREFIX)
        .query_async::<()>(&mut connection)
        .await?;
    let Some(layer) = inner.upgrade() else {
        return Ok(None);
    };
    layer.tracking(number, sent);
    Ok(Some(connection))
}

/// Confirms connection `number` every [`HEARTBEAT`] until a `PING` fails or the layer is gone.
async fn heartbeat(inner: &Weak<Inner>, mut connection: MultiplexedConnection, number: u64) {
    let mut tick = tokio::time::interval(HEARTBEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if inner.strong_count() == 0 {
            return;
        }
        let sent = Instant::now();
        let pong = tokio::time::timeout(
            MAX_LAG,
            redis::cmd("PING").query_async::<String>(&mut connection),
        )
        .await;
        match pong {
            Ok(Ok(_)) => match inner.upgrade() {
                Some(layer) => layer.confirm(number, sent),
                None => return,
            },
            Ok(Err(error)) => {
                tracing::warn!(%error, "entitlement tracking connection failed");
                return;
            }
            Err(_) => {
                tracing::warn!(
                    "entitlement tracking connection silent for {MAX_LAG:?}; reconnecting"
                );
                return;
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn layer(capacity: usize) -> Inner {
        Inner {
            capacity,
            state: Mutex::new(State::default()),
            hits: metrics::Counter::noop(),
            misses: metrics::Counter::noop(),
            bypassed: metrics::Counter::noop(),
        }
    }

    fn snapshot(user: &str, version: i64) -> Arc<UserSnapshot> {
        Arc::new(UserSnapshot {
            user_id: user.into(),
            version,
            entitlements: Vec::new(),
            organizations: Vec::new(),
        })
    }

    fn invalidate(keys: &[&str]) -> PushInfo {
        PushInfo {
            kind: PushKind::Invalidate,
            data: vec![Value::Array(
                keys.iter()
                    .map(|k| Value::BulkString(k.as_bytes().to_vec()))
                    .collect(),
            )],
        }
    }

    fn disconnection() -> PushInfo {
        PushInfo {
            kind: PushKind::Disconnection,
            data: Vec::new(),
        }
    }

    fn miss(layer: &Inner, user: &str) -> Ticket {
        match layer.lookup(user) {
            Lookup::Miss(ticket) => ticket,
            Lookup::Hit(_) => panic!("unexpected hit"),
            Lookup::Bypass => panic!("unexpected bypass"),
        }
    }

    #[test]
    fn nothing_is_served_or_installed_before_tracking_is_established() {
        let layer = layer(10);
        assert!(matches!(layer.lookup("u1"), Lookup::Bypass));
        layer.tracking(1, Instant::now());
        let ticket = miss(&layer, "u1");
        layer.install("u1", &ticket, Some(&snapshot("u1", 1)));
        assert!(matches!(layer.lookup("u1"), Lookup::Hit(s) if s.version == 1));
    }

    #[test]
    fn a_read_that_raced_an_invalidation_installs_nothing() {
        let layer = layer(10);
        layer.tracking(1, Instant::now());
        let ticket = miss(&layer, "u1");
        layer.on_push(1, &invalidate(&["entitlements:v1:u1"]));
        layer.install("u1", &ticket, Some(&snapshot("u1", 1)));
        assert!(matches!(layer.lookup("u1"), Lookup::Miss(_)));
    }

    #[test]
    fn an_invalidation_evicts_only_its_keys_and_a_flush_evicts_all() {
        let layer = layer(10);
        layer.tracking(1, Instant::now());
        for user in ["u1", "u2", "u3"] {
            let ticket = miss(&layer, user);
            layer.install(user, &ticket, Some(&snapshot(user, 1)));
        }
        layer.on_push(1, &invalidate(&["entitlements:v1:u1", "dedupe:v1:u2"]));
        assert!(matches!(layer.lookup("u1"), Lookup::Miss(_)));
        assert!(matches!(layer.lookup("u2"), Lookup::Hit(_)));
        let flush = PushInfo {
            kind: PushKind::Invalidate,
            data: vec![Value::Nil],
        };
        layer.on_push(1, &flush);
        assert!(matches!(layer.lookup("u3"), Lookup::Miss(_)));
    }

    #[test]
    fn a_lost_connection_clears_everything_until_tracking_is_back() {
        let layer = layer(10);
        layer.tracking(1, Instant::now());
        let ticket = miss(&layer, "u1");
        layer.install("u1", &ticket, Some(&snapshot("u1", 1)));
        let pending = miss(&layer, "u2");
        // A stale disconnection of an older connection changes nothing.
        layer.on_push(0, &disconnection());
        assert!(matches!(layer.lookup("u1"), Lookup::Hit(_)));
        layer.on_push(1, &disconnection());
        assert!(matches!(layer.lookup("u1"), Lookup::Bypass));
        layer.tracking(2, Instant::now());
        layer.install("u2", &pending, Some(&snapshot("u2", 1)));
        assert!(matches!(layer.lookup("u1"), Lookup::Miss(_)));
        assert!(matches!(layer.lookup("u2"), Lookup::Miss(_)));
    }

    #[test]
    fn an_unconfirmed_connection_serves_nothing_but_keeps_its_entries() {
        let layer = layer(10);
        layer.tracking(1, Instant::now());
        let ticket = miss(&layer, "u1");
        layer.install("u1", &ticket, Some(&snapshot("u1", 1)));
        let old = Instant::now().checked_sub(MAX_LAG * 2).unwrap();
        layer.lock().confirmed = Some(old);
        assert!(matches!(layer.lookup("u1"), Lookup::Bypass));
        // The answered PING proves every earlier push was applied: the entry is current again.
        layer.confirm(1, Instant::now());
        assert!(matches!(layer.lookup("u1"), Lookup::Hit(_)));
    }

    #[test]
    fn memory_stays_within_the_configured_entries() {
        let layer = layer(3);
        layer.tracking(1, Instant::now());
        for i in 0..10 {
            let user = format!("u{i}");
            let ticket = miss(&layer, &user);
            layer.install(&user, &ticket, Some(&snapshot(&user, 1)));
            assert!(layer.lock().entries.len() <= 3);
        }
        // A miss in Redis leaves no placeholder behind.
        let ticket = miss(&layer, "gone");
        layer.install("gone", &ticket, None);
        assert!(!layer.lock().entries.contains_key("gone"));
    }
}
