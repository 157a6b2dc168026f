//! Completing a paid Checkout Session, with `STRIPE_SECRET_KEY` set and Stripe answered by the
//! fake at a realistic latency: a session this service created is granted from what it
//! recorded at creation, with no request to Stripe; a session someone else created (a Payment
//! Link, the Dashboard) has its line items read from Stripe once; a redelivered event is
//! recognised before any request.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use serde_json::{Value, json};
use system_tests::api::Api;
use system_tests::stripe_fake::{Collection, FakeStripe};
use system_tests::worker::{Running, WAIT, config, publish, spawn_worker, wait_processed};
use system_tests::{amqp::TestBroker, unique};

/// A paid `checkout.session.completed` of `session` (a Checkout Session object as the fake
/// holds it), as Stripe delivers it: no line items.
fn completed(event_id: &str, session: &Value) -> Vec<u8> {
    let mut object = session.clone();
    object["status"] = json!("complete");
    object["payment_status"] = json!("paid");
    object["amount_total"] = json!(4900);
    object["currency"] = json!("usd");
    object["payment_intent"] = json!(format!("pi_{event_id}"));
    serde_json::to_vec(&json!({
        "id": event_id, "object": "event", "type": "checkout.session.completed",
        "created": chrono::Utc::now().timestamp(), "livemode": false,
        "api_version": "2025-03-31.basil", "data": { "object": object },
    }))
    .unwrap()
}

fn line_item_reads(fake: &FakeStripe, session: &str) -> usize {
    fake.requests_to(&format!("/v1/checkout/sessions/{session}/line_items"))
        .len()
}

async fn is_pro(api: &Api, user: &str) -> bool {
    let (status, body) = api.get("/api/pro/entitlement", user).await;
    assert_eq!(status, 200, "{body}");
    body["isPro"] == true
}

/// The API and a worker on one database, both with Stripe answered by `fake`.
async fn start(fake: &FakeStripe) -> (Api, TestBroker, Running) {
    let api = Api::start(Some(fake)).await;
    let broker = TestBroker::new(vec![Duration::from_millis(200)]).await;
    let mut worker_config = config(&api.db.url, &broker);
    worker_config.stripe = Some(fake.client_config());
    // The worker writes its configured products at start: the API's.
    worker_config.catalog = system_tests::api::catalog();
    let worker = spawn_worker(worker_config);
    (api, broker, worker)
}

/// The session the fake holds under `id`.
fn session_of(fake: &FakeStripe, id: &str) -> Value {
    fake.objects(Collection::CheckoutSessions)
        .into_iter()
        .find(|s| s["id"] == id)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_sessions_are_granted_without_stripe_and_foreign_ones_are_read_once() {
    let fake = FakeStripe::start().await;
    let (api, broker, worker) = start(&fake).await;
    fake.set_latency(Duration::from_millis(150));

    // Bought through this service: the offer was recorded at creation.
    let own_user = unique("u");
    let (status, answer) = api.checkout(&own_user, "pro").await;
    assert_eq!(status, 200, "{answer}");
    let own_session = answer["sessionId"].as_str().unwrap().to_owned();
    let session = session_of(&fake, &own_session);
    let own_event = unique("evt");
    publish(
        &broker,
        &completed(&own_event, &session),
        &own_event,
        "checkout.session.completed",
    )
    .await;

    // Sold by a Payment Link: the same product's price, a session this service never saw.
    let foreign_user = unique("u");
    let foreign_session = unique("cs_link");
    fake.seed(
        Collection::CheckoutSessions,
        json!({ "id": foreign_session, "object": "checkout.session", "mode": "payment",
                "client_reference_id": foreign_user, "customer": null, "metadata": {} }),
    );
    fake.seed(
        Collection::CheckoutLineItems,
        json!({ "id": unique("li"), "object": "item", "session": foreign_session,
                "price": { "id": "price_pro", "object": "price" }, "quantity": 1 }),
    );
    let foreign = json!({ "id": foreign_session, "object": "checkout.session",
        "mode": "payment", "client_reference_id": foreign_user, "customer": null,
        "metadata": {} });
    let foreign_event = unique("evt");
    let body = completed(&foreign_event, &foreign);
    publish(&broker, &body, &foreign_event, "checkout.session.completed").await;

    let direct = system_tests::worker::pg(&api.db.url).await;
    wait_processed(&direct, &own_event).await;
    wait_processed(&direct, &foreign_event).await;
    system_tests::eventually(WAIT, "both buyers are Pro", || async {
        (is_pro(&api, &own_user).await && is_pro(&api, &foreign_user).await).then_some(())
    })
    .await;
    assert_eq!(
        line_item_reads(&fake, &own_session),
        0,
        "a session this service created is completed from its offer"
    );
    assert_eq!(line_item_reads(&fake, &foreign_session), 1);

    // Stripe redelivers the foreign event: recognised before any request. A later event of
    // the same user goes through the same lane after it.
    publish(&broker, &body, &foreign_event, "checkout.session.completed").await;
    let sentinel = unique("evt");
    let object = unique("o");
    let later = shared::samples::event(
        &sentinel,
        "payment_intent.succeeded",
        &shared::samples::Sample {
            user: &foreign_user,
            product: "pro",
            object: &object,
            amount: 4900,
            created: chrono::Utc::now().timestamp(),
            subscription: false,
        },
    );
    publish(
        &broker,
        later.to_string().as_bytes(),
        &sentinel,
        "payment_intent.succeeded",
    )
    .await;
    wait_processed(&direct, &sentinel).await;
    assert_eq!(
        line_item_reads(&fake, &foreign_session),
        1,
        "no second read"
    );
    assert_eq!(line_item_reads(&fake, &own_session), 0);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offer_completes_only_its_own_session_for_its_own_user() {
    let fake = FakeStripe::start().await;
    let (api, broker, worker) = start(&fake).await;

    let buyer = unique("u");
    let (status, answer) = api.checkout(&buyer, "pro").await;
    assert_eq!(status, 200, "{answer}");
    let session_id = answer["sessionId"].as_str().unwrap().to_owned();
    let mut session = session_of(&fake, &session_id);
    // The same session id under another user: not the offer's, so Stripe is asked.
    let other = unique("u");
    session["client_reference_id"] = json!(other);
    session["metadata"]["user_id"] = json!(other);
    let event = unique("evt");
    publish(
        &broker,
        &completed(&event, &session),
        &event,
        "checkout.session.completed",
    )
    .await;
    let direct = system_tests::worker::pg(&api.db.url).await;
    wait_processed(&direct, &event).await;
    assert_eq!(line_item_reads(&fake, &session_id), 1);
    worker.stop().await;
}
