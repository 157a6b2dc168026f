//! The event parser and the Stripe client's answer types read Stripe's own published objects
//! (`tests/fixtures/stripe_fixtures3.json`: the resources this service reads, taken unchanged
//! from stripe/openapi's `openapi/fixtures3.json`, MIT, at the commit named in its `source`).
//! Each expectation is read from the fixture itself, so a parser that drops, renames or
//! misreads a field fails here, not only against payloads this project wrote.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use processor::domain::events::{
    self, CheckoutMode, CheckoutPaymentStatus, DisputeStatus, EventKind, SubscriptionStatus,
};
use serde_json::{Value, json};

fn resources() -> Value {
    let raw = include_str!("fixtures/stripe_fixtures3.json");
    serde_json::from_str::<Value>(raw).unwrap()["resources"].clone()
}

fn fixture(name: &str) -> Value {
    let value = resources()[name].clone();
    assert!(value.is_object(), "fixture {name} missing");
    value
}

/// The fixture `event` envelope carrying `object` as an event of `event_type`.
fn event_of(event_type: &str, object: &Value) -> EventKind {
    let mut event = fixture("event");
    event["type"] = json!(event_type);
    event["data"]["object"] = object.clone();
    let parsed = events::parse(&serde_json::to_vec(&event).unwrap())
        .unwrap_or_else(|e| panic!("{event_type}: {e}"));
    assert_eq!(parsed.id.as_str(), event["id"].as_str().unwrap());
    assert_eq!(parsed.created, event["created"].as_i64().unwrap());
    assert_eq!(parsed.event_type, event_type);
    parsed.kind
}

fn s(v: &Value) -> Option<String> {
    v.as_str().filter(|s| !s.is_empty()).map(str::to_owned)
}

#[test]
fn the_published_event_envelope_parses_and_its_own_type_is_unhandled() {
    let event = fixture("event");
    let parsed = events::parse(&serde_json::to_vec(&event).unwrap()).unwrap();
    assert_eq!(parsed.event_type, event["type"].as_str().unwrap());
    assert_eq!(parsed.kind, EventKind::Unhandled);
}

#[test]
fn checkout_sessions_read_as_published() {
    let mut session = fixture("checkout.session");
    for event_type in [
        "checkout.session.completed",
        "checkout.session.async_payment_succeeded",
        "checkout.session.async_payment_failed",
        "checkout.session.expired",
    ] {
        let kind = event_of(event_type, &session);
        let (EventKind::CheckoutSessionCompleted(got)
        | EventKind::CheckoutSessionAsyncPaymentSucceeded(got)
        | EventKind::CheckoutSessionAsyncPaymentFailed(got)
        | EventKind::CheckoutSessionExpired(got)) = kind
        else {
            panic!("{event_type}: {kind:?}")
        };
        assert_eq!(got.id, session["id"].as_str().unwrap());
        assert_eq!(got.mode.map(CheckoutMode::as_str), session["mode"].as_str());
        assert_eq!(got.payment_status, CheckoutPaymentStatus::Unpaid);
        assert_eq!(got.payment_intent, s(&session["payment_intent"]));
        assert_eq!(got.customer, s(&session["customer"]));
        assert_eq!(got.subscription, s(&session["subscription"]));
        assert_eq!(got.amount_total, session["amount_total"].as_i64());
        assert_eq!(got.currency, s(&session["currency"]));
        assert_eq!(got.recovery_url, None, "the fixture's recovery url is null");
        assert_eq!(got.user_id, None);
    }
    // The same object as this service's sessions fill it in, with line items expanded from
    // the published `item`.
    session["client_reference_id"] = json!("user_42");
    session["metadata"] = json!({ "product_key": "pro" });
    session["payment_status"] = json!("paid");
    session["amount_total"] = json!(4900);
    session["currency"] = json!("usd");
    session["line_items"] =
        json!({ "object": "list", "data": [fixture("item")], "has_more": false });
    let EventKind::CheckoutSessionCompleted(got) = event_of("checkout.session.completed", &session)
    else {
        panic!("wrong kind")
    };
    assert_eq!(got.user_id.unwrap().as_str(), "user_42");
    assert_eq!(got.product_key.as_deref(), Some("pro"));
    assert_eq!(got.payment_status, CheckoutPaymentStatus::Paid);
    assert_eq!(
        (got.amount_total, got.currency.as_deref()),
        (Some(4900), Some("usd"))
    );
    assert_eq!(got.price_id, s(&fixture("item")["price"]["id"]));
}

#[test]
fn payment_intents_read_as_published() {
    let intent = fixture("payment_intent");
    let EventKind::PaymentIntentSucceeded(got) = event_of("payment_intent.succeeded", &intent)
    else {
        panic!("wrong kind")
    };
    assert_eq!(got.id, intent["id"].as_str().unwrap());
    assert_eq!(got.customer, s(&intent["customer"]));
    let received = intent["amount_received"].as_i64().filter(|a| *a > 0);
    assert_eq!(got.amount, received.or(intent["amount"].as_i64()));
    assert_eq!(got.currency, s(&intent["currency"]));
}

#[test]
fn charges_and_their_refunds_read_as_published() {
    let mut charge = fixture("charge");
    let EventKind::ChargeRefunded(got) = event_of("charge.refunded", &charge) else {
        panic!("wrong kind")
    };
    assert_eq!(got.id, charge["id"].as_str().unwrap());
    assert_eq!(got.amount, charge["amount"].as_i64().unwrap());
    assert_eq!(
        got.amount_refunded,
        charge["amount_refunded"].as_i64().unwrap()
    );
    assert_eq!(got.refunded, charge["refunded"].as_bool().unwrap());
    assert_eq!(got.payment_intent, s(&charge["payment_intent"]));
    assert_eq!(got.currency, s(&charge["currency"]));
    assert_eq!(
        got.latest_refund, None,
        "the fixture's refund list is empty"
    );

    // Fully refunded, with the published refund in its list.
    let refund = fixture("refund");
    charge["refunded"] = json!(true);
    charge["amount_refunded"] = charge["amount"].clone();
    charge["refunds"]["data"] = json!([refund]);
    let EventKind::ChargeRefunded(got) = event_of("charge.refunded", &charge) else {
        panic!("wrong kind")
    };
    assert!(got.is_fully_refunded());
    let latest = got.latest_refund.unwrap();
    assert_eq!(latest.id, refund["id"].as_str().unwrap());
    assert_eq!(latest.reason, s(&refund["reason"]));
}

#[test]
fn disputes_read_as_published() {
    let mut dispute = fixture("dispute");
    let published = dispute["status"].as_str().unwrap().to_owned();
    for status in std::iter::once(published.as_str()).chain(DisputeStatus::KNOWN) {
        dispute["status"] = json!(status);
        for event_type in [
            "charge.dispute.created",
            "charge.dispute.updated",
            "charge.dispute.closed",
            "charge.dispute.funds_withdrawn",
            "charge.dispute.funds_reinstated",
        ] {
            let EventKind::ChargeDispute(got) = event_of(event_type, &dispute) else {
                panic!("wrong kind")
            };
            assert_eq!(got.id, dispute["id"].as_str().unwrap());
            assert_eq!(got.charge, s(&dispute["charge"]));
            assert_eq!(got.payment_intent, s(&dispute["payment_intent"]));
            assert_eq!(got.status.as_str(), status);
            assert!(
                !matches!(got.status, DisputeStatus::Unknown(_)),
                "{status} is one of Stripe's statuses"
            );
        }
    }
}

#[test]
fn invoices_read_as_published() {
    let invoice = fixture("invoice");
    for event_type in ["invoice.paid", "invoice.payment_failed"] {
        let (EventKind::InvoicePaid(got) | EventKind::InvoicePaymentFailed(got)) =
            event_of(event_type, &invoice)
        else {
            panic!("wrong kind")
        };
        assert_eq!(got.id, invoice["id"].as_str().unwrap());
        assert_eq!(got.customer, s(&invoice["customer"]));
        assert_eq!(
            got.subscription,
            s(&invoice["parent"]["subscription_details"]["subscription"]),
            "basil names the subscription under parent"
        );
        assert_eq!(got.billing_reason, s(&invoice["billing_reason"]));
        let ends = invoice["lines"]["data"].as_array().unwrap().iter();
        assert_eq!(
            got.period_end,
            ends.filter_map(|l| l["period"]["end"].as_i64()).max()
        );
        assert_eq!(
            got.user_id, None,
            "the fixture's subscription metadata is null"
        );
    }
}

#[test]
fn subscriptions_read_as_published() {
    let subscription = fixture("subscription");
    let first_item = &subscription["items"]["data"][0];
    for event_type in [
        "customer.subscription.created",
        "customer.subscription.updated",
        "customer.subscription.deleted",
    ] {
        let (EventKind::SubscriptionCreated(got)
        | EventKind::SubscriptionUpdated(got)
        | EventKind::SubscriptionDeleted(got)) = event_of(event_type, &subscription)
        else {
            panic!("wrong kind")
        };
        assert_eq!(got.id, subscription["id"].as_str().unwrap());
        assert_eq!(got.customer, s(&subscription["customer"]));
        assert_eq!(
            Some(got.status),
            SubscriptionStatus::from_stripe(subscription["status"].as_str().unwrap())
        );
        assert_eq!(got.price_id, s(&first_item["price"]["id"]));
        assert_eq!(got.quantity, first_item["quantity"].as_i64());
        assert_eq!(
            got.current_period_end,
            first_item["current_period_end"].as_i64(),
            "basil keeps the period on the items"
        );
        assert_eq!(
            got.cancel_at_period_end,
            subscription["cancel_at_period_end"].as_bool().unwrap()
        );
    }
}

#[test]
fn feature_summaries_read_as_published() {
    let summary = fixture("entitlements.active_entitlement_summary");
    let EventKind::FeatureSummaryUpdated(got) =
        event_of("entitlements.active_entitlement_summary.updated", &summary)
    else {
        panic!("wrong kind")
    };
    assert_eq!(got.customer, summary["customer"].as_str().unwrap());
    let mut keys: Vec<String> = summary["entitlements"]["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| s(&e["lookup_key"]))
        .collect();
    keys.sort();
    keys.dedup();
    assert_eq!(got.lookup_keys, keys);
    assert!(!keys.is_empty());
    assert_eq!(
        got.complete,
        !summary["entitlements"]["has_more"]
            .as_bool()
            .unwrap_or(false)
    );
}

#[test]
fn the_stripe_clients_answer_types_read_as_published() {
    use processor::stripe::{BillingPortalSession, CheckoutSession, Customer, ListPage};
    let session: CheckoutSession = serde_json::from_value(fixture("checkout.session")).unwrap();
    assert_eq!(
        session.id,
        fixture("checkout.session")["id"].as_str().unwrap()
    );
    assert_eq!(session.url, s(&fixture("checkout.session")["url"]));
    let portal: BillingPortalSession =
        serde_json::from_value(fixture("billing_portal.session")).unwrap();
    assert_eq!(
        portal.url,
        fixture("billing_portal.session")["url"].as_str().unwrap()
    );
    let customer: Customer = serde_json::from_value(fixture("customer")).unwrap();
    assert_eq!(customer.id, fixture("customer")["id"].as_str().unwrap());
    let page: ListPage<Value> =
        serde_json::from_value(fixture("subscription")["items"].clone()).unwrap();
    assert_eq!(page.data.len(), 1);
}
