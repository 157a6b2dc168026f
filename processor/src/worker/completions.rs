//! Events that need Stripe before they can be applied (a session created elsewhere, whose line
//! items must be read; a feature summary cut short), completed off the lanes: the lane hands
//! such an item over and goes on with the rest of its batch, so a slow or failing Stripe holds
//! back no other event.
//!
//! Invariants:
//! - at most [`IN_FLIGHT`] completions run at once per process and [`QUEUED`] more wait here
//!   for a slot (so the Stripe pipe stays full); beyond that an item waits in the first delay
//!   queue (durably, no attempt counted) rather than holding more of the prefetch window;
//! - Stripe unavailable (timeouts, 5xx, 429 past the client's retries): the item waits the
//!   same way and resumes by itself; nothing is parked for it;
//! - Stripe refusing the key (401, 403): a configuration error. Every item that needs Stripe
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

/// Completions admitted beyond those running, waiting here for a slot.
pub const QUEUED: usize = 16;

/// How long a refused key keeps every completion from asking Stripe.
pub const REFUSED_PAUSE: Duration = Duration::from_secs(5);

/// The shared state of the process' completions.
#[derive(Debug, Clone)]
pub struct Completions {
    /// Running ones.
    permits: Arc<Semaphore>,
    /// Admitted ones: running or waiting for a running slot.
    admitted: Arc<Semaphore>,
    tasks: Arc<Mutex<JoinSet<()>>>,
    refused: StripeKeyHealth,
}

impl Default for Completions {
    fn default() -> Self {
        Self {
            permits: Arc::new(Semaphore::new(IN_FLIGHT)),
            admitted: Arc::new(Semaphore::new(IN_FLIGHT + QUEUED)),
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

/// What to do with an item that needs Stripe.
pub(super) enum Admission {
    /// Run it off the lane: it holds this admission, then waits for a running slot
    /// ([`Completions::slot`]).
    Run(OwnedSemaphorePermit),
    /// Do not ask Stripe now: the item waits, for this reason.
    Wait(&'static str),
}

impl Completions {
    pub fn key_health(&self) -> StripeKeyHealth {
        self.refused.clone()
    }

    pub(super) fn admit(&self) -> Admission {
        if let Some(reason) = self.paused() {
            return Admission::Wait(reason);
        }
        match Arc::clone(&self.admitted).try_acquire_owned() {
            Ok(permit) => Admission::Run(permit),
            Err(_) => Admission::Wait("Stripe completions at capacity"),
        }
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
