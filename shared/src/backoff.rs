//! The pause between attempts of a loop that waits for a service to come back (a broker to
//! reconnect to, a database to answer, a Redis connection to re-open): exponential through
//! `backon`, never giving up, back to the shortest pause after a success.
//! One-shot in-process retries use `backon`'s `Retryable` directly.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// Pauses from `min` doubling to `max`, forever.
#[derive(Debug)]
pub struct Reconnect {
    builder: ExponentialBuilder,
    delays: ExponentialBackoff,
    max: Duration,
}

impl Reconnect {
    #[must_use]
    pub fn new(min: Duration, max: Duration) -> Self {
        let builder = ExponentialBuilder::default()
            .with_min_delay(min)
            .with_max_delay(max)
            .without_max_times();
        Self {
            delays: builder.build(),
            builder,
            max,
        }
    }

    /// The next pause (longer each time, up to `max`).
    pub fn next_pause(&mut self) -> Duration {
        self.delays.next().unwrap_or(self.max)
    }

    /// After a success: the next pause is the shortest again.
    pub fn reset(&mut self) {
        self.delays = self.builder.build();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_grow_to_the_cap_and_start_over_after_a_reset() {
        let (min, max) = (Duration::from_millis(200), Duration::from_secs(5));
        let mut pauses = Reconnect::new(min, max);
        let first: Vec<Duration> = (0..7).map(|_| pauses.next_pause()).collect();
        let ms: Vec<u128> = first.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [200, 400, 800, 1600, 3200, 5000, 5000]);
        assert!(
            (0..100).all(|_| pauses.next_pause() == max),
            "it never gives up"
        );
        pauses.reset();
        assert_eq!(pauses.next_pause(), min);
    }
}
