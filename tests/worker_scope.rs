//! One account, one mode: the worker takes the events of the Stripe mode it serves and of the
//! Connect accounts it lists, and parks the others (they change nothing, and the dead-letter
//! queue shows them). Configured through the environment, as deployed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use serde_json::Value;
use shared::config::Env;
use system_tests::amqp::TestBroker;
use system_tests::unique;
use system_tests::worker::*;

/// A paid checkout of `user` with `livemode` and, when given, the Connect `account`.
fn purchase(event_id: &str, user: &str, livemode: bool, account: Option<&str>) -> Vec<u8> {
    let mut event: Value = serde_json::from_slice(&checkout_completed(event_id, user)).unwrap();
    event["livemode"] = Value::Bool(livemode);
    if let Some(account) = account {
        event["account"] = Value::String(account.to_owned());
    }
    event.to_string().into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_of_another_mode_or_an_unlisted_account_change_nothing_and_are_parked() {
    let db = system_tests::db::TestDb::create().await;
    let broker = TestBroker::new(vec![Duration::from_millis(200)]).await;
    let direct = pg(&db.url).await;
    let redis = system_tests::redis_url();
    let env = Env::from_pairs([
        ("DATABASE_URL", db.url.as_str()),
        ("REDIS_URL", redis.as_str()),
        ("AMQP_URL", system_tests::amqp_url().as_str()),
        ("STRIPE_MODE", "test"),
        ("STRIPE_ACCOUNTS", "acct_served1"),
    ]);
    let mut config = processor::config::Config::from_env(&env).unwrap();
    config.topology = broker.topology.clone();
    config.shutdown_grace = Duration::from_secs(10);
    let worker = spawn_worker(config);

    let cases = [
        ("test mode", false, None, true),
        ("live mode", true, None, false),
        ("a served account", false, Some("acct_served1"), true),
        ("another account", false, Some("acct_other2"), false),
    ];
    let mut sent = Vec::new();
    for (what, livemode, account, _) in cases {
        let (user, event) = (unique("u"), unique("evt"));
        let body = purchase(&event, &user, livemode, account);
        register_product_of(&direct, &body).await;
        publish(&broker, &body, &event, "checkout.session.completed").await;
        sent.push((what, user, event));
    }
    // Taken ones are applied; a duplicate of each changes nothing more.
    for ((what, user, event), (_, livemode, account, taken)) in sent.iter().zip(cases) {
        if taken {
            wait_processed(&direct, event).await;
            assert_eq!(version(&direct, user).await, 1, "{what}: applied");
            let copy = purchase(event, user, livemode, account);
            publish(&broker, &copy, event, "checkout.session.completed").await;
        }
    }
    wait_depth(&broker, &broker.topology.dead_letter_queue(), 2).await;
    wait_depth(&broker, &broker.topology.main_queue(), 0).await;
    worker.stop().await;
    for ((what, user, event), (_, _, _, taken)) in sent.iter().zip(cases) {
        let expected = i64::from(taken);
        assert_eq!(processed_rows(&direct, event).await, expected, "{what}");
        assert_eq!(
            version(&direct, user).await,
            expected,
            "{what}: applied once or never"
        );
    }
}
