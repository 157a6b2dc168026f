//! Subscriptions as a join of monotone facts.
//!
//! Invariant: the status is a last-writer-wins register ordered by (event `created`, status
//! precedence, `cancel_at_period_end`) — a total order, so a stale event never overrides a newer
//! one and two events of the same second resolve the same way in any order. The price is a
//! register of the same kind ([`PriceClaim`]), so plan changes converge too. Ending is terminal
//! (`terminal` only grows), the period end only extends. When it fell past due is a join too:
//! the newest time it was paid up (`recovered_at`, a maximum) and the past-due claims after it
//! (a set, pruned of those before), so [`SubscriptionFacts::past_due_since`] is the start of the
//! current lapse in any order, however many failed retries claimed it again meanwhile.

use std::collections::BTreeSet;

use super::min_known;
use crate::domain::events::SubscriptionStatus;

/// A status asserted by one event. The derived `Ord` compares `at` first, then the lifecycle
/// precedence of [`SubscriptionStatus`] (incomplete < trialing < active < past_due < unpaid <
/// paused < incomplete_expired < canceled): inside one second Stripe moves a subscription
/// forward through that lifecycle, so the later stage is the better guess.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StatusClaim {
    /// The `created` of the event that made the claim (unix seconds).
    pub at: i64,
    pub status: SubscriptionStatus,
    pub cancel_at_period_end: bool,
}

/// The price a subscription is on, as asserted by one event: a last-writer-wins register
/// ordered by (event `created`, price id, quantity), a total order, so a stale update never
/// undoes a newer plan and two events of one second resolve the same way in any order.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PriceClaim {
    pub at: i64,
    pub price_id: String,
    /// Seats (`items.data[0].quantity`).
    pub quantity: Option<i64>,
}

/// Everything learned about one subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionFacts {
    pub id: String,
    pub user_id: Option<String>,
    pub customer_id: Option<String>,
    pub product_key: Option<String>,
    /// The newest price reported; decides the product (plan changes move it).
    pub price: Option<PriceClaim>,
    pub claim: Option<StatusClaim>,
    /// Set once the subscription ended (canceled, deleted, incomplete_expired); wins over
    /// every claim, however new.
    pub terminal: Option<SubscriptionStatus>,
    pub current_period_end: Option<i64>,
    pub ended_at: Option<i64>,
    /// The newest time an event said it was paid up (`active`/`trialing`).
    pub recovered_at: Option<i64>,
    /// The times events said it was past due, after `recovered_at`.
    pub past_due_claims: BTreeSet<i64>,
}

impl SubscriptionFacts {
    /// A subscription about which nothing is known yet.
    #[must_use]
    pub fn new(id: String) -> Self {
        Self {
            id,
            user_id: None,
            customer_id: None,
            product_key: None,
            price: None,
            claim: None,
            terminal: None,
            current_period_end: None,
            ended_at: None,
            recovered_at: None,
            past_due_claims: BTreeSet::new(),
        }
    }

    /// What one event's status claim says of the dunning: paid up, or past due, at its time.
    #[must_use]
    pub fn with_dunning(mut self, claim: Option<&StatusClaim>) -> Self {
        match claim.map(|c| (c.status, c.at)) {
            Some((SubscriptionStatus::Active | SubscriptionStatus::Trialing, at)) => {
                self.recovered_at = Some(at);
            }
            Some((SubscriptionStatus::PastDue, at)) => {
                self.past_due_claims.insert(at);
            }
            _ => {}
        }
        self
    }

    /// When the current lapse began: the first past-due claim after it was last paid up.
    #[must_use]
    pub fn past_due_since(&self) -> Option<i64> {
        self.past_due_claims.first().copied()
    }

    /// The join of two fact sets about the same subscription (same `id`).
    #[must_use]
    pub fn merge(self, other: Self) -> Self {
        let recovered_at = self.recovered_at.max(other.recovered_at);
        Self {
            id: self.id.max(other.id),
            user_id: self.user_id.max(other.user_id),
            customer_id: self.customer_id.max(other.customer_id),
            product_key: self.product_key.max(other.product_key),
            price: self.price.max(other.price),
            claim: self.claim.max(other.claim),
            terminal: self.terminal.max(other.terminal),
            current_period_end: self.current_period_end.max(other.current_period_end),
            ended_at: min_known(self.ended_at, other.ended_at),
            recovered_at,
            past_due_claims: self
                .past_due_claims
                .into_iter()
                .chain(other.past_due_claims)
                .filter(|at| recovered_at.is_none_or(|r| *at >= r))
                .collect(),
        }
    }

    /// The effective Stripe status: terminal if ended, else the newest claim; `incomplete`
    /// while no event has said anything about payment.
    #[must_use]
    pub fn status(&self) -> SubscriptionStatus {
        self.terminal
            .or(self.claim.map(|c| c.status))
            .unwrap_or(SubscriptionStatus::Incomplete)
    }

    /// `cancel_at_period_end` of the newest claim.
    #[must_use]
    pub fn cancel_at_period_end(&self) -> bool {
        self.claim.is_some_and(|c| c.cancel_at_period_end)
    }
}
