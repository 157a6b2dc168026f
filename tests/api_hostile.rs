//! The API's bounds against a caller that pushes: restore's rate limit fails closed, its Stripe
//! fan-out is bounded in pages, dispute lookups and concurrency, and bodies are capped.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use processor::api::restore::{
    RESTORE_CONCURRENCY, RESTORE_MAX_DISPUTE_LOOKUPS, RESTORE_MAX_PAGES,
};
use serde_json::json;
use shared::samples::{Sample, object};
use system_tests::api::*;
use system_tests::stripe_fake::{Collection, FakeStripe, Fault};
use system_tests::unique;

fn sample<'a>(user: &'a str, o: &'a str) -> Sample<'a> {
    Sample {
        user,
        product: "pro",
        object: o,
        amount: 4900,
        created: chrono::Utc::now().timestamp() - 3600,
        subscription: false,
    }
}

/// The fake, an API over it, and a user whose Stripe customer `cus_{o}` both know.
async fn with_customer() -> (FakeStripe, Api, String, String) {
    let fake = FakeStripe::start().await;
    let api = Api::start(Some(&fake)).await;
    let (user, o) = (unique("u"), unique("o"));
    let customer = format!("cus_{o}");
    fake.seed_customer_with_id(&customer, &user, None);
    api.map_customer(&customer, &user).await;
    (fake, api, user, o)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_answers_503_with_retry_after_when_its_rate_limit_cannot_be_checked() {
    let fake = FakeStripe::start().await;
    // Nothing listens on port 1: Redis is "down" for this API only.
    let api = Api::start_with_redis(Some(&fake), "redis://127.0.0.1:1").await;
    let user = unique("u");
    let response = api
        .http
        .post(format!("{}/api/pro/restore", api.base))
        .header("authorization", token(&user))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(
        response
            .headers()
            .get("retry-after")
            .unwrap()
            .to_str()
            .unwrap(),
        "10"
    );
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"], "unavailable");
    assert!(fake.requests().is_empty(), "nothing was read from Stripe");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_reads_no_more_than_its_page_cap_of_any_list() {
    let (fake, api, user, o) = with_customer().await;
    fake.set_max_page_size(1);
    for n in 0..=RESTORE_MAX_PAGES {
        let mut session = object("checkout.session.completed", &sample(&user, &o));
        session["id"] = json!(format!("cs_{o}_{n}"));
        fake.seed(Collection::CheckoutSessions, session);
    }
    let (status, body) = api.post("/api/pro/restore", &user, None).await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(
        fake.requests_to("/v1/checkout/sessions").len(),
        RESTORE_MAX_PAGES
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_looks_up_the_disputes_of_a_bounded_number_of_charges_a_few_at_a_time() {
    let (fake, api, user, o) = with_customer().await;
    for n in 0..RESTORE_MAX_DISPUTE_LOOKUPS + 10 {
        let mut charge = object("charge.refunded", &sample(&user, &o));
        charge["id"] = json!(format!("ch_{o}_{n}"));
        charge["refunded"] = json!(false);
        charge["amount_refunded"] = json!(0);
        charge["disputed"] = json!(true);
        fake.seed(Collection::Charges, charge);
    }
    // Every request (the four lists, then the lookups) takes 200 ms.
    let delay = Duration::from_millis(200);
    fake.inject(Fault::Slow(delay), 4 + RESTORE_MAX_DISPUTE_LOOKUPS);
    let started = Instant::now();
    let (status, body) = api.post("/api/pro/restore", &user, None).await;
    let took = started.elapsed();
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        fake.requests_to("/v1/disputes").len(),
        RESTORE_MAX_DISPUTE_LOOKUPS
    );
    // Lists in parallel, then the lookups in rounds of RESTORE_CONCURRENCY.
    let rounds = u32::try_from(RESTORE_MAX_DISPUTE_LOOKUPS.div_ceil(RESTORE_CONCURRENCY)).unwrap();
    assert!(
        took >= delay * rounds,
        "lookups ran more than {RESTORE_CONCURRENCY} at a time: {took:?}"
    );
    assert!(
        took < delay * (rounds + 1) * 3,
        "lookups ran one by one: {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_api_limit_is_answered_413() {
    let api = Api::start(None).await;
    let user = unique("u");
    let padding = "x".repeat(processor::api::DEFAULT_MAX_BODY_BYTES);
    let (status, body) = api
        .post(
            "/api/checkout/session",
            &user,
            Some(json!({"productKey": "pro", "padding": padding})),
        )
        .await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"], "payload_too_large");
    let (status, body) = api
        .post(
            "/api/checkout/session",
            &user,
            Some(json!({"productKey": 7})),
        )
        .await;
    assert_eq!((status, body["error"].as_str()), (400, Some("bad_request")));
}

/// The lines of `metric` in a Prometheus text scrape.
fn series<'a>(scrape: &'a str, metric: &str) -> Vec<&'a str> {
    scrape
        .lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_methods_and_paths_add_no_metric_series() {
    use system_tests::servers::{Process, free_port};
    let seed = Api::start(None).await;
    let addr = format!("127.0.0.1:{}", free_port());
    let api = Process::spawn(
        "processor",
        &["api"],
        &[
            ("API_ADDR", addr.clone()),
            ("DATABASE_URL", seed.db.url.clone()),
            ("REDIS_URL", system_tests::redis_url()),
            ("AMQP_URL", system_tests::amqp_url()),
            ("AUTH_JWT_SECRET", SECRET.to_owned()),
            ("RUST_LOG", "warn".to_owned()),
        ],
        std::env::temp_dir().join(format!("{}-api.log", unique("hostile"))),
    );
    let base = format!("http://{addr}");
    let http = reqwest::Client::new();
    system_tests::eventually(Duration::from_secs(30), "the api answers", || async {
        http.get(format!("{base}/healthz"))
            .send()
            .await
            .ok()
            .filter(|r| r.status() == 200)
            .map(drop)
    })
    .await;
    // One request of every shape a client may send, to settle the series the API has.
    let scrape = || async {
        http.get(format!("{base}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    for path in ["/api/pro/entitlement", "/no/such/route"] {
        for method in ["GET", "X1Z"] {
            let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
            http.request(method, format!("{base}{path}"))
                .send()
                .await
                .unwrap();
        }
    }
    let before = scrape().await;
    // 200 requests, each with a method and a path of its own.
    for n in 0..200 {
        let method = reqwest::Method::from_bytes(format!("X{n}Z").as_bytes()).unwrap();
        let path = if n % 2 == 0 {
            format!("/api/pro/entitlement?n={n}")
        } else {
            format!("/u_{n}/{}", unique("p"))
        };
        let answer = http
            .request(method, format!("{base}{path}"))
            .header("authorization", token("u_hostile"))
            .send()
            .await
            .unwrap();
        assert!(answer.status().is_client_error(), "{}", answer.status());
    }
    let after = scrape().await;
    for metric in ["api_requests_total", "api_request_duration_seconds_count"] {
        assert!(!series(&before, metric).is_empty(), "{metric} is exported");
        assert_eq!(
            series(&after, metric).len(),
            series(&before, metric).len(),
            "{metric}: {:#?}",
            series(&after, metric)
        );
    }
    assert!(
        !after.contains("X7Z") && !after.contains("/u_"),
        "no raw method or path"
    );
    assert!(after.contains(r#"method="other""#));
    drop(api);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_user_cannot_spend_the_accounts_stripe_budget_through_checkout_or_the_portal() {
    let (fake, api, user, _) = with_customer().await;
    let other = unique("u");
    // 40 rapid checkouts, then 40 portal sessions, from one user.
    let mut answers = Vec::new();
    for _ in 0..40 {
        answers.push(api.checkout(&user, "pro").await);
    }
    for _ in 0..40 {
        answers.push(api.post("/api/billing/portal", &user, None).await);
    }
    let created = |path: &str| {
        fake.requests()
            .iter()
            .filter(|r| r.method == "POST" && r.path == path)
            .count()
    };
    assert_eq!(
        created("/v1/checkout/sessions"),
        10,
        "10 checkouts reached Stripe"
    );
    assert_eq!(
        created("/v1/billing_portal/sessions"),
        10,
        "10 portal sessions"
    );
    let limited: Vec<&(u16, serde_json::Value)> = answers
        .iter()
        .filter(|(status, _)| *status == 429)
        .collect();
    assert_eq!(limited.len(), 60, "{answers:?}");
    assert!(
        limited
            .iter()
            .all(|(_, body)| body["error"] == "rate_limited")
    );
    // Another user is not held back by the first.
    let (status, body) = api.checkout(&other, "pro").await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_user_limits_answer_429_with_retry_after_and_hold_across_api_processes() {
    let (fake, api, user, _) = with_customer().await;
    let beside = api.beside_with_stripe(&fake).await;
    for n in 0..10 {
        let server = if n % 2 == 0 { &api } else { &beside };
        let (status, body) = server.post("/api/billing/portal", &user, None).await;
        assert_eq!(status, 200, "{n}: {body}");
    }
    let response = api
        .http
        .post(format!("{}/api/billing/portal", beside.base))
        .header("authorization", token(&user))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    let retry: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_user_limits_fail_closed_when_redis_is_away() {
    let fake = FakeStripe::start().await;
    // Redis at a port nothing listens on.
    let api = Api::start_with_redis(
        Some(&fake),
        &format!("redis://127.0.0.1:{}", system_tests::servers::free_port()),
    )
    .await;
    let user = unique("u");
    let customer = format!("cus_{}", unique("o"));
    fake.seed_customer_with_id(&customer, &user, None);
    api.map_customer(&customer, &user).await;
    let (status, body) = api.post("/api/billing/portal", &user, None).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (503, Some("unavailable")),
        "{body}"
    );
    assert!(
        fake.requests()
            .iter()
            .all(|r| r.path != "/v1/billing_portal/sessions")
    );
}
