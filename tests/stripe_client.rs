//! The Stripe client against the Stripe-shaped fake: what goes on the wire (form encoding,
//! version and auth headers, idempotency keys), how failures are retried or not, and how lists
//! are paged.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use processor::stripe::{
    CheckoutMode, CheckoutSessionRequest, EventQuery, LineItemPrice, STRIPE_API_VERSION,
    StripeClient, StripeError,
};
use serde_json::json;
use shared::ids::UserId;
use system_tests::stripe_fake::{Collection, FakeStripe, Fault};

fn client(fake: &FakeStripe) -> StripeClient {
    StripeClient::new(fake.client_config()).unwrap()
}

fn checkout(customer: Option<String>, mode: CheckoutMode) -> CheckoutSessionRequest {
    CheckoutSessionRequest {
        mode,
        price: LineItemPrice::Id("price_pro".into()),
        quantity: 1,
        success_url: "https://app.test/ok?session_id={CHECKOUT_SESSION_ID}".into(),
        cancel_url: "https://app.test/cancel".into(),
        client_reference_id: "user_1".into(),
        customer,
        metadata: BTreeMap::from([
            ("product_key".to_owned(), "pro".to_owned()),
            ("user_id".to_owned(), "user_1".to_owned()),
        ]),
        expires_at: Some(chrono::Utc::now().timestamp() + 3600),
    }
}

#[tokio::test]
async fn checkout_sessions_are_form_encoded_with_bracketed_keys() {
    let fake = FakeStripe::start().await;
    let stripe = client(&fake);
    let customer = fake.seed_customer("user_1", None);
    let request = checkout(Some(customer.clone()), CheckoutMode::Payment);

    let session = stripe
        .create_checkout_session(&request, "checkout-user_1-pro-1")
        .await
        .unwrap();

    assert!(session.id.starts_with("cs_test_"));
    assert_eq!(session.expires_at, request.expires_at.unwrap());
    assert!(session.url.unwrap().contains(&session.id));
    let sent = fake.requests_to("/v1/checkout/sessions");
    assert_eq!(sent.len(), 1);
    let sent = &sent[0];
    assert_eq!(sent.method, "POST");
    assert!(
        sent.raw_body.starts_with(
            "mode=payment&line_items[0][price]=price_pro&line_items[0][quantity]=1&success_url="
        ),
        "{}",
        sent.raw_body
    );
    assert!(sent.raw_body.contains("&metadata[user_id]=user_1"));
    assert_eq!(
        sent.param("success_url"),
        Some(request.success_url.as_str())
    );
    assert_eq!(sent.param("customer"), Some(customer.as_str()));
    assert_eq!(sent.param("client_reference_id"), Some("user_1"));
    assert_eq!(
        sent.param("payment_intent_data[metadata][user_id]"),
        Some("user_1")
    );
    assert_eq!(
        sent.param("payment_intent_data[metadata][product_key]"),
        Some("pro")
    );
    assert_eq!(sent.param("subscription_data[metadata][user_id]"), None);
    assert_eq!(
        sent.header("content-type"),
        Some("application/x-www-form-urlencoded")
    );
    let stored = fake.objects(Collection::CheckoutSessions);
    assert_eq!(stored[0]["metadata"]["product_key"], "pro");
}

#[tokio::test]
async fn every_request_carries_the_pinned_version_and_the_bearer_key() {
    let fake = FakeStripe::start().await;
    let stripe = client(&fake);
    let user = UserId::parse("user_2").unwrap();

    let customer = stripe
        .create_customer(&user, Some("a@b.test"))
        .await
        .unwrap();
    stripe.list_subscriptions(&customer.id).await.unwrap();

    let requests = fake.requests();
    assert_eq!(requests.len(), 2);
    for r in &requests {
        assert_eq!(r.header("stripe-version"), Some(STRIPE_API_VERSION));
        assert_eq!(
            r.header("authorization"),
            Some(format!("Bearer {}", fake.secret_key()).as_str())
        );
    }
    assert_eq!(requests[0].param("metadata[user_id]"), Some("user_2"));
    assert_eq!(
        requests[1].raw_query,
        format!("customer={}&status=all&limit=100", customer.id)
    );
    assert_eq!(
        customer.metadata.get("user_id").map(String::as_str),
        Some("user_2")
    );
    assert_eq!(customer.email.as_deref(), Some("a@b.test"));
}

#[tokio::test]
async fn a_wrong_key_is_refused_by_stripe_without_retrying() {
    let fake = FakeStripe::start().await;
    let mut config = fake.client_config();
    config.secret_key = "sk_test_wrong_key_123".to_owned().into();
    let stripe = StripeClient::new(config).unwrap();

    let err = stripe.list_charges("cus_1").await.unwrap_err();

    assert!(
        matches!(err, StripeError::Api { status: 401, .. }),
        "{err:?}"
    );
    assert_eq!(fake.requests().len(), 1);
    assert!(!err.to_string().contains("sk_test_wrong_key_123"));
}

#[tokio::test]
async fn rate_limited_posts_are_retried_with_the_same_idempotency_key() {
    let fake = FakeStripe::start().await;
    let stripe = client(&fake);
    fake.inject(Fault::RateLimited, 2);
    let user = UserId::parse("user_3").unwrap();

    let customer = stripe.create_customer(&user, None).await.unwrap();

    let sent = fake.requests_to("/v1/customers");
    assert_eq!(sent.len(), 3, "two 429s then a success");
    let key = sent[0]
        .idempotency_key()
        .expect("a POST carries an idempotency key");
    assert!(sent.iter().all(|r| r.idempotency_key() == Some(key)));
    assert!(sent.iter().all(|r| r.raw_body == sent[0].raw_body));
    assert_eq!(fake.objects(Collection::Customers).len(), 1);
    assert_eq!(
        fake.objects(Collection::Customers)[0]["id"],
        customer.id.as_str()
    );
}

#[tokio::test]
async fn server_errors_marked_retryable_are_retried_with_the_same_idempotency_key() {
    let fake = FakeStripe::start().await;
    let stripe = client(&fake);
    let customer = fake.seed_customer("user_4", None);
    fake.inject(Fault::ServerErrorShouldRetry, 1);
    fake.inject(Fault::Conflict, 1);

    let portal = stripe
        .create_billing_portal_session(&customer, "https://app.test/account", None)
        .await
        .unwrap();

    assert!(portal.url.starts_with("https://billing.stripe.com/"));
    let sent = fake.requests_to("/v1/billing_portal/sessions");
    assert_eq!(sent.len(), 3);
    let key = sent[0].idempotency_key().unwrap();
    assert!(sent.iter().all(|r| r.idempotency_key() == Some(key)));
    assert_eq!(
        sent[2].param("return_url"),
        Some("https://app.test/account")
    );
    assert_eq!(sent[2].param("configuration"), None);
}

#[tokio::test]
async fn retries_stop_after_the_configured_attempts() {
    let fake = FakeStripe::start().await;
    let stripe = client(&fake);
    fake.inject(Fault::RateLimited, 10);

    let err = stripe.list_payment_intents("cus_1").await.unwrap_err();

    assert_eq!(err, StripeError::RateLimited);
    assert_eq!(fake.requests().len(), 3, "one attempt and two retries");
}

#[tokio::test]
async fn should_retry_false_is_never_retried_even_for_a_server_error() {
    let fake = FakeStripe::start().await;
    let stripe = client(&fake);
    fake.inject(Fault::ServerErrorShouldNotRetry, 1);

    let err = stripe.list_charges("cus_1").await.unwrap_err();

    assert!(
        matches!(err, StripeError::Api { status: 500, .. }),
        "{err:?}"
    );
    assert_eq!(fake.requests().len(), 1);
}

#[tokio::test]
async fn a_bad_request_is_not_retried_and_keeps_stripes_error_details() {
    let fake = FakeStripe::start().await;
    let stripe = client(&fake);
    fake.inject(Fault::BadRequest, 1);

    let err = stripe
        .create_checkout_session(&checkout(None, CheckoutMode::Subscription), "k-bad")
        .await
        .unwrap_err();

    match &err {
        StripeError::Api {
            status,
            error_type,
            code,
            ..
        } => {
            assert_eq!(*status, 400);
            assert_eq!(error_type, "invalid_request_error");
            assert_eq!(code.as_deref(), Some("parameter_invalid"));
        }
        other => panic!("expected an API error, got {other:?}"),
    }
    assert!(!err.is_transient());
    assert_eq!(fake.requests().len(), 1);

    // A real validation error from the fake: unknown customer on the portal.
    let err = stripe
        .create_billing_portal_session("cus_missing", "https://app.test", None)
        .await
        .unwrap_err();
    assert!(err.is_resource_missing(), "{err:?}");
    assert_eq!(fake.requests().len(), 2);
}

#[tokio::test]
async fn the_same_idempotency_key_with_other_parameters_is_a_typed_conflict() {
    let fake = FakeStripe::start().await;
    let stripe = client(&fake);
    let first = stripe
        .create_checkout_session(&checkout(None, CheckoutMode::Payment), "double-click-key")
        .await
        .unwrap();

    // The same intent again (a double click) yields the same session.
    let again = stripe
        .create_checkout_session(&checkout(None, CheckoutMode::Payment), "double-click-key")
        .await
        .unwrap();
    assert_eq!(again, first);
    assert_eq!(fake.objects(Collection::CheckoutSessions).len(), 1);

    let mut other = checkout(None, CheckoutMode::Payment);
    other.price = LineItemPrice::Id("price_other".into());
    let err = stripe
        .create_checkout_session(&other, "double-click-key")
        .await
        .unwrap_err();

    assert!(
        matches!(err, StripeError::IdempotencyConflict { .. }),
        "{err:?}"
    );
    assert!(!err.is_transient());
    assert_eq!(
        fake.requests().len(),
        3,
        "an idempotency error is not retried"
    );
}

#[tokio::test]
async fn a_slow_stripe_surfaces_as_a_timeout_after_bounded_retries() {
    let fake = FakeStripe::start().await;
    let mut config = fake.client_config();
    config.request_timeout = Duration::from_millis(200);
    let stripe = StripeClient::new(config).unwrap();
    fake.inject(Fault::Slow(Duration::from_secs(3)), 3);
    let user = UserId::parse("user_5").unwrap();

    let err = stripe.create_customer(&user, None).await.unwrap_err();

    assert_eq!(err, StripeError::Timeout);
    assert!(err.is_transient());
    let sent = fake.requests_to("/v1/customers");
    assert_eq!(sent.len(), 3);
    let key = sent[0].idempotency_key().unwrap();
    assert!(sent.iter().all(|r| r.idempotency_key() == Some(key)));
}

#[tokio::test]
async fn a_slow_answer_followed_by_a_fast_one_succeeds_without_a_duplicate() {
    let fake = FakeStripe::start().await;
    let mut config = fake.client_config();
    config.request_timeout = Duration::from_secs(1);
    let stripe = StripeClient::new(config).unwrap();
    // The first attempt is answered too late: the client gives up and retries with the same key.
    // The retry creates the customer; were the late attempt still processed, the fake would
    // replay that answer for it rather than create a second customer.
    fake.inject(Fault::Slow(Duration::from_secs(5)), 1);
    let user = UserId::parse("user_6").unwrap();

    let customer = stripe.create_customer(&user, None).await.unwrap();

    let sent = fake.requests_to("/v1/customers");
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[0].idempotency_key(), sent[1].idempotency_key());
    let stored = fake.objects(Collection::Customers);
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0]["id"], customer.id.as_str());
}

#[tokio::test]
async fn an_unreachable_stripe_is_a_transport_error_after_retries() {
    let addr = format!("127.0.0.1:{}", system_tests::servers::free_port());
    let fake = FakeStripe::start().await;
    let mut config = fake.client_config();
    config.api_base = format!("http://{addr}");
    let stripe = StripeClient::new(config).unwrap();

    let err = stripe.list_subscriptions("cus_x").await.unwrap_err();

    assert!(matches!(err, StripeError::Transport { .. }), "{err:?}");
    assert!(err.is_transient());
}

#[tokio::test]
async fn pagination_walks_every_page_of_events() {
    let fake = FakeStripe::start().await;
    let stripe = client(&fake);
    fake.set_max_page_size(10);
    let base = 1_700_000_000;
    for i in 0..25 {
        fake.seed(
            Collection::Events,
            json!({"id": format!("evt_{i:02}"), "object": "event", "type": "charge.refunded",
                   "created": base + i, "data": {"object": {"id": format!("ch_{i}")}}}),
        );
    }
    // Filtered out: too old, and of another type.
    fake.seed(
        Collection::Events,
        json!({"id": "evt_old", "type": "charge.refunded", "created": base - 10}),
    );
    fake.seed(
        Collection::Events,
        json!({"id": "evt_other", "type": "customer.created", "created": base + 5}),
    );
    let query = EventQuery {
        created_gte: Some(base),
        types: vec!["charge.refunded".into(), "invoice.paid".into()],
        delivery_success: None,
    };

    // Page by page, as reconcile walks them for its progress bar.
    let mut events = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let page = stripe
            .list_events_page(&query, cursor.as_deref())
            .await
            .unwrap();
        assert!(page.data.len() <= 10);
        cursor = page
            .data
            .last()
            .map(|e| e["id"].as_str().unwrap().to_owned());
        events.extend(page.data);
        if !page.has_more {
            break;
        }
    }

    let ids: Vec<&str> = events.iter().map(|e| e["id"].as_str().unwrap()).collect();
    let expected: Vec<String> = (0..25).rev().map(|i| format!("evt_{i:02}")).collect();
    assert_eq!(ids, expected, "newest first, every page, nothing else");
    let sent = fake.requests_to("/v1/events");
    assert_eq!(sent.len(), 3);
    assert_eq!(sent[0].param("starting_after"), None);
    assert_eq!(sent[1].param("starting_after"), Some("evt_15"));
    assert_eq!(sent[2].param("starting_after"), Some("evt_05"));
    for r in &sent {
        assert_eq!(r.param("created[gte]"), Some(base.to_string().as_str()));
        assert_eq!(
            r.params_named("types[]"),
            ["charge.refunded", "invoice.paid"]
        );
        assert!(
            r.raw_query
                .contains("types[]=charge.refunded&types[]=invoice.paid")
        );
    }
}

#[tokio::test]
async fn customer_lists_are_filtered_and_kept_as_raw_objects() {
    let fake = FakeStripe::start().await;
    let stripe = client(&fake);
    fake.set_max_page_size(2);
    let mine = fake.seed_customer("user_7", Some("me@app.test"));
    let theirs = fake.seed_customer("user_8", Some("them@app.test"));
    for (i, status) in ["active", "canceled", "past_due"].iter().enumerate() {
        fake.seed(
            Collection::Subscriptions,
            json!({"id": format!("sub_{i}"), "customer": mine, "status": status, "created": i,
                   "items": {"data": [{"current_period_end": 1_900_000_000}]}}),
        );
    }
    fake.seed(
        Collection::Subscriptions,
        json!({"id": "sub_theirs", "customer": theirs, "status": "active", "created": 9}),
    );
    fake.seed(
        Collection::Charges,
        json!({"id": "ch_1", "customer": mine, "refunded": true, "amount_refunded": 500, "created": 1}),
    );
    fake.seed(
        Collection::PaymentIntents,
        json!({"id": "pi_1", "customer": mine, "status": "succeeded", "created": 1}),
    );
    fake.seed(
        Collection::CheckoutSessions,
        json!({"id": "cs_1", "customer": mine, "payment_status": "paid", "created": 1}),
    );

    let subs = stripe.list_subscriptions(&mine).await.unwrap();
    let statuses: Vec<&str> = subs.iter().map(|s| s["status"].as_str().unwrap()).collect();
    assert_eq!(
        statuses,
        ["past_due", "canceled", "active"],
        "status=all keeps canceled ones"
    );
    assert_eq!(
        subs[0]["items"]["data"][0]["current_period_end"],
        1_900_000_000
    );

    let charges = stripe.list_charges(&mine).await.unwrap();
    assert_eq!(charges[0]["amount_refunded"], 500);
    assert_eq!(
        stripe.list_payment_intents(&mine).await.unwrap()[0]["id"],
        "pi_1"
    );
    assert_eq!(
        stripe.list_checkout_sessions(&mine).await.unwrap()[0]["id"],
        "cs_1"
    );
}

#[tokio::test]
async fn the_secret_key_never_appears_in_debug_or_errors() {
    let fake = FakeStripe::start().await;
    let stripe = client(&fake);
    let key = fake.secret_key().to_owned();

    assert!(!format!("{stripe:?}").contains(&key));
    assert!(!format!("{:?}", fake.client_config()).contains(&key));

    let mut errors = Vec::new();
    fake.inject(Fault::BadRequest, 1);
    errors.push(stripe.list_charges("cus_1").await.unwrap_err());
    fake.inject(Fault::RateLimited, 3);
    errors.push(stripe.list_charges("cus_1").await.unwrap_err());
    errors.push(
        stripe
            .create_billing_portal_session("cus_nope", "https://app.test", None)
            .await
            .unwrap_err(),
    );
    for err in errors {
        assert!(!err.to_string().contains(&key), "{err}");
        assert!(!format!("{err:?}").contains(&key), "{err:?}");
    }
}
