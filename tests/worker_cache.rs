//! The entitlement cache: versioned compare-and-set, deletion on a failed write, and a Redis
//! failure never failing an event.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use processor::cache::{Cache, Claim, entitlements_key};
use processor::domain::events;
use processor::store::{self, Outcome};
use shared::ids::UserId;
use system_tests::worker::*;
use system_tests::{eventually, unique};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_that_commit_in_one_order_and_write_in_the_other_leave_the_newer_version() {
    let setup = Setup::new(&[200]).await;
    let config = config(&setup.db.url, &setup.broker);
    let pool = processor::db::pool(&config).unwrap();
    processor::db::prepare(&config, &pool).await.unwrap();
    let cache = Cache::new(&config).unwrap();
    let user = unique("u");

    // Two transactions for the same user commit one after the other...
    let mut snapshots = Vec::new();
    for _ in 0..2 {
        let event = events::parse(&checkout_completed(&unique("evt"), &user)).unwrap();
        let Outcome::Applied(users) = store::apply_and_commit(&pool, &[&event])
            .await
            .unwrap()
            .remove(0)
        else {
            panic!("a fresh purchase applies");
        };
        snapshots.extend(users.into_iter().filter(|s| s.user_id == user));
    }
    let (older, newer) = (&snapshots[0], &snapshots[1]);
    assert!(newer.version > older.version);

    // ...and their cache writes arrive in the other order.
    assert!(cache.write_snapshot(newer).await.unwrap());
    assert!(
        !cache.write_snapshot(older).await.unwrap(),
        "older version refused"
    );
    cache.refresh(older).await;
    let cached = cache
        .read_snapshot(&UserId::parse(&user).unwrap())
        .await
        .expect("cached");
    assert_eq!(&cached, newer);

    let ttl: i64 = redis::cmd("TTL")
        .arg(entitlements_key(&user))
        .query_async(&mut redis().await)
        .await
        .unwrap();
    let configured = i64::try_from(config.entitlement_cache_ttl.as_secs()).unwrap();
    assert!(ttl > configured - 60 && ttl <= configured, "ttl {ttl}");
    cache.invalidate(&user).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_writes_the_cache_after_commit_and_deletes_it_when_the_write_fails() {
    let setup = Setup::new(&[200]).await;
    let direct = pg(&setup.db.url).await;
    let worker = spawn_worker(config(&setup.db.url, &setup.broker));
    let mut redis = redis().await;

    // A healthy write: the cache carries the committed version.
    let (good_user, event) = (unique("u"), unique("evt"));
    publish_event(&setup.broker, &event, &good_user).await;
    wait_processed(&direct, &event).await;
    let cached: Option<String> = eventually(WAIT, "cache written", || {
        let mut redis = redis.clone();
        let key = entitlements_key(&good_user);
        async move {
            redis::cmd("HGET")
                .arg(key)
                .arg("v")
                .query_async::<Option<String>>(&mut redis)
                .await
                .unwrap()
                .map(Some)
        }
    })
    .await;
    assert_eq!(cached.as_deref(), Some("1"));

    // A key the script cannot update (wrong type) makes the write fail: it is deleted.
    let bad_user = unique("u");
    let key = entitlements_key(&bad_user);
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg("not a hash")
        .query_async(&mut redis)
        .await
        .unwrap();
    let event = unique("evt");
    publish_event(&setup.broker, &event, &bad_user).await;
    wait_processed(&direct, &event).await;
    eventually(WAIT, "the unwritable key is deleted", || {
        let mut redis = redis.clone();
        let key = key.clone();
        async move {
            let exists: i64 = redis::cmd("EXISTS")
                .arg(key)
                .query_async(&mut redis)
                .await
                .unwrap();
            (exists == 0).then_some(())
        }
    })
    .await;
    worker.stop().await;
    assert_eq!(setup.broker.dead_letter_depth().await, 0);
    let _: () = redis::cmd("DEL")
        .arg(entitlements_key(&good_user))
        .query_async(&mut redis)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_redis_never_fails_an_event() {
    let setup = Setup::new(&[200, 400]).await;
    let direct = pg(&setup.db.url).await;
    // Nothing listens on port 1.
    let config = config_with(&setup.db.url, &setup.broker, "redis://127.0.0.1:1");
    let worker = spawn_worker(config);
    let (event, user) = (unique("evt"), unique("u"));
    publish_event(&setup.broker, &event, &user).await;
    wait_processed(&direct, &event).await;
    wait_depth(&setup.broker, &setup.broker.topology.main_queue(), 0).await;
    // Stopping closes the channel: an unacked delivery would come back now.
    worker.stop().await;
    let topology = &setup.broker.topology;
    assert_eq!(setup.broker.main_depth().await, 0);
    assert_eq!(setup.broker.dead_letter_depth().await, 0);
    for n in 1..=topology.retry_delays().len() {
        assert_eq!(setup.broker.depth(&topology.retry_queue(n)).await, 0);
    }
    assert_eq!(version(&direct, &user).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dedupe_marker_is_a_released_or_expiring_claim_until_the_commit_marks_it_done() {
    let setup = Setup::new(&[200]).await;
    let mut config = config(&setup.db.url, &setup.broker);
    config.claim_ttl = std::time::Duration::from_millis(300);
    let cache = Cache::new(&config).unwrap();
    let event = shared::ids::StripeEventId::parse(&unique("evt")).unwrap();

    let Claim::Acquired(first) = cache.claim(&event).await else {
        panic!("a fresh event can be claimed");
    };
    assert_eq!(cache.claim(&event).await, Claim::HeldElsewhere);
    // A failed attempt releases its own claim only.
    cache.release(&event, &first).await;
    let Claim::Acquired(second) = cache.claim(&event).await else {
        panic!("a released claim can be taken again");
    };
    cache.release(&event, &first).await;
    assert_eq!(
        cache.claim(&event).await,
        Claim::HeldElsewhere,
        "stale token ignored"
    );
    // A crashed holder's claim expires on its own.
    let third = eventually(WAIT, "the claim expires", || async {
        match cache.claim(&event).await {
            Claim::Acquired(token) => Some(token),
            _ => None,
        }
    })
    .await;
    assert_ne!(second, third);
    // After the commit: done, which no release removes.
    cache.mark_done(&event).await;
    cache.release(&event, &third).await;
    assert_eq!(cache.claim(&event).await, Claim::Done);
    let ttl: i64 = redis::cmd("TTL")
        .arg(processor::cache::dedupe_key(&event))
        .query_async(&mut redis().await)
        .await
        .unwrap();
    let configured = i64::try_from(config.dedupe_ttl.as_secs()).unwrap();
    assert!(
        ttl > configured - 60 && ttl <= configured,
        "done lives for DEDUPE_TTL_SECONDS, got {ttl}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_committed_while_redis_was_unreachable_reaches_the_cache_once_it_answers() {
    let setup = Setup::new(&[200, 400]).await;
    let direct = pg(&setup.db.url).await;
    let proxy = system_tests::chaos::ChaosProxy::start("127.0.0.1:6379".parse().unwrap()).await;
    let through_proxy = format!("redis://{}", proxy.addr);
    let worker = spawn_worker(config_with(&setup.db.url, &setup.broker, &through_proxy));
    let mut redis = redis().await;
    let user = unique("u");
    let cached_version = |redis: &redis::aio::MultiplexedConnection| {
        let mut redis = redis.clone();
        let key = entitlements_key(&user);
        async move {
            redis::cmd("HGET")
                .arg(key)
                .arg("v")
                .query_async::<Option<i64>>(&mut redis)
                .await
                .unwrap()
        }
    };

    let first = unique("evt");
    publish_event(&setup.broker, &first, &user).await;
    eventually(WAIT, "the first purchase cached", || async {
        (cached_version(&redis).await == Some(1)).then_some(())
    })
    .await;

    // Redis goes away: the second purchase commits, its cache write and the fallback delete
    // both fail, and the entry still says version 1.
    proxy.break_all();
    let second = unique("evt");
    publish_event(&setup.broker, &second, &user).await;
    wait_processed(&direct, &second).await;
    assert_eq!(version(&direct, &user).await, 2);
    assert_eq!(
        cached_version(&redis).await,
        Some(1),
        "stale while Redis is away"
    );

    // The worker dies before its cache write can succeed (it may still be retrying it): only
    // what the commit left in Postgres can repair the entry, in another process.
    worker.kill();
    proxy.restore();
    let worker = spawn_worker(config_with(&setup.db.url, &setup.broker, &through_proxy));
    eventually(
        std::time::Duration::from_secs(10),
        "the entry healed within seconds",
        || async { (cached_version(&redis).await != Some(1)).then_some(()) },
    )
    .await;
    assert!(matches!(cached_version(&redis).await, None | Some(2)));
    worker.stop().await;
    let _: () = redis::cmd("DEL")
        .arg(entitlements_key(&user))
        .query_async(&mut redis)
        .await
        .unwrap();
}
