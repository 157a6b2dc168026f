//! The entitlement API's Stripe routes against the Stripe fake: checkout, billing portal and
//! restore, with real Postgres and Redis.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::json;
use shared::samples::{Sample, object};
use system_tests::api::*;
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

/// A customer known to Stripe and mapped to `user`, as a previous checkout would leave it.
async fn link_customer(fake: &FakeStripe, api: &Api, customer: &str, user: &str) {
    fake.seed_customer_with_id(customer, user, None);
    api.map_customer(customer, user).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkout_sends_server_controlled_parameters_and_a_double_click_yields_one_session() {
    let fake = FakeStripe::start().await;
    let api = Api::start(Some(&fake)).await;
    let user = unique("u");

    let (status, first) = api.checkout(&user, "pro").await;
    assert_eq!(status, 200, "{first}");
    let (status, second) = api.checkout(&user, "pro").await;
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
    let (status, _) = api.checkout(&user, "team").await;
    assert_eq!(status, 200);
    let team = fake.requests_to("/v1/checkout/sessions").pop().unwrap();
    assert_eq!(team.param("mode"), Some("subscription"));
    assert_eq!(team.param("line_items[0][price]"), Some("price_team"));
    assert_eq!(
        team.param("subscription_data[metadata][product_key]"),
        Some("team")
    );
    assert_ne!(team.idempotency_key(), Some(key));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkout_refuses_unknown_products_bad_bodies_and_users_who_already_have_it() {
    let fake = FakeStripe::start().await;
    let api = Api::start(Some(&fake)).await;
    let user = unique("u");
    let (status, body) = api.checkout(&user, "gold").await;
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
    let (status, body) = api.checkout(&user, "pro").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (409, Some("already_entitled"))
    );
    assert!(fake.requests().is_empty(), "Stripe was never called");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stripe_failures_give_502_with_a_generic_message() {
    let fake = FakeStripe::start().await;
    let api = Api::start(Some(&fake)).await;
    let user = unique("u");
    // More failures than the client's retries.
    fake.inject(Fault::ServerErrorShouldRetry, 10);
    let (status, body) = api.checkout(&user, "pro").await;
    assert_eq!(status, 502);
    assert_eq!(body["error"], "stripe_unavailable");
    assert!(
        !body["message"].as_str().unwrap().contains("Stripe's end"),
        "{body}"
    );
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
    link_customer(&fake, &api, &format!("cus_{o}"), &user).await;
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
    let (status, body) = api.restore_again(&user).await;
    assert_eq!(status, 200);
    assert_eq!(body["entitlement"]["status"], "active");
    assert_eq!(
        counts().await,
        first,
        "an unchanged Stripe state applies nothing twice"
    );
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
    link_customer(&fake, &api, &format!("cus_{o}"), &user).await;
    let (status, body) = api.restore_again(&user).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["restored"], true);
    let (status, access) = api.get("/api/access/team", &user).await;
    assert_eq!((status, access), (200, json!({"allowed": true})));
    let (_, list) = api.get("/api/entitlements", &user).await;
    assert_eq!(list["entitlements"][0]["source"], "subscription");
    assert!(list["entitlements"][0]["expiresAt"].is_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_applies_a_refund_it_finds_in_stripe() {
    let fake = FakeStripe::start().await;
    let api = Api::start(Some(&fake)).await;
    let user = unique("u");
    let o = unique("o");
    let s = sample(&user, "pro", &o, false);
    // The purchase was projected from its webhook; the refund's webhook was lost.
    api.apply_sample("checkout.session.completed", &s).await;
    let (_, before) = api.get("/api/pro/entitlement", &user).await;
    assert_eq!(before["isPro"], true);
    for (collection, ty) in [
        (Collection::CheckoutSessions, "checkout.session.completed"),
        (Collection::PaymentIntents, "payment_intent.succeeded"),
        (Collection::Charges, "charge.refunded"),
    ] {
        fake.seed(collection, object(ty, &s));
    }
    link_customer(&fake, &api, &format!("cus_{o}"), &user).await;

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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_reads_the_disputes_of_disputed_charges_from_the_disputes_list() {
    let fake = FakeStripe::start().await;
    let api = Api::start(Some(&fake)).await;
    let user = unique("u");
    let o = unique("o");
    let s = sample(&user, "pro", &o, false);
    // The purchase was projected; the dispute's webhooks were lost.
    api.apply_sample("checkout.session.completed", &s).await;
    let mut charge = object("charge.refunded", &s);
    charge["refunded"] = json!(false);
    charge["amount_refunded"] = json!(0);
    charge["disputed"] = json!(true);
    fake.seed(Collection::Charges, charge);
    // Current API versions carry no dispute on the charge: it is listed by charge id.
    let mut dispute = object("charge.dispute.created", &s);
    dispute["created"] = json!(chrono::Utc::now().timestamp() - 60);
    fake.seed(Collection::Disputes, dispute.clone());
    // Another charge's dispute must not be read as this one's.
    let other = unique("o");
    fake.seed(
        Collection::Disputes,
        object(
            "charge.dispute.closed",
            &sample(&unique("u"), "pro", &other, false),
        ),
    );
    link_customer(&fake, &api, &format!("cus_{o}"), &user).await;

    let (status, body) = api.post("/api/pro/restore", &user, None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (
            body["entitlement"]["isPro"].as_bool(),
            body["entitlement"]["status"].as_str()
        ),
        (Some(false), Some("suspended")),
        "{body}"
    );
    let listed = fake.requests_to("/v1/disputes");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].param("charge"), Some(format!("ch_{o}").as_str()));

    // The dispute is won later; the next restore closes it and access comes back.
    dispute["status"] = json!("won");
    fake.update(Collection::Disputes, dispute);
    let (status, body) = api.restore_again(&user).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["entitlement"]["status"], "active", "{body}");
    let (_, purchases) = api.get("/api/purchases", &user).await;
    assert_eq!(purchases["data"][0]["status"], "completed", "{purchases}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkout_replaces_a_customer_stripe_no_longer_knows_once() {
    let fake = FakeStripe::start().await;
    let api = Api::start(Some(&fake)).await;
    let user = unique("u");
    let stale = format!("cus_{}", unique("gone"));
    // Mapped here, deleted in Stripe (as from the Dashboard).
    api.map_customer(&stale, &user).await;

    let (status, first) = api.checkout(&user, "pro").await;
    assert_eq!(status, 200, "{first}");
    let customers = fake.objects(Collection::Customers);
    assert_eq!(customers.len(), 1, "one replacement customer");
    let replacement = customers[0]["id"].as_str().unwrap().to_owned();
    assert_eq!(customers[0]["metadata"]["user_id"], user.as_str());
    let sessions = fake.requests_to("/v1/checkout/sessions");
    assert_eq!(sessions.len(), 2, "the refused attempt, then the retry");
    assert_eq!(sessions[0].param("customer"), Some(stale.as_str()));
    assert_eq!(sessions[1].param("customer"), Some(replacement.as_str()));
    assert_ne!(
        sessions[0].idempotency_key(),
        sessions[1].idempotency_key(),
        "the retry is a new request, not a replay with other parameters"
    );
    assert_eq!(
        api.count(&format!(
            "SELECT count(*) FROM customers WHERE customer_id = '{stale}' AND gone_at IS NOT NULL"
        ))
        .await,
        1,
        "the stale customer is marked gone and kept for its past events"
    );

    // A double click goes straight to the replacement and yields the same session.
    let (status, second) = api.checkout(&user, "pro").await;
    assert_eq!(status, 200, "{second}");
    assert_eq!(first["sessionId"], second["sessionId"]);
    assert_eq!(fake.requests_to("/v1/checkout/sessions").len(), 3);
    assert_eq!(fake.objects(Collection::Customers).len(), 1);

    // The billing portal now opens for the replacement.
    let (status, _) = api.post("/api/billing/portal", &user, None).await;
    assert_eq!(status, 200);
    let portal = fake
        .requests_to("/v1/billing_portal/sessions")
        .pop()
        .unwrap();
    assert_eq!(portal.param("customer"), Some(replacement.as_str()));

    // The replacement goes missing too: it is replaced in turn, under a new key.
    let deleted = api
        .http
        .delete(format!("{}/v1/customers/{replacement}", fake.base_url()))
        .bearer_auth(fake.secret_key())
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 200);
    let (status, _) = api.checkout(&user, "team").await;
    assert_eq!(status, 200);
    let customers = fake.objects(Collection::Customers);
    assert_eq!(customers.len(), 1, "{customers:?}");
    assert_ne!(customers[0]["id"].as_str(), Some(replacement.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customer_stripe_no_longer_knows_is_no_billing_account_and_restores_nothing() {
    let fake = FakeStripe::start().await;
    let api = Api::start(Some(&fake)).await;
    let user = unique("u");
    let stale = format!("cus_{}", unique("gone"));
    api.map_customer(&stale, &user).await;

    let (status, body) = api.post("/api/billing/portal", &user, None).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (404, Some("no_billing_account")),
        "{body}"
    );
    let (status, body) = api.post("/api/pro/restore", &user, None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["restored"], false);
    assert_eq!(
        fake.requests_to("/v1/charges").len(),
        0,
        "a customer marked gone is not read again"
    );
    assert_eq!(
        api.count("SELECT count(*) FROM customers WHERE gone_at IS NOT NULL")
            .await,
        1
    );

    // Marked by restore alone (no portal call first), too.
    let other = unique("u");
    let lost = format!("cus_{}", unique("gone"));
    api.map_customer(&lost, &other).await;
    let (status, body) = api.post("/api/pro/restore", &other, None).await;
    assert_eq!(
        (status, body["restored"].as_bool()),
        (200, Some(false)),
        "{body}"
    );
    assert_eq!(
        api.count(&format!(
            "SELECT count(*) FROM customers WHERE customer_id = '{lost}' AND gone_at IS NOT NULL"
        ))
        .await,
        1
    );
}
