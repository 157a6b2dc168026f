//! Order-independence of the projection: every permutation of a scenario's events, with
//! duplicates, applied one by one and in batches of every size through the domain's fold
//! ([`crate::domain::fold`], the one the Postgres store calls), ends in the same rows and
//! entitlements as the expected end state. No service is needed.

#![allow(clippy::unwrap_used)]

use super::*;
use crate::domain::events::{self, DisputeStatus, Event, EventKind};
use proptest::prelude::*;
use serde_json::{Value, json};
use shared::ids::UserId;
use shared::samples::history::DAY;
use std::collections::BTreeMap;

const T0: i64 = 1_700_000_000;

/// Stripe-shaped event bodies, parsed through [`events::parse`] like the real ones.
/// The shared fixed-id history (`shared::samples::history`), parsed.
mod fx {
    use super::*;
    use shared::samples::history;

    pub(super) use history::On;

    fn parse(body: Value) -> Event {
        events::parse(&serde_json::to_vec(&body).unwrap()).unwrap()
    }

    macro_rules! parsed {
        ($($name:ident($($arg:ident: $ty:ty),*);)*) => {$(
            pub(super) fn $name($($arg: $ty),*) -> Event {
                parse(history::$name($($arg),*))
            }
        )*};
    }

    parsed! {
        event(id: &str, event_type: &str, created: i64, object: Value);
        checkout(id: &str, event_type: &str, created: i64, payment_status: &str, user: &str);
        payment_intent_succeeded(id: &str, created: i64, user: &str);
        refund(id: &str, created: i64, refunded: i64);
        dispute(id: &str, event_type: &str, created: i64, status: &str);
        dispute_on(id: &str, event_type: &str, created: i64, dispute: &str, status: &str);
        subscription(id: &str, event_type: &str, created: i64, status: &str, period_end: i64);
        invoice(id: &str, event_type: &str, created: i64, reason: &str, period_end: i64);
        subscription_checkout(id: &str, created: i64, user: &str);
    }

    /// A subscription event of `on` in `status` (quantity 2, period ending 90 days after `T0`).
    pub(super) fn priced_subscription(
        id: &str,
        event_type: &str,
        created: i64,
        status: &str,
        on: &On<'_>,
    ) -> Event {
        parse(history::priced_subscription(
            id,
            event_type,
            created,
            status,
            on,
            T0 + 90 * DAY,
        ))
    }
}

/// The registry of these tests: the catalog's documented example (`pro` lifetime at `price_pro`,
/// `pro_monthly → pro`, `team_monthly → team`) and one `price_data` content item.
fn registry() -> Registry {
    let product = |key: &str, price: Option<&str>, amount: Option<i64>, grants: &[&str]| Product {
        key: key.into(),
        title: None,
        price_id: price.map(str::to_owned),
        amount_cents: amount,
        currency: amount.map(|_| "usd".into()),
        mode: if key.ends_with("_monthly") {
            crate::domain::events::CheckoutMode::Subscription
        } else {
            crate::domain::events::CheckoutMode::Payment
        },
        grants: grants.iter().map(|g| (*g).to_owned()).collect(),
        feature_lookup_key: Some(format!("feature-{key}")),
        creator_id: None,
        platform_fee_bps: 0,
        organization_fee_bps: 0,
        status: ProductStatus::Published,
        retired_price_ids: Vec::new(),
        retired_amounts: Vec::new(),
    };
    Registry::new([
        product("pro", Some("price_pro"), None, &["pro"]),
        product("pro_monthly", Some("price_pro_monthly"), None, &["pro"]),
        product("team_monthly", Some("price_team_monthly"), None, &["team"]),
        product("item-1", None, Some(1500), &["content:item-1"]),
    ])
}

/// A tiny in-memory store applying the same pure functions as `store::apply`: each batch's fresh
/// events planned, folded with the stored rows by [`crate::domain::fold`], the rows written back.
#[derive(Debug, Default)]
struct Memory {
    /// By row id, as the store keeps them.
    purchases: Vec<(i64, PurchaseFacts)>,
    next_id: i64,
    subscriptions: Vec<SubscriptionFacts>,
    customers: HashMap<String, String>,
    abandoned: BTreeMap<String, AbandonedCheckout>,
    features: Vec<FeatureFacts>,
    /// `processed_events`.
    seen: HashSet<String>,
}

#[derive(Debug, PartialEq)]
struct Outcome {
    purchases: Vec<(PurchaseFacts, PurchaseStatus)>,
    subscriptions: Vec<(SubscriptionFacts, SubscriptionStatus)>,
    entitlements: BTreeMap<String, Vec<Entitlement>>,
}

use crate::domain::events::SubscriptionStatus;
use crate::domain::fold;
use std::collections::{BTreeSet, HashMap, HashSet};

impl Memory {
    fn apply(&mut self, event: &Event) {
        self.apply_batch(&[event]);
    }

    /// One batch, as one transaction of the store: replays skipped, links first (the first
    /// link of a customer wins), then the fold.
    fn apply_batch(&mut self, events: &[&Event]) {
        let plans: Vec<Plan> = events
            .iter()
            .filter(|e| self.seen.insert(e.id.as_str().to_owned()))
            .map(|e| plan(e))
            .collect();
        for link in plans.iter().filter_map(|p| p.link.as_ref()) {
            self.customers
                .entry(link.customer_id.clone())
                .or_insert_with(|| link.user_id.as_str().to_owned());
        }
        let purchase_deltas = deltas(&plans, |p| p.purchase.as_ref());
        let subscription_deltas = deltas(&plans, |p| p.subscription.as_ref());
        let feature_deltas = deltas(&plans, |p| p.features.as_ref());
        let mut users = vec![BTreeSet::new(); plans.len()];
        let purchases = fold::purchases(
            std::mem::take(&mut self.purchases),
            &purchase_deltas,
            &self.customers,
            &mut users,
        );
        for write in purchases.writes {
            let id = write.id.unwrap_or_else(|| {
                self.next_id += 1;
                -self.next_id
            });
            self.purchases.push((id, write.facts));
        }
        self.subscriptions = fold::subscriptions(
            std::mem::take(&mut self.subscriptions),
            &subscription_deltas,
            &self.customers,
            &mut users,
        );
        self.features = fold::features(
            std::mem::take(&mut self.features),
            &feature_deltas,
            &self.customers,
            &mut users,
        );
        for abandoned in plans.iter().filter_map(|p| p.abandoned.clone()) {
            self.abandoned
                .entry(abandoned.session_id.clone())
                .or_insert(abandoned);
        }
        // A new link attaches the stored rows that waited for their customer's user.
        let customers = &self.customers;
        let resolve = |user: &mut Option<String>, customer: Option<&String>| {
            if user.is_none() {
                *user = customer.and_then(|c| customers.get(c)).cloned();
            }
        };
        for (_, p) in &mut self.purchases {
            resolve(&mut p.user_id, p.customer_id.as_ref());
        }
        for s in &mut self.subscriptions {
            resolve(&mut s.user_id, s.customer_id.as_ref());
        }
        for f in &mut self.features {
            let customer = f.customer_id.clone();
            resolve(&mut f.user_id, Some(&customer));
        }
    }

    fn outcome(&self) -> Outcome {
        let mut purchases: Vec<_> = self
            .purchases
            .iter()
            .map(|(_, p)| (p.clone(), p.status()))
            .collect();
        purchases.sort_by(|a, b| a.0.source_id().cmp(&b.0.source_id()));
        let subscriptions = self
            .subscriptions
            .iter()
            .map(|s| (s.clone(), s.status()))
            .collect();
        let mut users: Vec<&String> = self
            .purchases
            .iter()
            .filter_map(|(_, p)| p.user_id.as_ref())
            .chain(self.subscriptions.iter().filter_map(|s| s.user_id.as_ref()))
            .chain(self.features.iter().filter_map(|f| f.user_id.as_ref()))
            .collect();
        users.sort();
        users.dedup();
        let entitlements = users
            .into_iter()
            .map(|user| {
                let ps: Vec<_> = self
                    .purchases
                    .iter()
                    .map(|(_, p)| p)
                    .filter(|p| p.user_id.as_ref() == Some(user))
                    .cloned()
                    .collect();
                let ss: Vec<_> = self
                    .subscriptions
                    .iter()
                    .filter(|s| s.user_id.as_ref() == Some(user))
                    .cloned()
                    .collect();
                let fs: Vec<_> = self
                    .features
                    .iter()
                    .filter(|f| f.user_id.as_ref() == Some(user))
                    .cloned()
                    .collect();
                (
                    user.clone(),
                    derive_entitlements(&ps, &ss, &fs, &registry()),
                )
            })
            .collect();
        Outcome {
            purchases,
            subscriptions,
            entitlements,
        }
    }
}

fn run(events: &[Event], order: &[usize]) -> Outcome {
    let mut memory = Memory::default();
    for &i in order {
        memory.apply(&events[i]);
    }
    memory.outcome()
}

/// A permutation of `0..n` with duplicates inserted at arbitrary places.
fn orders(n: usize) -> impl Strategy<Value = Vec<usize>> {
    let perm = Just((0..n).collect::<Vec<_>>()).prop_shuffle();
    let dups = prop::collection::vec((0..n, any::<prop::sample::Index>()), 0..=n);
    (perm, dups).prop_map(|(mut order, dups)| {
        for (event, at) in dups {
            let pos = at.index(order.len() + 1);
            order.insert(pos, event);
        }
        order
    })
}

fn only_entitlement(outcome: &Outcome, user: &str) -> Entitlement {
    let list = &outcome.entitlements[user];
    assert_eq!(list.len(), 1, "{list:?}");
    list[0].clone()
}

fn purchase_scenario(tail: Vec<Event>) -> Vec<Event> {
    let mut events = vec![
        fx::checkout("evt_done", "checkout.session.completed", T0, "paid", "u1"),
        fx::payment_intent_succeeded("evt_pi", T0, "u1"),
    ];
    events.extend(tail);
    events
}

fn subscription_scenario(with_delete: bool) -> Vec<Event> {
    let p1 = T0 + 30 * DAY;
    let p2 = T0 + 60 * DAY;
    let mut events = vec![
        // The first payment: four events inside the same second.
        fx::subscription(
            "evt_s1",
            "customer.subscription.created",
            T0,
            "incomplete",
            p1,
        ),
        fx::invoice("evt_i1", "invoice.paid", T0, "subscription_create", p1),
        fx::subscription("evt_s2", "customer.subscription.updated", T0, "active", p1),
        fx::subscription_checkout("evt_cs", T0, "u2"),
        // The first renewal fails…
        fx::invoice(
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
        // …and is paid three days later.
        fx::invoice(
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
    ];
    if with_delete {
        events.push(fx::subscription(
            "evt_s5",
            "customer.subscription.deleted",
            p1 + 10 * DAY,
            "canceled",
            p2,
        ));
    }
    events
}

/// One part of each plan that has it, by the plan's index in the batch (as the store's deltas).
fn deltas<T>(plans: &[Plan], part: fn(&Plan) -> Option<&T>) -> Vec<(usize, &T)> {
    plans
        .iter()
        .enumerate()
        .filter_map(|(i, p)| Some((i, part(p)?)))
        .collect()
}

/// `order`'s events applied in batches of `size` (the last one shorter), as the worker groups
/// deliveries into transactions.
fn run_batched(events: &[Event], order: &[usize], size: usize) -> Outcome {
    let mut memory = Memory::default();
    for batch in order.chunks(size) {
        let batch: Vec<&Event> = batch.iter().map(|&i| &events[i]).collect();
        memory.apply_batch(&batch);
    }
    memory.outcome()
}

/// The same end state for `order` as for the events in their own order, applied one by one
/// and grouped into batches of every size (one batch of all included).
fn assert_converges(events: &[Event], order: &[usize]) -> Outcome {
    let canonical = run(events, &(0..events.len()).collect::<Vec<_>>());
    let permuted = run(events, order);
    assert_eq!(permuted, canonical, "order {order:?}");
    for size in 2..=order.len().max(2) {
        let batched = run_batched(events, order, size);
        assert_eq!(batched, canonical, "order {order:?} in batches of {size}");
    }
    permuted
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn purchase_then_full_refund_revokes_in_any_order(order in orders(3)) {
        let events = purchase_scenario(vec![fx::refund("evt_rf", T0 + DAY, 4900)]);
        let outcome = assert_converges(&events, &order);
        let (purchase, status) = &outcome.purchases[0];
        prop_assert_eq!(*status, PurchaseStatus::Refunded);
        prop_assert_eq!(purchase.refunded_cents(), 4900);
        prop_assert_eq!(purchase.refunded_at, Some(T0 + DAY));
        prop_assert_eq!(purchase.user_id.as_deref(), Some("u1"));
        let e = only_entitlement(&outcome, "u1");
        prop_assert_eq!(e.status, EntitlementStatus::Revoked);
        prop_assert_eq!(e.source_id, "pi_1");
    }

    #[test]
    fn purchase_then_partial_refund_keeps_access_in_any_order(order in orders(4)) {
        let events = purchase_scenario(vec![
            fx::refund("evt_rf1", T0 + DAY, 1000),
            fx::refund("evt_rf2", T0 + 2 * DAY, 1500),
        ]);
        let outcome = assert_converges(&events, &order);
        let (purchase, status) = &outcome.purchases[0];
        prop_assert_eq!(*status, PurchaseStatus::Completed);
        prop_assert_eq!(purchase.refunded_cents(), 1500);
        prop_assert_eq!(
            purchase.refund.as_ref().and_then(|r| r.refund_id.as_deref()),
            Some("re_1500")
        );
        prop_assert_eq!(purchase.refunded_at, None);
        let e = only_entitlement(&outcome, "u1");
        prop_assert_eq!(e.status, EntitlementStatus::Active);
        prop_assert_eq!(e.expires_at, None);
    }

    #[test]
    fn purchase_then_dispute_won_restores_in_any_order(order in orders(4)) {
        let events = purchase_scenario(vec![
            fx::dispute("evt_dc", "charge.dispute.created", T0 + DAY, "needs_response"),
            fx::dispute("evt_dw", "charge.dispute.closed", T0 + 9 * DAY, "won"),
        ]);
        let outcome = assert_converges(&events, &order);
        let (purchase, status) = &outcome.purchases[0];
        prop_assert_eq!(*status, PurchaseStatus::Completed);
        prop_assert_eq!(purchase.dispute(), DisputeState::Won);
        prop_assert_eq!(purchase.charge_id.as_deref(), Some("ch_1"));
        prop_assert_eq!(only_entitlement(&outcome, "u1").status, EntitlementStatus::Active);
    }

    #[test]
    fn purchase_then_dispute_lost_revokes_in_any_order(order in orders(4)) {
        let events = purchase_scenario(vec![
            fx::dispute("evt_dc", "charge.dispute.created", T0 + DAY, "needs_response"),
            fx::dispute("evt_dl", "charge.dispute.closed", T0 + 9 * DAY, "lost"),
        ]);
        let outcome = assert_converges(&events, &order);
        prop_assert_eq!(outcome.purchases.len(), 1);
        prop_assert_eq!(outcome.purchases[0].1, PurchaseStatus::Refunded);
        prop_assert_eq!(only_entitlement(&outcome, "u1").status, EntitlementStatus::Revoked);
    }

    #[test]
    fn an_inquiry_closed_then_a_chargeback_won_restores_access_in_any_order(order in orders(7)) {
        let events = purchase_scenario(vec![
            fx::dispute_on("evt_i1", "charge.dispute.created", T0 + DAY, "dp_i", "warning_needs_response"),
            fx::dispute_on("evt_i2", "charge.dispute.updated", T0 + 2 * DAY, "dp_i", "warning_under_review"),
            fx::dispute_on("evt_i3", "charge.dispute.closed", T0 + 3 * DAY, "dp_i", "warning_closed"),
            fx::dispute_on("evt_c1", "charge.dispute.created", T0 + 4 * DAY, "dp_c", "needs_response"),
            fx::dispute_on("evt_c2", "charge.dispute.funds_reinstated", T0 + 9 * DAY, "dp_c", "won"),
        ]);
        let outcome = assert_converges(&events, &order);
        let (purchase, status) = &outcome.purchases[0];
        prop_assert_eq!(*status, PurchaseStatus::Completed);
        prop_assert_eq!(purchase.dispute(), DisputeState::Won);
        prop_assert_eq!(purchase.disputes.len(), 2);
        prop_assert_eq!(only_entitlement(&outcome, "u1").status, EntitlementStatus::Active);
    }

    #[test]
    fn a_chargeback_opened_after_a_closed_inquiry_suspends_in_any_order(order in orders(5)) {
        let events = purchase_scenario(vec![
            fx::dispute_on("evt_i1", "charge.dispute.created", T0 + DAY, "dp_i", "warning_needs_response"),
            fx::dispute_on("evt_i3", "charge.dispute.closed", T0 + 3 * DAY, "dp_i", "warning_closed"),
            fx::dispute_on("evt_c1", "charge.dispute.funds_withdrawn", T0 + 4 * DAY, "dp_c", "needs_response"),
        ]);
        let outcome = assert_converges(&events, &order);
        prop_assert_eq!(outcome.purchases[0].1, PurchaseStatus::Disputed);
        prop_assert_eq!(only_entitlement(&outcome, "u1").status, EntitlementStatus::Suspended);
    }

    #[test]
    fn an_open_inquiry_suspends_nothing_and_its_escalation_lost_revokes_in_any_order(
        order in orders(5),
        lost in any::<bool>(),
    ) {
        let mut tail = vec![
            fx::dispute_on("evt_i1", "charge.dispute.created", T0 + DAY, "dp_i", "warning_needs_response"),
        ];
        // The first three events alone, in the same order.
        let first: Vec<usize> = order.iter().copied().filter(|i| *i < 3).collect();
        let inquiry = assert_converges(&purchase_scenario(tail.clone()), &first);
        prop_assert_eq!(inquiry.purchases[0].0.dispute(), DisputeState::Inquiry);
        prop_assert_eq!(only_entitlement(&inquiry, "u1").status, EntitlementStatus::Active);
        // The same dispute escalates to a chargeback, then closes.
        tail.push(fx::dispute_on("evt_i2", "charge.dispute.updated", T0 + 2 * DAY, "dp_i", "needs_response"));
        tail.push(fx::dispute_on(
            "evt_i3", "charge.dispute.closed", T0 + 9 * DAY, "dp_i", if lost { "lost" } else { "won" },
        ));
        let outcome = assert_converges(&purchase_scenario(tail), &order);
        let expected = if lost { EntitlementStatus::Revoked } else { EntitlementStatus::Active };
        prop_assert_eq!(only_entitlement(&outcome, "u1").status, expected);
    }

    #[test]
    fn one_chargeback_lost_of_two_revokes_in_any_order(order in orders(6)) {
        let events = purchase_scenario(vec![
            fx::dispute_on("evt_a1", "charge.dispute.created", T0 + DAY, "dp_a", "needs_response"),
            fx::dispute_on("evt_a2", "charge.dispute.closed", T0 + 5 * DAY, "dp_a", "won"),
            fx::dispute_on("evt_b1", "charge.dispute.created", T0 + 6 * DAY, "dp_b", "needs_response"),
            fx::dispute_on("evt_b2", "charge.dispute.closed", T0 + 9 * DAY, "dp_b", "lost"),
        ]);
        let outcome = assert_converges(&events, &order);
        prop_assert_eq!(outcome.purchases[0].1, PurchaseStatus::Refunded);
        prop_assert_eq!(only_entitlement(&outcome, "u1").status, EntitlementStatus::Revoked);
    }

    #[test]
    fn an_unknown_dispute_status_is_recorded_and_keeps_the_disputes_known_effect(
        order in orders(5),
    ) {
        let events = purchase_scenario(vec![
            fx::dispute_on("evt_c1", "charge.dispute.created", T0 + DAY, "dp_c", "needs_response"),
            fx::dispute_on("evt_c2", "charge.dispute.updated", T0 + 2 * DAY, "dp_c", "escalated_to_arbitration"),
            fx::dispute_on("evt_u1", "charge.dispute.created", T0 + 3 * DAY, "dp_u", "brand_new_status"),
        ]);
        let outcome = assert_converges(&events, &order);
        let purchase = &outcome.purchases[0].0;
        prop_assert_eq!(
            purchase.disputes["dp_c"].latest.status.as_str(), "escalated_to_arbitration"
        );
        prop_assert_eq!(purchase.disputes["dp_u"].state(), DisputeState::Unknown);
        // The chargeback's last known status still suspends; the unknown dispute adds nothing.
        prop_assert_eq!(only_entitlement(&outcome, "u1").status, EntitlementStatus::Suspended);
    }

    #[test]
    fn a_second_payment_is_a_duplicate_and_refunding_one_of_two_keeps_access_in_any_order(
        order in orders(5),
        refund_both in any::<bool>(),
    ) {
        let second = |id: &str, event_type: &str, created: i64, object: Value| {
            fx::event(id, event_type, created, object)
        };
        let mut events = purchase_scenario(vec![
            second("evt_done2", "checkout.session.completed", T0 + 900, json!({
                "id": "cs_2", "object": "checkout.session", "mode": "payment",
                "payment_status": "paid", "customer": "cus_1", "payment_intent": "pi_2",
                "client_reference_id": "u1", "amount_total": 4900, "currency": "usd",
                "metadata": { "product_key": "pro" } })),
            fx::refund("evt_rf1", T0 + 3_600, 4900),
        ]);
        events.push(second("evt_rf2", "charge.refunded", T0 + 7_200, json!({
            "id": "ch_2", "object": "charge", "amount": 4900,
            "amount_refunded": if refund_both { 4900 } else { 0 }, "refunded": refund_both,
            "payment_intent": "pi_2", "customer": "cus_1", "currency": "usd" })));
        let outcome = assert_converges(&events, &order);
        let purchases: Vec<PurchaseFacts> =
            outcome.purchases.iter().map(|(p, _)| p.clone()).collect();
        let flags: Vec<(Option<&str>, bool)> = purchases
            .iter()
            .map(|p| p.payment_intent_id.as_deref())
            .zip(duplicate_payments(&purchases, &registry()))
            .collect();
        prop_assert_eq!(flags, vec![(Some("pi_1"), false), (Some("pi_2"), true)]);
        let pro = only_entitlement(&outcome, "u1");
        if refund_both {
            prop_assert_eq!(pro.status, EntitlementStatus::Revoked);
        } else {
            prop_assert_eq!((pro.status, pro.source_id.as_str()), (EntitlementStatus::Active, "pi_2"));
        }
    }

    #[test]
    fn delayed_payment_then_async_success_grants_in_any_order(order in orders(3)) {
        let events = vec![
            fx::checkout("evt_done", "checkout.session.completed", T0, "unpaid", "u1"),
            fx::checkout(
                "evt_async", "checkout.session.async_payment_succeeded", T0 + DAY, "paid", "u1",
            ),
            fx::payment_intent_succeeded("evt_pi", T0 + DAY, "u1"),
        ];
        let outcome = assert_converges(&events, &order);
        let (purchase, status) = &outcome.purchases[0];
        prop_assert_eq!(*status, PurchaseStatus::Completed);
        prop_assert_eq!(purchase.paid_at, Some(T0 + DAY));
        prop_assert_eq!(purchase.amount_cents, Some(4900));
        prop_assert_eq!(only_entitlement(&outcome, "u1").status, EntitlementStatus::Active);
    }

    #[test]
    fn subscription_lifecycle_ending_in_deletion_expires_in_any_order(order in orders(9)) {
        let events = subscription_scenario(true);
        let outcome = assert_converges(&events, &order);
        let (sub, status) = &outcome.subscriptions[0];
        prop_assert_eq!(*status, SubscriptionStatus::Canceled);
        prop_assert_eq!(sub.user_id.as_deref(), Some("u2"));
        let e = only_entitlement(&outcome, "u2");
        prop_assert_eq!(e.status, EntitlementStatus::Expired);
        prop_assert_eq!(e.source, EntitlementSource::Subscription);
        prop_assert_eq!(e.expires_at, Some(T0 + 40 * DAY));
    }

    #[test]
    fn subscription_recovered_from_failed_renewal_is_active_in_any_order(order in orders(8)) {
        let events = subscription_scenario(false);
        let outcome = assert_converges(&events, &order);
        prop_assert_eq!(outcome.subscriptions[0].1, SubscriptionStatus::Active);
        let e = only_entitlement(&outcome, "u2");
        prop_assert_eq!(e.status, EntitlementStatus::Active);
        prop_assert_eq!(e.expires_at, Some(T0 + 60 * DAY));
    }

    #[test]
    fn purchase_merge_is_a_semilattice(
        a in arbitrary_purchase(), b in arbitrary_purchase(), c in arbitrary_purchase(),
    ) {
        prop_assert_eq!(a.clone().merge(b.clone()), b.clone().merge(a.clone()));
        prop_assert_eq!(
            a.clone().merge(b.clone()).merge(c.clone()),
            a.clone().merge(b.clone().merge(c))
        );
        prop_assert_eq!(a.clone().merge(a.clone()), a);
    }
}

/// `invoice_payment.paid`: `payment_intent` (charge `ch_` of the same suffix) paid `invoice`.
fn invoice_payment(id: &str, created: i64, invoice: &str, payment_intent: &str) -> Event {
    fx::event(
        id,
        "invoice_payment.paid",
        created,
        json!({ "id": format!("inpay_{id}"), "object": "invoice_payment", "invoice": invoice,
            "status": "paid", "amount_paid": 1900, "currency": "usd",
            "payment": { "type": "payment_intent", "payment_intent": payment_intent } }),
    )
}

/// A dispute of the subscription payment `payment_intent` (its charge `ch_…` of the same suffix).
fn payment_dispute(
    id: &str,
    event_type: &str,
    created: i64,
    payment_intent: &str,
    status: &str,
) -> Event {
    let suffix = payment_intent.trim_start_matches("pi_");
    fx::event(
        id,
        event_type,
        created,
        json!({ "id": format!("dp_{suffix}"), "object": "dispute", "amount": 1900,
            "charge": format!("ch_{suffix}"), "payment_intent": payment_intent, "status": status }),
    )
}

/// The full refund of the subscription payment `payment_intent`.
fn payment_refund(id: &str, created: i64, payment_intent: &str) -> Event {
    let suffix = payment_intent.trim_start_matches("pi_");
    fx::event(
        id,
        "charge.refunded",
        created,
        json!({ "id": format!("ch_{suffix}"), "object": "charge", "amount": 1900,
            "amount_refunded": 1900, "refunded": true, "payment_intent": payment_intent,
            "currency": "usd" }),
    )
}

/// How a chargeback on a subscription's renewal payment ends.
#[derive(Debug, Clone, Copy)]
enum Chargeback {
    Open,
    Won,
    Lost,
    LostThenPaidAgain,
}

fn chargebacks() -> impl Strategy<Value = Chargeback> {
    prop::sample::select(vec![
        Chargeback::Open,
        Chargeback::Won,
        Chargeback::Lost,
        Chargeback::LostThenPaidAgain,
    ])
}

/// The subscription of [`subscription_scenario`] (renewed at `T0 + 33 days` by invoice
/// `in_evt_i3`), its renewal's payment tied to the invoice, and a chargeback on that payment.
fn subscription_chargeback_scenario(outcome: Chargeback) -> Vec<Event> {
    let p1 = T0 + 30 * DAY;
    let mut events = subscription_scenario(false);
    events.push(invoice_payment("evt_ip", p1 + 3 * DAY, "in_evt_i3", "pi_r"));
    events.push(payment_dispute(
        "evt_d1",
        "charge.dispute.created",
        p1 + 5 * DAY,
        "pi_r",
        "needs_response",
    ));
    let closed = |status| {
        payment_dispute(
            "evt_d2",
            "charge.dispute.closed",
            p1 + 20 * DAY,
            "pi_r",
            status,
        )
    };
    match outcome {
        Chargeback::Open => {}
        Chargeback::Won => events.push(closed("won")),
        Chargeback::Lost => events.push(closed("lost")),
        Chargeback::LostThenPaidAgain => {
            events.push(closed("lost"));
            // The next renewal is paid after the loss.
            events.push(fx::invoice(
                "evt_i4",
                "invoice.paid",
                T0 + 60 * DAY,
                "subscription_cycle",
                T0 + 90 * DAY,
            ));
            events.push(invoice_payment(
                "evt_ip4",
                T0 + 60 * DAY,
                "in_evt_i4",
                "pi_next",
            ));
        }
    }
    events
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn a_chargeback_on_a_subscription_payment_decides_the_subscription_in_any_order(
        outcome in chargebacks(),
        seed in any::<prop::sample::Index>(),
    ) {
        let events = subscription_chargeback_scenario(outcome);
        // One order of many, drawn from the seed, with a duplicate.
        let mut order: Vec<usize> = (0..events.len()).collect();
        let n = order.len();
        order.rotate_left(seed.index(n));
        order.swap(0, seed.index(n));
        order.push(seed.index(n));
        let result = assert_converges(&events, &order);
        let e = only_entitlement(&result, "u2");
        let expected = match outcome {
            Chargeback::Open => EntitlementStatus::Suspended,
            Chargeback::Won | Chargeback::LostThenPaidAgain => EntitlementStatus::Active,
            Chargeback::Lost => EntitlementStatus::Revoked,
        };
        prop_assert_eq!(e.status, expected, "{:?}", outcome);
        // The payment is the subscription's: never a purchase of its own.
        let payment = result
            .purchases
            .iter()
            .find(|(p, _)| p.payment_intent_id.as_deref() == Some("pi_r"))
            .map(|(p, _)| p.clone())
            .unwrap();
        prop_assert_eq!(payment.subscription_id.as_deref(), Some("sub_1"));
        prop_assert_eq!(payment.invoice_id.as_deref(), Some("in_evt_i3"));
        prop_assert!(payment.is_invoice_payment());
    }

    #[test]
    fn a_refund_of_the_latest_subscription_payment_follows_the_policy_in_any_order(
        order in orders(10),
        latest in any::<bool>(),
    ) {
        let p1 = T0 + 30 * DAY;
        let mut events = subscription_scenario(false);
        // The renewal's payment (latest) or the first one's, refunded in full.
        let (invoice, intent) = if latest { ("in_evt_i3", "pi_r") } else { ("in_evt_i1", "pi_f") };
        events.push(invoice_payment("evt_ip", p1 + 3 * DAY, invoice, intent));
        events.push(payment_refund("evt_rf", p1 + 6 * DAY, intent));
        let result = assert_converges(&events, &order);
        let rows = |r: &Outcome| -> (Vec<PurchaseFacts>, Vec<SubscriptionFacts>) {
            (
                r.purchases.iter().map(|(p, _)| p.clone()).collect(),
                r.subscriptions.iter().map(|(s, _)| s.clone()).collect(),
            )
        };
        let (purchases, subscriptions) = rows(&result);
        for (policy, expected) in [
            (RefundPolicy::EndAccess, if latest { EntitlementStatus::Revoked } else { EntitlementStatus::Active }),
            (RefundPolicy::KeepUntilPeriodEnd, EntitlementStatus::Active),
        ] {
            let registry = registry().with_policy(SubscriptionPolicy { refund: policy, past_due_grace: None });
            let derived = derive_entitlements(&purchases, &subscriptions, &[], &registry);
            prop_assert_eq!(derived[0].status, expected, "{:?}, latest {}", policy, latest);
            if expected == EntitlementStatus::Active {
                prop_assert_eq!(derived[0].expires_at, Some(T0 + 60 * DAY), "to the period's end");
            }
        }
    }

    #[test]
    fn past_due_grace_counts_from_the_first_failure_whatever_the_retries_and_order(
        order in orders(9),
    ) {
        let p1 = T0 + 30 * DAY;
        let p2 = T0 + 60 * DAY;
        let mut events = subscription_scenario(false);
        // Keep the first payment and the failed renewal; drop the late payment (evt_i3, evt_s4).
        events.truncate(6);
        for (id, day) in [("evt_r1", 3), ("evt_r2", 5), ("evt_r3", 7)] {
            events.push(fx::invoice(id, "invoice.payment_failed", p1 + day * DAY, "subscription_cycle", p2));
        }
        let result = assert_converges(&events, &order);
        let purchases: Vec<PurchaseFacts> = result.purchases.iter().map(|(p, _)| p.clone()).collect();
        let subscriptions: Vec<SubscriptionFacts> =
            result.subscriptions.iter().map(|(s, _)| s.clone()).collect();
        prop_assert_eq!(subscriptions[0].past_due_since(), Some(p1));
        for (grace, status, expires) in [
            (None, EntitlementStatus::PastDue, Some(p2)),
            (Some(3 * DAY), EntitlementStatus::PastDue, Some(p1 + 3 * DAY)),
            (Some(0), EntitlementStatus::Suspended, Some(p2)),
        ] {
            let registry = registry().with_policy(SubscriptionPolicy { refund: RefundPolicy::EndAccess, past_due_grace: grace });
            let derived = derive_entitlements(&purchases, &subscriptions, &[], &registry);
            prop_assert_eq!((derived[0].status, derived[0].expires_at), (status, expires), "grace {:?}", grace);
        }
    }

}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn one_user_with_a_disputed_purchase_and_a_subscription_converges_in_any_order(
        order in orders(14),
    ) {
        // Both sources grant `pro`; the lifetime purchase (dispute won, partially refunded)
        // outranks the canceled subscription whatever the order.
        let mut events = purchase_scenario(vec![
            fx::dispute("evt_dc", "charge.dispute.created", T0 + DAY, "needs_response"),
            fx::dispute("evt_dw", "charge.dispute.closed", T0 + 9 * DAY, "won"),
            fx::refund("evt_rf", T0 + 10 * DAY, 700),
        ]);
        events.extend(subscription_scenario(true).into_iter().map(|mut e| {
            if let EventKind::CheckoutSessionCompleted(s) = &mut e.kind {
                s.user_id = Some(UserId::parse("u1").unwrap());
            }
            e
        }));
        let outcome = assert_converges(&events, &order);
        prop_assert_eq!(outcome.entitlements.len(), 1);
        let e = only_entitlement(&outcome, "u1");
        prop_assert_eq!(e.status, EntitlementStatus::Active);
        prop_assert_eq!(e.source, EntitlementSource::Purchase);
    }

    #[test]
    fn subscription_merge_is_a_semilattice(
        a in arbitrary_subscription(), b in arbitrary_subscription(),
        c in arbitrary_subscription(),
    ) {
        prop_assert_eq!(a.clone().merge(b.clone()), b.clone().merge(a.clone()));
        prop_assert_eq!(
            a.clone().merge(b.clone()).merge(c.clone()),
            a.clone().merge(b.clone().merge(c))
        );
        prop_assert_eq!(a.clone().merge(a.clone()), a);
    }

    #[test]
    fn parsing_arbitrary_bytes_never_panics(body in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = events::parse(&body);
    }

    #[test]
    fn parsing_arbitrary_handled_events_never_panics(
        event_type in prop::sample::select(vec![
            "checkout.session.completed", "checkout.session.expired", "charge.refunded",
            "charge.dispute.closed", "invoice.paid", "customer.subscription.updated",
            "payment_intent.succeeded",
        ]),
        object in arbitrary_json(),
    ) {
        let body = json!({ "id": "evt_1", "type": event_type, "created": 1,
            "data": { "object": object } });
        if let Ok(event) = events::parse(&serde_json::to_vec(&body).unwrap()) {
            let _ = plan(&event);
        }
    }
}

fn arbitrary_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        prop::sample::select(vec!["paid", "payment", "cus_1", "", "active", "lost"])
            .prop_map(Value::from),
    ];
    let keys = prop::sample::select(vec![
        "id",
        "mode",
        "payment_status",
        "customer",
        "status",
        "amount",
        "amount_refunded",
        "refunded",
        "subscription",
        "parent",
        "subscription_details",
        "lines",
        "data",
        "period",
        "end",
        "items",
        "current_period_end",
        "metadata",
        "user_id",
        "refunds",
        "after_expiration",
        "recovery",
        "url",
        "charge",
        "payment_intent",
    ]);
    leaf.prop_recursive(4, 32, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map(keys.clone().prop_map(String::from), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn arbitrary_subscription() -> impl Strategy<Value = SubscriptionFacts> {
    let status = || {
        prop::sample::select(vec![
            SubscriptionStatus::Incomplete,
            SubscriptionStatus::Active,
            SubscriptionStatus::PastDue,
            SubscriptionStatus::Canceled,
        ])
    };
    let id = || prop::option::of(prop::sample::select(vec!["a", "b"]).prop_map(String::from));
    (
        (id(), id(), id()),
        prop::option::of((0i64..3, status(), any::<bool>())),
        prop::option::of(prop::sample::select(vec![
            SubscriptionStatus::Canceled,
            SubscriptionStatus::IncompleteExpired,
        ])),
        (prop::option::of(0i64..3), prop::option::of(0i64..3)),
    )
        .prop_map(
            |((user, customer, product), claim, terminal, (end, ended))| {
                let claim = claim.map(|(at, status, cancel_at_period_end)| StatusClaim {
                    at,
                    status,
                    cancel_at_period_end,
                });
                // The dunning facts a claim carries (paid up, or past due, at its time).
                SubscriptionFacts {
                    user_id: user,
                    customer_id: customer,
                    product_key: product,
                    claim,
                    terminal,
                    current_period_end: end,
                    ended_at: ended,
                    ..SubscriptionFacts::new("sub".into())
                }
                .with_dunning(claim.as_ref())
            },
        )
}

fn arbitrary_purchase() -> impl Strategy<Value = PurchaseFacts> {
    let id = || prop::option::of(prop::sample::select(vec!["a", "b"]).prop_map(String::from));
    let time = || prop::option::of(0i64..3);
    (
        (id(), id(), id(), id(), prop::option::of(0i64..3)),
        (any::<bool>(), time(), any::<bool>(), any::<bool>(), time()),
        (
            prop::option::of((0i64..3, id(), id())),
            prop::collection::btree_map(
                prop::sample::select(vec!["dp_a", "dp_b"]).prop_map(String::from),
                (
                    0i64..3,
                    arbitrary_dispute_status(),
                    0i64..3,
                    arbitrary_dispute_status(),
                ),
                0..3,
            ),
        ),
    )
        .prop_map(
            |(
                (session, intent, user, product, amount),
                (paid, paid_at, failed, full, refunded_at),
                (refund, disputes),
            )| PurchaseFacts {
                checkout_session_id: session,
                payment_intent_id: intent,
                user_id: user,
                product_key: product,
                amount_cents: amount,
                paid,
                paid_at,
                failed,
                fully_refunded: full,
                refunded_at,
                refund: refund.map(|(amount_cents, refund_id, reason)| RefundFact {
                    amount_cents,
                    refund_id,
                    reason,
                }),
                disputes: disputes
                    .into_iter()
                    .map(|(id, (at, status, later, next))| {
                        (
                            id,
                            DisputeFacts::of(at, status).merge(DisputeFacts::of(later, next)),
                        )
                    })
                    .collect(),
                ..PurchaseFacts::default()
            },
        )
}

fn arbitrary_dispute_status() -> impl Strategy<Value = DisputeStatus> {
    let mut statuses = DisputeStatus::KNOWN.to_vec();
    statuses.push("charge_refunded_someday");
    prop::sample::select(statuses).prop_map(DisputeStatus::from_stripe)
}

#[test]
fn refund_before_completion_never_grants() {
    let events = purchase_scenario(vec![fx::refund("evt_rf", T0 + DAY, 4900)]);
    let outcome = run(&events, &[2, 0, 1]);
    assert_eq!(
        only_entitlement(&outcome, "u1").status,
        EntitlementStatus::Revoked
    );
}

#[test]
fn stale_subscription_update_never_overrides_a_newer_one() {
    let newer = fx::subscription(
        "evt_b",
        "customer.subscription.updated",
        T0 + 10,
        "past_due",
        T0,
    );
    let stale = fx::subscription("evt_a", "customer.subscription.updated", T0, "active", T0);
    let outcome = run(&[newer, stale], &[0, 1]);
    assert_eq!(outcome.subscriptions[0].1, SubscriptionStatus::PastDue);
}

#[test]
fn same_second_subscription_events_resolve_by_lifecycle_precedence() {
    let created = fx::subscription(
        "evt_a",
        "customer.subscription.created",
        T0,
        "incomplete",
        T0,
    );
    let active = fx::subscription("evt_b", "customer.subscription.updated", T0, "active", T0);
    for order in [[0, 1], [1, 0]] {
        let outcome = run(&[created.clone(), active.clone()], &order);
        assert_eq!(outcome.subscriptions[0].1, SubscriptionStatus::Active);
    }
}

#[test]
fn failed_first_invoice_does_not_open_a_grace_period() {
    let failed = fx::invoice(
        "evt_f",
        "invoice.payment_failed",
        T0,
        "subscription_create",
        T0,
    );
    let plan = plan(&failed);
    assert_eq!(plan.subscription.unwrap().claim, None);
}

#[test]
fn payment_intent_without_our_metadata_is_not_a_purchase() {
    let pi = fx::event(
        "evt_pi",
        "payment_intent.succeeded",
        T0,
        json!({ "id": "pi_9", "amount": 900, "customer": "cus_1", "metadata": {} }),
    );
    assert!(plan(&pi).is_empty());
}

#[test]
fn unpaid_and_incomplete_subscriptions_map_to_suspended_and_nothing() {
    for (status, expected) in [
        ("unpaid", Some(EntitlementStatus::Suspended)),
        ("paused", Some(EntitlementStatus::Suspended)),
        ("incomplete", None),
        ("trialing", Some(EntitlementStatus::Active)),
        ("incomplete_expired", Some(EntitlementStatus::Expired)),
    ] {
        let mut sub = plan(&fx::subscription(
            "evt",
            "customer.subscription.updated",
            T0,
            status,
            T0 + DAY,
        ))
        .subscription
        .unwrap();
        sub.user_id = Some("u".into());
        sub.product_key = Some("pro".into());
        let derived = derive_entitlements(&[], &[sub], &[], &registry());
        assert_eq!(derived.first().map(|e| e.status), expected, "{status}");
    }
}

#[test]
fn expired_checkout_plans_an_abandoned_notification_with_its_recovery_url() {
    let expired = fx::event(
        "evt_x",
        "checkout.session.expired",
        T0,
        json!({ "id": "cs_9", "mode": "payment", "payment_status": "unpaid",
            "client_reference_id": "u9",
            "after_expiration": { "recovery": { "url": "https://buy.stripe.com/r/x" } } }),
    );
    let abandoned = plan(&expired).abandoned.unwrap();
    assert_eq!(abandoned.session_id, "cs_9");
    assert_eq!(abandoned.user_id.unwrap().as_str(), "u9");
    assert_eq!(
        abandoned.recovery_url.as_deref(),
        Some("https://buy.stripe.com/r/x")
    );
}

#[test]
fn lifetime_purchase_outranks_an_expired_subscription_for_the_same_key() {
    let purchase = PurchaseFacts {
        checkout_session_id: Some("cs".into()),
        payment_intent_id: Some("pi".into()),
        product_key: Some("pro".into()),
        paid: true,
        ..PurchaseFacts::default()
    };
    let sub = SubscriptionFacts {
        product_key: Some("pro".into()),
        terminal: Some(SubscriptionStatus::Canceled),
        ended_at: Some(T0),
        ..SubscriptionFacts::new("sub".into())
    };
    let refunded = PurchaseFacts {
        checkout_session_id: Some("cs_old".into()),
        payment_intent_id: Some("pi_old".into()),
        fully_refunded: true,
        ..purchase.clone()
    };
    // The choice must not depend on the order rows were loaded in.
    for purchases in [
        vec![refunded.clone(), purchase.clone()],
        vec![purchase, refunded],
    ] {
        let derived = derive_entitlements(&purchases, std::slice::from_ref(&sub), &[], &registry());
        assert_eq!(derived.len(), 1);
        assert_eq!(derived[0].source, EntitlementSource::Purchase);
        assert_eq!(derived[0].source_id, "pi");
        assert_eq!(derived[0].status, EntitlementStatus::Active);
    }
}

#[test]
fn free_checkout_without_payment_intent_grants_by_session() {
    let free = fx::event(
        "evt_free",
        "checkout.session.completed",
        T0,
        json!({ "id": "cs_free", "mode": "payment", "payment_status": "no_payment_required",
            "payment_intent": null, "client_reference_id": "u5", "amount_total": 0,
            "metadata": { "product_key": "pro" } }),
    );
    let outcome = run(&[free], &[0]);
    assert_eq!(outcome.purchases[0].1, PurchaseStatus::Completed);
    let e = only_entitlement(&outcome, "u5");
    assert_eq!(e.status, EntitlementStatus::Active);
    assert_eq!(e.source_id, "cs_free");
    assert_eq!(e.key, "pro");
}

#[test]
fn failed_delayed_payment_marks_the_purchase_failed_and_grants_nothing() {
    let events = [
        fx::checkout("evt_done", "checkout.session.completed", T0, "unpaid", "u1"),
        fx::checkout(
            "evt_fail",
            "checkout.session.async_payment_failed",
            T0 + DAY,
            "unpaid",
            "u1",
        ),
    ];
    for order in [[0, 1], [1, 0]] {
        let outcome = run(&events, &order);
        assert_eq!(outcome.purchases[0].1, PurchaseStatus::Failed);
        assert!(outcome.entitlements["u1"].is_empty());
    }
}

#[test]
fn unhandled_events_plan_nothing() {
    let other = fx::event("evt_o", "customer.updated", T0, json!({ "id": "cus_1" }));
    assert!(plan(&other).is_empty());
    assert!(plan(&other).lock_keys().is_empty());
}

fn plan_change_scenario() -> Vec<Event> {
    let pro = fx::On {
        sub: "sub_p",
        user: "u3",
        price: "price_pro_monthly",
    };
    let team = fx::On {
        price: "price_team_monthly",
        ..pro
    };
    vec![
        fx::priced_subscription("evt_c", "customer.subscription.created", T0, "active", &pro),
        // A stale update (older than the switch) still naming the old price.
        fx::priced_subscription(
            "evt_u0",
            "customer.subscription.updated",
            T0 + DAY,
            "active",
            &pro,
        ),
        // The portal switch: the price changes, the metadata does not.
        fx::priced_subscription(
            "evt_u1",
            "customer.subscription.updated",
            T0 + 2 * DAY,
            "active",
            &team,
        ),
    ]
}

fn keys(outcome: &Outcome, user: &str) -> Vec<(String, EntitlementStatus)> {
    outcome.entitlements[user]
        .iter()
        .map(|e| (e.key.clone(), e.status))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn a_portal_plan_switch_moves_the_entitlement_to_the_new_plan_in_any_order(
        order in orders(3),
    ) {
        let events = plan_change_scenario();
        let outcome = assert_converges(&events, &order);
        prop_assert_eq!(
            keys(&outcome, "u3"),
            vec![("team".to_owned(), EntitlementStatus::Active)]
        );
        let (sub, _) = &outcome.subscriptions[0];
        prop_assert_eq!(sub.price.as_ref().map(|c| c.quantity), Some(Some(2)));
    }

    #[test]
    fn a_lifetime_purchase_survives_the_end_of_a_monthly_plan_in_any_order(
        order in orders(4),
    ) {
        let monthly = fx::On { sub: "sub_p", user: "u1", price: "price_pro_monthly" };
        let events = purchase_scenario(vec![
            fx::priced_subscription("evt_c", "customer.subscription.created", T0, "active", &monthly),
            fx::priced_subscription("evt_d", "customer.subscription.deleted", T0 + 5 * DAY, "canceled", &monthly),
        ]);
        let outcome = assert_converges(&events, &order);
        let e = only_entitlement(&outcome, "u1");
        prop_assert_eq!(e.status, EntitlementStatus::Active);
        prop_assert_eq!(e.source, EntitlementSource::Purchase);
        prop_assert_eq!(e.expires_at, None);
    }

    #[test]
    fn ending_one_of_two_plans_keeps_what_the_other_grants_in_any_order(order in orders(3)) {
        let a = fx::On { sub: "sub_a", user: "u4", price: "price_pro_monthly" };
        let b = fx::On { sub: "sub_b", ..a };
        let events = vec![
            fx::priced_subscription("evt_a", "customer.subscription.created", T0, "active", &a),
            fx::priced_subscription("evt_b", "customer.subscription.created", T0, "active", &b),
            fx::priced_subscription("evt_a_end", "customer.subscription.deleted", T0 + DAY, "canceled", &a),
        ];
        let outcome = assert_converges(&events, &order);
        let e = only_entitlement(&outcome, "u4");
        prop_assert_eq!(e.status, EntitlementStatus::Active);
        prop_assert_eq!(&e.source_id, "sub_b");
        let sources: Vec<_> = e.sources.iter().map(|s| (s.source_id.as_str(), s.status)).collect();
        prop_assert_eq!(
            sources,
            vec![("sub_b", EntitlementStatus::Active), ("sub_a", EntitlementStatus::Expired)]
        );
        prop_assert_eq!(e.sources[0].quantity, Some(2));
    }
}

#[test]
fn a_payment_link_checkout_with_only_a_client_reference_id_grants_nothing() {
    // What a Payment Link opened with ?client_reference_id=u6 yields: no product metadata, a
    // price the registry does not sell, $1.
    let link = fx::event(
        "evt_link",
        "checkout.session.completed",
        T0,
        json!({ "id": "cs_link", "mode": "payment", "payment_status": "paid",
            "payment_intent": "pi_link", "client_reference_id": "u6", "amount_total": 100,
            "currency": "usd", "metadata": {},
            "line_items": { "data": [ { "price": { "id": "price_one_dollar" } } ] } }),
    );
    let outcome = run(std::slice::from_ref(&link), &[0]);
    assert_eq!(outcome.purchases[0].1, PurchaseStatus::Completed);
    assert!(outcome.entitlements["u6"].is_empty());
    // The same without line items in the payload: still nothing.
    let EventKind::CheckoutSessionCompleted(mut session) = link.kind.clone() else {
        panic!("wrong kind")
    };
    session.price_id = None;
    let bare = Event {
        kind: EventKind::CheckoutSessionCompleted(session),
        ..link
    };
    assert!(run(&[bare], &[0]).entitlements["u6"].is_empty());
}

#[test]
fn a_subscription_to_a_price_outside_the_registry_grants_nothing() {
    let elsewhere = fx::On {
        sub: "sub_x",
        user: "u7",
        price: "price_unknown",
    };
    let events = [fx::priced_subscription(
        "evt_x",
        "customer.subscription.created",
        T0,
        "active",
        &elsewhere,
    )];
    assert!(run(&events, &[0]).entitlements["u7"].is_empty());
}

#[test]
fn a_content_item_grants_its_key_only_at_its_own_amount_and_currency() {
    let item = |amount: i64, currency: &str| {
        fx::event(
            "evt_item",
            "checkout.session.completed",
            T0,
            json!({ "id": "cs_item", "mode": "payment", "payment_status": "paid",
                "payment_intent": "pi_item", "client_reference_id": "u8",
                "amount_total": amount, "currency": currency,
                "metadata": { "user_id": "u8", "product_key": "item-1" } }),
        )
    };
    let outcome = run(&[item(1500, "usd")], &[0]);
    assert_eq!(
        keys(&outcome, "u8"),
        vec![("content:item-1".to_owned(), EntitlementStatus::Active)]
    );
    assert!(run(&[item(100, "usd")], &[0]).entitlements["u8"].is_empty());
    assert!(run(&[item(1500, "eur")], &[0]).entitlements["u8"].is_empty());
}

/// `entitlements.active_entitlement_summary.updated` for `cus_1` listing `features`.
fn feature_summary(id: &str, created: i64, features: &[&str]) -> Event {
    let data: Vec<Value> = features
        .iter()
        .map(|f| json!({ "object": "entitlements.active_entitlement", "lookup_key": f }))
        .collect();
    fx::event(
        id,
        "entitlements.active_entitlement_summary.updated",
        created,
        json!({ "object": "entitlements.active_entitlement_summary", "customer": "cus_1",
            "entitlements": { "object": "list", "data": data, "has_more": false } }),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn the_newest_feature_summary_decides_in_any_order_beside_a_purchase(order in orders(5)) {
        let events = purchase_scenario(vec![
            feature_summary("evt_f1", T0, &["feature-team_monthly"]),
            feature_summary("evt_f2", T0 + DAY, &["feature-team_monthly", "feature-item-1"]),
            // Newest: team is gone; a feature the registry does not map grants nothing.
            feature_summary("evt_f3", T0 + 2 * DAY, &["feature-item-1", "unmapped"]),
        ]);
        let outcome = assert_converges(&events, &order);
        prop_assert_eq!(
            keys(&outcome, "u1"),
            vec![
                ("content:item-1".to_owned(), EntitlementStatus::Active),
                ("pro".to_owned(), EntitlementStatus::Active),
            ]
        );
        let item = &outcome.entitlements["u1"][0];
        prop_assert_eq!(item.source, EntitlementSource::StripeFeature);
        prop_assert_eq!(item.source.contract(), EntitlementSource::Subscription);
        prop_assert_eq!(&item.source_id, "cus_1");
    }
}
