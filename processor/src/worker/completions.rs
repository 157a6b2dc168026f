//! Events that need Stripe before they can be applied (a session created elsewhere, whose line
//! items must be read; a feature summary cut short), completed off the lanes: the lane moves
//! such an event to the Stripe queue (`<base>.stripe`) and goes on with the rest of its batch,
//! so a slow or failing Stripe holds back no other event. The completions consume that queue on
//! a channel of their own.
//!
//! Invariants:
//! - at most [`IN_FLIGHT`] completions run at once per process, and the Stripe queue's channel
//!   holds [`PREFETCH`] deliveries (the running ones and [`QUEUED`] waiting here for a slot, so
//!   the Stripe pipe stays full); the rest wait in the queue, durably, and none takes any of the
//!   main queue's prefetch window;
//! - Stripe unavailable (timeouts, 5xx, 429 past the client's retries): the event waits in the
//!   first delay queue (no attempt counted) and resumes by itself; nothing is parked for it;
//! - Stripe refusing the key (401, 403): a configuration error. Every event that needs Stripe
//!   waits without a request for [`REFUSED_PAUSE`], then one is tried again; the
//!   `stripe_key_refused` gauge and `/readyz` say so meanwhile;
//! - the tasks are drained within the shutdown grace, then aborted (their deliveries return to
//!   the queue when the connection closes).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use crate::complete::CompleteError;

/// Completions running at once per process.
pub const IN_FLIGHT: usize = 16;

/// Deliveries of the Stripe queue held beyond those running, waiting here for a slot.
pub const QUEUED: usize = 16;

/// The Stripe queue's prefetch: the running completions and the queued ones.
#[allow(clippy::cast_possible_truncation)]
pub const PREFETCH: u16 = (IN_FLIGHT + QUEUED) as u16;

/// How long a refused key keeps every completion from asking Stripe.
pub const REFUSED_PAUSE: Duration = Duration::from_secs(5);

/// The shared state of the process' completions.
#[derive(Debug, Clone)]
pub struct Completions {
    /// Running ones.
    permits: Arc<Semaphore>,
    tasks: Arc<Mutex<JoinSet<()>>>,
    refused: StripeKeyHealth,
}

impl Default for Completions {
    fn default() -> Self {
        Self {
            permits: Arc::new(Semaphore::new(IN_FLIGHT)),
            tasks: Arc::new(Mutex::new(JoinSet::new())),
            refused: StripeKeyHealth::default(),
        }
    }
}

/// Whether Stripe refused the key recently (401/403), for `/readyz`.
#[derive(Debug, Clone, Default)]
pub struct StripeKeyHealth {
    since: Arc<Mutex<Option<Instant>>>,
}

impl StripeKeyHealth {
    /// True while the last answer to a completion was 401 or 403.
    #[must_use]
    pub fn is_refused(&self) -> bool {
        self.lock().is_some()
    }

    /// True while requests should not be tried (within [`REFUSED_PAUSE`] of the refusal).
    fn paused(&self) -> bool {
        self.lock()
            .is_some_and(|since| since.elapsed() < REFUSED_PAUSE)
    }

    fn record(&self, refused: bool) {
        let mut since = self.lock();
        match (refused, since.is_some()) {
            (true, _) => {
                *since = Some(Instant::now());
                metrics::gauge!("stripe_key_refused").set(1.0);
            }
            (false, true) => {
                *since = None;
                metrics::gauge!("stripe_key_refused").set(0.0);
                tracing::info!("Stripe accepts the key again; completions resume");
            }
            (false, false) => {}
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.since.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Completions {
    pub fn key_health(&self) -> StripeKeyHealth {
        self.refused.clone()
    }

    /// Why no request should be tried now, if so.
    pub(super) fn paused(&self) -> Option<&'static str> {
        self.refused
            .paused()
            .then_some("Stripe refuses STRIPE_SECRET_KEY (401/403)")
    }

    /// Waits for one of the [`IN_FLIGHT`] running slots.
    pub(super) async fn slot(&self) -> Option<OwnedSemaphorePermit> {
        Arc::clone(&self.permits).acquire_owned().await.ok()
    }

    /// Runs `task` beside the lanes.
    pub(super) fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        let mut tasks = self.tasks.lock().unwrap_or_else(PoisonError::into_inner);
        // Finished tasks are reaped here, so the set holds only running ones.
        while tasks.try_join_next().is_some() {}
        tasks.spawn(task);
    }

    /// A completion succeeded: Stripe accepts the key.
    pub(super) fn succeeded(&self) {
        self.refused.record(false);
    }

    /// Whether a failed completion waits (Stripe cannot answer now, or refuses the key) rather
    /// than being retried as a failure of its own. Records the key's health.
    pub(super) fn waits(&self, error: &CompleteError) -> bool {
        let CompleteError::Stripe(error) = error else {
            return false;
        };
        let refused = matches!(error.status(), Some(401 | 403));
        if refused {
            if !self.refused.is_refused() {
                tracing::error!("Stripe refuses STRIPE_SECRET_KEY (401/403); completions pause");
            }
            self.refused.record(true);
        } else {
            self.refused.record(false);
        }
        refused || error.is_transient()
    }

    /// Waits up to `grace` for the running completions, then aborts what is left.
    pub(super) async fn drain(&self, grace: Duration) {
        let mut tasks =
            std::mem::take(&mut *self.tasks.lock().unwrap_or_else(PoisonError::into_inner));
        let drained =
            tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            tracing::warn!(
                ?grace,
                "Stripe completions did not finish in time; their deliveries return to the queue"
            );
            tasks.shutdown().await;
        }
    }
}
