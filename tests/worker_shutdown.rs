//! Graceful shutdown: the in-flight batch finishes, everything not acked returns to the queue,
//! and a restarted worker picks it up: nothing lost, nothing applied twice.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use system_tests::worker::*;
use system_tests::{eventually, unique};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_in_flight_events_and_returns_the_rest_to_the_queue() {
    let setup = Setup::new(&[200, 400]).await;
    let direct = pg(&setup.db.url).await;
    let user = unique("u");
    // Enough that deliveries are still prefetched and in flight when the stop comes.
    let total: i64 = 600;
    for _ in 0..total {
        publish_event(&setup.broker, &unique("evt"), &user).await;
    }
    let mut config = config(&setup.db.url, &setup.broker);
    config.batch_size = 16;
    config.prefetch = 64;

    let worker = spawn_worker(config.clone());
    eventually(WAIT, "some events processed", || async {
        (processed_total(&direct).await >= 50).then_some(())
    })
    .await;
    worker.stop().await;

    // After the stop: every event is either committed (and acked) or back in the queue, never
    // both and never neither: the in-flight batch finished and prefetched deliveries returned.
    let committed = processed_total(&direct).await;
    let main = setup.broker.topology.main_queue();
    eventually(WAIT, "unfinished deliveries back in the queue", || async {
        let waiting = i64::from(setup.broker.depth(&main).await);
        (committed + waiting == total).then_some(())
    })
    .await;
    assert_eq!(version(&direct, &user).await, committed);

    let worker = spawn_worker(config);
    eventually(WAIT, "the rest processed after a restart", || async {
        (processed_total(&direct).await == total).then_some(())
    })
    .await;
    wait_depth(&setup.broker, &main, 0).await;
    worker.stop().await;
    assert_eq!(version(&direct, &user).await, total);
}
