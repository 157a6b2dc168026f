//! `store::apply_events` against a real Postgres: the projection scenarios in several orders (refund
//! first, duplicates, a user linked only later) end in the same rows, entitlements and
//! notifications; versions are bumped; two concurrent writers on one user end like one.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use processor::domain::events::{self, Event};
use processor::domain::view::UserSnapshot;
use processor::store::{self, Outcome, StoreError};
use serde_json::{Value, json};
use shared::ids::UserId;
use shared::samples::history::{self as fx, DAY};
use system_tests::db::TestDb;
use tokio_postgres::{Client, NoTls};

const T0: i64 = 1_700_000_000;

fn purchase(tail: Vec<Value>) -> Vec<Value> {
    let mut events = vec![
        fx::checkout("evt_done", "checkout.session.completed", T0, "paid", "u1"),
        fx::payment_intent_succeeded("evt_pi", T0, "u1"),
    ];
    events.extend(tail);
    events
}

fn subscription_lifecycle(user: &str) -> Vec<Value> {
    let (p1, p2) = (T0 + 30 * DAY, T0 + 60 * DAY);
    vec![
        fx::subscription(
            "evt_s1",
            "customer.subscription.created",
            T0,
            "incomplete",
            p1,
        ),
        fx::legacy_invoice("evt_i1", "invoice.paid", T0, "subscription_create", p1),
        fx::subscription("evt_s2", "customer.subscription.updated", T0, "active", p1),
        fx::subscription_checkout("evt_cs", T0, user),
        fx::legacy_invoice(
            "evt_i2",
            "invoice.payment_failed",
            p1,
            "subscription_cycle",
            p2,
        ),
        fx::subscription(
            "evt_s3",
            "customer.subscription.updated",
            p1,
            "past_due",
            p2,
        ),
        fx::legacy_invoice(
            "evt_i3",
            "invoice.paid",
            p1 + 3 * DAY,
            "subscription_cycle",
            p2,
        ),
        fx::subscription(
            "evt_s4",
            "customer.subscription.updated",
            p1 + 3 * DAY,
            "active",
            p2,
        ),
        fx::subscription(
            "evt_s5",
            "customer.subscription.deleted",
            p1 + 10 * DAY,
            "canceled",
            p2,
        ),
    ]
}

async fn connect(db: &TestDb) -> Client {
    let (client, connection) = tokio_postgres::connect(&db.url, NoTls).await.unwrap();
    tokio::spawn(connection);
    client
}

/// A fresh, migrated database.
async fn fresh_db() -> (TestDb, Client) {
    let db = TestDb::create().await;
    let client = connect(&db).await;
    (db, client)
}

fn parse(body: &Value) -> Event {
    events::parse(&serde_json::to_vec(body).unwrap()).unwrap()
}

/// What one delivery changed: the users whose entitlements it recomputed.
#[derive(Debug)]
struct Applied {
    users: Vec<UserSnapshot>,
}

/// Why [`deliver`] applied nothing.
#[derive(Debug)]
enum Refusal {
    /// The database failed the whole transaction: deliver again.
    Unavailable(StoreError),
    /// The store charged this outcome to the event (rolled back alone); shown when a test
    /// fails on it.
    Event(#[allow(dead_code)] Outcome),
}

/// What the consumer does per delivery: the store's one apply path (dedupe on
/// `processed_events`, then the projection) in a transaction of its own, then commit. `None`
/// for a duplicate.
async fn deliver(client: &mut Client, body: &Value) -> Result<Option<Applied>, Refusal> {
    let event = parse(body);
    let tx = client
        .transaction()
        .await
        .map_err(|e| Refusal::Unavailable(e.into()))?;
    let outcome = store::apply_events(&tx, None, &[&event])
        .await
        .map_err(Refusal::Unavailable)?
        .remove(0);
    tx.commit()
        .await
        .map_err(|e| Refusal::Unavailable(e.into()))?;
    match outcome {
        Outcome::Applied(users) => Ok(Some(Applied { users })),
        Outcome::Replay => Ok(None),
        other => Err(Refusal::Event(other)),
    }
}

/// Applies `body` again as if it had never been processed: its facts merged a second time.
async fn reapply(client: &mut Client, body: &Value) {
    let event = parse(body);
    let tx = client.transaction().await.unwrap();
    tx.execute(
        "DELETE FROM processed_events WHERE event_id = $1",
        &[&event.id.as_str()],
    )
    .await
    .unwrap();
    let outcome = store::apply_events(&tx, None, &[&event]).await.unwrap();
    assert!(matches!(outcome[0], Outcome::Applied(_)), "{outcome:?}");
    tx.commit().await.unwrap();
}

async fn deliver_all(client: &mut Client, events: &[Value], order: &[usize]) {
    for &i in order {
        deliver(client, &events[i]).await.unwrap();
    }
}

/// Rows, entitlements and revocation notifications, without surrogate ids and wall-clock
/// columns (those legitimately differ between runs).
#[derive(Debug, PartialEq)]
struct State {
    purchases: Vec<Value>,
    subscriptions: Vec<Value>,
    entitlements: Vec<Value>,
    revocations: Vec<Value>,
}

async fn state(client: &Client) -> State {
    async fn rows(client: &Client, sql: &str) -> Vec<Value> {
        client
            .query(sql, &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<_, Value>(0))
            .collect()
    }
    State {
        purchases: rows(
            client,
            "SELECT to_jsonb(p) - 'id' - 'created_at' - 'updated_at' FROM purchases p
              ORDER BY payment_intent_id, checkout_session_id, charge_id, invoice_id",
        )
        .await,
        subscriptions: rows(
            client,
            "SELECT to_jsonb(s) - 'created_at' - 'updated_at' FROM subscriptions s ORDER BY id",
        )
        .await,
        entitlements: rows(
            client,
            "SELECT to_jsonb(e) - 'updated_at' FROM entitlements e ORDER BY user_id, key",
        )
        .await,
        revocations: rows(
            client,
            "SELECT jsonb_build_object('user', user_id, 'key', dedupe_key, 'payload', payload)
               FROM notifications WHERE kind = 'entitlement_revoked' ORDER BY dedupe_key",
        )
        .await,
    }
}

async fn notification_count(client: &Client, kind: &str) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM notifications WHERE kind = $1",
            &[&kind],
        )
        .await
        .unwrap()
        .get(0)
}

async fn version(client: &Client, user: &str) -> i64 {
    store::user_snapshot(client, &UserId::parse(user).unwrap())
        .await
        .unwrap()
        .version
}

/// Runs `events` in every given order, each on a fresh database, asserts they all end in the
/// same state, and returns it.
async fn converge(events: &[Value], orders: &[&[usize]]) -> State {
    let mut first: Option<State> = None;
    for order in orders {
        let (_db, mut client) = fresh_db().await;
        deliver_all(&mut client, events, order).await;
        let got = state(&client).await;
        assert!(
            notification_count(&client, "entitlement_suspended").await <= 1,
            "suspension queued twice for order {order:?}"
        );
        match &first {
            None => first = Some(got),
            Some(expected) => assert_eq!(&got, expected, "order {order:?} diverged"),
        }
    }
    first.unwrap()
}

fn field<'a>(row: &'a Value, name: &str) -> &'a Value {
    &row[name]
}

#[tokio::test]
async fn full_refund_revokes_whatever_the_order_even_when_it_arrives_first() {
    let events = purchase(vec![fx::refund("evt_rf", T0 + DAY, 4900)]);
    let state = converge(
        &events,
        &[&[0, 1, 2], &[2, 0, 1], &[2, 1, 2, 0, 0], &[1, 2, 0]],
    )
    .await;
    assert_eq!(state.purchases.len(), 1);
    let p = &state.purchases[0];
    assert_eq!(field(p, "status"), "refunded");
    assert_eq!(field(p, "user_id"), "u1");
    assert_eq!(field(p, "refund_amount_cents"), 4900);
    assert_eq!(field(p, "stripe_refund_id"), "re_4900");
    assert_eq!(field(p, "creator_payout_cents"), 4900);
    assert_eq!(state.entitlements.len(), 1);
    assert_eq!(field(&state.entitlements[0], "status"), "revoked");
    assert_eq!(state.revocations.len(), 1, "{:?}", state.revocations);
}

#[tokio::test]
async fn partial_refund_keeps_access_and_records_the_amount() {
    let events = purchase(vec![fx::refund("evt_rf", T0 + DAY, 1000)]);
    let state = converge(&events, &[&[0, 1, 2], &[2, 1, 0, 2]]).await;
    let p = &state.purchases[0];
    assert_eq!(field(p, "status"), "completed");
    assert_eq!(field(p, "refund_amount_cents"), 1000);
    assert_eq!(field(p, "refunded_at"), &Value::Null);
    assert_eq!(field(&state.entitlements[0], "status"), "active");
    assert_eq!(field(&state.entitlements[0], "expires_at"), &Value::Null);
}

#[tokio::test]
async fn won_dispute_restores_access_in_any_order() {
    let events = purchase(vec![
        fx::dispute(
            "evt_dc",
            "charge.dispute.created",
            T0 + DAY,
            "needs_response",
        ),
        fx::dispute("evt_dw", "charge.dispute.closed", T0 + 9 * DAY, "won"),
    ]);
    let state = converge(&events, &[&[0, 1, 2, 3], &[3, 2, 1, 0], &[2, 0, 3, 1, 2]]).await;
    let p = &state.purchases[0];
    assert_eq!(field(p, "status"), "completed");
    assert_eq!(field(p, "dispute_status"), "won");
    assert_eq!(field(p, "charge_id"), "ch_1");
    assert_eq!(field(&state.entitlements[0], "status"), "active");
    assert!(state.revocations.is_empty());
}

#[tokio::test]
async fn lost_dispute_revokes_even_before_the_completion() {
    let events = purchase(vec![
        fx::dispute(
            "evt_dc",
            "charge.dispute.created",
            T0 + DAY,
            "needs_response",
        ),
        fx::dispute("evt_dl", "charge.dispute.closed", T0 + 9 * DAY, "lost"),
    ]);
    let state = converge(&events, &[&[0, 1, 2, 3], &[3, 2, 0, 1], &[2, 3, 1, 0, 3]]).await;
    assert_eq!(field(&state.purchases[0], "status"), "refunded");
    assert_eq!(field(&state.entitlements[0], "status"), "revoked");
    assert_eq!(state.revocations.len(), 1);
}

#[tokio::test]
async fn delayed_payment_grants_once_the_async_payment_succeeds() {
    let events = vec![
        fx::checkout("evt_done", "checkout.session.completed", T0, "unpaid", "u1"),
        fx::checkout(
            "evt_async",
            "checkout.session.async_payment_succeeded",
            T0 + DAY,
            "paid",
            "u1",
        ),
        fx::payment_intent_succeeded("evt_pi", T0 + DAY, "u1"),
    ];
    let (_db, mut client) = fresh_db().await;
    deliver(&mut client, &events[0]).await.unwrap();
    let pending: String = client
        .query_one("SELECT status FROM purchases", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(pending, "pending");
    let entitlements: i64 = client
        .query_one("SELECT count(*) FROM entitlements", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(entitlements, 0, "an unpaid checkout grants nothing");

    let state = converge(&events, &[&[0, 1, 2], &[1, 0, 2], &[2, 1, 0, 0]]).await;
    assert_eq!(field(&state.purchases[0], "status"), "completed");
    assert_eq!(field(&state.entitlements[0], "status"), "active");
}

#[tokio::test]
async fn subscription_lifecycle_ends_expired_in_any_order() {
    let events = subscription_lifecycle("u2");
    let state = converge(
        &events,
        &[
            &[0, 1, 2, 3, 4, 5, 6, 7, 8],
            &[8, 7, 6, 5, 4, 3, 2, 1, 0],
            &[5, 3, 8, 0, 5, 7, 1, 6, 2, 4, 8],
        ],
    )
    .await;
    let s = &state.subscriptions[0];
    assert_eq!(field(s, "status"), "canceled");
    assert_eq!(field(s, "user_id"), "u2");
    let e = &state.entitlements[0];
    assert_eq!(field(e, "status"), "expired");
    assert_eq!(field(e, "source"), "subscription");
    assert_eq!(field(e, "source_id"), "sub_1");
}

#[tokio::test]
async fn stale_subscription_update_never_overrides_the_newer_one() {
    let events = subscription_lifecycle("u2");
    let (_db, mut client) = fresh_db().await;
    // Renewal recovered (evt_s4, active) is applied before the older past_due update.
    deliver_all(&mut client, &events, &[3, 7, 5, 4]).await;
    let row = client
        .query_one("SELECT status, current_period_end FROM subscriptions", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "active");
    let snapshot = store::user_snapshot(&client, &UserId::parse("u2").unwrap())
        .await
        .unwrap();
    assert_eq!(snapshot.entitlements[0].status, "active");
    assert_eq!(
        snapshot.entitlements[0].expires_at.unwrap().timestamp(),
        T0 + 60 * DAY
    );
}

#[tokio::test]
async fn events_of_an_unknown_user_are_kept_and_applied_when_the_link_appears() {
    let events = subscription_lifecycle("u2");
    let (_db, mut client) = fresh_db().await;
    // Everything but the checkout (the only event naming the user) arrives first.
    for i in [0, 1, 2, 4, 5, 6, 7] {
        let applied = deliver(&mut client, &events[i]).await.unwrap().unwrap();
        assert!(applied.users.is_empty(), "no user to recompute yet");
    }
    let orphan: Option<String> = client
        .query_one("SELECT user_id FROM subscriptions WHERE id = 'sub_1'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(orphan, None);
    assert_eq!(version(&client, "u2").await, 0);

    let applied = deliver(&mut client, &events[3]).await.unwrap().unwrap();
    assert_eq!(applied.users.len(), 1);
    let snapshot = &applied.users[0];
    assert_eq!(snapshot.user_id, "u2");
    assert_eq!(snapshot.version, 1);
    assert_eq!(snapshot.entitlements[0].status, "active");
    assert_eq!(
        snapshot.entitlements[0].expires_at.unwrap().timestamp(),
        T0 + 60 * DAY
    );
    // The read path sees exactly what the write path returned.
    let read = store::user_snapshot(&client, &UserId::parse("u2").unwrap())
        .await
        .unwrap();
    assert_eq!(&read, snapshot);

    // Later events of the now-known customer bump the version each time.
    let applied = deliver(&mut client, &events[8]).await.unwrap().unwrap();
    assert_eq!(applied.users[0].version, 2);
    assert_eq!(applied.users[0].entitlements[0].status, "expired");
}

#[tokio::test]
async fn refund_before_completion_never_grants_and_bumps_the_version_once_linked() {
    let events = purchase(vec![fx::refund("evt_rf", T0 + DAY, 4900)]);
    let (_db, mut client) = fresh_db().await;
    let applied = deliver(&mut client, &events[2]).await.unwrap().unwrap();
    assert!(applied.users.is_empty());
    let applied = deliver(&mut client, &events[0]).await.unwrap().unwrap();
    assert_eq!(applied.users[0].version, 1);
    assert_eq!(applied.users[0].entitlements[0].status, "revoked");
    assert!(deliver(&mut client, &events[0]).await.unwrap().is_none());
    assert_eq!(
        version(&client, "u1").await,
        1,
        "a duplicate changes nothing"
    );
    let applied = deliver(&mut client, &events[1]).await.unwrap().unwrap();
    assert_eq!(applied.users[0].version, 2);
    assert_eq!(applied.users[0].entitlements[0].status, "revoked");
    assert_eq!(notification_count(&client, "entitlement_revoked").await, 1);
}

#[tokio::test]
async fn reapplying_events_without_dedupe_neither_changes_rows_nor_duplicates_notifications() {
    let events = purchase(vec![
        fx::dispute(
            "evt_dc",
            "charge.dispute.created",
            T0 + DAY,
            "needs_response",
        ),
        fx::dispute("evt_dl", "charge.dispute.closed", T0 + 9 * DAY, "lost"),
    ]);
    let (_db, mut client) = fresh_db().await;
    deliver_all(&mut client, &events, &[0, 1, 2, 3]).await;
    let once = state(&client).await;
    for body in &events {
        reapply(&mut client, body).await;
    }
    assert_eq!(state(&client).await, once);
    assert_eq!(
        notification_count(&client, "entitlement_suspended").await,
        1
    );
    assert_eq!(notification_count(&client, "entitlement_revoked").await, 1);
}

#[tokio::test]
async fn expired_checkout_queues_one_abandoned_notification_with_the_recovery_url() {
    let expired = fx::event(
        "evt_exp",
        "checkout.session.expired",
        T0,
        json!({ "id": "cs_9", "object": "checkout.session", "mode": "payment",
            "payment_status": "unpaid", "status": "expired", "customer": null,
            "client_reference_id": "u9", "metadata": { "product_key": "pro" },
            "after_expiration": { "recovery": { "enabled": true,
                "url": "https://buy.stripe.com/r/test_abc" } } }),
    );
    let (_db, mut client) = fresh_db().await;
    for _ in 0..2 {
        reapply(&mut client, &expired).await;
    }
    let rows = client
        .query(
            "SELECT user_id, payload FROM notifications WHERE kind = 'checkout_abandoned'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].get::<_, Option<String>>(0).as_deref(), Some("u9"));
    let payload: Value = rows[0].get(1);
    assert_eq!(payload["recoveryUrl"], "https://buy.stripe.com/r/test_abc");
    assert_eq!(payload["checkoutSessionId"], "cs_9");
}

#[tokio::test]
async fn a_second_payment_is_a_purchase_of_its_own_and_refunding_one_of_two_keeps_access() {
    let (_db, mut client) = fresh_db().await;
    deliver(&mut client, &purchase(vec![])[0]).await.unwrap();
    let other = fx::event(
        "evt_other",
        "checkout.session.completed",
        T0 + 5,
        json!({ "id": "cs_other", "mode": "payment", "payment_status": "paid",
            "customer": "cus_1", "payment_intent": "pi_other", "client_reference_id": "u1",
            "amount_total": 4900, "currency": "usd", "metadata": { "product_key": "pro" } }),
    );
    let applied = deliver(&mut client, &other).await.unwrap().unwrap();
    let pro = &applied.users[0].entitlements[0];
    assert_eq!(pro.status, "active");
    assert_eq!(
        pro.sources.len(),
        2,
        "both payments grant: {:?}",
        pro.sources
    );
    let flags: Vec<(String, bool)> = client
        .query(
            "SELECT payment_intent_id, duplicate FROM purchases ORDER BY purchased_at",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        flags,
        [("pi_1".to_owned(), false), ("pi_other".to_owned(), true)]
    );

    // Refunding the first keeps access through the second; refunding both ends it.
    let applied = deliver(&mut client, &fx::refund("evt_rf", T0 + 9, 4900))
        .await
        .unwrap()
        .unwrap();
    let pro = &applied.users[0].entitlements[0];
    assert_eq!(
        (pro.status.as_str(), pro.source_id.as_str()),
        ("active", "pi_other")
    );
    let refund_other = fx::event(
        "evt_rf_other",
        "charge.refunded",
        T0 + 10,
        json!({ "id": "ch_other", "object": "charge", "amount": 4900, "amount_refunded": 4900,
            "refunded": true, "payment_intent": "pi_other", "customer": "cus_1",
            "currency": "usd" }),
    );
    let applied = deliver(&mut client, &refund_other).await.unwrap().unwrap();
    assert_eq!(applied.users[0].entitlements[0].status, "revoked");
}

/// One user with a disputed purchase and a whole subscription lifecycle.
fn one_user_everything() -> Vec<Value> {
    let mut events = purchase(vec![
        fx::dispute(
            "evt_dc",
            "charge.dispute.created",
            T0 + DAY,
            "needs_response",
        ),
        fx::dispute("evt_dw", "charge.dispute.closed", T0 + 9 * DAY, "won"),
        fx::refund("evt_rf", T0 + 10 * DAY, 700),
    ]);
    events.extend(subscription_lifecycle("u1"));
    events
}

/// Delivers `bodies` in order, retrying transient failures (deadlock victims, lock timeouts)
/// the way the consumer does.
async fn deliver_with_retries(mut client: Client, bodies: Vec<Value>) {
    for body in &bodies {
        let mut attempts = 0;
        loop {
            match deliver(&mut client, body).await {
                Ok(_) => break,
                Err(Refusal::Unavailable(e)) if attempts < 10 => {
                    attempts += 1;
                    eprintln!("retrying after transient error: {e}");
                }
                Err(e) => panic!("permanent failure: {e:?}"),
            }
        }
    }
}

#[tokio::test]
async fn two_concurrent_writers_on_one_user_end_like_a_sequential_run() {
    let events = one_user_everything();
    let (_db, mut client) = fresh_db().await;
    deliver_all(&mut client, &events, &(0..events.len()).collect::<Vec<_>>()).await;
    let sequential = state(&client).await;
    assert_eq!(field(&sequential.entitlements[0], "status"), "active");
    assert_eq!(field(&sequential.entitlements[0], "source"), "purchase");

    for round in 0..3 {
        let (db, client) = fresh_db().await;
        let second = connect(&db).await;
        // Interleave: each writer takes every other event, shifted per round; some events go
        // to both, so the writers also race on the same event ids.
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for (i, body) in events.iter().enumerate() {
            if (i + round) % 2 == 0 {
                a.push(body.clone())
            } else {
                b.push(body.clone())
            }
            if i % 4 == round {
                a.push(body.clone());
                b.push(body.clone());
            }
        }
        b.reverse();
        let (ra, rb) = tokio::join!(
            tokio::spawn(deliver_with_retries(client, a)),
            tokio::spawn(deliver_with_retries(second, b)),
        );
        ra.unwrap();
        rb.unwrap();
        let check = connect(&db).await;
        assert_eq!(state(&check).await, sequential, "round {round}");
        let snapshot = store::user_snapshot(&check, &UserId::parse("u1").unwrap())
            .await
            .unwrap();
        assert!(snapshot.version >= 1);
        assert_eq!(snapshot.entitlements[0].status, "active");
    }
}

#[tokio::test]
async fn a_writer_on_the_same_user_waits_for_the_first_to_commit_and_sees_its_changes() {
    let (db, mut first) = fresh_db().await;
    deliver(&mut first, &purchase(vec![])[0]).await.unwrap();

    // The refund and the subscription checkout touch disjoint Stripe objects; only the user
    // is shared. Without the per-user lock the second would recompute from a snapshot missing
    // the refund, keep the purchase as the best source, and the refund would win at commit.
    let refund = parse(&fx::refund("evt_rf", T0 + DAY, 4900));
    let tx = first.transaction().await.unwrap();
    let Outcome::Applied(users) = store::apply_events(&tx, None, &[&refund])
        .await
        .unwrap()
        .remove(0)
    else {
        panic!("the refund applies");
    };
    assert_eq!(users[0].entitlements[0].status, "revoked");

    let mut second = connect(&db).await;
    let racer = tokio::spawn(async move {
        deliver(&mut second, &fx::subscription_checkout("evt_cs", T0, "u1"))
            .await
            .unwrap()
            .unwrap()
    });
    let observer = connect(&db).await;
    system_tests::eventually(
        std::time::Duration::from_secs(10),
        "the second writer to wait on the user's advisory lock",
        || async {
            let waiting: i64 = observer
                .query_one(
                    "SELECT count(*) FROM pg_locks
                      WHERE locktype = 'advisory' AND NOT granted
                        AND database = (SELECT oid FROM pg_database
                                         WHERE datname = current_database())",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            (waiting > 0).then_some(())
        },
    )
    .await;
    tx.commit().await.unwrap();

    let applied = racer.await.unwrap();
    let snapshot = &applied.users[0];
    assert_eq!(snapshot.version, 3, "completion, refund, then the racer");
    assert_eq!(snapshot.entitlements[0].status, "active");
    assert_eq!(snapshot.entitlements[0].source, "subscription");
    let read = store::user_snapshot(&observer, &UserId::parse("u1").unwrap())
        .await
        .unwrap();
    assert_eq!(&read, snapshot);
}
