//! The entitlement API's Stripe routes against the Stripe fake: checkout, billing portal and
//! restore, with real Postgres and Redis.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod api_common;

use api_common::*;
use processor::api::restore::rate_limit_key;
use serde_json::json;
use shared::ids::UserId;
use shared::samples::{Sample, object};
use system_tests::stripe_fake::{Collection, FakeStripe, Fault};
use system_tests::unique;

fn sample<'a>(user: &'a str, product: &'a str, o: &'a str, subscription: bool) -> Sample<'a> {
    Sample {
        user,
        product,
        object: o,
        amount: 4900,
        created: chrono::Utc::now().timestamp() - 3600,
        subscription,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkout_sends_server_controlled_parameters_and_a_double_click_yields_one_session() {
    let fake = FakeStripe::start().await;
    let api = Api::start(Some(&fake)).await;
    let user = unique("u");

    let (status, first) = api
        .post(
            "/api/checkout/session",
            &user,
            Some(json!({"productKey": "pro"})),
        )
        .await;
    assert_eq!(status, 200, "{first}");
    let (status, second) = api
        .post(
            "/api/checkout/session",
            &user,
            Some(json!({"productKey": "pro"})),
        )
        .await;
    assert_eq!(status, 200, "{second}");
    assert_eq!(first["sessionId"], second["sessionId"]);
    assert!(
        first["url"]
            .as_str()
            .unwrap()
            .starts_with("https://checkout.stripe.com/")
    );
    let expires_at = chrono::DateTime::parse_from_rfc3339(first["expiresAt"].as_str().unwrap())
        .unwrap()
        .timestamp();
    let lifetime = expires_at - chrono::Utc::now().timestamp();
    assert!((1800..=86_400).contains(&lifetime), "{lifetime}");
    assert_eq!(fake.objects(Collection::CheckoutSessions).len(), 1);

    let requests = fake.requests_to("/v1/checkout/sessions");
    assert_eq!(requests.len(), 2);
    let key = requests[0].idempotency_key().unwrap();
    assert_eq!(requests[1].idempotency_key(), Some(key));
    let r = &requests[0];
    let customers = fake.objects(Collection::Customers);
    assert_eq!(customers.len(), 1, "the second click reuses the customer");
    let customer = customers[0]["id"].as_str().unwrap();
    for (param, value) in [
        ("mode", "payment"),
        ("line_items[0][price]", "price_pro"),
        ("line_items[0][quantity]", "1"),
        ("client_reference_id", user.as_str()),
        ("customer", customer),
        ("metadata[user_id]", user.as_str()),
        ("metadata[product_key]", "pro"),
        ("payment_intent_data[metadata][user_id]", user.as_str()),
        ("payment_intent_data[metadata][product_key]", "pro"),
        ("success_url", SUCCESS_URL),
        ("cancel_url", CANCEL_URL),
    ] {
        assert_eq!(r.param(param), Some(value), "{param}");
    }
    assert!(r.param("expires_at").is_some());
    assert_eq!(
        api.count(&format!(
            "SELECT count(*) FROM customers WHERE user_id = '{user}' AND customer_id = '{customer}'"
        ))
        .await,
        1,
        "the customer is mapped to the user for the projection"
    );

    // A subscription product carries its metadata on the subscription.
    let (status, _) = api
        .post(
            "/api/checkout/session",
            &user,
            Some(json!({"productKey": "team"})),
        )
        .await;
    assert_eq!(status, 200);
    let team = fake.requests_to("/v1/checkout/sessions").pop().unwrap();
    assert_eq!(team.param("mode"), Some("subscription"));
    assert_eq!(team.param("line_items[0][price]"), Some("price_team"));
    assert_eq!(
        team.param("subscription_data[metadata][product_key]"),
        Some("team")
    );
    assert_ne!(team.idempotency_key(), Some(key));
    api.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkout_refuses_unknown_products_bad_bodies_and_users_who_already_have_it() {
    let fake = FakeStripe::start().await;
    let api = Api::start(Some(&fake)).await;
    let user = unique("u");
    let (status, body) = api
        .post(
            "/api/checkout/session",
            &user,
            Some(json!({"productKey": "gold"})),
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (404, Some("unknown_product"))
    );
    let (status, body) = api
        .post(
            "/api/checkout/session",
            &user,
            Some(json!({"product": "pro"})),
        )
        .await;
    assert_eq!((status, body["error"].as_str()), (400, Some("bad_request")));

    api.buy(&user, "pro").await;
    let (status, body) = api
        .post(
            "/api/checkout/session",
            &user,
            Some(json!({"productKey": "pro"})),
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (409, Some("already_entitled"))
    );
    assert!(fake.requests().is_empty(), "Stripe was never called");
    api.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stripe_failures_give_502_with_a_generic_message() {
    let fake = FakeStripe::start().await;
    let api = Api::start(Some(&fake)).await;
    let user = unique("u");
    // More failures than the client's retries.
    fake.inject(Fault::ServerErrorShouldRetry, 10);
    let (status, body) = api
        .post(
            "/api/checkout/session",
            &user,
            Some(json!({"productKey": "pro"})),
        )
        .await;
    assert_eq!(status, 502);
    assert_eq!(body["error"], "stripe_unavailable");
    assert!(
        !body["message"].as_str().unwrap().contains("Stripe's end"),
        "{body}"
    );
    api.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_billing_portal_needs_a_customer_and_returns_its_url() {
    let fake = FakeStripe::start().await;
    let api = Api::start(Some(&fake)).await;
    let user = unique("u");
    let (status, body) = api.post("/api/billing/portal", &user, None).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (404, Some("no_billing_account"))
    );

    let customer = fake.seed_customer(&user, None);
    api.map_customer(&customer, &user).await;
    let (status, body) = api.post("/api/billing/portal", &user, None).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body["url"]
            .as_str()
            .unwrap()
            .starts_with("https://billing.stripe.com/")
    );
    let request = fake
        .requests_to("/v1/billing_portal/sessions")
        .pop()
        .unwrap();
    assert_eq!(request.param("customer"), Some(customer.as_str()));
    assert_eq!(request.param("return_url"), Some(PORTAL_RETURN_URL));
    api.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_reprojects_a_paid_checkout_is_rate_limited_and_idempotent() {
    let fake = FakeStripe::start().await;
    let api = Api::start(Some(&fake)).await;
    let user = unique("u");
    let o = unique("o");
    let s = sample(&user, "pro", &o, false);
    fake.seed(
        Collection::CheckoutSessions,
        object("checkout.session.completed", &s),
    );
    fake.seed(
        Collection::PaymentIntents,
        object("payment_intent.succeeded", &s),
    );
    api.map_customer(&format!("cus_{o}"), &user).await;
    let (_, before) = api.get("/api/pro/entitlement", &user).await;
    assert_eq!(before["status"], "none");

    let (status, body) = api.post("/api/pro/restore", &user, None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["restored"], true);
    assert_eq!(body["entitlement"]["isPro"], true);
    assert_eq!(body["entitlement"]["status"], "active");
    assert_eq!(body["entitlement"]["userId"], user.as_str());
    let (_, after) = api.get("/api/pro/entitlement", &user).await;
    assert_eq!(
        after["isPro"], true,
        "the cache was refreshed after the restore"
    );
    assert_eq!(
        fake.requests_to("/v1/subscriptions")[0].param("status"),
        Some("all")
    );

    let (status, body) = api.post("/api/pro/restore", &user, None).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (429, Some("rate_limited"))
    );

    let counts = || async {
        (
            api.count("SELECT count(*) FROM purchases").await,
            api.count("SELECT count(*) FROM processed_events").await,
            api.count("SELECT version FROM user_entitlement_versions")
                .await,
        )
    };
    let first = counts().await;
    assert_eq!(first.0, 1);
    // The window passes (deleting the key stands in for waiting 10 s).
    api.forget(&rate_limit_key(&UserId::parse(&user).unwrap()))
        .await;
    let (status, body) = api.post("/api/pro/restore", &user, None).await;
    assert_eq!(status, 200);
    assert_eq!(body["entitlement"]["status"], "active");
    assert_eq!(
        counts().await,
        first,
        "an unchanged Stripe state applies nothing twice"
    );
    api.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_grants_an_active_subscription_and_nothing_without_a_customer() {
    let fake = FakeStripe::start().await;
    let api = Api::start(Some(&fake)).await;
    let user = unique("u");

    let (status, body) = api.post("/api/pro/restore", &user, None).await;
    assert_eq!(status, 200);
    assert_eq!(body["restored"], false);
    assert_eq!(body["entitlement"]["status"], "none");
    assert!(fake.requests().is_empty(), "no customer, no Stripe call");

    let o = unique("o");
    let s = sample(&user, "team", &o, true);
    fake.seed(
        Collection::Subscriptions,
        object("customer.subscription.updated", &s),
    );
    api.map_customer(&format!("cus_{o}"), &user).await;
    api.forget(&rate_limit_key(&UserId::parse(&user).unwrap()))
        .await;
    let (status, body) = api.post("/api/pro/restore", &user, None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["restored"], true);
    let (status, access) = api.get("/api/access/team", &user).await;
    assert_eq!((status, access), (200, json!({"allowed": true})));
    let (_, list) = api.get("/api/entitlements", &user).await;
    assert_eq!(list["entitlements"][0]["source"], "subscription");
    assert!(list["entitlements"][0]["expiresAt"].is_string());
    api.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_applies_a_refund_it_finds_in_stripe() {
    let fake = FakeStripe::start().await;
    let api = Api::start(Some(&fake)).await;
    let user = unique("u");
    let o = unique("o");
    let s = sample(&user, "pro", &o, false);
    // The purchase was projected from its webhook; the refund's webhook was lost.
    api.apply(&shared::samples::event(
        &unique("evt"),
        "checkout.session.completed",
        &s,
    ))
    .await;
    let (_, before) = api.get("/api/pro/entitlement", &user).await;
    assert_eq!(before["isPro"], true);
    for (collection, ty) in [
        (Collection::CheckoutSessions, "checkout.session.completed"),
        (Collection::PaymentIntents, "payment_intent.succeeded"),
        (Collection::Charges, "charge.refunded"),
    ] {
        fake.seed(collection, object(ty, &s));
    }
    api.map_customer(&format!("cus_{o}"), &user).await;

    let (status, body) = api.post("/api/pro/restore", &user, None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["entitlement"]["isPro"], false);
    assert_eq!(body["entitlement"]["status"], "revoked");
    let (_, purchases) = api.get("/api/purchases", &user).await;
    assert_eq!(
        purchases["pagination"]["totalCount"], 1,
        "no duplicate purchase"
    );
    assert_eq!(purchases["data"][0]["status"], "refunded");
    let (status, access) = api.get("/api/access/pro", &user).await;
    assert_eq!((status, access["reason"].as_str()), (403, Some("revoked")));
    api.cleanup().await;
}
