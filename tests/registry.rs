//! The product registry end to end, against the Stripe fake, real Postgres and Redis: content
//! items registered through the admin API are sold through Checkout `price_data`, open their
//! content key to their buyer only, show in the buyer's purchases with the split, cannot be
//! bought twice, and stay open to buyers once unpublished; subscriptions follow their price
//! (plan changes in the billing portal), several sources grant one key, and payments that match
//! no registered product grant nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::{Value, json};
use system_tests::api::*;
use system_tests::stripe_fake::{Collection, FakeStripe};
use system_tests::unique;

const DAY: i64 = 86_400;

/// A few days ago: the periods of the subscriptions below are still running.
fn t0() -> i64 {
    chrono::Utc::now().timestamp() - 3 * DAY
}

fn admin() -> String {
    format!("Bearer {ADMIN_TOKEN}")
}

async fn admin_send(
    api: &Api,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    api.send(method, path, Some(&admin()), body).await
}

/// A body-less admin request on the product `key`.
async fn on_product(api: &Api, method: reqwest::Method, key: &str) -> (u16, Value) {
    admin_send(api, method, &format!("/v1/products/{key}"), None).await
}

async fn put_product(api: &Api, key: &str, body: Value) -> (u16, Value) {
    admin_send(
        api,
        reqwest::Method::PUT,
        &format!("/v1/products/{key}"),
        Some(body),
    )
    .await
}

fn envelope(id: &str, event_type: &str, created: i64, object: Value) -> Value {
    json!({ "id": id, "object": "event", "type": event_type, "created": created,
        "api_version": "2025-03-31.basil", "livemode": false, "pending_webhooks": 1,
        "request": { "id": null, "idempotency_key": null }, "data": { "object": object } })
}

/// What Stripe sends when the Checkout Session `session` (as the fake recorded it) is paid.
fn paid(session: &Value, created: i64) -> Value {
    let mut object = session.clone();
    object["status"] = json!("complete");
    object["payment_status"] = json!("paid");
    object["payment_intent"] = json!(format!("pi_{}", session["id"].as_str().unwrap()));
    envelope(
        &unique("evt"),
        "checkout.session.completed",
        created,
        object,
    )
}

/// A subscription of `user` through `customer`, bought through our checkout as `bought_as`.
struct Sub {
    id: String,
    customer: String,
    user: String,
    bought_as: &'static str,
}

impl Sub {
    fn new(user: &str, bought_as: &'static str) -> Self {
        Self {
            id: unique("sub"),
            customer: unique("cus"),
            user: user.to_owned(),
            bought_as,
        }
    }

    /// Its `event_type` event in `status` on `price` (3 seats), as Stripe sends it.
    fn event(&self, event_type: &str, created: i64, status: &str, price: &str) -> Value {
        envelope(
            &unique("evt"),
            event_type,
            created,
            json!({ "id": self.id, "object": "subscription", "customer": self.customer,
                "status": status, "cancel_at_period_end": false,
                "ended_at": if status == "canceled" { json!(created) } else { Value::Null },
                "metadata": { "user_id": self.user, "product_key": self.bought_as },
                "items": { "data": [ { "id": "si_1", "quantity": 3,
                    "current_period_end": created + 30 * DAY, "price": { "id": price } } ] } }),
        )
    }
}

/// Status and `error` code of an answer.
fn code(answer: &(u16, Value)) -> (u16, Option<&str>) {
    (answer.0, answer.1["error"].as_str())
}

async fn access(api: &Api, user: &str, key: &str) -> u16 {
    api.get(&format!("/api/access/{key}"), user).await.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_item_registered_by_the_app_is_sold_opened_to_its_buyer_and_kept_after_unpublishing() {
    let fake = FakeStripe::start().await;
    let api = Api::start(Some(&fake)).await;
    let (buyer, other) = (unique("u"), unique("u"));
    let item = unique("item").replace('_', "-");

    let (status, product) = put_product(
        &api,
        &item,
        json!({ "title": "Lesson one", "amountCents": 999, "currency": "usd",
                "creatorId": "creator_1", "platformFeeBps": 1000, "organizationFeeBps": 500 }),
    )
    .await;
    assert_eq!(status, 201, "{product}");
    assert_eq!(product["grants"], json!([format!("content:{item}")]));
    assert_eq!(product["status"], "published");
    let (status, got) = on_product(&api, reqwest::Method::GET, &item).await;
    assert_eq!((status, &got), (200, &product));

    // Checkout with price_data at the item's amount, currency and title.
    let (status, answer) = api.checkout(&buyer, &item).await;
    assert_eq!(status, 200, "{answer}");
    let request = fake.requests_to("/v1/checkout/sessions").pop().unwrap();
    for (param, value) in [
        ("mode", "payment"),
        ("line_items[0][price_data][currency]", "usd"),
        ("line_items[0][price_data][unit_amount]", "999"),
        (
            "line_items[0][price_data][product_data][name]",
            "Lesson one",
        ),
        ("metadata[product_key]", item.as_str()),
    ] {
        assert_eq!(request.param(param), Some(value), "{param}");
    }
    assert_eq!(request.param("line_items[0][price]"), None);
    let session = fake
        .objects(Collection::CheckoutSessions)
        .into_iter()
        .find(|s| s["id"] == answer["sessionId"])
        .unwrap();
    // The worker reads the line items the webhook lacks: the ad-hoc price of price_data.
    let stripe = processor::stripe::StripeClient::new(fake.client_config()).unwrap();
    let completed = paid(&session, chrono::Utc::now().timestamp());
    let event = processor::domain::events::parse(completed.to_string().as_bytes()).unwrap();
    assert!(processor::complete::needs_stripe(&event, true));
    let event = processor::complete::complete(Some(&stripe), event)
        .await
        .unwrap();
    let processor::domain::events::EventKind::CheckoutSessionCompleted(s) = &event.kind else {
        panic!("wrong kind")
    };
    assert!(
        s.price_id
            .as_deref()
            .is_some_and(|p| p.starts_with("price_adhoc"))
    );
    apply_event(&api, &buyer, event).await;
    // The worker refreshes the cache after its commit; this test applies directly.
    api.cache.invalidate(&buyer).await;

    let key = format!("content:{item}");
    assert_eq!(access(&api, &buyer, &key).await, 200);
    assert_eq!(access(&api, &other, &key).await, 403, "the buyer only");
    let (_, purchases) = api.get("/api/purchases", &buyer).await;
    let p = &purchases["data"][0];
    assert_eq!(p["productKey"], item.as_str());
    assert_eq!(p["title"], "Lesson one");
    assert_eq!(p["status"], "completed");
    assert_eq!(
        (&p["amountPaidCents"], &p["currency"]),
        (&json!(999), &json!("usd"))
    );
    assert_eq!(
        (
            &p["platformFeeCents"],
            &p["organizationFeeCents"],
            &p["creatorPayoutCents"]
        ),
        (&json!(99), &json!(49), &json!(851)),
        "the split follows the item's rule and adds up"
    );

    let answer = api.checkout(&buyer, &item).await;
    assert_eq!(code(&answer), (409, Some("already_entitled")));

    // Unpublished: nobody can buy it, the buyer keeps it.
    let (status, body) = on_product(&api, reqwest::Method::DELETE, &item).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("unpublished"))
    );
    let answer = api.checkout(&other, &item).await;
    assert_eq!(code(&answer), (404, Some("unknown_product")));
    api.cache.invalidate(&buyer).await;
    assert_eq!(access(&api, &buyer, &key).await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_routes_validate_and_refuse_what_would_break_buyers() {
    let fake = FakeStripe::start().await;
    let api = Api::start(Some(&fake)).await;
    let user = unique("u");

    let (status, body) = put_product(&api, "x", json!({ "amountCents": 100 })).await;
    assert_eq!(
        (status, body["error"].as_str(), body["field"].as_str()),
        (422, Some("validation_failed"), Some("currency"))
    );
    let (status, body) = put_product(&api, "x", json!({ "priceId": "nope" })).await;
    assert_eq!((status, body["field"].as_str()), (422, Some("priceId")));
    let (status, body) = put_product(
        &api,
        "x",
        json!({ "amountCents": 1, "currency": "usd", "platformFeeBps": 20000 }),
    )
    .await;
    assert_eq!(
        (status, body["field"].as_str()),
        (422, Some("platformFeeBps"))
    );
    let (status, body) = put_product(
        &api,
        "x",
        json!({ "amountCents": 1, "currency": "usd", "colour": "red" }),
    )
    .await;
    assert_eq!(status, 422, "{body}");
    let (status, _) = api
        .send(
            reqwest::Method::PUT,
            "/v1/products/x",
            Some(&token(&user)),
            Some(json!({})),
        )
        .await;
    assert_eq!(status, 401, "a user token is not the admin token");
    let (status, body) =
        put_product(&api, "pro", json!({ "amountCents": 1, "currency": "usd" })).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (409, Some("configured_product"))
    );

    // A free item cannot be checked out.
    let (status, _) = put_product(
        &api,
        "free-item",
        json!({ "amountCents": 0, "currency": "usd" }),
    )
    .await;
    assert_eq!(status, 201);
    let answer = api.checkout(&user, "free-item").await;
    assert_eq!(code(&answer), (422, Some("free_product")));

    // A price another product is sold at cannot be given to a second one.
    let (status, _) = put_product(
        &api,
        "gold-monthly",
        json!({ "priceId": "price_gold", "mode": "subscription", "grants": ["gold"] }),
    )
    .await;
    assert_eq!(status, 201);
    let answer = put_product(
        &api,
        "silver-monthly",
        json!({ "priceId": "price_gold", "mode": "subscription", "grants": ["silver"] }),
    )
    .await;
    assert_eq!(code(&answer), (409, Some("price_taken")));
    let (status, list) = admin_send(&api, reqwest::Method::GET, "/v1/products?limit=2", None).await;
    assert_eq!(status, 200);
    assert_eq!(list["data"].as_array().unwrap().len(), 2);
    assert!(list["nextAfter"].is_string());
    // A cursor that is no product key (a NUL byte was a 500) and a malformed limit: 400 JSON.
    for query in [
        "after=%00",
        "after=%C3%B2%00",
        "limit=null",
        "limit=null&limit=null",
    ] {
        let (status, body) = admin_send(
            &api,
            reqwest::Method::GET,
            &format!("/v1/products?{query}"),
            None,
        )
        .await;
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some("bad_request")),
            "{query}: {body}"
        );
    }
}

/// A paid one-time session of `user` at `amount` `currency`, with `extra` fields merged in.
fn session_paid(user: &str, amount: i64, currency: &str, created: i64, extra: Value) -> Value {
    let o = unique("o");
    let mut object = json!({ "id": format!("cs_{o}"), "object": "checkout.session",
        "mode": "payment", "payment_status": "paid", "status": "complete",
        "customer": format!("cus_{o}"), "payment_intent": format!("pi_{o}"),
        "client_reference_id": user, "amount_total": amount, "currency": currency,
        "metadata": {} });
    for (field, value) in extra.as_object().unwrap() {
        object[field] = value.clone();
    }
    envelope(
        &unique("evt"),
        "checkout.session.completed",
        created,
        object,
    )
}

/// A paid Payment Link session of `user` at `price` (its line items expanded, as the worker reads
/// them), without our metadata.
fn link_paid(user: &str, price: &str, amount: i64, created: i64) -> Value {
    let items = json!({ "object": "list", "has_more": false,
        "data": [ { "object": "item", "quantity": 1, "price": { "id": price } } ] });
    session_paid(user, amount, "usd", created, json!({ "line_items": items }))
}

/// A paid session of our checkout for the item `key` at `amount` `currency` (`price_data`).
fn item_paid(user: &str, key: &str, amount: i64, currency: &str, created: i64) -> Value {
    let metadata = json!({ "user_id": user, "product_key": key });
    session_paid(
        user,
        amount,
        currency,
        created,
        json!({ "metadata": metadata }),
    )
}

async fn recompute_all(api: &Api) {
    processor::store::recompute_stored(&api.pool, None)
        .await
        .unwrap();
}

/// `processor` start-up with `STRIPE_PRICE_PRO_LIFETIME=price` (and the tests' `team`).
async fn configure_pro_price(
    api: &Api,
    price: &str,
) -> Result<(), processor::registry::RegistryError> {
    let file = "[products.team]\nprice = \"price_team\"\nmode = \"subscription\"\nentitlement = \"team\"\n";
    let catalog =
        processor::catalog::Catalog::from_sources(Some(price), Some(("catalog.toml", file)))
            .unwrap();
    processor::registry::sync_config(&api.pool, &catalog).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_sold_stays_sold_through_price_changes_retired_prices_and_new_amounts() {
    let api = Api::start(None).await;
    let now = chrono::Utc::now().timestamp();
    let buyers: Vec<String> = (0..3).map(|_| unique("u")).collect();
    for buyer in &buyers {
        api.apply(&link_paid(buyer, "price_pro", 4900, now - DAY))
            .await;
        assert_eq!(access(&api, buyer, "pro").await, 200);
    }

    // The price is raised: STRIPE_PRICE_PRO_LIFETIME moves to a new price, as it must.
    configure_pro_price(&api, "price_pro_raised").await.unwrap();
    recompute_all(&api).await;
    for buyer in &buyers {
        api.cache.invalidate(buyer).await;
        let (_, pro) = api.get("/api/pro/entitlement", buyer).await;
        assert_eq!(
            pro["isPro"], true,
            "{buyer} paid what was asked at the time"
        );
    }
    let (_, pro) = on_product(&api, reqwest::Method::GET, "pro").await;
    assert_eq!(pro["priceId"], "price_pro_raised");
    assert_eq!(pro["retiredPriceIds"], json!(["price_pro"]));
    // An old Payment Link still sells at the old price; the new price sells too.
    let (late, new) = (unique("u"), unique("u"));
    api.apply(&link_paid(&late, "price_pro", 4900, now)).await;
    api.apply(&link_paid(&new, "price_pro_raised", 9900, now))
        .await;
    for user in [&late, &new] {
        assert_eq!(access(&api, user, "pro").await, 200, "{user}");
    }
    // Retired is not free: no other product, configured or registered, may take the price.
    assert_eq!(
        code(
            &put_product(
                &api,
                "pro-copy",
                json!({ "priceId": "price_pro", "grants": ["pro"] })
            )
            .await
        ),
        (409, Some("price_taken"))
    );
    let err = processor::registry::sync_config(
        &api.pool,
        &processor::catalog::Catalog::from_sources(
            Some("price_pro_raised"),
            Some((
                "catalog.toml",
                "[products.team]\nprice = \"price_pro\"\nmode = \"subscription\"\nentitlement = \"team\"\n",
            )),
        )
        .unwrap(),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("price_pro"), "{err}");

    // An item's amount, then its currency, change; its buyer keeps it.
    let item = unique("item").replace('_', "-");
    let key = format!("content:{item}");
    let (status, _) = put_product(
        &api,
        &item,
        json!({ "amountCents": 1500, "currency": "usd" }),
    )
    .await;
    assert_eq!(status, 201);
    let (reader, slow, cheap) = (unique("u"), unique("u"), unique("u"));
    api.apply(&item_paid(&reader, &item, 1500, "usd", now))
        .await;
    for change in [
        json!({ "amountCents": 2000, "currency": "usd" }),
        json!({ "amountCents": 1800, "currency": "eur" }),
    ] {
        let (status, body) = put_product(&api, &item, change).await;
        assert_eq!(status, 200, "{body}");
    }
    recompute_all(&api).await;
    api.cache.invalidate(&reader).await;
    assert_eq!(access(&api, &reader, &key).await, 200);
    let (_, product) = on_product(&api, reqwest::Method::GET, &item).await;
    assert_eq!(
        product["retiredAmounts"],
        json!([{ "amountCents": 1500, "currency": "usd" }, { "amountCents": 2000, "currency": "usd" }])
    );
    // A checkout opened at the old amount and paid after the change still grants; an amount
    // the item was never sold at does not.
    api.apply(&item_paid(&slow, &item, 1500, "usd", now + 1))
        .await;
    api.apply(&item_paid(&cheap, &item, 1000, "usd", now + 1))
        .await;
    assert_eq!(access(&api, &slow, &key).await, 200);
    assert_eq!(access(&api, &cheap, &key).await, 403);

    // A subscription plan's price changes: its subscribers stay on the old price and keep it.
    let (status, _) = put_product(
        &api,
        "gold-monthly",
        json!({ "priceId": "price_gold", "mode": "subscription", "grants": ["gold"] }),
    )
    .await;
    assert_eq!(status, 201);
    let subscriber = unique("u");
    let sub = Sub::new(&subscriber, "gold-monthly");
    api.apply(&sub.event(
        "customer.subscription.created",
        t0(),
        "active",
        "price_gold",
    ))
    .await;
    let (status, body) = put_product(
        &api,
        "gold-monthly",
        json!({ "priceId": "price_gold2", "mode": "subscription", "grants": ["gold"] }),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    recompute_all(&api).await;
    // Its renewal on the old price, after the change.
    api.apply(&sub.event(
        "customer.subscription.updated",
        t0() + DAY,
        "active",
        "price_gold",
    ))
    .await;
    api.cache.invalidate(&subscriber).await;
    assert_eq!(access(&api, &subscriber, "gold").await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plans_follow_the_price_and_several_sources_grant_one_key() {
    let api = Api::start(None).await;
    for (key, price, grants) in [
        ("pro-monthly", "price_pro_monthly", "pro"),
        ("team-monthly", "price_team_monthly", "team"),
    ] {
        let (status, body) = put_product(
            &api,
            key,
            json!({ "priceId": price, "mode": "subscription", "grants": [grants] }),
        )
        .await;
        assert_eq!(status, 201, "{body}");
    }
    let user = unique("u");
    let sub = Sub::new(&user, "pro-monthly");
    // The portal switch arrives before the creation, and a stale update after it.
    let switch = sub.event(
        "customer.subscription.updated",
        t0() + 2 * DAY,
        "active",
        "price_team_monthly",
    );
    let created = sub.event(
        "customer.subscription.created",
        t0(),
        "active",
        "price_pro_monthly",
    );
    let stale = sub.event(
        "customer.subscription.updated",
        t0() + DAY,
        "active",
        "price_pro_monthly",
    );
    for event in [&switch, &created, &stale] {
        api.apply(event).await;
    }
    api.cache.invalidate(&user).await;
    assert_eq!(access(&api, &user, "team").await, 200);
    let (_, list) = api.get("/api/entitlements", &user).await;
    let team = &list["entitlements"][0];
    assert_eq!(team["key"], "team");
    assert_eq!(
        team["sources"][0]["quantity"], 3,
        "seats are kept and shown"
    );
    assert_eq!(
        access(&api, &user, "pro").await,
        403,
        "the old plan's key is gone"
    );

    // A lifetime pro purchase and a pro-monthly subscription: ending the subscription keeps pro.
    let buyer = unique("u");
    api.buy(&buyer, "pro").await;
    let monthly = Sub::new(&buyer, "pro-monthly");
    api.apply(&monthly.event(
        "customer.subscription.created",
        t0(),
        "active",
        "price_pro_monthly",
    ))
    .await;
    api.apply(&monthly.event(
        "customer.subscription.deleted",
        t0() + DAY,
        "canceled",
        "price_pro_monthly",
    ))
    .await;
    api.cache.invalidate(&buyer).await;
    let (_, pro) = api.get("/api/pro/entitlement", &buyer).await;
    assert_eq!(
        (pro["isPro"].as_bool(), pro["source"].as_str()),
        (Some(true), Some("purchase"))
    );
    let sources: Vec<_> = pro["sources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["source"].as_str().unwrap(), s["status"].as_str().unwrap()))
        .collect();
    assert_eq!(
        sources,
        [("purchase", "active"), ("subscription", "expired")],
        "the API names every source"
    );

    // A subscription to a price outside the registry grants nothing, and is listed.
    let stranger = unique("u");
    api.apply(&Sub::new(&stranger, "pro-monthly").event(
        "customer.subscription.created",
        t0(),
        "active",
        "price_not_sold_here",
    ))
    .await;
    let (_, list) = api.get("/api/entitlements", &stranger).await;
    assert_eq!(list["entitlements"], json!([]));
    let (status, unmatched) =
        admin_send(&api, reqwest::Method::GET, "/v1/payments/unmatched", None).await;
    assert_eq!(status, 200);
    assert!(
        unmatched
            .as_array()
            .unwrap()
            .iter()
            .any(|u| u["userId"] == stranger.as_str() && u["priceId"] == "price_not_sold_here"),
        "{unmatched}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_dollar_payment_link_checkout_grants_nothing() {
    let api = Api::start(None).await;
    let user = unique("u");
    let o = unique("o");
    // A Payment Link opened with ?client_reference_id=<user>: no product metadata, $1.
    api.apply(&envelope(
        &unique("evt"),
        "checkout.session.completed",
        chrono::Utc::now().timestamp(),
        json!({ "id": format!("cs_{o}"), "object": "checkout.session", "mode": "payment",
            "payment_status": "paid", "status": "complete", "customer": format!("cus_{o}"),
            "payment_intent": format!("pi_{o}"), "client_reference_id": user,
            "amount_total": 100, "currency": "usd", "metadata": {} }),
    ))
    .await;
    let (_, pro) = api.get("/api/pro/entitlement", &user).await;
    assert_eq!(pro["isPro"], false);
    assert_eq!(access(&api, &user, "pro").await, 403);
    let (_, purchases) = api.get("/api/purchases", &user).await;
    assert_eq!(
        purchases["data"][0]["amountPaidCents"], 100,
        "the money trail is kept"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recompute_re_derives_entitlements_after_a_mapping_change() {
    let api = Api::start(None).await;
    let (buyer, bystander) = (unique("u"), unique("u"));
    let (status, _) = put_product(
        &api,
        "bundle",
        json!({ "amountCents": 500, "currency": "usd", "grants": ["content:a"] }),
    )
    .await;
    assert_eq!(status, 201);
    let o = unique("o");
    api.apply(&envelope(
        &unique("evt"),
        "checkout.session.completed",
        chrono::Utc::now().timestamp(),
        json!({ "id": format!("cs_{o}"), "object": "checkout.session", "mode": "payment",
            "payment_status": "paid", "customer": format!("cus_{o}"),
            "payment_intent": format!("pi_{o}"), "client_reference_id": buyer,
            "amount_total": 500, "currency": "usd",
            "metadata": { "user_id": buyer, "product_key": "bundle" } }),
    ))
    .await;
    api.buy(&bystander, "pro").await;

    // The bundle now also grants content:b; stored entitlements follow only after recompute.
    let (status, _) = put_product(
        &api,
        "bundle",
        json!({ "amountCents": 500, "currency": "usd", "grants": ["content:a", "content:b"] }),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(entitlement_keys(&api, &buyer).await, ["content:a"]);
    let one = shared::ids::UserId::parse(&buyer).unwrap();
    assert_eq!(
        processor::store::recompute_stored(&api.pool, Some(&one))
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        entitlement_keys(&api, &buyer).await,
        ["content:a", "content:b"]
    );
    let everyone = processor::store::recompute_stored(&api.pool, None)
        .await
        .unwrap();
    assert_eq!(everyone, 2, "every user with a row");
    assert_eq!(
        entitlement_keys(&api, &bystander).await,
        ["pro"],
        "unchanged"
    );
}

/// `entitlements.active_entitlement_summary.updated` for `customer` listing the first ten of
/// `features`, as Stripe does (`has_more` when there are more).
fn summary(customer: &str, created: i64, features: &[String]) -> Value {
    let data: Vec<Value> = features
        .iter()
        .take(10)
        .map(|f| json!({ "object": "entitlements.active_entitlement", "lookup_key": f }))
        .collect();
    envelope(
        &unique("evt"),
        "entitlements.active_entitlement_summary.updated",
        created,
        json!({ "object": "entitlements.active_entitlement_summary", "customer": customer,
            "entitlements": { "object": "list", "data": data, "has_more": features.len() > 10 } }),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stripe_features_beyond_the_first_ten_are_read_in_full_and_granted_through_the_registry() {
    let fake = FakeStripe::start().await;
    let api = Api::start(Some(&fake)).await;
    let stripe = processor::stripe::StripeClient::new(fake.client_config()).unwrap();
    let (user, customer) = (unique("u"), unique("cus"));
    link_customer(&fake, &api, &customer, &user).await;
    // The twelfth feature, which the event's own list leaves out, maps to `team`.
    let (status, body) = put_product(
        &api,
        "team-seats",
        json!({ "priceId": "price_team_seats", "mode": "subscription", "grants": ["team"],
                "featureLookupKey": "feat-11" }),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let features: Vec<String> = (0..12).map(|i| format!("feat-{i}")).collect();
    for f in &features {
        fake.seed(
            Collection::ActiveEntitlements,
            json!({ "id": unique("ent"), "object": "entitlements.active_entitlement",
                    "lookup_key": f, "customer": customer }),
        );
    }
    let body = summary(&customer, t0(), &features);
    let event = processor::domain::events::parse(body.to_string().as_bytes()).unwrap();
    assert!(
        matches!(
            processor::complete::complete(None, event.clone()).await,
            Err(processor::complete::CompleteError::NotConfigured)
        ),
        "a cut list is never applied as it is"
    );
    let complete = processor::complete::complete(Some(&stripe), event)
        .await
        .unwrap();
    apply_event(&api, &user, complete).await;
    assert_eq!(access(&api, &user, "team").await, 200);
    let (_, list) = api.get("/api/entitlements", &user).await;
    let team = &list["entitlements"][0];
    assert_eq!(team["source"], "subscription", "the contract's spelling");
    assert_eq!(team["sources"][0]["source"], "stripe_feature");
    assert_eq!(team["sources"][0]["sourceId"], customer.as_str());

    // Stripe drops the feature; an older summary arriving late does not bring it back.
    let mut fewer = features.clone();
    fewer.pop();
    let newer = summary(&customer, t0() + DAY, &fewer);
    // The fake still lists feat-11: complete from a client over the reduced list instead.
    let event = processor::domain::events::parse(newer.to_string().as_bytes()).unwrap();
    let processor::domain::events::EventKind::FeatureSummaryUpdated(s) = event.kind.clone() else {
        panic!("wrong kind")
    };
    let reduced = processor::domain::events::Event {
        kind: processor::domain::events::EventKind::FeatureSummaryUpdated(
            s.completed(fewer.clone()),
        ),
        ..event
    };
    apply_event(&api, &user, reduced).await;
    assert_eq!(access(&api, &user, "team").await, 403);
    let stale = summary(&customer, t0() - DAY, &features);
    let stale = processor::domain::events::parse(stale.to_string().as_bytes()).unwrap();
    let stale = processor::complete::complete(Some(&stripe), stale)
        .await
        .unwrap();
    apply_event(&api, &user, stale).await;
    assert_eq!(
        access(&api, &user, "team").await,
        403,
        "a stale summary never undoes a newer one"
    );

    // Reconcile reports the drift between Stripe's view (feat-11 still listed) and ours.
    let drift = processor::reconcile::feature_drift(&api.pool, &stripe)
        .await
        .unwrap();
    assert_eq!(drift.len(), 1, "{drift:?}");
    assert_eq!(drift[0].customer, customer);
    assert_eq!(drift[0].user.as_deref(), Some(user.as_str()));
    assert_eq!(drift[0].missing, ["feat-11"]);
    assert!(drift[0].extra.is_empty());

    // Restore reads the complete list from Stripe as the customer's current state.
    let (status, body) = api.restore_again(&user).await;
    assert_eq!(status, 200, "{body}");
    api.cache.invalidate(&user).await;
    assert_eq!(access(&api, &user, "team").await, 200);
}

/// The keys `GET /api/entitlements` lists for `user`, read past the cache.
async fn entitlement_keys(api: &Api, user: &str) -> Vec<String> {
    api.cache.invalidate(user).await;
    let (_, list) = api.get("/api/entitlements", user).await;
    list["entitlements"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["key"].as_str().unwrap().to_owned())
        .collect()
}

/// Applies `event` through the store and drops `user`'s cache entry (the worker would
/// refresh it after its commit).
async fn apply_event(api: &Api, user: &str, event: processor::domain::events::Event) {
    let outcomes = processor::store::apply_and_commit(&api.pool, &[&event])
        .await
        .unwrap();
    assert!(matches!(outcomes[0], processor::store::Outcome::Applied(_)));
    api.cache.invalidate(user).await;
}

async fn link_customer(fake: &FakeStripe, api: &Api, customer: &str, user: &str) {
    fake.seed_customer_with_id(customer, user, None);
    api.map_customer(customer, user).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_kept_in_memory_follows_every_write_to_products() {
    let api = Api::start(None).await;
    let key = format!("kit_{}", unique("k").replace('-', "_"));
    let (status, _) = put_product(
        &api,
        &key,
        json!({ "amountCents": 700, "currency": "usd", "grants": ["content:one"] }),
    )
    .await;
    assert_eq!(status, 201);
    let buy = |user: &str| {
        let o = unique("o");
        envelope(
            &unique("evt"),
            "checkout.session.completed",
            chrono::Utc::now().timestamp(),
            json!({ "id": format!("cs_{o}"), "object": "checkout.session", "mode": "payment",
                "payment_status": "paid", "customer": format!("cus_{o}"),
                "payment_intent": format!("pi_{o}"), "client_reference_id": user,
                "amount_total": 700, "currency": "usd",
                "metadata": { "user_id": user, "product_key": key } }),
        )
    };
    let first = unique("u");
    api.apply(&buy(&first)).await;
    assert_eq!(entitlement_keys(&api, &first).await, ["content:one"]);

    // Written by hand on another connection, not through the registry's code: the next batch
    // resolves against the new row, not the one it kept.
    let client = api.pool.get().await.unwrap();
    client
        .execute(
            "UPDATE products SET grants = ARRAY['content:two'] WHERE key = $1",
            &[&key],
        )
        .await
        .unwrap();
    let second = unique("u");
    api.apply(&buy(&second)).await;
    assert_eq!(entitlement_keys(&api, &second).await, ["content:two"]);

    // And a product removed by hand grants nothing to the next buyer.
    client
        .execute("DELETE FROM products WHERE key = $1", &[&key])
        .await
        .unwrap();
    let third = unique("u");
    api.apply(&buy(&third)).await;
    assert!(entitlement_keys(&api, &third).await.is_empty());
}
