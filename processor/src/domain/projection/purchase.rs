//! One-time purchases as a join of monotone facts.
//!
//! Invariant: [`PurchaseFacts::merge`] is commutative, associative and idempotent (flags are
//! OR-ed, the refund register and the dispute state take their maximum, timestamps their
//! earliest value, ids and amounts the known one), and [`PurchaseFacts::status`] is a function
//! of the facts alone. So a refund or lost dispute merged before the completion still leaves
//! the purchase refunded.

use super::min_known;
use crate::domain::events::DisputeStatus;

/// Everything learned about one purchase. A row may be known by any of its three Stripe ids
/// before the others show up.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PurchaseFacts {
    pub checkout_session_id: Option<String>,
    pub payment_intent_id: Option<String>,
    pub charge_id: Option<String>,
    pub user_id: Option<String>,
    pub customer_id: Option<String>,
    /// Set by our checkout (or our payment metadata); a row without it is a payment we only
    /// heard about through a refund or dispute and grants nothing until it is linked.
    pub product_key: Option<String>,
    /// The Stripe price paid (the Checkout Session's line item), when an event reported it.
    pub price_id: Option<String>,
    pub amount_cents: Option<i64>,
    pub currency: Option<String>,
    pub paid: bool,
    pub paid_at: Option<i64>,
    pub failed: bool,
    /// The largest refund seen: `amount_refunded` only grows on a charge.
    pub refund: Option<RefundFact>,
    pub fully_refunded: bool,
    pub refunded_at: Option<i64>,
    pub dispute: DisputeState,
    pub dispute_id: Option<String>,
}

/// Cumulative refund of a charge, ordered by amount so the latest state wins.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct RefundFact {
    pub amount_cents: i64,
    pub refund_id: Option<String>,
    pub reason: Option<String>,
}

/// Dispute progress. `Open` < closed outcomes; a closed dispute never reopens, and among
/// outcomes `Lost` has the highest precedence.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DisputeState {
    #[default]
    None,
    Open,
    WarningClosed,
    Won,
    Lost,
}

impl From<DisputeStatus> for DisputeState {
    fn from(status: DisputeStatus) -> Self {
        match status {
            DisputeStatus::Open => Self::Open,
            DisputeStatus::WarningClosed => Self::WarningClosed,
            DisputeStatus::Won => Self::Won,
            DisputeStatus::Lost => Self::Lost,
        }
    }
}

impl DisputeState {
    /// The column spelling.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Open => "open",
            Self::WarningClosed => "warning_closed",
            Self::Won => "won",
            Self::Lost => "lost",
        }
    }

    /// Parses the column spelling.
    #[must_use]
    pub fn from_column(raw: &str) -> Option<Self> {
        Some(match raw {
            "none" => Self::None,
            "open" => Self::Open,
            "warning_closed" => Self::WarningClosed,
            "won" => Self::Won,
            "lost" => Self::Lost,
            _ => return None,
        })
    }
}

/// `purchases.status`, derived from the facts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PurchaseStatus {
    Pending,
    Completed,
    Refunded,
    Failed,
    Disputed,
}

impl PurchaseStatus {
    /// The column spelling.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Completed => "completed",
            Self::Refunded => "refunded",
            Self::Failed => "failed",
            Self::Disputed => "disputed",
        }
    }
}

/// How a payment is split: by the product's rule ([`super::Product::split`]), everything to the
/// creator when no product resolves. The CHECK in the schema holds every split to adding up to
/// the amount.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeeSplit {
    pub platform_fee_cents: i64,
    pub organization_fee_cents: i64,
    pub creator_payout_cents: i64,
}

impl FeeSplit {
    /// Everything to the creator.
    #[must_use]
    pub fn of(amount_cents: i64) -> Self {
        Self {
            platform_fee_cents: 0,
            organization_fee_cents: 0,
            creator_payout_cents: amount_cents,
        }
    }
}

impl PurchaseFacts {
    /// True when both describe the same payment (they share a Stripe id).
    #[must_use]
    pub fn shares_key(&self, other: &Self) -> bool {
        fn same(a: Option<&String>, b: Option<&String>) -> bool {
            matches!((a, b), (Some(a), Some(b)) if a == b)
        }
        same(
            self.checkout_session_id.as_ref(),
            other.checkout_session_id.as_ref(),
        ) || same(
            self.payment_intent_id.as_ref(),
            other.payment_intent_id.as_ref(),
        ) || same(self.charge_id.as_ref(), other.charge_id.as_ref())
    }

    /// The join of two fact sets about the same payment.
    #[must_use]
    pub fn merge(self, other: Self) -> Self {
        Self {
            checkout_session_id: self.checkout_session_id.max(other.checkout_session_id),
            payment_intent_id: self.payment_intent_id.max(other.payment_intent_id),
            charge_id: self.charge_id.max(other.charge_id),
            user_id: self.user_id.max(other.user_id),
            customer_id: self.customer_id.max(other.customer_id),
            product_key: self.product_key.max(other.product_key),
            price_id: self.price_id.max(other.price_id),
            amount_cents: self.amount_cents.max(other.amount_cents),
            currency: self.currency.max(other.currency),
            paid: self.paid || other.paid,
            paid_at: min_known(self.paid_at, other.paid_at),
            failed: self.failed || other.failed,
            refund: self.refund.max(other.refund),
            fully_refunded: self.fully_refunded || other.fully_refunded,
            refunded_at: min_known(self.refunded_at, other.refunded_at),
            dispute: self.dispute.max(other.dispute),
            dispute_id: self.dispute_id.max(other.dispute_id),
        }
    }

    /// Derived status: money taken back (full refund, lost dispute) beats an open dispute,
    /// which beats payment; a failure only shows when nothing was paid.
    #[must_use]
    pub fn status(&self) -> PurchaseStatus {
        if self.fully_refunded || self.dispute == DisputeState::Lost {
            PurchaseStatus::Refunded
        } else if self.dispute == DisputeState::Open {
            PurchaseStatus::Disputed
        } else if self.paid {
            PurchaseStatus::Completed
        } else if self.failed {
            PurchaseStatus::Failed
        } else {
            PurchaseStatus::Pending
        }
    }

    /// Amount refunded so far (partial or full).
    #[must_use]
    pub fn refunded_cents(&self) -> i64 {
        self.refund.as_ref().map_or(0, |r| r.amount_cents)
    }

    /// The id entitlements and notifications name this purchase by: the payment intent when
    /// there is one (every paid checkout has one), else the checkout session, else the charge.
    #[must_use]
    pub fn source_id(&self) -> Option<&str> {
        self.payment_intent_id
            .as_deref()
            .or(self.checkout_session_id.as_deref())
            .or(self.charge_id.as_deref())
    }
}
