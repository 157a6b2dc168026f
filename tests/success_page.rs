//! The success page does not wait for the webhook: `GET /api/checkout/session/{id}` reads a
//! paid session from Stripe (the Stripe-shaped fake) and applies it through the one apply
//! path, so the page shows the purchase at once; the webhook that follows, delivered through the
//! broker to a worker with duplicates, changes nothing and grants nothing twice.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::{Value, json};
use shared::samples::{self, Sample};
use system_tests::stack::Stack;
use system_tests::stripe_fake::{Collection, FakeStripe};
use system_tests::unique;

/// The fake's session `id` as Stripe holds it once paid (payment intent `pi_{object}`).
fn paid(fake: &FakeStripe, id: &str, object: &str) -> Value {
    let mut session = fake
        .objects(Collection::CheckoutSessions)
        .into_iter()
        .find(|s| s["id"] == id)
        .unwrap();
    session["status"] = json!("complete");
    session["payment_status"] = json!("paid");
    session["payment_intent"] = json!(format!("pi_{object}"));
    session["amount_total"] = json!(4900);
    session["currency"] = json!("usd");
    session
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_success_page_shows_pro_before_the_webhook_and_the_webhook_grants_nothing_twice() {
    let stack = Stack::start(Some(FakeStripe::start().await)).await;
    let fake = stack.stripe.as_ref().unwrap();
    let (user, other) = (unique("buyer"), unique("other"));
    let (status, body) = stack.api.checkout(&user, "pro").await;
    assert_eq!(status, 200, "{body}");
    let id = body["sessionId"].as_str().unwrap().to_owned();
    let path = format!("/api/checkout/session/{id}");

    // Open: nothing granted yet. Another user cannot see it, nor a made-up id.
    let (status, open) = stack.api.get(&path, &user).await;
    assert_eq!(status, 200, "{open}");
    assert_eq!(
        (open["status"].as_str(), open["granted"].as_bool()),
        (Some("open"), Some(false))
    );
    assert_eq!(stack.api.get(&path, &other).await.0, 404);
    assert_eq!(
        stack
            .api
            .get("/api/checkout/session/cs_made_up", &user)
            .await
            .0,
        404
    );
    assert_eq!(
        stack.api.get(&format!("{path}?wait=11"), &user).await.0,
        400
    );

    // Paid in Stripe, no webhook yet: the page shows Pro at once.
    let object = unique("o");
    let session = paid(fake, &id, &object);
    fake.update(Collection::CheckoutSessions, session.clone());
    let (status, done) = stack.api.get(&path, &user).await;
    assert_eq!(status, 200, "{done}");
    assert_eq!(
        (done["status"].as_str(), done["granted"].as_bool()),
        (Some("complete"), Some(true)),
        "{done}"
    );
    assert_eq!(done["entitlements"][0]["key"], "pro");
    assert_eq!(done["entitlements"][0]["active"], true);
    assert_eq!(stack.pro(&user).await["isPro"], true);

    // The webhooks that follow (a third twice, any order) grant nothing twice.
    let sample = Sample {
        ..Sample::pro(&user, &object)
    };
    let mut completed = samples::event(&unique("evt"), "checkout.session.completed", &sample);
    completed["data"]["object"] = session;
    let intent = samples::event(&unique("evt"), "payment_intent.succeeded", &sample);
    stack.deliver(&[completed, intent], 11).await;
    let purchases = stack
        .api
        .count(&format!(
            "SELECT count(*) FROM purchases WHERE user_id = '{user}'"
        ))
        .await;
    assert_eq!(purchases, 1, "one purchase, whichever came first");
    let (_, listed) = stack.api.get("/api/purchases", &user).await;
    assert_eq!(listed["pagination"]["totalCount"], 1);
    assert_eq!(listed["data"][0]["duplicate"], false);
    assert_eq!(stack.api.get(&path, &user).await.1["granted"], true);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_success_page_polled_without_end_reads_stripe_within_the_users_limit() {
    let stack = Stack::start(Some(FakeStripe::start().await)).await;
    let fake = stack.stripe.as_ref().unwrap();
    let user = unique("poller");
    let (_, body) = stack.api.checkout(&user, "pro").await;
    let id = body["sessionId"].as_str().unwrap().to_owned();
    let path = format!("/api/checkout/session/{id}");
    for _ in 0..40 {
        let (status, answer) = stack.api.get(&path, &user).await;
        assert_eq!(
            (status, answer["status"].as_str()),
            (200, Some("open")),
            "{answer}"
        );
    }
    let reads = fake
        .requests_to(&format!("/v1/checkout/sessions/{id}"))
        .len();
    assert_eq!(
        reads, 30,
        "one read per request up to the limit, none after"
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_success_page_answers_once_the_session_is_paid() {
    let stack = Stack::start(Some(FakeStripe::start().await)).await;
    let fake = stack.stripe.as_ref().unwrap();
    let user = unique("buyer");
    let (_, body) = stack.api.checkout(&user, "pro").await;
    let id = body["sessionId"].as_str().unwrap().to_owned();
    let path = format!("/api/checkout/session/{id}?wait=8");
    // The payment lands while the page waits.
    let session = paid(fake, &id, &unique("o"));
    let waiting = async { stack.api.get(&path, &user).await };
    let paying = async {
        tokio::time::sleep(std::time::Duration::from_millis(700)).await;
        fake.update(Collection::CheckoutSessions, session);
    };
    let started = std::time::Instant::now();
    let ((status, answer), ()) = tokio::join!(waiting, paying);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["granted"], true, "{answer}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(8),
        "answered once paid"
    );
    stack.stop().await;
}
