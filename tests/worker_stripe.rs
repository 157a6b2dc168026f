//! Stripe on the worker's path, with `STRIPE_SECRET_KEY` set and Stripe answered by the fake at
//! a realistic latency: a session this service created is granted from what it recorded at
//! creation, with no request to Stripe; a session someone else created (a Payment Link, the
//! Dashboard) has its line items read from Stripe once, off the lane; a redelivered event is
//! recognised before any request. While Stripe fails or refuses the key, only the events that
//! need it wait, nothing is parked, and they are applied once Stripe answers again.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use serde_json::{Value, json};
use system_tests::api::Api;
use system_tests::stripe_fake::{Collection, FakeStripe, Fault};
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
    start_with_budget(fake, processor::stripe::budget::DEFAULT_PER_SECOND).await
}

/// [`start`] with the worker held to `per_second` Stripe requests.
async fn start_with_budget(fake: &FakeStripe, per_second: u32) -> (Api, TestBroker, Running) {
    let api = Api::start(Some(fake)).await;
    let broker = TestBroker::new(vec![Duration::from_millis(200)]).await;
    let worker = spawn_worker(worker_config(fake, &api, &broker, per_second));
    (api, broker, worker)
}

/// A worker's configuration over `api`'s database, with Stripe answered by `fake`.
fn worker_config(
    fake: &FakeStripe,
    api: &Api,
    broker: &TestBroker,
    per_second: u32,
) -> processor::config::Config {
    let mut worker_config = config(&api.db.url, broker);
    let mut stripe = fake.client_config();
    stripe.budget = processor::stripe::budget::Budget::new(per_second);
    worker_config.stripe = Some(stripe);
    // The worker writes its configured products at start: the API's.
    worker_config.catalog = system_tests::api::catalog();
    worker_config
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
        &shared::samples::Sample::pro(&foreign_user, &object),
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

/// Waits until every one of `users` is Pro.
async fn all_pro(api: &Api, users: &[String]) {
    system_tests::eventually(WAIT, "every buyer is Pro", || async {
        for user in users {
            if !is_pro(api, user).await {
                return None;
            }
        }
        Some(())
    })
    .await;
}

/// A session of `user` created elsewhere (a Payment Link) for the `pro` price: the fake holds
/// it and its line item; returns the object as its webhook carries it.
fn foreign_session(fake: &FakeStripe, user: &str) -> Value {
    let session = json!({ "id": unique("cs_link"), "object": "checkout.session",
        "mode": "payment", "client_reference_id": user, "customer": null, "metadata": {} });
    fake.seed(Collection::CheckoutSessions, session.clone());
    fake.seed(
        Collection::CheckoutLineItems,
        json!({ "id": unique("li"), "object": "item", "session": session["id"],
                "price": { "id": "price_pro", "object": "price" }, "quantity": 1 }),
    );
    session
}

/// A sample event of `user`'s Pro purchase `object` that needs no Stripe read: a paid checkout
/// carries its line items (price `price_pro`), as a session expanded by its sender does.
fn sample_event(event_id: &str, event_type: &str, user: &str, object: &str) -> Vec<u8> {
    let sample = shared::samples::Sample::pro(user, object);
    let mut event = shared::samples::event(event_id, event_type, &sample);
    if event_type == "checkout.session.completed" {
        event["data"]["object"]["line_items"] =
            serde_json::json!({ "object": "list", "data": [ { "price": { "id": "price_pro" } } ] });
    }
    event.to_string().into_bytes()
}

async fn publish_body(broker: &TestBroker, body: &[u8]) -> String {
    let value: Value = serde_json::from_slice(body).unwrap();
    let id = value["id"].as_str().unwrap().to_owned();
    publish(broker, body, &id, value["type"].as_str().unwrap()).await;
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_stripe_fails_only_the_purchases_that_need_it_wait_and_none_is_parked() {
    let fake = FakeStripe::start().await;
    let (api, broker, worker) = start(&fake).await;
    fake.set_latency(Duration::from_millis(150));
    let direct = system_tests::worker::pg(&api.db.url).await;

    // Before the outage: a checkout through this service, and a buyer who will be refunded.
    let own_user = unique("u");
    let (status, answer) = api.checkout(&own_user, "pro").await;
    assert_eq!(status, 200, "{answer}");
    let own = session_of(&fake, answer["sessionId"].as_str().unwrap());
    let refunded_user = unique("u");
    let refunded_object = unique("o");
    let bought = publish_body(
        &broker,
        &sample_event(
            &unique("evt"),
            "checkout.session.completed",
            &refunded_user,
            &refunded_object,
        ),
    )
    .await;
    wait_processed(&direct, &bought).await;
    system_tests::eventually(WAIT, "the refunded user was Pro", || async {
        is_pro(&api, &refunded_user).await.then_some(())
    })
    .await;

    // Stripe answers 500 to everything, for as long as it takes.
    fake.inject(Fault::ServerErrorShouldRetry, 100_000);
    let foreign_users: Vec<String> = (0..5).map(|_| unique("u")).collect();
    for user in &foreign_users {
        let event = unique("evt");
        publish_body(&broker, &completed(&event, &foreign_session(&fake, user))).await;
    }
    let own_event = unique("evt");
    publish_body(&broker, &completed(&own_event, &own)).await;
    let refund = publish_body(
        &broker,
        &sample_event(
            &unique("evt"),
            "charge.refunded",
            &refunded_user,
            &refunded_object,
        ),
    )
    .await;
    let sent = std::time::Instant::now();
    wait_processed(&direct, &refund).await;
    wait_processed(&direct, &own_event).await;
    let applied_in = sent.elapsed();
    assert!(
        applied_in < Duration::from_secs(2),
        "the refund and the own purchase wait for no one: {applied_in:?}"
    );
    assert!(is_pro(&api, &own_user).await);
    assert!(!is_pro(&api, &refunded_user).await);
    // The foreign purchases are tried, wait, and are tried again.
    system_tests::eventually(WAIT, "the foreign purchases were retried", || async {
        (fake.requests().len() > 3 * foreign_users.len()).then_some(())
    })
    .await;
    for user in &foreign_users {
        assert!(!is_pro(&api, user).await, "not granted while Stripe fails");
    }
    assert_eq!(broker.dead_letter_depth().await, 0, "nothing parked");

    // Stripe is back: every waiting purchase is granted by itself.
    fake.clear_faults();
    all_pro(&api, &foreign_users).await;
    assert_eq!(broker.dead_letter_depth().await, 0, "nothing parked");
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_key_parks_nothing_says_so_on_readyz_and_resumes_once_accepted() {
    let fake = FakeStripe::start().await;
    let api = Api::start(Some(&fake)).await;
    let broker = TestBroker::new(vec![Duration::from_millis(200)]).await;
    let mut service_config = config(&api.db.url, &broker);
    service_config.stripe = Some(fake.client_config());
    service_config.catalog = system_tests::api::catalog();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let service = tokio::spawn(processor::cli::serve(
        service_config,
        listener,
        async move {
            let _ = stopped.await;
        },
        true,
    ));
    let http = reqwest::Client::new();
    let readyz = || async {
        let response = http.get(format!("{base}/readyz")).send().await.ok()?;
        let status = response.status().as_u16();
        Some((status, response.json::<Value>().await.ok()?))
    };
    system_tests::eventually(WAIT, "ready", || async {
        let (status, body) = readyz().await?;
        (status == 200 && body.get("stripe").is_none()).then_some(())
    })
    .await;

    fake.inject(Fault::Unauthorized, 100_000);
    let user = unique("u");
    let event = unique("evt");
    publish_body(&broker, &completed(&event, &foreign_session(&fake, &user))).await;
    let body = system_tests::eventually(WAIT, "readyz names the refused key", || async {
        let (status, body) = readyz().await?;
        (status == 200 && body["stripe"] == "key_refused").then_some(body)
    })
    .await;
    assert_eq!(body["postgres"], "ok", "{body}");
    // Paused: a few seconds later Stripe was asked about once, not once per retry.
    let asked = fake.requests().len();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(fake.requests().len() <= asked + 1, "paused while refused");
    assert_eq!(broker.dead_letter_depth().await, 0, "nothing parked");
    assert!(!is_pro(&api, &user).await);

    fake.clear_faults();
    system_tests::eventually(WAIT, "granted once the key is accepted", || async {
        is_pro(&api, &user).await.then_some(())
    })
    .await;
    let (_, body) = readyz().await.unwrap();
    assert!(body.get("stripe").is_none(), "{body}");
    assert_eq!(broker.dead_letter_depth().await, 0);
    stop.send(()).unwrap();
    service.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_sessions_are_read_within_the_stripe_budget_and_near_it() {
    let fake = FakeStripe::start().await;
    let (api, broker, worker) = start_with_budget(&fake, 5).await;
    fake.set_latency(Duration::from_millis(150));
    let users: Vec<String> = (0..15).map(|_| unique("u")).collect();
    let started = std::time::Instant::now();
    for user in &users {
        let event = unique("evt");
        publish_body(&broker, &completed(&event, &foreign_session(&fake, user))).await;
    }
    all_pro(&api, &users).await;
    let elapsed = started.elapsed();
    // 15 reads at 5/s with a burst of 5: at least 2 s; at 80 % of the budget, at most 3.75 s
    // (plus the fake's latency and the applies).
    assert_eq!(fake.requests().len(), 15, "one read per session");
    assert!(
        elapsed >= Duration::from_millis(1900),
        "the budget holds: {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_millis(4500),
        "the budget is used: {elapsed:?}"
    );
    assert_eq!(broker.dead_letter_depth().await, 0);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_links_price_is_read_once_for_all_its_sessions() {
    let fake = FakeStripe::start().await;
    let (api, broker, worker) = start(&fake).await;
    let direct = system_tests::worker::pg(&api.db.url).await;
    let link = unique("plink");
    let users: Vec<String> = (0..3).map(|_| unique("u")).collect();
    let mut sessions = Vec::new();
    for user in &users {
        let mut session = foreign_session(&fake, user);
        session["payment_link"] = json!(link);
        sessions.push(session);
    }
    // The first session teaches the link's price; the others need no read.
    let first = unique("evt");
    publish_body(&broker, &completed(&first, &sessions[0])).await;
    wait_processed(&direct, &first).await;
    for session in &sessions[1..] {
        let event = unique("evt");
        publish_body(&broker, &completed(&event, session)).await;
        wait_processed(&direct, &event).await;
    }
    all_pro(&api, &users).await;
    let reads = fake
        .requests()
        .iter()
        .filter(|r| r.path.ends_with("/line_items"))
        .count();
    assert_eq!(reads, 1, "one read for the link, not one per session");
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_while_stripe_is_slow_and_failing_loses_and_doubles_nothing() {
    let fake = FakeStripe::start().await;
    let api = Api::start(Some(&fake)).await;
    let broker = TestBroker::new(vec![Duration::from_millis(200)]).await;
    let direct = system_tests::worker::pg(&api.db.url).await;
    let budget = processor::stripe::budget::DEFAULT_PER_SECOND;
    // Own checkouts first (the API needs Stripe for them), then Stripe turns slow and failing.
    let own_users: Vec<String> = (0..3).map(|_| unique("u")).collect();
    let mut own = Vec::new();
    for user in &own_users {
        let (status, answer) = api.checkout(user, "pro").await;
        assert_eq!(status, 200, "{answer}");
        own.push(session_of(&fake, answer["sessionId"].as_str().unwrap()));
    }
    fake.set_latency(Duration::from_millis(400));
    fake.inject(Fault::ServerErrorShouldRetry, 12);
    let first = spawn_worker(worker_config(&fake, &api, &broker, budget));
    let foreign_users: Vec<String> = (0..10).map(|_| unique("u")).collect();
    let mut bodies = Vec::new();
    for user in &foreign_users {
        bodies.push(completed(&unique("evt"), &foreign_session(&fake, user)));
    }
    for session in &own {
        bodies.push(completed(&unique("evt"), session));
    }
    for body in &bodies {
        publish_body(&broker, body).await;
    }
    // Killed mid-flight: completions waiting on Stripe, retries in the delay queue.
    tokio::time::sleep(Duration::from_millis(600)).await;
    first.kill();
    let second = spawn_worker(worker_config(&fake, &api, &broker, budget));
    // Every event delivered again (a duplicate of each) on top.
    for body in &bodies {
        publish_body(&broker, body).await;
    }
    let everyone: Vec<String> = foreign_users.iter().chain(&own_users).cloned().collect();
    all_pro(&api, &everyone).await;
    for user in &everyone {
        let rows = direct
            .query_one("SELECT count(*) FROM purchases WHERE user_id = $1", &[user])
            .await
            .unwrap()
            .get::<_, i64>(0);
        assert_eq!(rows, 1, "{user}: one purchase, applied once");
    }
    let processed = direct
        .query_one("SELECT count(*) FROM processed_events", &[])
        .await
        .unwrap()
        .get::<_, i64>(0);
    assert_eq!(processed, i64::try_from(bodies.len()).unwrap());
    assert_eq!(broker.dead_letter_depth().await, 0, "nothing parked");
    for session in &own {
        let path = format!(
            "/v1/checkout/sessions/{}/line_items",
            session["id"].as_str().unwrap()
        );
        assert!(
            fake.requests_to(&path).is_empty(),
            "own sessions need no read"
        );
    }
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_foreign_sessions_than_the_completions_hold_wait_in_the_stripe_queue_not_the_delays() {
    let fake = FakeStripe::start().await;
    let api = Api::start(Some(&fake)).await;
    // A delay as long as production's first one: an event sent through it would show.
    let broker = TestBroker::new(vec![Duration::from_secs(5)]).await;
    let worker = spawn_worker(worker_config(&fake, &api, &broker, 50));
    // 16 reads in flight at 300 ms each: about 53 a second, near the budget of 50, so the 96
    // reads take close to two seconds.
    fake.set_latency(Duration::from_millis(300));
    let sessions = 3 * usize::from(processor::worker::completions::PREFETCH);
    let buyers: Vec<String> = (0..sessions).map(|_| unique("u")).collect();
    let others: Vec<String> = (0..20).map(|_| unique("u")).collect();
    let started = std::time::Instant::now();
    for (n, user) in buyers.iter().enumerate() {
        let event = unique("evt");
        publish_body(&broker, &completed(&event, &foreign_session(&fake, user))).await;
        // Other users' purchases, which need no Stripe read, arrive among them.
        if n % 5 == 0 {
            let other = &others[n / 5];
            let body = sample_event(
                &unique("evt"),
                "checkout.session.completed",
                other,
                &unique("o"),
            );
            publish_body(&broker, &body).await;
        }
    }
    all_pro(&api, &others).await;
    let others_done = started.elapsed();
    let mut buyers_pro_then = 0;
    for buyer in &buyers {
        buyers_pro_then += usize::from(is_pro(&api, buyer).await);
    }
    all_pro(&api, &buyers).await;
    let elapsed = started.elapsed();
    assert_eq!(fake.requests().len(), sessions, "one read per session");
    // 96 reads in about 2 s, below the 5 s delay that any session overflowing into the delay
    // queue would have waited.
    assert!(
        elapsed < Duration::from_millis(4000),
        "the sessions waited in the Stripe queue, read at the budget: {elapsed:?}"
    );
    assert!(
        buyers_pro_then < sessions,
        "other users' events were applied while reads were still outstanding \
         ({buyers_pro_then} of {sessions} buyers Pro at {others_done:?}, all at {elapsed:?})"
    );
    assert_eq!(broker.depth(&broker.topology.stripe_queue()).await, 0);
    assert_eq!(broker.dead_letter_depth().await, 0);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_stripe_does_not_know_and_a_lone_payment_intent_grant_nothing() {
    let fake = FakeStripe::start().await;
    let (api, broker, worker) = start(&fake).await;
    let direct = system_tests::worker::pg(&api.db.url).await;
    // A session of another account or mode: Stripe answers resource_missing for it, whatever
    // its metadata claims.
    let (stranger, lone, control) = (unique("u"), unique("u"), unique("u"));
    let session = json!({ "id": unique("cs_other_account"), "object": "checkout.session",
        "mode": "payment", "client_reference_id": stranger, "customer": null,
        "metadata": { "user_id": stranger, "product_key": "pro" } });
    let unknown = unique("evt");
    // A payment intent with our metadata naming Pro, at a dollar, with no session.
    let mut intent: Value = serde_json::from_slice(&sample_event(
        &unique("evt"),
        "payment_intent.succeeded",
        &lone,
        &unique("o"),
    ))
    .unwrap();
    intent["data"]["object"]["amount"] = json!(100);
    intent["data"]["object"]["amount_received"] = json!(100);
    let intent = intent.to_string().into_bytes();
    let granted = sample_event(
        &unique("evt"),
        "checkout.session.completed",
        &control,
        &unique("o"),
    );
    let mut ids = Vec::new();
    for _ in 0..2 {
        ids.push(publish_body(&broker, &completed(&unknown, &session)).await);
        ids.push(publish_body(&broker, &intent).await);
        ids.push(publish_body(&broker, &granted).await);
    }
    for id in &ids {
        wait_processed(&direct, id).await;
    }
    assert!(is_pro(&api, &control).await, "the control purchase grants");
    for user in [&stranger, &lone] {
        assert!(!is_pro(&api, user).await, "{user} was granted");
    }
    // Both payments are recorded, with their money trail, and grant nothing.
    let recorded = api
        .count(&format!(
            "SELECT count(*) FROM purchases WHERE paid AND user_id IN ('{stranger}', '{lone}')"
        ))
        .await;
    assert_eq!(recorded, 2);
    assert_eq!(
        line_item_reads(&fake, session["id"].as_str().unwrap()),
        1,
        "read once, its redelivery recognised"
    );
    worker.stop().await;
}

/// [`system_tests::scenarios::team_event`] as a body to publish.
fn team_body(user: &str, object: &str, event_type: &str, created: i64) -> Vec<u8> {
    system_tests::scenarios::team_event(user, object, event_type, created)
        .to_string()
        .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chargeback_reaches_its_subscription_through_stripes_invoice_payments_when_no_event_tied_them()
 {
    let fake = FakeStripe::start().await;
    let (api, broker, worker) = start(&fake).await;
    let direct = system_tests::worker::pg(&api.db.url).await;
    let now = chrono::Utc::now().timestamp() - 86_400;
    // A subscription paid by a basil invoice: no event names its payment.
    let (subscriber, object) = (unique("u"), unique("o"));
    fake.seed(
        Collection::InvoicePayments,
        json!({ "id": format!("inpay_{object}"), "object": "invoice_payment",
            "invoice": format!("in_{object}"), "status": "paid",
            "payment": { "type": "payment_intent", "payment_intent": format!("pi_{object}") } }),
    );
    fake.seed(
        Collection::Invoices,
        json!({ "id": format!("in_{object}"), "object": "invoice", "status": "paid",
            "parent": { "type": "subscription_details",
                "subscription_details": { "subscription": format!("sub_{object}") } } }),
    );
    let mut ids = Vec::new();
    for event_type in [
        "customer.subscription.created",
        "checkout.session.completed",
        "invoice.paid",
    ] {
        ids.push(publish_body(&broker, &team_body(&subscriber, &object, event_type, now)).await);
    }
    for id in &ids {
        wait_processed(&direct, id).await;
    }
    assert_eq!(api.status_of(&subscriber, "team").await, "active");
    // The chargeback, delivered twice.
    let dispute = team_body(&subscriber, &object, "charge.dispute.created", now + 60);
    let first = publish_body(&broker, &dispute).await;
    publish_body(&broker, &dispute).await;
    wait_processed(&direct, &first).await;
    assert_eq!(api.status_of(&subscriber, "team").await, "suspended");
    let lookups = fake.requests_to("/v1/invoice_payments").len();
    assert_eq!(lookups, 1, "looked up once, its redelivery recognised");

    // A dispute of a purchase this service holds needs no lookup.
    let (buyer, bought) = (unique("u"), unique("o"));
    let paid = publish_body(
        &broker,
        &sample_event(
            &unique("evt"),
            "checkout.session.completed",
            &buyer,
            &bought,
        ),
    )
    .await;
    wait_processed(&direct, &paid).await;
    let disputed = publish_body(
        &broker,
        &sample_event(&unique("evt"), "charge.dispute.created", &buyer, &bought),
    )
    .await;
    wait_processed(&direct, &disputed).await;
    assert!(!is_pro(&api, &buyer).await, "suspended");
    assert_eq!(fake.requests_to("/v1/invoice_payments").len(), lookups);
    worker.stop().await;
}
