//! The one shutdown primitive of both binaries (mini-redis' `shutdown.rs` is the model): a
//! [`Stop`] is triggered once, by a signal or by a task that ends; every [`Shutdown`] it hands
//! out, before or after the trigger, sees it. Long-running tasks take a [`Shutdown`] and finish
//! their current unit of work when it fires; nothing else (no ad-hoc channel or flag) carries
//! the news.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::watch;

/// The trigger side: cheap to clone; triggering twice is triggering once.
#[derive(Debug, Clone)]
pub struct Stop {
    sender: Arc<watch::Sender<bool>>,
}

impl Default for Stop {
    fn default() -> Self {
        Self {
            sender: Arc::new(watch::channel(false).0),
        }
    }
}

impl Stop {
    pub fn trigger(&self) {
        self.sender.send_replace(true);
    }

    #[must_use]
    pub fn is_triggered(&self) -> bool {
        *self.sender.borrow()
    }

    /// A listener for a task.
    #[must_use]
    pub fn listener(&self) -> Shutdown {
        Shutdown {
            receiver: self.sender.subscribe(),
        }
    }

    /// Resolves once [`Stop::trigger`] has been called (at once if it already was).
    pub fn wait(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut listener = self.listener();
        async move { listener.recv().await }
    }
}

/// The listening side, held by a task.
#[derive(Debug, Clone)]
pub struct Shutdown {
    receiver: watch::Receiver<bool>,
}

impl Shutdown {
    /// Whether shutdown has been requested.
    #[must_use]
    pub fn is_shutdown(&self) -> bool {
        *self.receiver.borrow()
    }

    /// Resolves once shutdown is requested (at once if it already was). Cancel-safe: use it
    /// in `select!` beside the work.
    pub async fn recv(&mut self) {
        // An error means every `Stop` is gone: nobody can trigger any more, so this is the
        // end as well.
        let _ = self.receiver.wait_for(|stopped| *stopped).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_listener_sees_one_trigger_whenever_it_subscribed() {
        let stop = Stop::default();
        let mut early = stop.listener();
        assert!(!early.is_shutdown() && !stop.is_triggered());
        let waiting = tokio::spawn(async move {
            early.recv().await;
            early.is_shutdown()
        });
        stop.trigger();
        stop.trigger();
        assert!(waiting.await.unwrap());
        let mut late = stop.listener();
        late.recv().await;
        assert!(late.is_shutdown());
        stop.wait().await;
    }
}
