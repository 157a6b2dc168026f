//! The store's one apply path is independent of how events are grouped: the same events,
//! shuffled and with duplicates, applied in sets of random sizes (`store::apply_events`, the
//! worker's usual path) to one database and one per transaction to another, must leave the same
//! purchases, subscriptions, customers, entitlements, versions and notifications.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use deadpool_postgres::Pool;
use processor::config::Config;
use processor::domain::events::{self, Event};
use processor::store::{self, Outcome};
use shared::config::Env;
use system_tests::db::TestDb;
use system_tests::scenarios::{Rng, histories};

async fn database() -> (TestDb, Pool) {
    let db = TestDb::create().await;
    let env = Env::from_pairs([
        ("DATABASE_URL", db.url.as_str()),
        ("REDIS_URL", "redis://127.0.0.1:6379"),
        ("AMQP_URL", "amqp://127.0.0.1:5672"),
    ]);
    let config = Config::from_env(&env).unwrap();
    let pool = processor::db::pool(&config).unwrap();
    processor::db::prepare(&config, &pool).await.unwrap();
    (db, pool)
}

/// The reference: one transaction per event. An event that cannot apply yet (a repurchase
/// whose earlier purchase's refund comes later in this order) is retried after the rest, as the
/// consumer's delay queues would.
async fn apply_one_by_one(pool: &Pool, events: &[Event]) {
    let mut pending: Vec<&Event> = events.iter().collect();
    while !pending.is_empty() {
        let mut later = Vec::new();
        for event in &pending {
            let outcomes = store::apply_and_commit(pool, &[event]).await.unwrap();
            match &outcomes[0] {
                Outcome::Applied(_) | Outcome::Replay => {}
                Outcome::Later(_) => later.push(*event),
                other => panic!("{other:?}"),
            }
        }
        assert!(later.len() < pending.len(), "no progress: {later:?}");
        pending = later;
    }
}

/// Sets of 1 to 40 events, the events that cannot apply yet retried in later sets; returns how
/// many events the sets called replays.
async fn apply_in_batches(pool: &Pool, events: &[Event], rng: &mut Rng) -> usize {
    let mut replays = 0;
    let mut pending: Vec<&Event> = events.iter().collect();
    while !pending.is_empty() {
        let mut later = Vec::new();
        let mut rest = pending.as_slice();
        while !rest.is_empty() {
            let n = (1 + rng.below(40)).min(rest.len());
            let (batch, tail) = rest.split_at(n);
            rest = tail;
            let outcomes = store::apply_and_commit(pool, batch)
                .await
                .unwrap_or_else(|e| panic!("batch of {n} failed: {e:?}"));
            assert_eq!(outcomes.len(), n);
            for (event, outcome) in batch.iter().zip(&outcomes) {
                match outcome {
                    Outcome::Replay => replays += 1,
                    Outcome::Applied(_) => {}
                    Outcome::Later(_) => later.push(*event),
                    other => panic!("batch of {n}: {other:?}"),
                }
            }
        }
        assert!(later.len() < pending.len(), "no progress: {later:?}");
        pending = later;
    }
    replays
}

/// The notifications as `(kind, user, dedupe key)`.
async fn notifications(pool: &Pool) -> Vec<(String, String, String)> {
    let client = pool.get().await.unwrap();
    client
        .query(
            "SELECT kind, coalesce(user_id, ''), dedupe_key FROM notifications ORDER BY 3",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

/// Every table the projection writes but the outbox, as sorted text, without surrogate ids
/// and write times.
async fn dump(pool: &Pool) -> Vec<String> {
    let client = pool.get().await.unwrap();
    let mut out = Vec::new();
    for (table, drop) in [
        ("purchases", "'{id,created_at,updated_at}'"),
        ("subscriptions", "'{created_at,updated_at}'"),
        ("customers", "'{created_at}'"),
        ("entitlements", "'{updated_at}'"),
        // A batch bumps a user's version once per event that concerned the user at commit
        // time, where one by one an event applied before the user was known bumps nothing:
        // both only grow, which is what the cache's compare-and-set needs.
        ("user_entitlement_versions", "'{version}'"),
        ("processed_events", "'{processed_at}'"),
    ] {
        let rows = client
            .query(
                &format!("SELECT (to_jsonb(t) - {drop}::text[])::text FROM {table} t ORDER BY 1"),
                &[],
            )
            .await
            .unwrap();
        out.extend(
            rows.iter()
                .map(|r| format!("{table}: {}", r.get::<_, String>(0))),
        );
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_of_any_size_leave_the_rows_one_event_at_a_time_leaves() {
    let (_reference_db, reference) = database().await;
    let (_batched_db, batched) = database().await;
    let mut skipped_intermediate = 0;
    for seed in 1..=6_u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let mut bodies = histories(seed, 45);
        // Shuffle, then deliver about a fifth of the events twice, anywhere.
        for i in (1..bodies.len()).rev() {
            bodies.swap(i, rng.below(i + 1));
        }
        let copies = bodies.len() / 5;
        for _ in 0..copies {
            let copy = bodies[rng.below(bodies.len())].clone();
            let at = rng.below(bodies.len() + 1);
            bodies.insert(at, copy);
        }
        let events: Vec<Event> = bodies
            .iter()
            .map(|b| events::parse(b.to_string().as_bytes()).unwrap())
            .collect();

        apply_one_by_one(&reference, &events).await;
        let replays = apply_in_batches(&batched, &events, &mut rng).await;

        assert_eq!(replays, copies, "seed {seed}: every duplicate is a replay");
        let (expected, actual) = (dump(&reference).await, dump(&batched).await);
        let missing: Vec<_> = expected.iter().filter(|r| !actual.contains(r)).collect();
        let extra: Vec<_> = actual.iter().filter(|r| !expected.contains(r)).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "seed {seed}:\nonly one by one: {missing:#?}\nonly batched: {extra:#?}"
        );
        // The outbox: a batch never notifies what one by one would not, and skips only
        // states that never committed (suspended, then revoked within the batch).
        let (expected, actual) = (
            notifications(&reference).await,
            notifications(&batched).await,
        );
        assert!(
            actual.iter().all(|n| expected.contains(n)),
            "seed {seed}: {actual:#?}"
        );
        for (kind, user, _) in expected.iter().filter(|n| !actual.contains(n)) {
            let status = kind.trim_start_matches("entitlement_");
            let still: i64 = batched
                .get()
                .await
                .unwrap()
                .query_one(
                    "SELECT count(*) FROM entitlements WHERE user_id = $1 AND status = $2",
                    &[user, &status],
                )
                .await
                .unwrap()
                .get(0);
            assert_eq!(
                still, 0,
                "seed {seed}: {kind} of {user} is the final state, yet not notified"
            );
            skipped_intermediate += 1;
        }
    }
    let entitled: i64 = batched
        .get()
        .await
        .unwrap()
        .query_one("SELECT count(*) FROM entitlements", &[])
        .await
        .unwrap()
        .get(0);
    assert!(entitled > 100, "the scenarios grant: {entitled}");
    println!("notifications of states that never committed in a batch: {skipped_intermediate}");
    drop((reference, batched));
}

#[tokio::test]
async fn pooled_connections_plan_every_execution_and_keep_the_urls_own_options() {
    let db = TestDb::create().await;
    for (url, search_path) in [
        (db.url.clone(), "\"$user\", public"),
        (
            format!("{}?options=-c%20search_path%3Dpg_catalog", db.url),
            "pg_catalog",
        ),
    ] {
        let env = Env::from_pairs([
            ("DATABASE_URL", url.as_str()),
            ("REDIS_URL", "redis://127.0.0.1:6379"),
            ("AMQP_URL", "amqp://127.0.0.1:5672"),
        ]);
        let pool = processor::db::pool(&Config::from_env(&env).unwrap()).unwrap();
        let client = pool.get().await.unwrap();
        let row = client
            .query_one(
                "SELECT current_setting('plan_cache_mode'), current_setting('search_path')",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), "force_custom_plan", "{url}");
        assert_eq!(row.get::<_, String>(1), search_path, "{url}");
    }
}
