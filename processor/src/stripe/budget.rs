//! The process' Stripe request budget: a token bucket every request of every client built from
//! one [`super::StripeConfig`] draws from (checkout, portal, restore, reconcile and the worker's
//! completions alike), so the service as a whole stays under Stripe's rate limit (about 100
//! requests/s in live mode, 25 in test mode, per account) and the worker's reads cannot starve
//! the users' checkouts. Stripe's own 429 is still honoured by the client's retries.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// The default budget: below test mode's limit, a fifth of live mode's.
pub const DEFAULT_PER_SECOND: u32 = 20;

/// Requests per second, with a burst of one second's worth. Clones share the bucket.
#[derive(Debug, Clone)]
pub struct Budget {
    per_second: f64,
    bucket: Arc<Mutex<(f64, Instant)>>,
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
        }
    }

    /// Waits until a request may be sent, and takes it from the budget.
    pub async fn take(&self) {
        let started = Instant::now();
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
        let waited = started.elapsed();
        if waited > Duration::from_millis(1) {
            metrics::histogram!("stripe_budget_wait_seconds").record(waited.as_secs_f64());
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
}
