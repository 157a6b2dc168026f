//! The projection's pure decisions: what an event means for purchases and subscriptions, how
//! rows merge, and which entitlements a user's rows imply. No I/O lives here; `store` loads
//! rows, calls these functions and writes the results.
//!
//! Invariant (order independence): every row is a join of monotone facts. [`plan`] turns an
//! event into a *delta* row, and [`PurchaseFacts::merge`] / [`SubscriptionFacts::merge`] are
//! commutative, associative and idempotent, so applying a scenario's events in any order, any
//! number of times, yields the same rows — and [`derive_entitlements`] depends on the rows only.

mod entitlement;
mod feature;
mod purchase;
mod registry;
mod subscription;
#[cfg(test)]
mod tests;

pub use entitlement::{
    Entitlement, EntitlementSource, EntitlementStatus, GrantSource, better, derive_entitlements,
    duplicate_payments,
};
pub use feature::{FeatureClaim, FeatureFacts};
pub use purchase::{
    DisputeClaim, DisputeFacts, DisputeState, FeeSplit, PurchaseFacts, PurchaseStatus, RefundFact,
};
pub use registry::{
    BPS_WHOLE, Product, ProductStatus, RefundPolicy, Registry, SoldAmount, SubscriptionPolicy,
    is_price_id, is_product_key,
};
pub use subscription::{PriceClaim, StatusClaim, SubscriptionFacts};

use crate::domain::events::{
    CheckoutMode, CheckoutPaymentStatus, Event, EventKind, PaidFor, SubscriptionStatus,
};
use shared::ids::UserId;

/// What one event contributes. Every part is optional; an empty plan changes nothing.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    /// A Stripe customer the event ties to a user.
    pub link: Option<CustomerLink>,
    /// Facts about a one-time purchase, to merge into the rows sharing any of its Stripe ids.
    pub purchase: Option<PurchaseFacts>,
    /// Facts about a subscription, to merge into the row with its id.
    pub subscription: Option<SubscriptionFacts>,
    /// An expired checkout to announce in the outbox.
    pub abandoned: Option<AbandonedCheckout>,
    /// A customer's complete list of active Stripe features.
    pub features: Option<FeatureFacts>,
}

/// Stripe customer → application user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomerLink {
    pub customer_id: String,
    pub user_id: UserId,
}

/// `checkout.session.expired`, for the `checkout_abandoned` notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AbandonedCheckout {
    pub session_id: String,
    pub user_id: Option<UserId>,
    pub customer_id: Option<String>,
    /// `metadata.product_key` (set by this service's checkout); a Payment Link's session has
    /// none.
    pub product_key: Option<String>,
    pub recovery_url: Option<String>,
}

impl Plan {
    /// True when the event changes nothing.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.link.is_none()
            && self.purchase.is_none()
            && self.subscription.is_none()
            && self.abandoned.is_none()
            && self.features.is_none()
    }

    /// The Stripe objects this plan reads or writes, as lock names. Two transactions whose
    /// plans share a name serialize on it before touching rows. Users are not included: they
    /// are locked in a second phase, once the rows have revealed them.
    #[must_use]
    pub fn lock_keys(&self) -> Vec<String> {
        let mut keys = Vec::new();
        let mut push = |prefix: &str, id: Option<&String>| {
            if let Some(id) = id {
                keys.push(format!("{prefix}:{id}"));
            }
        };
        if let Some(link) = &self.link {
            push("customer", Some(&link.customer_id));
        }
        if let Some(p) = &self.purchase {
            push("customer", p.customer_id.as_ref());
            push("checkout", p.checkout_session_id.as_ref());
            push("payment_intent", p.payment_intent_id.as_ref());
            push("charge", p.charge_id.as_ref());
            push("invoice", p.invoice_id.as_ref());
        }
        if let Some(s) = &self.subscription {
            push("customer", s.customer_id.as_ref());
            push("subscription", Some(&s.id));
        }
        if let Some(a) = &self.abandoned {
            push("customer", a.customer_id.as_ref());
            push("checkout", Some(&a.session_id));
        }
        if let Some(f) = &self.features {
            push("customer", Some(&f.customer_id));
        }
        keys.sort();
        keys.dedup();
        keys
    }
}

fn user_string(user: Option<&UserId>) -> Option<String> {
    user.map(|u| u.as_str().to_owned())
}

fn link(customer: Option<&String>, user: Option<&UserId>) -> Option<CustomerLink> {
    Some(CustomerLink {
        customer_id: customer?.clone(),
        user_id: user?.clone(),
    })
}

/// Decides what an event contributes. Pure: the same event always yields the same plan.
#[must_use]
pub fn plan(event: &Event) -> Plan {
    let mut plan = facts_of(event);
    // A status claim also says whether the subscription was paid up or past due at its time.
    plan.subscription = plan.subscription.map(|s| {
        let claim = s.claim;
        s.with_dunning(claim.as_ref())
    });
    plan
}

fn facts_of(event: &Event) -> Plan {
    let at = event.created;
    match &event.kind {
        EventKind::CheckoutSessionCompleted(s)
        | EventKind::CheckoutSessionAsyncPaymentSucceeded(s)
        | EventKind::CheckoutSessionAsyncPaymentFailed(s) => {
            // The async events are authoritative whatever payment_status they carry.
            let (paid, failed) = match &event.kind {
                EventKind::CheckoutSessionAsyncPaymentSucceeded(_) => (true, false),
                EventKind::CheckoutSessionAsyncPaymentFailed(_) => (false, true),
                _ => (s.payment_status != CheckoutPaymentStatus::Unpaid, false),
            };
            // No default product: a session without our metadata (a Payment Link) resolves only
            // through its price, if the registry sells it.
            let product_key = s.product_key.clone();
            let mut plan = Plan {
                link: link(s.customer.as_ref(), s.user_id.as_ref()),
                ..Plan::default()
            };
            match s.mode {
                Some(CheckoutMode::Payment) => {
                    plan.purchase = Some(PurchaseFacts {
                        checkout_session_id: Some(s.id.clone()),
                        payment_intent_id: s.payment_intent.clone(),
                        user_id: user_string(s.user_id.as_ref()),
                        customer_id: s.customer.clone(),
                        product_key,
                        price_id: s.price_id.clone(),
                        amount_cents: s.amount_total,
                        currency: s.currency.clone(),
                        paid,
                        paid_at: paid.then_some(at),
                        failed,
                        unknown_to_stripe: s.unknown_to_stripe,
                        ..PurchaseFacts::default()
                    });
                }
                Some(CheckoutMode::Subscription) => {
                    plan.subscription = s.subscription.as_ref().map(|id| SubscriptionFacts {
                        user_id: user_string(s.user_id.as_ref()),
                        customer_id: s.customer.clone(),
                        product_key,
                        price: s.price_id.clone().map(|price_id| PriceClaim {
                            at,
                            price_id,
                            quantity: None,
                        }),
                        // A paid (or free-trial) subscription checkout means the subscription
                        // is live; it competes with the subscription's own events by `created`.
                        claim: paid.then_some(StatusClaim {
                            at,
                            status: SubscriptionStatus::Active,
                            cancel_at_period_end: false,
                        }),
                        ..SubscriptionFacts::new(id.clone())
                    });
                }
                None => {}
            }
            plan
        }
        EventKind::CheckoutSessionExpired(s) => Plan {
            link: link(s.customer.as_ref(), s.user_id.as_ref()),
            abandoned: Some(AbandonedCheckout {
                session_id: s.id.clone(),
                user_id: s.user_id.clone(),
                customer_id: s.customer.clone(),
                product_key: s.product_key.clone(),
                recovery_url: s.recovery_url.clone(),
            }),
            ..Plan::default()
        },
        EventKind::PaymentIntentSucceeded(pi) => {
            // Only payments started by our checkout carry our metadata; a subscription
            // invoice's payment intent does not, and must not become a purchase.
            if pi.user_id.is_none() && pi.product_key.is_none() {
                return Plan::default();
            }
            Plan {
                link: link(pi.customer.as_ref(), pi.user_id.as_ref()),
                purchase: Some(PurchaseFacts {
                    payment_intent_id: Some(pi.id.clone()),
                    user_id: user_string(pi.user_id.as_ref()),
                    customer_id: pi.customer.clone(),
                    product_key: pi.product_key.clone(),
                    amount_cents: pi.amount,
                    currency: pi.currency.clone(),
                    paid: true,
                    paid_at: Some(at),
                    ..PurchaseFacts::default()
                }),
                ..Plan::default()
            }
        }
        EventKind::ChargeRefunded(ch) => {
            let full = ch.is_fully_refunded();
            Plan {
                link: link(ch.customer.as_ref(), ch.user_id.as_ref()),
                purchase: Some(PurchaseFacts {
                    payment_intent_id: ch.payment_intent.clone(),
                    charge_id: Some(ch.id.clone()),
                    invoice_id: ch.invoice.clone(),
                    user_id: user_string(ch.user_id.as_ref()),
                    customer_id: ch.customer.clone(),
                    product_key: ch.product_key.clone(),
                    amount_cents: Some(ch.amount),
                    currency: ch.currency.clone(),
                    refund: Some(RefundFact {
                        amount_cents: ch.amount_refunded,
                        refund_id: ch.latest_refund.as_ref().map(|r| r.id.clone()),
                        reason: ch.latest_refund.as_ref().and_then(|r| r.reason.clone()),
                    }),
                    fully_refunded: full,
                    refunded_at: full.then_some(at),
                    ..PurchaseFacts::default()
                }),
                ..Plan::default()
            }
        }
        EventKind::ChargeDispute(d) => Plan {
            purchase: Some(PurchaseFacts {
                payment_intent_id: d.payment_intent.clone(),
                charge_id: d.charge.clone(),
                invoice_id: match &d.paid_for {
                    PaidFor::Invoice { invoice, .. } => Some(invoice.clone()),
                    _ => None,
                },
                subscription_id: match &d.paid_for {
                    PaidFor::Invoice { subscription, .. } => subscription.clone(),
                    _ => None,
                },
                disputes: [(d.id.clone(), DisputeFacts::of(at, d.status.clone()))].into(),
                ..PurchaseFacts::default()
            }),
            ..Plan::default()
        },
        EventKind::InvoicePaid(inv) | EventKind::InvoicePaymentFailed(inv) => {
            let Some(sub_id) = &inv.subscription else {
                return Plan::default();
            };
            let paid = matches!(event.kind, EventKind::InvoicePaid(_));
            // A paid invoice is its subscription's payment: what later befalls the payment (a
            // dispute, a refund) reaches the subscription through it.
            let payment = paid.then(|| PurchaseFacts {
                invoice_id: Some(inv.id.clone()),
                subscription_id: Some(sub_id.clone()),
                payment_intent_id: inv.payment_intent.clone(),
                charge_id: inv.charge.clone(),
                user_id: user_string(inv.user_id.as_ref()),
                customer_id: inv.customer.clone(),
                amount_cents: inv.amount_paid,
                currency: inv.currency.clone(),
                paid: true,
                paid_at: Some(at),
                ..PurchaseFacts::default()
            });
            // A failed FIRST invoice leaves the subscription `incomplete` (no grace period), so
            // only renewal failures claim past_due.
            let claim_status = if paid {
                Some(SubscriptionStatus::Active)
            } else if inv.billing_reason.as_deref() == Some("subscription_create") {
                None
            } else {
                Some(SubscriptionStatus::PastDue)
            };
            Plan {
                link: link(inv.customer.as_ref(), inv.user_id.as_ref()),
                subscription: Some(SubscriptionFacts {
                    user_id: user_string(inv.user_id.as_ref()),
                    customer_id: inv.customer.clone(),
                    product_key: inv.product_key.clone(),
                    claim: claim_status.map(|status| StatusClaim {
                        at,
                        status,
                        cancel_at_period_end: false,
                    }),
                    current_period_end: if paid { inv.period_end } else { None },
                    ..SubscriptionFacts::new(sub_id.clone())
                }),
                purchase: payment,
                ..Plan::default()
            }
        }
        EventKind::InvoicePaymentPaid(p) => Plan {
            purchase: Some(PurchaseFacts {
                invoice_id: Some(p.invoice.clone()),
                payment_intent_id: p.payment_intent.clone(),
                charge_id: p.charge.clone(),
                amount_cents: p.amount_paid,
                currency: p.currency.clone(),
                paid: true,
                paid_at: Some(at),
                ..PurchaseFacts::default()
            }),
            ..Plan::default()
        },
        EventKind::SubscriptionCreated(s)
        | EventKind::SubscriptionUpdated(s)
        | EventKind::SubscriptionDeleted(s) => {
            let deleted = matches!(event.kind, EventKind::SubscriptionDeleted(_));
            let terminal = if s.status.is_terminal() {
                Some(s.status)
            } else if deleted {
                Some(SubscriptionStatus::Canceled)
            } else {
                None
            };
            Plan {
                link: link(s.customer.as_ref(), s.user_id.as_ref()),
                subscription: Some(SubscriptionFacts {
                    user_id: user_string(s.user_id.as_ref()),
                    customer_id: s.customer.clone(),
                    product_key: s.product_key.clone(),
                    price: s.price_id.clone().map(|price_id| PriceClaim {
                        at,
                        price_id,
                        quantity: s.quantity,
                    }),
                    claim: Some(StatusClaim {
                        at,
                        status: s.status,
                        cancel_at_period_end: s.cancel_at_period_end,
                    }),
                    terminal,
                    current_period_end: s.current_period_end,
                    ended_at: terminal.map(|_| s.ended_at.unwrap_or(at)),
                    ..SubscriptionFacts::new(s.id.clone())
                }),
                ..Plan::default()
            }
        }
        EventKind::FeatureSummaryUpdated(summary) => Plan {
            features: Some(FeatureFacts {
                customer_id: summary.customer.clone(),
                user_id: None,
                claim: Some(FeatureClaim {
                    at,
                    lookup_keys: summary.lookup_keys.clone(),
                }),
            }),
            ..Plan::default()
        },
        // A thin event is read from Stripe into its snapshot twin before it is applied
        // (`complete::needs_stripe` says so for every one); unread, it says nothing.
        EventKind::Thin(_) | EventKind::GenerationFailureResolved | EventKind::Unhandled => {
            Plan::default()
        }
    }
}

/// Join of two optional values where `None` is "not known yet": the earliest known one.
fn min_known<T: Ord>(a: Option<T>, b: Option<T>) -> Option<T> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}
