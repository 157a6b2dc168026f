//! Duplicates: the same event delivered many times, at once or later, has the effect of one,
//! and a worker that dies between its dedupe claim and its commit never loses the event.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use processor::cache::{Cache, Claim};
use shared::ids::StripeEventId;
use system_tests::worker::*;
use system_tests::{eventually, unique};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_event_delivered_many_times_has_the_effect_of_one() {
    let setup = Setup::new(&[200, 400]).await;
    let direct = pg(&setup.db.url).await;
    let user = unique("u");
    let repeated = unique("evt");
    let others: Vec<String> = (0..3).map(|_| unique("evt")).collect();

    // Published before the worker starts, so copies share batches as well as span them.
    let body = checkout_completed(&repeated, &user);
    for round in 0..10 {
        publish(
            &setup.broker,
            &body,
            &repeated,
            "checkout.session.completed",
        )
        .await;
        if let Some(other) = others.get(round) {
            publish_event(&setup.broker, other, &user).await;
        }
    }
    let worker = spawn_worker(config(&setup.db.url, &setup.broker));
    for event in others.iter().chain([&repeated]) {
        wait_processed(&direct, event).await;
    }
    wait_depth(&setup.broker, &setup.broker.topology.main_queue(), 0).await;

    // Days later, Stripe retries: more copies, then a fresh event as a marker behind them.
    for _ in 0..5 {
        publish(
            &setup.broker,
            &body,
            &repeated,
            "checkout.session.completed",
        )
        .await;
    }
    let marker = unique("evt");
    publish_event(&setup.broker, &marker, &unique("u")).await;
    wait_processed(&direct, &marker).await;
    worker.stop().await;

    assert_eq!(processed_rows(&direct, &repeated).await, 1);
    assert_eq!(
        version(&direct, &user).await,
        4,
        "one effect per distinct event"
    );
    assert_eq!(setup.broker.main_depth().await, 0);
    assert_eq!(setup.broker.dead_letter_depth().await, 0);
    let marker_state: Option<String> = redis::cmd("GET")
        .arg(format!("dedupe:v1:{repeated}"))
        .query_async(&mut redis().await)
        .await
        .unwrap();
    assert_eq!(marker_state.as_deref(), Some("done"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_already_marked_done_are_skipped_even_when_postgres_never_saw_them() {
    // The `done` marker is the fast path: a copy arriving while it is live never reaches
    // Postgres. (It is only ever written after a commit; here the test writes it directly.)
    let setup = Setup::new(&[200, 400]).await;
    let direct = pg(&setup.db.url).await;
    let (event, user) = (unique("evt"), unique("u"));
    let _: () = redis::cmd("SET")
        .arg(format!("dedupe:v1:{event}"))
        .arg("done")
        .arg("EX")
        .arg(60)
        .query_async(&mut redis().await)
        .await
        .unwrap();
    let worker = spawn_worker(config(&setup.db.url, &setup.broker));
    publish_event(&setup.broker, &event, &user).await;
    let marker = unique("evt");
    publish_event(&setup.broker, &marker, &user).await;
    wait_processed(&direct, &marker).await;
    worker.stop().await;
    assert_eq!(processed_rows(&direct, &event).await, 0);
    assert_eq!(version(&direct, &user).await, 1);
    assert_eq!(setup.broker.main_depth().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_dies_between_claim_and_commit_never_loses_the_event() {
    let setup = Setup::new(&[200, 400]).await;
    let direct = pg(&setup.db.url).await;
    let config = config(&setup.db.url, &setup.broker);
    let (event, user) = (unique("evt"), unique("u"));

    // What a crashed worker leaves behind: its live `processing` claim in Redis, nothing in
    // Postgres, and the delivery back in the queue.
    let crashed = Cache::new(&config).unwrap();
    let id = StripeEventId::parse(&event).unwrap();
    assert!(matches!(crashed.claim(&id).await, Claim::Acquired(_)));
    publish_event(&setup.broker, &event, &user).await;

    let worker = spawn_worker(config.clone());
    // While the claim lives, the event is left alone (parked in the first delay queue)...
    let first_retry = setup.broker.topology.retry_queue(1);
    eventually(WAIT, "the claimed event is deferred", || async {
        (setup.broker.depth(&first_retry).await > 0).then_some(())
    })
    .await;
    assert_eq!(processed_rows(&direct, &event).await, 0);
    // ...and once the claim expires, it is processed exactly once.
    wait_processed(&direct, &event).await;
    wait_depth(&setup.broker, &setup.broker.topology.main_queue(), 0).await;
    worker.stop().await;
    assert_eq!(version(&direct, &user).await, 1);
    assert_eq!(setup.broker.dead_letter_depth().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_batch_loses_nothing_and_applies_nothing_twice() {
    let setup = Setup::new(&[200, 400]).await;
    let direct = pg(&setup.db.url).await;
    let user = unique("u");
    let total: i64 = 1000;
    for _ in 0..total {
        publish_event(&setup.broker, &unique("evt"), &user).await;
    }
    let config = config(&setup.db.url, &setup.broker);
    let killed = spawn_worker(config.clone());
    eventually(WAIT, "some events processed", || async {
        (processed_total(&direct).await >= 30).then_some(())
    })
    .await;
    // No graceful anything: claims stay behind in Redis, transactions are cut off.
    killed.kill();

    let worker = spawn_worker(config);
    eventually(WAIT, "every event processed after the restart", || async {
        (processed_total(&direct).await == total).then_some(())
    })
    .await;
    wait_depth(&setup.broker, &setup.broker.topology.main_queue(), 0).await;
    worker.stop().await;
    assert_eq!(version(&direct, &user).await, total);
    assert_eq!(setup.broker.dead_letter_depth().await, 0);
}
