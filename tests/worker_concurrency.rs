//! Two workers on one queue, fed interleaved events of the same users (with duplicates), end in
//! the same state as one worker fed the same events.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use processor::store;
use shared::ids::UserId;
use system_tests::unique;
use system_tests::worker::*;

/// The user's snapshot without timestamps (they differ between runs by nature).
async fn state(client: &tokio_postgres::Client, user: &str) -> serde_json::Value {
    let snapshot = store::user_snapshot(client, &UserId::parse(user).unwrap())
        .await
        .unwrap();
    let mut value = serde_json::to_value(snapshot).unwrap();
    strip_timestamps(&mut value);
    value
}

fn strip_timestamps(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            map.retain(|k, _| !k.ends_with("At"));
            map.values_mut().for_each(strip_timestamps);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(strip_timestamps),
        _ => {}
    }
}

/// Runs `workers` workers over `events` (published in order) on a fresh database and topology,
/// and returns each user's final state.
async fn run(
    workers: usize,
    events: &[(String, Vec<u8>)],
    users: &[String],
) -> Vec<serde_json::Value> {
    let setup = Setup::new(&[200, 400, 800]).await;
    let direct = pg(&setup.db.url).await;
    // Event ids are global dedupe keys in Redis: each run gets its own, same events otherwise.
    let run_tag = unique("r");
    let events: Vec<(String, Vec<u8>)> = events
        .iter()
        .map(|(id, body)| {
            let own = format!("{id}_{run_tag}");
            let body = String::from_utf8_lossy(body).replace(id.as_str(), &own);
            (own, body.into_bytes())
        })
        .collect();
    for (id, body) in &events {
        publish(&setup.broker, body, id, "checkout.session.completed").await;
    }
    let mut config = config(&setup.db.url, &setup.broker);
    // Small batches so the two workers really interleave.
    config.batch_size = 4;
    config.prefetch = 8;
    let running: Vec<Running> = (0..workers).map(|_| spawn_worker(config.clone())).collect();
    let distinct: std::collections::BTreeSet<&String> = events.iter().map(|(id, _)| id).collect();
    for id in &distinct {
        wait_processed(&direct, id).await;
    }
    wait_depth(&setup.broker, &setup.broker.topology.main_queue(), 0).await;
    for worker in running {
        worker.stop().await;
    }
    assert_eq!(processed_total(&direct).await, distinct.len() as i64);
    assert_eq!(setup.broker.dead_letter_depth().await, 0);
    let mut states = Vec::new();
    for user in users {
        states.push(state(&direct, user).await);
    }
    states
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_on_one_queue_end_in_the_same_state_as_one() {
    let users: Vec<String> = (0..3).map(|_| unique("u")).collect();
    let mut events = Vec::new();
    for round in 0..40 {
        let user = &users[round % users.len()];
        let id = unique("evt");
        let body = checkout_completed(&id, user);
        events.push((id.clone(), body.clone()));
        if round % 5 == 0 {
            events.push((id, body));
        }
    }

    let with_two = run(2, &events, &users).await;
    let with_one = run(1, &events, &users).await;
    assert_eq!(with_two, with_one);
    for (user, state) in users.iter().zip(&with_one) {
        let expected = events
            .iter()
            .filter(|(_, body)| String::from_utf8_lossy(body).contains(user.as_str()))
            .map(|(id, _)| id)
            .collect::<std::collections::BTreeSet<_>>()
            .len();
        assert_eq!(state["version"], serde_json::json!(expected), "{user}");
    }
}
