//! Thin events end in the same state as their snapshot twins. Every event of the scenario
//! corpus (the chaos suite's histories: purchases refunded and disputed, subscriptions renewed,
//! failing, canceled and charged back, abandoned checkouts) is sent twice over: as the snapshot
//! event to one stack, and as its thin twin (`v1.<type>`, only `related_object`) to another,
//! whose worker reads each object from the Stripe-shaped fake. Both fakes hold every object as
//! Stripe would after the history (its newest state), both workers hold a key; each stack gets
//! its events shuffled with duplicates. Every subject ends with the same entitlements.
//!
//! The stacks share the machine's Redis, whose dedupe markers are keyed by event id: each run
//! draws seeds of its own, and a twin's id is its snapshot's with a `t` appended (an event
//! destination's events have ids of their own). Entitlements are compared as each stack's
//! Postgres holds them, since the two write the same users' cache entries.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;

use serde_json::{Value, json};
use system_tests::scenarios::histories;
use system_tests::stack::Stack;
use system_tests::stripe_fake::{Collection, FakeStripe};

/// The fake collection holding objects of `object_type`.
fn collection(object_type: &str) -> Option<Collection> {
    Some(match object_type {
        "checkout.session" => Collection::CheckoutSessions,
        "payment_intent" => Collection::PaymentIntents,
        "charge" => Collection::Charges,
        "dispute" => Collection::Disputes,
        "invoice" => Collection::Invoices,
        "invoice_payment" => Collection::InvoicePayments,
        "subscription" => Collection::Subscriptions,
        _ => return None,
    })
}

/// A fake holding the newest state of every object `events` carry (in `created` order).
async fn fake_after(events: &[Value]) -> FakeStripe {
    let fake = FakeStripe::start().await;
    let mut ordered: Vec<&Value> = events.iter().collect();
    ordered.sort_by_key(|e| e["created"].as_i64());
    let mut seen = BTreeSet::new();
    for event in ordered {
        let object = &event["data"]["object"];
        let (Some(kind), Some(id)) = (
            object["object"].as_str().and_then(collection),
            object["id"].as_str(),
        ) else {
            continue;
        };
        if seen.insert((format!("{kind:?}"), id.to_owned())) {
            fake.seed(kind, object.clone());
            if kind == Collection::CheckoutSessions {
                // What the session sold, as Stripe lists its line items.
                let price = if object["mode"] == "subscription" {
                    "price_team"
                } else {
                    "price_pro"
                };
                fake.seed(
                    Collection::CheckoutLineItems,
                    json!({"id": format!("li_{id}"), "object": "item", "session": id,
                           "price": {"id": price, "object": "price"}, "quantity": 1}),
                );
            }
        } else {
            fake.update(kind, object.clone());
        }
    }
    fake
}

/// The thin twin of a snapshot event, as an event destination sends it.
fn thin(event: &Value) -> Value {
    let object = &event["data"]["object"];
    let created = chrono::DateTime::from_timestamp(event["created"].as_i64().unwrap(), 0).unwrap();
    json!({
        "id": format!("{}t", event["id"].as_str().unwrap()), "object": "v2.core.event",
        "type": format!("v1.{}", event["type"].as_str().unwrap()),
        "created": created.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "livemode": false, "context": null,
        "reason": {"type": "request", "request": {"id": "req_1", "idempotency_key": null}},
        "related_object": {"id": object["id"], "type": object["object"],
                           "url": format!("/v1/objects/{}", object["id"].as_str().unwrap_or(""))},
    })
}

/// `subject`'s entitlements as the stack's Postgres holds them, without write times.
async fn entitlements(stack: &Stack, subject: &str) -> Value {
    let id = shared::ids::UserId::parse(subject).unwrap();
    let snapshot = processor::store::user_snapshot(&stack.direct, &id)
        .await
        .unwrap();
    let mut answer = serde_json::to_value(&snapshot.entitlements).unwrap();
    for item in answer.as_array_mut().unwrap() {
        item.as_object_mut().unwrap().remove("updatedAt");
    }
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thin_events_end_in_the_same_state_as_their_snapshot_twins_over_the_scenario_corpus() {
    let first: u64 = rand::random::<u32>().into();
    for seed in [first, first + 1] {
        let events = histories(seed, 2 * system_tests::scenarios::KINDS);
        let snapshots = Stack::start(Some(fake_after(&events).await)).await;
        let thins = Stack::start(Some(fake_after(&events).await)).await;
        let twins: Vec<Value> = events.iter().map(thin).collect();
        snapshots.deliver(&events, seed).await;
        thins.deliver(&twins, seed + 100).await;
        let subjects: BTreeSet<String> = events
            .iter()
            .filter_map(|e| {
                let object = &e["data"]["object"];
                object["metadata"]["user_id"]
                    .as_str()
                    .or(object["client_reference_id"].as_str())
                    .map(str::to_owned)
            })
            .collect();
        assert!(subjects.len() > 10, "the corpus names its subjects");
        let mut granted = 0;
        for subject in &subjects {
            let (want, got) = (
                entitlements(&snapshots, subject).await,
                entitlements(&thins, subject).await,
            );
            assert_eq!(got, want, "seed {seed}: {subject}");
            granted += usize::from(want.as_array().is_some_and(|l| !l.is_empty()));
        }
        assert!(
            granted > 5,
            "seed {seed}: the corpus grants something ({granted} subjects)"
        );
        // Every thin event was read, none parked (`Stack::stop` checks the dead letters).
        let read = thins.stripe.as_ref().unwrap().requests().len();
        assert!(
            read >= twins.len() / 2,
            "{read} Stripe reads for {} thin events",
            twins.len()
        );
        snapshots.stop().await;
        thins.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_stripe_failed_to_generate_is_applied_when_the_failure_is_resolved() {
    let fake = FakeStripe::start().await;
    let user = system_tests::unique("missed");
    let object = system_tests::unique("m");
    let sample = shared::samples::Sample::pro(&user, &object);
    // The purchase Stripe holds, whose `checkout.session.completed` was never generated.
    let mut session = shared::samples::object("checkout.session.completed", &sample);
    session["created"] = json!(chrono::Utc::now().timestamp());
    fake.seed(Collection::CheckoutSessions, session);
    fake.seed(
        Collection::CheckoutLineItems,
        json!({"id": format!("li_{object}"), "object": "item", "session": format!("cs_{object}"),
               "price": {"id": "price_pro", "object": "price"}, "quantity": 1}),
    );
    let id = format!("evt_{}", system_tests::unique("health"));
    fake.seed(
        Collection::V2Events,
        json!({"id": id, "object": "v2.core.event", "type": "v2.core.health.event_generation_failure.resolved",
               "created": "2026-12-05T04:00:00.000Z", "livemode": false,
               "data": {"alert_id": "alert_1", "grouping_key": "g", "summary": "events missed",
                        "resolved_at": "2026-12-05T04:00:00.000Z",
                        "impact": {"event_type": "checkout.session.completed", "context": null,
                                   "related_object": {"id": format!("cs_{object}"), "type": "checkout.session",
                                                      "url": format!("/v1/checkout/sessions/cs_{object}")}}}}),
    );
    let stack = Stack::start(Some(fake)).await;
    // The notification itself is thin: no data, only what to read.
    let notification = json!({"id": id, "object": "v2.core.event",
        "type": "v2.core.health.event_generation_failure.resolved",
        "created": "2026-12-05T04:00:00.000Z", "livemode": false, "context": null,
        "related_object": null});
    stack.deliver(&[notification], 7).await;
    assert_eq!(
        stack.pro(&user).await["isPro"],
        true,
        "the missed purchase is applied"
    );
    let reads: Vec<String> = stack
        .stripe
        .as_ref()
        .unwrap()
        .requests()
        .iter()
        .map(|r| r.path.clone())
        .collect();
    assert!(
        reads.contains(&format!("/v2/core/events/{id}")),
        "{reads:?}"
    );
    stack.stop().await;
}
