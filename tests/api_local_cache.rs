//! The entitlement cache's in-process layer against the real Redis and Postgres: two API
//! servers, each with its own Redis connections and process memory, serve hits from memory and
//! stop serving a revoked entitlement within the cache's bound — after the worker's cache write,
//! after the key is deleted, while the connection to Redis is cut or silent, and under readers
//! racing a writer that flips the entitlement back and forth.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use processor::domain::projection::EntitlementStatus;
use processor::domain::view::UserSnapshot;
use processor::store::{self, Outcome};
use serde_json::Value;
use shared::samples::{Sample, event};
use system_tests::api::*;
use system_tests::chaos::ChaosProxy;
use system_tests::servers::{Process, free_port};
use system_tests::{eventually, redis_url, unique};

/// The cache's own bound: a stale Redis entry lives at most ~3 s after Redis answers again.
/// Invalidation normally takes one network hop, and a silent connection stops serving from
/// memory after `local_cache::MAX_LAG`.
const BOUND: Duration = Duration::from_secs(3);

/// While Redis is cut or silent, a read waits out its Redis timeouts before going to Postgres.
const BOUND_WITHOUT_REDIS: Duration = Duration::from_secs(20);

/// How long a server may take to (re-)establish tracking and fill its memory: readiness, not a
/// bound the cache promises.
const WARM: Duration = Duration::from_secs(15);

async fn pro(api: &Api, user: &str) -> Value {
    let (status, body) = api.get("/api/pro/entitlement", user).await;
    assert_eq!(status, 200, "{body}");
    body
}

/// Reads until `api` serves `user`'s entitlement from memory; returns what it serves.
async fn warm(api: &Api, user: &str) -> Value {
    eventually(WARM, "the entitlement served from memory", || async {
        let body = pro(api, user).await;
        api.local.holds(user).then_some(body)
    })
    .await
}

/// Polls `api` until `user` is no longer pro, within `bound`.
async fn revoked_within(api: &Api, user: &str, bound: Duration, what: &str) {
    eventually(bound, what, || async {
        let body = pro(api, user).await;
        (body["isPro"] == false).then_some(())
    })
    .await;
}

/// Refunds `user`'s purchase `object` in Postgres; returns the committed snapshot.
async fn refund(api: &Api, user: &str, object: &str) -> UserSnapshot {
    let sample = Sample::pro(user, object);
    let body = event(&unique("evt"), "charge.refunded", &sample);
    let event = processor::domain::events::parse(body.to_string().as_bytes()).unwrap();
    let outcome = store::apply_and_commit(&api.pool, &[&event])
        .await
        .unwrap()
        .remove(0);
    let Outcome::Applied(users) = outcome else {
        panic!("the refund applies: {outcome:?}");
    };
    users.into_iter().find(|s| s.user_id == user).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_api_processes_stop_serving_a_refunded_entitlement_within_the_bound() {
    let a = Api::start(None).await;
    let b = a.beside(&redis_url()).await;
    let user = unique("u");
    let object = a.buy(&user, "pro").await;
    for api in [&a, &b] {
        assert_eq!(warm(api, &user).await["isPro"], true);
    }

    // The worker's path: commit, then the versioned write to Redis.
    let snapshot = refund(&a, &user, &object).await;
    a.cache.refresh(&snapshot).await;
    for api in [&a, &b] {
        revoked_within(api, &user, BOUND, "the refund served by every API").await;
        assert_eq!(pro(api, &user).await["status"], "revoked");
    }
    // Served from memory again, now the revoked snapshot.
    assert_eq!(warm(&b, &user).await["status"], "revoked");
}

/// `processor api` hits served from its process memory, read off its `/metrics`.
async fn memory_hits(http: &reqwest::Client, base: &str) -> u64 {
    let Ok(response) = http.get(format!("{base}/metrics")).send().await else {
        return 0;
    };
    let text = response.text().await.unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with("entitlement_local_cache_reads_total{outcome=\"hit\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// `GET /api/pro/entitlement` of `user` from the API at `base`, if it answers.
async fn pro_at(http: &reqwest::Client, base: &str, user: &str) -> Option<Value> {
    let response = http
        .get(format!("{base}/api/pro/entitlement"))
        .header("authorization", token(user))
        .send()
        .await
        .ok()?;
    (response.status() == 200).then_some(())?;
    response.json().await.ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processor_api_processes_stop_serving_a_refunded_entitlement_within_the_bound() {
    let seed = Api::start(None).await;
    let broker = system_tests::amqp::TestBroker::new(vec![Duration::from_secs(1)]).await;
    let user = unique("u");
    let object = seed.buy(&user, "pro").await;
    let logs = std::env::temp_dir();
    let processes: Vec<Process> = (0..2)
        .map(|i| {
            let addr = format!("127.0.0.1:{}", free_port());
            Process::spawn(
                "processor",
                &["api"],
                &[
                    ("API_ADDR", addr),
                    ("DATABASE_URL", seed.db.url.clone()),
                    ("REDIS_URL", redis_url()),
                    ("AMQP_URL", system_tests::amqp_url()),
                    ("AMQP_TOPOLOGY_BASE", broker.topology.exchange().to_string()),
                    ("AUTH_JWT_SECRET", SECRET.to_owned()),
                    ("STRIPE_PRICE_PRO_LIFETIME", "price_pro".to_owned()),
                    ("RUST_LOG", "warn".to_owned()),
                ],
                logs.join(format!("{}-api-{i}.log", user)),
            )
        })
        .collect();
    let http = reqwest::Client::new();
    let bases: Vec<String> = processes
        .iter()
        .map(|p| format!("http://{}", p.addr))
        .collect();

    // Each process serves the purchase from its own memory before the refund.
    for base in &bases {
        eventually(WARM, "the purchase served from process memory", || async {
            let body = pro_at(&http, base, &user).await?;
            assert_eq!(body["isPro"], true, "{body}");
            let before = memory_hits(&http, base).await;
            pro_at(&http, base, &user).await?;
            (memory_hits(&http, base).await > before).then_some(())
        })
        .await;
    }

    // The worker's path: commit, then the versioned write to Redis.
    let snapshot = refund(&seed, &user, &object).await;
    seed.cache.refresh(&snapshot).await;
    for base in &bases {
        eventually(
            BOUND,
            "the refund answered by every processor api",
            || async {
                let body = pro_at(&http, base, &user).await?;
                (body["status"] == "revoked").then_some(())
            },
        )
        .await;
    }
    // And nothing older comes back from either memory.
    for base in &bases {
        for _ in 0..20 {
            let body = pro_at(&http, base, &user).await.expect("answers");
            assert_eq!(body["status"], "revoked", "{body}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_cache_entry_is_no_longer_served_from_memory() {
    let a = Api::start(None).await;
    let b = a.beside(&redis_url()).await;
    let user = unique("u");
    let object = a.buy(&user, "pro").await;
    for api in [&a, &b] {
        warm(api, &user).await;
    }
    // The commit's cache write failed, so the key is deleted (as the worker and the healer do).
    refund(&a, &user, &object).await;
    assert!(a.cache.invalidate(&user).await);
    for api in [&a, &b] {
        revoked_within(api, &user, BOUND, "Postgres read once the key is gone").await;
    }
}

/// A server reaching Redis through a proxy that `fault` breaks: a refund made behind its back
/// (in Postgres and Redis) is answered as revoked, never from memory; once Redis is back,
/// memory serves the new state.
async fn a_refund_made_while_redis_is_away_is_not_served_from_memory(fault: fn(&ChaosProxy)) {
    let proxy = ChaosProxy::start("127.0.0.1:6379".parse().unwrap()).await;
    let direct = Api::start(None).await;
    let api = direct.beside(&format!("redis://{}", proxy.addr)).await;
    let user = unique("u");
    let object = direct.buy(&user, "pro").await;
    warm(&api, &user).await;

    fault(&proxy);
    let snapshot = refund(&direct, &user, &object).await;
    direct.cache.refresh(&snapshot).await;
    revoked_within(&api, &user, BOUND_WITHOUT_REDIS, "Postgres read while away").await;
    assert!(!api.local.is_tracking(), "no tracking while away");

    proxy.restore();
    assert_eq!(warm(&api, &user).await["status"], "revoked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_the_connection_to_redis_is_cut_nothing_is_served_from_memory() {
    a_refund_made_while_redis_is_away_is_not_served_from_memory(ChaosProxy::break_all).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_to_redis_stops_serving_from_memory() {
    // No error and no answer: the invalidation push is held in the proxy.
    a_refund_made_while_redis_is_away_is_not_served_from_memory(ChaosProxy::stall).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_racing_a_flipping_writer_converge_on_the_last_write_in_every_process() {
    let a = Api::start(None).await;
    let b = a.beside(&redis_url()).await;
    let user = unique("u");
    a.buy(&user, "pro").await;
    let id = shared::ids::UserId::parse(&user).unwrap();
    let stored = {
        let client = a.pool.get().await.unwrap();
        store::user_snapshot(&**client, &id).await.unwrap()
    };
    let apis = std::sync::Arc::new([a, b]);
    let writing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let readers: Vec<_> = (0..8)
        .map(|i| {
            let (apis, writing, user) = (apis.clone(), writing.clone(), user.clone());
            tokio::spawn(async move {
                let api = &apis[i % 2];
                while writing.load(std::sync::atomic::Ordering::SeqCst) {
                    pro(api, &user).await;
                }
            })
        })
        .collect();

    // Bursts of writes, each ending in a write every process must converge on while readers
    // keep racing: a read that began before the burst's last write and is installed after its
    // invalidation would stick.
    let (bursts, flips) = (40_i64, 10_i64);
    let mut last = stored.clone();
    for burst in 0..bursts {
        for flip in 1..=flips {
            let n = burst * flips + flip;
            last = stored.clone();
            last.version = stored.version + n;
            last.entitlements[0].status = if n % 2 == 0 {
                EntitlementStatus::Active
            } else {
                EntitlementStatus::Revoked
            };
            apis[0].cache.refresh(&last).await;
        }
        let expected = last.entitlements[0].status.as_str();
        for api in apis.iter() {
            eventually(BOUND, "the burst's last write served", || async {
                (pro(api, &user).await["status"] == expected).then_some(())
            })
            .await;
        }
    }
    writing.store(false, std::sync::atomic::Ordering::SeqCst);
    for reader in readers {
        reader.await.unwrap();
    }
    assert_eq!(last.entitlements[0].status, EntitlementStatus::Active);

    for api in apis.iter() {
        let body = warm(api, &user).await;
        assert_eq!(body["status"], "active", "the last write, from memory");
        // Nothing older is installed later: every read now is the last write.
        for _ in 0..20 {
            assert_eq!(pro(api, &user).await["status"], "active");
        }
    }
}
