//! A worker and an API over one database, fed through the broker: the harness of the tests
//! that drive whole histories through the real services (`tests/business_life.rs`,
//! `tests/organizations.rs`).

use std::time::Duration;

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde_json::Value;

use crate::amqp::TestBroker;
use crate::api::Api;
use crate::stripe_fake::FakeStripe;
use crate::worker::{Running, config, pg, publish, spawn_worker, wait_depth, wait_processed};

/// A worker and an API over one database; with a Stripe fake, the API holds its key.
pub struct Stack {
    pub api: Api,
    pub broker: TestBroker,
    pub direct: tokio_postgres::Client,
    pub stripe: Option<FakeStripe>,
    worker: Option<Running>,
}

impl Stack {
    /// The stack, the worker's catalog the API's (so start-up publishes the same products);
    /// with a fake, the worker holds its key too.
    pub async fn start(stripe: Option<FakeStripe>) -> Self {
        let api = Api::start(stripe.as_ref()).await;
        let broker = TestBroker::new(vec![Duration::from_millis(200)]).await;
        let mut worker_config = config(&api.db.url, &broker);
        worker_config.catalog = crate::api::catalog();
        worker_config.stripe = stripe.as_ref().map(FakeStripe::client_config);
        let worker = spawn_worker(worker_config);
        let direct = pg(&api.db.url).await;
        Self {
            api,
            broker,
            direct,
            stripe,
            worker: Some(worker),
        }
    }

    /// Publishes one event as ingress would.
    pub async fn publish(&self, event: &Value) {
        let id = event["id"].as_str().expect("an event id");
        let event_type = event["type"].as_str().expect("an event type");
        publish(&self.broker, event.to_string().as_bytes(), id, event_type).await;
    }

    /// Waits until each of `events` is processed.
    pub async fn wait_all(&self, events: &[Value]) {
        for event in events {
            wait_processed(&self.direct, event["id"].as_str().expect("an event id")).await;
        }
    }

    /// Publishes `events` in an order drawn from `seed`, a third of them twice, and waits
    /// until each is processed.
    pub async fn deliver(&self, events: &[Value], seed: u64) {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut order: Vec<&Value> = events.iter().collect();
        order.extend(events.iter().step_by(3));
        order.shuffle(&mut rng);
        for event in order {
            self.publish(event).await;
        }
        self.wait_all(events).await;
    }

    /// `GET /api/pro/entitlement` as `user` (must answer 200).
    pub async fn pro(&self, user: &str) -> Value {
        let (status, body) = self.api.get("/api/pro/entitlement", user).await;
        assert_eq!(status, 200, "{body}");
        body
    }

    /// Checks that nothing was parked, and stops the worker.
    pub async fn stop(mut self) {
        wait_depth(&self.broker, &self.broker.topology.dead_letter_queue(), 0).await;
        if let Some(worker) = self.worker.take() {
            worker.stop().await;
        }
    }
}
