//! The store's one apply path is independent of how events are grouped: the same events,
//! shuffled and with duplicates, applied in sets of random sizes (`store::apply_events`, the
//! worker's usual path) to one database and one per transaction to another, must leave the same
//! purchases, subscriptions, customers, entitlements, versions and notifications.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use deadpool_postgres::Pool;
use processor::config::Config;
use processor::events::{self, Event};
use processor::store::{self, Outcome};
use serde_json::{Value, json};
use shared::config::Env;
use shared::samples::{Sample, event};
use system_tests::db::TestDb;

/// A small deterministic generator (xorshift64*), so a failing seed can be rerun.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % n as u64).unwrap()
    }
}

/// The events of `users` simulated customers covering every event kind the projection acts on
/// (and one it ignores), including payments whose user is only learnt from a later checkout.
fn scenario_events(seed: u64, users: usize) -> Vec<Value> {
    let t0 = 1_900_000_000;
    let mut out = Vec::new();
    for k in 0..users {
        let user = format!("u{seed}_{k}");
        let o = format!("{seed}_{k}");
        let sample = |created: i64, subscription: bool, product: &'static str| Sample {
            user: "",
            product,
            object: "",
            amount: 4900,
            created,
            subscription,
        };
        let mut push = |n: usize, ty: &str, subscription: bool, edit: &dyn Fn(&mut Value)| {
            let created = t0 + i64::try_from(k * 100 + n).unwrap();
            let mut s = sample(
                created,
                subscription,
                if subscription { "team" } else { "pro" },
            );
            s.user = &user;
            s.object = &o;
            let mut body = event(&format!("evt_{o}_{n}"), ty, &s);
            edit(&mut body["data"]["object"]);
            out.push(body);
        };
        let none = |_: &mut Value| {};
        match k % 9 {
            0 => {
                push(0, "checkout.session.completed", false, &none);
                push(1, "payment_intent.succeeded", false, &none);
            }
            1 => {
                push(0, "checkout.session.completed", false, &none);
                push(1, "payment_intent.succeeded", false, &none);
                push(2, "charge.refunded", false, &none);
            }
            2 => {
                push(0, "checkout.session.completed", false, &none);
                push(1, "charge.dispute.created", false, &none);
                push(2, "charge.dispute.closed", false, &none);
            }
            3 => {
                push(0, "checkout.session.completed", false, &none);
                push(1, "charge.dispute.created", false, &none);
                push(2, "charge.dispute.closed", false, &|d| {
                    d["status"] = json!("won")
                });
            }
            4 => {
                push(0, "customer.subscription.created", true, &none);
                push(1, "checkout.session.completed", true, &none);
                push(2, "invoice.paid", true, &none);
                push(3, "invoice.payment_failed", true, &none);
                push(4, "customer.subscription.updated", true, &|s| {
                    s["status"] = json!("past_due");
                });
            }
            5 => {
                push(0, "customer.subscription.created", true, &none);
                push(1, "customer.subscription.deleted", true, &none);
            }
            6 => push(0, "checkout.session.expired", false, &none),
            7 => {
                // Payment facts without a user: only the checkout's customer link names them.
                let anonymous = |v: &mut Value| v["metadata"] = json!({});
                push(0, "payment_intent.succeeded", false, &anonymous);
                push(1, "charge.refunded", false, &|v| {
                    v["metadata"] = json!({});
                    v["amount_refunded"] = json!(1000);
                    v["refunded"] = json!(false);
                });
                push(2, "checkout.session.completed", false, &none);
            }
            _ => push(0, "customer.updated", false, &none),
        }
    }
    out
}

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

/// The reference: one transaction per event.
async fn apply_one_by_one(pool: &Pool, events: &[Event]) {
    for event in events {
        let outcomes = store::apply_and_commit(pool, &[event]).await.unwrap();
        assert!(
            matches!(outcomes[0], Outcome::Applied(_) | Outcome::Replay),
            "{outcomes:?}"
        );
    }
}

/// Sets of 1 to 40 events; returns how many events the sets called replays.
async fn apply_in_batches(pool: &Pool, events: &[Event], rng: &mut Rng) -> usize {
    let mut replays = 0;
    let mut rest = events;
    while !rest.is_empty() {
        let n = (1 + rng.below(40)).min(rest.len());
        let (batch, tail) = rest.split_at(n);
        rest = tail;
        let refs: Vec<&Event> = batch.iter().collect();
        let outcomes = store::apply_and_commit(pool, &refs)
            .await
            .unwrap_or_else(|e| panic!("batch of {n} failed: {e}"));
        assert_eq!(outcomes.len(), n);
        for outcome in &outcomes {
            match outcome {
                Outcome::Replay => replays += 1,
                Outcome::Applied(_) => {}
                other => panic!("batch of {n}: {other:?}"),
            }
        }
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
    let (reference_db, reference) = database().await;
    let (batched_db, batched) = database().await;
    let mut skipped_intermediate = 0;
    for seed in 1..=6_u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let mut bodies = scenario_events(seed, 45);
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
    reference_db.cleanup().await;
    batched_db.cleanup().await;
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
    db.cleanup().await;
}
