//! What a Stripe account does in its first year, through the real services: events published
//! to the broker in a shuffled order with duplicates, consumed by a worker, read back through
//! the entitlement API. Each situation runs for several users, each in an order of its own.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::{Value, json};
use shared::samples::{self, Sample};
use system_tests::scenarios::team_event;
use system_tests::stack::Stack;
use system_tests::unique;

/// Orders tried per situation (one user each).
const ROUNDS: u64 = 4;

/// The events of one user's Pro purchase (`object` names its Stripe objects), at `created`.
fn purchase(user: &str, object: &str, created: i64) -> Vec<Value> {
    let sample = Sample {
        created,
        ..Sample::pro(user, object)
    };
    ["checkout.session.completed", "payment_intent.succeeded"]
        .iter()
        .map(|t| samples::event(&unique("evt"), t, &sample))
        .collect()
}

/// An event of dispute `dispute` of `object`'s charge in `status`.
fn dispute(object: &str, event_type: &str, created: i64, dispute: &str, status: &str) -> Value {
    json!({ "id": unique("evt"), "object": "event", "type": event_type, "created": created,
        "livemode": false, "data": { "object": {
            "id": dispute, "object": "dispute", "amount": 4900, "currency": "usd",
            "charge": format!("ch_{object}"), "payment_intent": format!("pi_{object}"),
            "status": status, "reason": "fraudulent" } } })
}

/// A dispute event of a history: its type, its day, the dispute (a suffix), its status.
type DisputeStep = (&'static str, i64, &'static str, &'static str);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disputes_count_for_what_each_is_in_any_order_with_duplicates() {
    let stack = Stack::start(None).await;
    let t0 = chrono::Utc::now().timestamp() - 30 * 86_400;
    let day = 86_400;
    // (situation, its disputes, expected status).
    let situations: [(&str, Vec<DisputeStep>, &str); 6] = [
        (
            "an inquiry closed, then a chargeback won",
            vec![
                ("charge.dispute.created", 1, "i", "warning_needs_response"),
                ("charge.dispute.closed", 3, "i", "warning_closed"),
                ("charge.dispute.created", 4, "c", "needs_response"),
                ("charge.dispute.funds_withdrawn", 4, "c", "needs_response"),
                ("charge.dispute.updated", 5, "c", "under_review"),
                ("charge.dispute.funds_reinstated", 9, "c", "won"),
                ("charge.dispute.closed", 9, "c", "won"),
            ],
            "active",
        ),
        (
            "an inquiry closed, then a chargeback open",
            vec![
                ("charge.dispute.created", 1, "i", "warning_needs_response"),
                ("charge.dispute.closed", 3, "i", "warning_closed"),
                ("charge.dispute.created", 4, "c", "needs_response"),
            ],
            "suspended",
        ),
        (
            "an open inquiry",
            vec![
                ("charge.dispute.created", 1, "i", "warning_needs_response"),
                ("charge.dispute.updated", 2, "i", "warning_under_review"),
            ],
            "active",
        ),
        (
            "an inquiry escalated on the same dispute, then lost",
            vec![
                ("charge.dispute.created", 1, "i", "warning_needs_response"),
                ("charge.dispute.updated", 2, "i", "needs_response"),
                ("charge.dispute.closed", 9, "i", "lost"),
            ],
            "revoked",
        ),
        (
            "a chargeback won, a second one lost",
            vec![
                ("charge.dispute.created", 1, "a", "needs_response"),
                ("charge.dispute.closed", 5, "a", "won"),
                ("charge.dispute.created", 6, "b", "needs_response"),
                ("charge.dispute.closed", 9, "b", "lost"),
            ],
            "revoked",
        ),
        (
            "a status nobody knows, alone and after a chargeback",
            vec![
                ("charge.dispute.created", 1, "u", "a_status_from_the_future"),
                ("charge.dispute.created", 2, "c", "needs_response"),
                ("charge.dispute.updated", 3, "c", "another_new_status"),
            ],
            "suspended",
        ),
    ];
    for (n, (what, disputes, expected)) in situations.iter().enumerate() {
        for round in 0..ROUNDS {
            let (user, object) = (unique("u"), unique("o"));
            let mut events = purchase(&user, &object, t0);
            for (event_type, at, id, status) in disputes {
                let id = format!("dp_{object}_{id}");
                events.push(dispute(&object, event_type, t0 + at * day, &id, status));
            }
            stack.deliver(&events, n as u64 * 100 + round).await;
            let pro = stack.pro(&user).await;
            assert_eq!(pro["status"], *expected, "{what}, order {round}: {pro}");
            assert_eq!(pro["isPro"], *expected == "active", "{what}: {pro}");
        }
    }
    // The unknown statuses are recorded as Stripe sent them.
    let recorded = stack
        .api
        .count(
            "SELECT count(*) FROM purchases p, jsonb_each(p.disputes) d
              WHERE d.value->>'status' IN ('a_status_from_the_future', 'another_new_status')",
        )
        .await;
    assert_eq!(recorded, 2 * ROUNDS as i64);
    stack.stop().await;
}

/// `charge.refunded` of `object`'s payment, in full.
fn refund(user: &str, object: &str, created: i64) -> Value {
    let sample = Sample {
        created,
        ..Sample::pro(user, object)
    };
    samples::event(&unique("evt"), "charge.refunded", &sample)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_payment_is_recorded_flagged_and_refunding_one_of_two_keeps_access() {
    let stack = Stack::start(None).await;
    let t0 = chrono::Utc::now().timestamp() - 86_400;
    for round in 0..ROUNDS {
        let user = unique("u");
        let (first, second) = (unique("o"), unique("o"));
        // Two sessions opened apart, both paid; the first payment is refunded later.
        let mut events = purchase(&user, &first, t0);
        events.extend(purchase(&user, &second, t0 + 900));
        events.push(refund(&user, &first, t0 + 3_600));
        stack.deliver(&events, 1_000 + round).await;
        let pro = stack.pro(&user).await;
        assert_eq!(pro["isPro"], true, "one payment of two still stands: {pro}");

        let (_, purchases) = stack.api.get("/api/purchases", &user).await;
        let mut rows: Vec<(String, String, bool)> = purchases["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p["paymentIntentId"].as_str().unwrap().to_owned(),
                    p["status"].as_str().unwrap().to_owned(),
                    p["duplicate"].as_bool().unwrap(),
                )
            })
            .collect();
        rows.sort();
        let mut expected = vec![
            (format!("pi_{first}"), "refunded".to_owned(), false),
            (format!("pi_{second}"), "completed".to_owned(), true),
        ];
        expected.sort();
        assert_eq!(rows, expected, "order {round}");

        // Operators see the second payment until its money goes back.
        let listed = duplicates(&stack).await;
        assert!(listed.contains(&(user.clone(), format!("pi_{second}"))));
        stack
            .deliver(&[refund(&user, &second, t0 + 7_200)], 2_000 + round)
            .await;
        let pro = stack.pro(&user).await;
        assert_eq!(
            (pro["isPro"].as_bool(), pro["status"].as_str()),
            (Some(false), Some("revoked")),
            "both refunded: {pro}"
        );
        assert!(
            !duplicates(&stack)
                .await
                .contains(&(user, format!("pi_{second}")))
        );
    }
    stack.stop().await;
}

/// `GET /v1/payments/duplicates` of the stack's API as (user, payment intent) pairs.
async fn duplicates(stack: &Stack) -> Vec<(String, String)> {
    let response = stack
        .api
        .http
        .get(format!("{}/v1/payments/duplicates", stack.api.base))
        .bearer_auth(system_tests::api::ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let listed: Value = response.json().await.unwrap();
    listed
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["userId"].as_str().unwrap().to_owned(),
                d["paymentIntentId"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// `checkout.session.expired` of session `cs_{object}` with `fields` merged into the object.
fn expired(object: &str, fields: Value) -> Value {
    let mut session = json!({ "id": format!("cs_{object}"), "object": "checkout.session",
        "mode": "payment", "payment_status": "unpaid", "status": "expired",
        "customer": null, "metadata": {},
        "after_expiration": { "recovery": { "enabled": true,
            "url": format!("https://buy.stripe.com/r/{object}") } } });
    for (field, value) in fields.as_object().unwrap() {
        session[field] = value.clone();
    }
    json!({ "id": unique("evt"), "object": "event", "type": "checkout.session.expired",
        "created": chrono::Utc::now().timestamp(), "livemode": false,
        "data": { "object": session } })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_checkout_notices_only_for_what_was_offered_and_once_per_session() {
    let stack = Stack::start(None).await;
    let (ours, by_metadata, link, unknown, nobody) = (
        unique("o"),
        unique("o"),
        unique("o"),
        unique("o"),
        unique("o"),
    );
    let (buyer, reader, victim) = (unique("u"), unique("u"), unique("u"));
    // A session this service created: its offer names the user and the product, whatever
    // the expired session says.
    processor::store::offers::record(
        &stack.direct,
        &processor::domain::offer::CheckoutOffer {
            session_id: format!("cs_{ours}"),
            user_id: buyer.clone(),
            product_key: "pro".into(),
            mode: processor::domain::events::CheckoutMode::Payment,
            price: processor::domain::offer::OfferedPrice::Stripe("price_pro".into()),
        },
    )
    .await
    .unwrap();
    let events = vec![
        expired(&ours, json!({ "client_reference_id": buyer })),
        // Our metadata, a registered product, a known user.
        expired(
            &by_metadata,
            json!({ "client_reference_id": reader,
                "metadata": { "user_id": reader, "product_key": "team" } }),
        ),
        // A Payment Link opened with ?client_reference_id=<someone>: no product of ours.
        expired(
            &link,
            json!({ "client_reference_id": victim,
            "payment_link": "plink_1" }),
        ),
        // A product nobody registered.
        expired(
            &unknown,
            json!({ "client_reference_id": victim,
                "metadata": { "product_key": "not-registered" } }),
        ),
        // A registered product, but no user to tell.
        expired(&nobody, json!({ "metadata": { "product_key": "pro" } })),
    ];
    // Each delivered twice or more, in any order.
    let mut twice = events.clone();
    twice.extend(events.iter().cloned());
    stack.deliver(&twice, 7).await;
    let rows = stack
        .direct
        .query(
            "SELECT user_id, payload->>'checkoutSessionId', payload->>'productKey'
               FROM notifications WHERE kind = 'checkout_abandoned' ORDER BY user_id",
            &[],
        )
        .await
        .unwrap();
    let mut notices: Vec<(String, String, String)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    notices.sort();
    let mut expected = vec![
        (buyer, format!("cs_{ours}"), "pro".to_owned()),
        (reader, format!("cs_{by_metadata}"), "team".to_owned()),
    ];
    expected.sort();
    assert_eq!(notices, expected);
    stack.stop().await;
}

/// `invoice_payment.paid`: `payment_intent` paid `invoice`, as API versions since basil tie them.
fn invoice_payment(invoice: &str, payment_intent: &str, created: i64) -> Value {
    json!({ "id": unique("evt"), "object": "event", "type": "invoice_payment.paid",
        "created": created, "livemode": false, "data": { "object": {
            "id": format!("inpay_{invoice}"), "object": "invoice_payment", "invoice": invoice,
            "status": "paid", "amount_paid": 1900, "currency": "usd",
            "payment": { "type": "payment_intent", "payment_intent": payment_intent } } } })
}

/// The events of `user`'s `team` subscription `object`, paid by invoice `in_{object}` whose
/// payment is tied to it by an `invoice_payment.paid`.
fn team_subscription(user: &str, object: &str, created: i64) -> Vec<Value> {
    let mut events: Vec<Value> = [
        "customer.subscription.created",
        "checkout.session.completed",
        "invoice.paid",
    ]
    .iter()
    .map(|t| team_event(user, object, t, created))
    .collect();
    events.push(invoice_payment(
        &format!("in_{object}"),
        &format!("pi_{object}"),
        created,
    ));
    events
}

/// A subscription chargeback history: what it is, its dispute statuses by day, whether a later
/// renewal is paid, the status expected.
type Situation = (
    &'static str,
    &'static [(i64, &'static str)],
    bool,
    &'static str,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chargeback_on_a_subscription_payment_decides_the_subscription_in_any_order() {
    let stack = Stack::start(None).await;
    let t0 = chrono::Utc::now().timestamp() - 20 * 86_400;
    let day = 86_400;
    // (situation, dispute statuses by day, a later renewal paid, expected status).
    let situations: [Situation; 5] = [
        (
            "a chargeback open",
            &[(2, "needs_response")],
            false,
            "suspended",
        ),
        (
            "a chargeback won",
            &[(2, "needs_response"), (9, "won")],
            false,
            "active",
        ),
        (
            "a chargeback lost",
            &[(2, "needs_response"), (9, "lost")],
            false,
            "revoked",
        ),
        (
            "an inquiry",
            &[(2, "warning_needs_response")],
            false,
            "active",
        ),
        (
            "a chargeback lost, then the next renewal paid",
            &[(2, "needs_response"), (9, "lost")],
            true,
            "active",
        ),
    ];
    for (n, (what, statuses, renewed, expected)) in situations.iter().enumerate() {
        for round in 0..ROUNDS {
            let (user, object) = (unique("u"), unique("o"));
            let mut events = team_subscription(&user, &object, t0);
            for (at, status) in *statuses {
                let event_type = if ["won", "lost"].contains(status) {
                    "charge.dispute.closed"
                } else {
                    "charge.dispute.created"
                };
                events.push(dispute(
                    &object,
                    event_type,
                    t0 + at * day,
                    &format!("dp_{object}"),
                    status,
                ));
            }
            if *renewed {
                // The next period's invoice, paid after the loss (another invoice, another payment).
                let next = format!("{object}_next");
                let mut paid = team_event(&user, &object, "invoice.paid", t0 + 12 * day);
                paid["data"]["object"]["id"] = json!(format!("in_{next}"));
                events.push(paid);
                events.push(invoice_payment(
                    &format!("in_{next}"),
                    &format!("pi_{next}"),
                    t0 + 12 * day,
                ));
            }
            stack.deliver(&events, 3_000 + n as u64 * 100 + round).await;
            assert_eq!(
                stack.api.status_of(&user, "team").await,
                *expected,
                "{what}, order {round}"
            );
            // Its payments are the subscription's, not purchases of their own.
            let (_, purchases) = stack.api.get("/api/purchases", &user).await;
            assert_eq!(purchases["pagination"]["totalCount"], 0, "{purchases}");
        }
    }
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_refund_of_a_subscriptions_latest_payment_ends_its_access_by_default() {
    let stack = Stack::start(None).await;
    let t0 = chrono::Utc::now().timestamp() - 5 * 86_400;
    for round in 0..ROUNDS {
        let (user, object) = (unique("u"), unique("o"));
        let mut events = team_subscription(&user, &object, t0);
        events.push(team_event(&user, &object, "charge.refunded", t0 + 86_400));
        stack.deliver(&events, 4_000 + round).await;
        assert_eq!(
            stack.api.status_of(&user, "team").await,
            "revoked",
            "order {round}"
        );
        let (_, purchases) = stack.api.get("/api/purchases", &user).await;
        assert_eq!(
            purchases["pagination"]["totalCount"], 0,
            "a subscription's payment is not a purchase: {purchases}"
        );
    }
    // SUBSCRIPTION_REFUND_POLICY=keep_until_period_end, written as start-up writes it: every
    // process resolves with it from then on.
    let keep = processor::domain::projection::SubscriptionPolicy {
        refund: processor::domain::projection::RefundPolicy::KeepUntilPeriodEnd,
        past_due_grace: None,
    };
    processor::registry::sync_policy(&stack.api.pool, keep)
        .await
        .unwrap();
    let (user, object) = (unique("u"), unique("o"));
    let mut events = team_subscription(&user, &object, t0);
    events.push(team_event(&user, &object, "charge.refunded", t0 + 86_400));
    stack.deliver(&events, 5_000).await;
    assert_eq!(
        stack.api.status_of(&user, "team").await,
        "active",
        "kept to the period's end"
    );
    stack.stop().await;
}

/// A paid Pro checkout of `user` through a Payment Link at `price` (its line items in the
/// payload, as an expanded session carries them), at `created`.
fn link_purchase(user: &str, object: &str, price: &str, amount: i64, created: i64) -> Vec<Value> {
    let mut events = purchase(user, object, created);
    for event in &mut events {
        let paid = event["type"] == "checkout.session.completed";
        let object = &mut event["data"]["object"];
        object["metadata"] = json!({});
        if paid {
            object["payment_link"] = json!("plink_old");
            object["amount_total"] = json!(amount);
            object["line_items"] =
                json!({ "object": "list", "data": [ { "price": { "id": price } } ] });
        }
    }
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_price_change_takes_access_from_no_earlier_buyer_in_any_order() {
    let stack = Stack::start(None).await;
    let t0 = chrono::Utc::now().timestamp() - 86_400;
    let earlier: Vec<String> = (0..3).map(|_| unique("u")).collect();
    let mut events = Vec::new();
    for user in &earlier {
        events.extend(link_purchase(user, &unique("o"), "price_pro", 4900, t0));
    }
    stack.deliver(&events, 6_000).await;

    // Pro's price is raised: STRIPE_PRICE_PRO_LIFETIME moves to a new price (Stripe prices
    // cannot be edited), and `processor recompute --all` runs with it, as after any mapping
    // change (it writes the configuration first, as start-up does).
    let catalog = std::env::temp_dir().join(format!("{}.toml", unique("catalog")));
    std::fs::write(
        &catalog,
        "[products.team]\nprice = \"price_team\"\nmode = \"subscription\"\nentitlement = \"team\"\n",
    )
    .unwrap();
    let recompute = tokio::process::Command::new(system_tests::binary("processor"))
        .args(["recompute", "--all"])
        .env_clear()
        .env("DATABASE_URL", &stack.api.db.url)
        .env("STRIPE_PRICE_PRO_LIFETIME", "price_pro_raised")
        .env("CATALOG_FILE", &catalog)
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .output()
        .await
        .unwrap();
    let _ = std::fs::remove_file(&catalog);
    assert!(recompute.status.success(), "{recompute:?}");
    let url = format!("{}/v1/products/pro", stack.api.base);
    let pro = system_tests::get_json(&stack.api.http, &url, system_tests::api::ADMIN_TOKEN).await;
    assert_eq!(pro["priceId"], "price_pro_raised");
    assert_eq!(pro["retiredPriceIds"], json!(["price_pro"]));
    for user in &earlier {
        stack.api.cache.invalidate(user).await;
        assert_eq!(
            stack.pro(user).await["isPro"],
            true,
            "{user} paid what was asked"
        );
    }
    // After the change, in any order with duplicates: an old Payment Link still sells at the
    // old price, the new price sells, and an earlier buyer's later refund still counts.
    let (late, new) = (unique("u"), unique("u"));
    let mut after = link_purchase(&late, &unique("o"), "price_pro", 4900, t0 + 3_600);
    after.extend(link_purchase(
        &new,
        &unique("o"),
        "price_pro_raised",
        9900,
        t0 + 3_600,
    ));
    for round in 0..ROUNDS {
        stack.deliver(&after, 6_100 + round).await;
        for user in [&late, &new] {
            assert_eq!(
                stack.pro(user).await["isPro"],
                true,
                "{user}, order {round}"
            );
        }
    }
    stack.stop().await;
}
