//! The entitlement API's reads against real Postgres and Redis: authentication refusals,
//! per-user isolation, the cache-first read path and read-time expiry, purchases paging.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use reqwest::Method;
use serde_json::json;
use shared::ids::UserId;
use system_tests::api::*;
use system_tests::unique;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_malformed_expired_forged_and_unsigned_tokens_get_401() {
    let api = Api::start(None).await;
    let user = unique("u");
    // {"alg":"none","typ":"JWT"} . {"sub":"u_none","exp":4102444800} . (no signature)
    let unsigned = "Bearer eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.\
                    eyJzdWIiOiJ1X25vbmUiLCJleHAiOjQxMDI0NDQ4MDB9."
        .to_owned();
    let cases = [
        ("missing", None),
        ("malformed", Some("Bearer not.a.jwt".to_owned())),
        (
            "not bearer",
            Some(format!(
                "Basic {}",
                sign(&json!({"sub": user, "exp": exp(600)}), SECRET)
            )),
        ),
        (
            "expired",
            Some(format!(
                "Bearer {}",
                sign(&json!({"sub": user, "exp": exp(-3600)}), SECRET)
            )),
        ),
        (
            "wrong signature",
            Some(format!(
                "Bearer {}",
                sign(
                    &json!({"sub": user, "exp": exp(600)}),
                    "another-secret-of-at-least-32-bytes!!"
                )
            )),
        ),
        ("alg none", Some(unsigned)),
    ];
    for path in [
        "/api/pro/entitlement",
        "/api/entitlements",
        "/api/purchases",
    ] {
        for (what, auth) in &cases {
            let (status, body) = api.send(Method::GET, path, auth.as_deref(), None).await;
            assert_eq!(status, 401, "{what} on {path}: {body}");
            assert_eq!(body["error"], "unauthorized", "{what}");
        }
    }
    let (status, _) = api.get("/api/pro/entitlement", &user).await;
    assert_eq!(status, 200, "the valid token is accepted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_route_needs_the_admin_token_and_serves_any_user() {
    let api = Api::start(None).await;
    let user = unique("u");
    api.buy(&user, "pro").await;
    let path = format!("/v1/entitlements/{user}");
    let (status, _) = api.send(Method::GET, &path, None, None).await;
    assert_eq!(status, 401);
    let (status, _) = api
        .send(Method::GET, &path, Some("Bearer wrong-token"), None)
        .await;
    assert_eq!(status, 401);
    // A user's token is not the admin token.
    let (status, _) = api.get(&path, &user).await;
    assert_eq!(status, 401);
    let (status, body) = api
        .send(
            Method::GET,
            &path,
            Some(&format!("Bearer {ADMIN_TOKEN}")),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["userId"], user.as_str());
    assert_eq!(body["entitlements"][0]["key"], "pro");
    assert_eq!(body["entitlements"][0]["active"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_sees_only_their_own_entitlements_and_purchases() {
    let api = Api::start(None).await;
    let (alice, bob) = (unique("alice"), unique("bob"));
    api.buy(&alice, "pro").await;

    let (_, mine) = api.get("/api/purchases", &alice).await;
    assert_eq!(mine["pagination"]["totalCount"], 1);
    let id = mine["data"][0]["id"].as_i64().unwrap();
    let (status, one) = api.get(&format!("/api/purchases/{id}"), &alice).await;
    assert_eq!(status, 200);
    assert_eq!(one["productKey"], "pro");
    assert_eq!(one["status"], "completed");

    let (status, body) = api.get(&format!("/api/purchases/{id}"), &bob).await;
    assert_eq!(
        status, 404,
        "another user's purchase is not found, not forbidden"
    );
    assert_eq!(body["error"], "not_found");
    let (_, theirs) = api.get("/api/purchases", &bob).await;
    assert_eq!(theirs["pagination"]["totalCount"], 0);
    let (_, pro) = api.get("/api/pro/entitlement", &bob).await;
    assert_eq!(pro["userId"], bob.as_str());
    assert_eq!(pro["isPro"], false);
    assert_eq!(pro["status"], "none");
    let (status, access) = api.get("/api/access/pro", &bob).await;
    assert_eq!(status, 403);
    assert_eq!(access, json!({"allowed": false, "reason": "none"}));

    let (_, pro) = api.get("/api/pro/entitlement", &alice).await;
    assert_eq!(pro["isPro"], true);
    assert_eq!(pro["status"], "active");
    assert_eq!(pro["source"], "purchase");
    let (status, access) = api.get("/api/access/pro", &alice).await;
    assert_eq!((status, access), (200, json!({"allowed": true})));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_miss_reads_postgres_and_refills_the_cache() {
    let api = Api::start(None).await;
    let user = unique("u");
    api.buy(&user, "pro").await;
    assert!(api.cached(&user).await.is_none(), "nothing cached yet");

    let (_, pro) = api.get("/api/pro/entitlement", &user).await;
    assert_eq!(pro["isPro"], true);
    // The refill runs after the answer.
    let cached = system_tests::eventually(
        std::time::Duration::from_secs(5),
        "the read refilled the cache",
        || api.cached(&user),
    )
    .await;
    assert_eq!(cached["userId"], user.as_str());
    assert_eq!(cached["entitlements"][0]["key"], "pro");
    assert!(cached["version"].as_i64().unwrap() >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_postgres_is_down_hits_are_served_and_a_miss_answers_503_with_retry_after() {
    let proxy = system_tests::chaos::ChaosProxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let api = Api::start_with(
        None,
        &system_tests::redis_url(),
        Some(&proxy.addr.to_string()),
    )
    .await;
    let (cached_user, missed_user) = (unique("u"), unique("u"));
    api.buy(&cached_user, "pro").await;
    api.buy(&missed_user, "pro").await;
    let (status, _) = api.get("/api/pro/entitlement", &cached_user).await;
    assert_eq!(status, 200, "the read fills the cache");
    system_tests::eventually(
        std::time::Duration::from_secs(5),
        "the refill after the read",
        || api.cached(&cached_user),
    )
    .await;

    proxy.break_all();
    let (status, pro) = api.get("/api/pro/entitlement", &cached_user).await;
    assert_eq!(
        (status, &pro["isPro"]),
        (200, &json!(true)),
        "a hit needs no Postgres"
    );
    let response = api
        .http
        .get(format!("{}/api/pro/entitlement", api.base))
        .header("Authorization", token(&missed_user))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 503);
    assert_eq!(
        response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("5")
    );
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"], "unavailable");

    proxy.restore();
    let (status, pro) = api.get("/api/pro/entitlement", &missed_user).await;
    assert_eq!((status, &pro["isPro"]), (200, &json!(true)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_hit_is_served_without_postgres_and_a_refresh_after_a_write_changes_the_read() {
    let api = Api::start(None).await;
    let user = unique("u");
    api.buy(&user, "pro").await;
    let id = UserId::parse(&user).unwrap();
    let client = api.pool.get().await.unwrap();
    let stored = processor::store::user_snapshot(&**client, &id)
        .await
        .unwrap();

    // A snapshot that Postgres does not hold (revoked) with a newer version: only Redis has it.
    let mut distinct = stored.clone();
    distinct.version += 100;
    distinct.entitlements[0].status = processor::domain::projection::EntitlementStatus::Revoked;
    assert!(api.cache.write_snapshot(&distinct).await.unwrap());
    let (_, pro) = api.get("/api/pro/entitlement", &user).await;
    assert_eq!(pro["status"], "revoked", "served from the cache");
    let (status, access) = api.get("/api/access/pro", &user).await;
    assert_eq!((status, access["reason"].as_str()), (403, Some("revoked")));

    // A committed change followed by the post-commit refresh is what the next read shows.
    api.cache.invalidate(&user).await;
    api.buy(&user, "team").await;
    let fresh = processor::store::user_snapshot(&**client, &id)
        .await
        .unwrap();
    api.cache.refresh(&fresh).await;
    // The process-memory copy goes with Redis' invalidation push, one network hop later.
    let list = system_tests::eventually(
        std::time::Duration::from_secs(3),
        "the refreshed entry served",
        || async {
            let (_, list) = api.get("/api/entitlements", &user).await;
            let keys: Vec<_> = list["entitlements"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["key"].as_str().unwrap().to_owned())
                .collect();
            (keys == ["pro", "team"]).then_some(list)
        },
    )
    .await;
    assert!(
        list["entitlements"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["status"] == "active" && e["active"] == true)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entitlement_past_its_expiry_reads_as_expired_while_the_row_still_says_active() {
    let api = Api::start(None).await;
    let user = unique("u");
    api.buy(&user, "pro").await;
    let client = api.pool.get().await.unwrap();
    client
        .execute(
            "UPDATE entitlements SET expires_at = now() - interval '1 minute' WHERE user_id = $1",
            &[&user],
        )
        .await
        .unwrap();
    let (_, pro) = api.get("/api/pro/entitlement", &user).await;
    assert_eq!(pro["status"], "expired");
    assert_eq!(pro["isPro"], false);
    assert!(pro["expiresAt"].is_string());
    let (status, access) = api.get("/api/access/pro", &user).await;
    assert_eq!(status, 403);
    assert_eq!(access["reason"], "expired");
    // The stored row and the cached copy are untouched: the status is decided at read time.
    let cached = system_tests::eventually(std::time::Duration::from_secs(5), "the refill", || {
        api.cached(&user)
    })
    .await;
    assert_eq!(cached["entitlements"][0]["status"], "active");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purchases_are_paged_newest_first_and_filtered_by_status() {
    let api = Api::start(None).await;
    let user = unique("u");
    let client = api.pool.get().await.unwrap();
    for i in 0..5 {
        let status = if i % 2 == 0 { "completed" } else { "refunded" };
        client
            .execute(
                "INSERT INTO purchases (user_id, product_key, checkout_session_id, status, created_at)
                 VALUES ($1, $2, $3, $4, now() - make_interval(mins => $5))",
                &[&user, &format!("p{i}"), &unique("cs"), &status, &(10 - i)],
            )
            .await
            .unwrap();
    }
    let (status, page) = api.get("/api/purchases?page=1&pageSize=2", &user).await;
    assert_eq!(status, 200);
    assert_eq!(
        page["pagination"],
        json!({"page": 1, "pageSize": 2, "totalCount": 5, "totalPages": 3})
    );
    let keys = |page: &serde_json::Value| -> Vec<String> {
        page["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["productKey"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(keys(&page), ["p4", "p3"]);
    let (_, last) = api.get("/api/purchases?page=3&pageSize=2", &user).await;
    assert_eq!(keys(&last), ["p0"]);
    let (_, beyond) = api.get("/api/purchases?page=9&pageSize=2", &user).await;
    assert_eq!(keys(&beyond), Vec::<String>::new());

    let (_, refunded) = api.get("/api/purchases?status=refunded", &user).await;
    assert_eq!(keys(&refunded), ["p3", "p1"]);
    assert_eq!(refunded["pagination"]["totalCount"], 2);
    assert_eq!(refunded["pagination"]["pageSize"], 20);
    let first = &refunded["data"][0];
    for field in [
        "id",
        "productKey",
        "status",
        "amountPaidCents",
        "currency",
        "platformFeeCents",
        "organizationFeeCents",
        "creatorPayoutCents",
        "checkoutSessionId",
        "paymentIntentId",
        "purchasedAt",
        "refundedAt",
        "refundAmountCents",
        "refundReason",
        "createdAt",
    ] {
        assert!(first.get(field).is_some(), "{field} missing from {first}");
    }

    for bad in [
        "page=0",
        "page=x",
        "pageSize=0",
        "pageSize=101",
        "status=paid",
    ] {
        let (status, body) = api.get(&format!("/api/purchases?{bad}"), &user).await;
        assert_eq!(status, 400, "{bad}");
        assert_eq!(body["error"], "bad_request");
    }
    let (status, _) = api.get("/api/purchases/not-a-number", &user).await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_served_openapi_document_lists_every_route() {
    let api = Api::start(None).await;
    let (status, doc) = api.send(Method::GET, "/openapi.json", None, None).await;
    assert_eq!(status, 200);
    assert_eq!(doc, processor::api::openapi::document());
    for route in processor::api::routes() {
        let method = route.method.as_str().to_lowercase();
        assert!(
            doc["paths"][route.path][&method].is_object(),
            "{method} {} undocumented",
            route.path
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_serves_the_api_next_to_the_operational_routes() {
    let db = system_tests::db::TestDb::create().await;
    let redis = system_tests::redis_url();
    let amqp = system_tests::amqp_url();
    let env = shared::config::Env::from_pairs([
        ("DATABASE_URL", db.url.as_str()),
        ("REDIS_URL", redis.as_str()),
        ("AMQP_URL", amqp.as_str()),
        ("AUTH_JWT_SECRET", SECRET),
        ("STRIPE_PRICE_PRO_LIFETIME", "price_pro"),
    ]);
    let config = processor::config::Config::from_env(&env).unwrap();
    let api = processor::api::ApiConfig::from_env(&env, &config).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let service = tokio::spawn(processor::cli::serve_with_api(
        config,
        Some(api),
        listener,
        async move {
            let _ = stopped.await;
        },
        false,
    ));
    let http = reqwest::Client::new();
    let user = unique("u");
    let pro = system_tests::eventually(
        std::time::Duration::from_secs(30),
        "API answers",
        || async {
            let response = http
                .get(format!("{base}/api/pro/entitlement"))
                .header("authorization", token(&user))
                .send()
                .await
                .ok()?;
            (response.status() == 200).then_some(response)
        },
    )
    .await;
    let pro: serde_json::Value = pro.json().await.unwrap();
    assert_eq!(pro["userId"], user.as_str());
    let health = http.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    // Without STRIPE_SECRET_KEY the Stripe routes say so instead of failing obscurely.
    let checkout = http
        .post(format!("{base}/api/checkout/session"))
        .header("authorization", token(&user))
        .json(&json!({"productKey": "pro"}))
        .send()
        .await
        .unwrap();
    assert_eq!(checkout.status(), 503);
    let metrics = http.get(format!("{base}/metrics")).send().await.unwrap();
    let metrics = metrics.text().await.unwrap();
    assert!(
        metrics.contains("api_requests_total") && metrics.contains("/api/pro/entitlement"),
        "per-route request metrics"
    );
    let _ = stop.send(());
    service.await.unwrap().unwrap();
}
