//! Generated Stripe event histories with known outcomes, shared by the store's grouping test
//! and the chaos suite: the same fixtures for every test that needs many realistic events.

use serde_json::{Value, json};
use shared::samples::{Sample, event};

/// A small deterministic generator (xorshift64*), so a failing seed can be rerun.
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next_u64() % n as u64).unwrap_or(0)
    }

    /// Shuffles `items` (Fisher–Yates).
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i + 1));
        }
    }
}

/// Events ingress accepts (signed, with an `id` and a `type`) that the processor can never
/// apply: each must end parked, once.
pub fn poison(seed: u64, n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| {
            json!({"id": format!("evt_poison_{seed}_{i}"), "object": "event",
                   "type": "checkout.session.completed", "created": 1_900_000_000,
                   "data": {"object": "not an object"}})
        })
        .collect()
}

/// How many kinds of history [`histories`] cycles through (user `k` lives kind `k % KINDS`).
pub const KINDS: usize = 16;

/// Every how many subjects one is an organisation ([`subject`]).
pub const ORGANIZATION_EVERY: usize = 5;

/// The subject of history `k` of round `seed`: user `u{seed}_{k}`, or, for every
/// [`ORGANIZATION_EVERY`]th history, organisation `o{seed}_{k}` (subject `org:o{seed}_{k}`),
/// which lives the same kinds of history as a user does.
#[must_use]
pub fn subject(seed: u64, k: usize) -> String {
    if k % ORGANIZATION_EVERY == ORGANIZATION_EVERY - 1 {
        format!("org:o{seed}_{k}")
    } else {
        format!("u{seed}_{k}")
    }
}

/// The kind of history of a repurchase after a refund.
pub const REPURCHASE: usize = 11;

/// The events of `users` simulated customers, in the order Stripe would have sent them, covering
/// every event kind the projection acts on (and one it ignores): purchases refunded in full or in
/// part, disputes lost and won, an inquiry closed then a chargeback won, delayed payments, a
/// repurchase after a refund, a double payment, subscriptions renewed, failing, canceled and
/// charged back, payments whose user is only learnt from a later checkout, and abandoned
/// checkouts. Subjects are named by [`subject`].
pub fn histories(seed: u64, users: usize) -> Vec<Value> {
    let t0 = 1_900_000_000;
    let mut out = Vec::new();
    for k in 0..users {
        let user = subject(seed, k);
        let o = format!("{seed}_{k}");
        let sample = |created: i64, subscription: bool, product: &'static str| Sample {
            user: "",
            product,
            object: "",
            amount: 4900,
            created,
            subscription,
        };
        let mut push = |n: usize, ty: &str, subscription: bool, edit: &dyn Fn(&mut Value)| {
            let created = t0 + i64::try_from(k * 100 + n).unwrap();
            let mut s = sample(
                created,
                subscription,
                if subscription { "team" } else { "pro" },
            );
            s.user = &user;
            s.object = &o;
            let mut body = event(&format!("evt_{o}_{n}"), ty, &s);
            edit(&mut body["data"]["object"]);
            out.push(body);
        };
        let none = |_: &mut Value| {};
        match k % KINDS {
            0 => {
                push(0, "checkout.session.completed", false, &none);
                push(1, "payment_intent.succeeded", false, &none);
            }
            1 => {
                push(0, "checkout.session.completed", false, &none);
                push(1, "payment_intent.succeeded", false, &none);
                push(2, "charge.refunded", false, &none);
            }
            2 => {
                push(0, "checkout.session.completed", false, &none);
                push(1, "charge.dispute.created", false, &none);
                push(2, "charge.dispute.closed", false, &none);
            }
            3 => {
                push(0, "checkout.session.completed", false, &none);
                push(1, "charge.dispute.created", false, &none);
                push(2, "charge.dispute.closed", false, &|d| {
                    d["status"] = json!("won")
                });
            }
            4 => {
                push(0, "customer.subscription.created", true, &none);
                push(1, "checkout.session.completed", true, &none);
                push(2, "invoice.paid", true, &none);
                push(3, "invoice.payment_failed", true, &none);
                push(4, "customer.subscription.updated", true, &|s| {
                    s["status"] = json!("past_due");
                });
            }
            5 => {
                push(0, "customer.subscription.created", true, &none);
                push(1, "customer.subscription.deleted", true, &none);
            }
            6 => push(0, "checkout.session.expired", false, &none),
            7 => {
                // Payment facts without a user: only the checkout's customer link names them.
                let anonymous = |v: &mut Value| v["metadata"] = json!({});
                push(0, "payment_intent.succeeded", false, &anonymous);
                push(1, "charge.refunded", false, &|v| {
                    v["metadata"] = json!({});
                    v["amount_refunded"] = json!(1000);
                    v["refunded"] = json!(false);
                });
                push(2, "checkout.session.completed", false, &none);
            }
            8 => push(0, "customer.updated", false, &none),
            9 => {
                // A partial refund keeps access.
                push(0, "checkout.session.completed", false, &none);
                push(1, "charge.refunded", false, &|v| {
                    v["amount_refunded"] = json!(900);
                    v["refunded"] = json!(false);
                });
            }
            10 => {
                // A delayed payment method: pending at completion, paid later.
                push(0, "checkout.session.completed", false, &|v| {
                    v["payment_status"] = json!("unpaid");
                });
                push(1, "checkout.session.async_payment_succeeded", false, &none);
            }
            REPURCHASE => {
                // Bought, refunded, bought again in a second session.
                push(0, "checkout.session.completed", false, &none);
                push(1, "charge.refunded", false, &none);
                let again = |v: &mut Value| {
                    let id = v["id"].as_str().unwrap_or_default().to_owned();
                    v["id"] = json!(format!("{id}_again"));
                    v["payment_intent"] = json!(format!("pi_again_{id}"));
                };
                push(2, "checkout.session.completed", false, &again);
            }
            13 => {
                // An inquiry that closed, then a real chargeback on a new dispute, won.
                let dispute = |id: &'static str, status: &'static str| {
                    move |d: &mut Value| {
                        let object = d["charge"].as_str().unwrap_or_default().to_owned();
                        d["id"] = json!(format!("dp_{object}_{id}"));
                        d["status"] = json!(status);
                    }
                };
                push(0, "checkout.session.completed", false, &none);
                push(
                    1,
                    "charge.dispute.created",
                    false,
                    &dispute("i", "warning_needs_response"),
                );
                push(
                    2,
                    "charge.dispute.closed",
                    false,
                    &dispute("i", "warning_closed"),
                );
                push(
                    3,
                    "charge.dispute.created",
                    false,
                    &dispute("c", "needs_response"),
                );
                push(
                    4,
                    "charge.dispute.updated",
                    false,
                    &dispute("c", "under_review"),
                );
                push(5, "charge.dispute.closed", false, &dispute("c", "won"));
            }
            14 => {
                // A subscription whose payment is charged back and lost: the invoice payment
                // ties the payment to its invoice, as since API version basil.
                push(0, "customer.subscription.created", true, &none);
                push(1, "checkout.session.completed", true, &none);
                push(2, "invoice.paid", true, &none);
                push(3, "invoice_payment.paid", true, &|v| {
                    let object = v["id"]
                        .as_str()
                        .unwrap_or_default()
                        .trim_start_matches("obj_")
                        .to_owned();
                    *v = json!({ "id": format!("inpay_{object}"), "object": "invoice_payment",
                        "invoice": format!("in_{object}"), "status": "paid", "amount_paid": 4900,
                        "currency": "usd", "payment": { "type": "payment_intent",
                            "payment_intent": format!("pi_{object}") } });
                });
                push(4, "charge.dispute.created", true, &none);
                push(5, "charge.dispute.closed", true, &none);
            }
            15 => {
                // Paid twice in two sessions, the first payment refunded: Pro stays.
                push(0, "checkout.session.completed", false, &none);
                push(1, "checkout.session.completed", false, &|v| {
                    let id = v["id"].as_str().unwrap_or_default().to_owned();
                    v["id"] = json!(format!("{id}_twice"));
                    v["payment_intent"] = json!(format!("pi_twice_{id}"));
                });
                push(2, "charge.refunded", false, &none);
            }
            _ => {
                // A subscription renewed, then canceled at the end.
                push(0, "customer.subscription.created", true, &none);
                push(1, "checkout.session.completed", true, &none);
                push(2, "invoice.paid", true, &none);
                push(3, "customer.subscription.updated", true, &|s| {
                    s["cancel_at_period_end"] = json!(true);
                });
                push(4, "customer.subscription.deleted", true, &none);
            }
        }
    }
    out
}

/// A sample event of `user`'s `team` subscription `object` (invoice `in_{object}`, paid by
/// `pi_{object}` with charge `ch_{object}`), at `created`, under a fresh event id.
pub fn team_event(user: &str, object: &str, event_type: &str, created: i64) -> Value {
    let sample = Sample {
        user,
        product: "team",
        object,
        amount: 1900,
        created,
        subscription: true,
    };
    event(&crate::unique("evt"), event_type, &sample)
}
