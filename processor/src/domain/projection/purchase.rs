//! One-time purchases as a join of monotone facts.
//!
//! Invariant: [`PurchaseFacts::merge`] is commutative, associative and idempotent (flags are
//! OR-ed, the refund register takes its maximum, each dispute its newest claim, timestamps their
//! earliest value, ids and amounts the known one), and [`PurchaseFacts::status`] is a function
//! of the facts alone. So a refund or lost dispute merged before the completion still leaves
//! the purchase refunded.
//!
//! Disputes by their lifecycle: each dispute of a payment is tracked on its own (by id) with
//! its newest status, ordered by (closed, event time, lifecycle stage), so an inquiry, its
//! escalation, its closure and a later chargeback (a new dispute) each count for what they
//! are. Access is suspended while any chargeback is open, revoked once one is lost, and back
//! when every chargeback is won or closed; an inquiry moves no money and suspends nothing. A
//! status this code does not know is recorded and never acted upon: the dispute keeps the
//! effect of its newest known status.

use std::collections::BTreeMap;

use super::min_known;
use crate::domain::events::DisputeStatus;

/// Everything learned about one purchase. A row may be known by any of its three Stripe ids
/// before the others show up.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PurchaseFacts {
    pub checkout_session_id: Option<String>,
    pub payment_intent_id: Option<String>,
    pub charge_id: Option<String>,
    /// The invoice it paid (`invoice.paid`, `invoice_payment.paid`): a fourth id the row is
    /// known by.
    pub invoice_id: Option<String>,
    /// The subscription whose invoice it paid: the row is that subscription's payment, and its
    /// disputes and refunds decide the subscription's access (never a purchase's).
    pub subscription_id: Option<String>,
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
    /// Every dispute of the payment, by dispute id.
    pub disputes: BTreeMap<String, DisputeFacts>,
    /// Stripe answered `resource_missing` for its Checkout Session (another account or mode):
    /// it grants nothing.
    pub unknown_to_stripe: bool,
}

/// A dispute's status as reported by one event, at its `created`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DisputeClaim {
    pub at: i64,
    pub status: DisputeStatus,
}

impl DisputeClaim {
    /// The register's order: a closed status wins (a closed dispute never moves again), then
    /// the newer event, then the later lifecycle stage, then the spelling (a total order).
    fn rank(&self) -> (bool, i64, u8, &str) {
        (
            self.status.is_closed(),
            self.at,
            self.status.stage(),
            self.status.as_str(),
        )
    }
}

impl Ord for DisputeClaim {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.rank().cmp(&other.rank())
    }
}

impl PartialOrd for DisputeClaim {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// One dispute: its newest status, and its newest status this code knows (what decides its
/// effect; an unknown one is only recorded).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DisputeFacts {
    pub latest: DisputeClaim,
    pub known: Option<DisputeClaim>,
}

impl DisputeFacts {
    /// What one event says of a dispute.
    #[must_use]
    pub fn of(at: i64, status: DisputeStatus) -> Self {
        let claim = DisputeClaim { at, status };
        let known = (!matches!(claim.status, DisputeStatus::Unknown(_))).then(|| claim.clone());
        Self {
            latest: claim,
            known,
        }
    }

    /// The join of two fact sets about the same dispute.
    #[must_use]
    pub fn merge(self, other: Self) -> Self {
        Self {
            latest: self.latest.max(other.latest),
            known: self.known.max(other.known),
        }
    }

    /// What the dispute means for the payment.
    #[must_use]
    pub fn state(&self) -> DisputeState {
        let Some(known) = &self.known else {
            return DisputeState::Unknown;
        };
        match known.status {
            DisputeStatus::WarningNeedsResponse | DisputeStatus::WarningUnderReview => {
                DisputeState::Inquiry
            }
            DisputeStatus::NeedsResponse | DisputeStatus::UnderReview => DisputeState::Open,
            DisputeStatus::WarningClosed => DisputeState::WarningClosed,
            DisputeStatus::Prevented => DisputeState::Prevented,
            DisputeStatus::Won => DisputeState::Won,
            DisputeStatus::Lost => DisputeState::Lost,
            // `known` never holds an unknown status.
            DisputeStatus::Unknown(_) => DisputeState::Unknown,
        }
    }
}

/// Cumulative refund of a charge, ordered by amount so the latest state wins.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct RefundFact {
    pub amount_cents: i64,
    pub refund_id: Option<String>,
    pub reason: Option<String>,
}

/// What a payment's disputes mean for it, summed up: the most severe of its disputes' states
/// (`Lost` > `Open` > `Inquiry` > `Unknown` > `Won` > `Prevented` > `WarningClosed` > `None`).
/// Only `Open` (suspends) and `Lost` (takes the money back) change access.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DisputeState {
    #[default]
    None,
    /// An inquiry closed without a chargeback.
    WarningClosed,
    /// Resolved by a prevention network (the charge was refunded).
    Prevented,
    Won,
    /// Only statuses this code does not know were reported.
    Unknown,
    /// An inquiry is open: no money moved.
    Inquiry,
    /// A chargeback is open: the funds are withdrawn.
    Open,
    Lost,
}

impl DisputeState {
    /// The column spelling.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::WarningClosed => "warning_closed",
            Self::Prevented => "prevented",
            Self::Won => "won",
            Self::Unknown => "unknown",
            Self::Inquiry => "inquiry",
            Self::Open => "open",
            Self::Lost => "lost",
        }
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
            || same(self.invoice_id.as_ref(), other.invoice_id.as_ref())
    }

    /// The join of two fact sets about the same payment.
    #[must_use]
    pub fn merge(self, other: Self) -> Self {
        Self {
            checkout_session_id: self.checkout_session_id.max(other.checkout_session_id),
            payment_intent_id: self.payment_intent_id.max(other.payment_intent_id),
            charge_id: self.charge_id.max(other.charge_id),
            invoice_id: self.invoice_id.max(other.invoice_id),
            subscription_id: self.subscription_id.max(other.subscription_id),
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
            disputes: merge_disputes(self.disputes, other.disputes),
            unknown_to_stripe: self.unknown_to_stripe || other.unknown_to_stripe,
        }
    }

    /// What the payment's disputes mean for it: the most severe of their states.
    #[must_use]
    pub fn dispute(&self) -> DisputeState {
        self.disputes
            .values()
            .map(DisputeFacts::state)
            .max()
            .unwrap_or_default()
    }

    /// The dispute reported last (the newest claim; ties by id), for display.
    #[must_use]
    pub fn latest_dispute_id(&self) -> Option<&str> {
        self.disputes
            .iter()
            .max_by(|a, b| (a.1.latest.at, a.0).cmp(&(b.1.latest.at, b.0)))
            .map(|(id, _)| id.as_str())
    }

    /// Derived status: money taken back (full refund, lost dispute) beats an open dispute,
    /// which beats payment; a failure only shows when nothing was paid.
    #[must_use]
    pub fn status(&self) -> PurchaseStatus {
        let dispute = self.dispute();
        if self.fully_refunded || dispute == DisputeState::Lost {
            PurchaseStatus::Refunded
        } else if dispute == DisputeState::Open {
            PurchaseStatus::Disputed
        } else if self.paid {
            PurchaseStatus::Completed
        } else if self.failed {
            PurchaseStatus::Failed
        } else {
            PurchaseStatus::Pending
        }
    }

    /// True for a payment known only as an invoice's (a subscription's, or an invoice payment
    /// not yet tied to anything): never a purchase of its own. (`store::A_PURCHASE` is the same
    /// rule in SQL.)
    #[must_use]
    pub fn is_invoice_payment(&self) -> bool {
        self.subscription_id.is_some()
            || (self.invoice_id.is_some() && self.checkout_session_id.is_none())
    }

    /// When a lost dispute took the money back, if one did.
    #[must_use]
    pub fn lost_at(&self) -> Option<i64> {
        self.disputes
            .values()
            .filter_map(|d| d.known.as_ref())
            .filter(|k| k.status == DisputeStatus::Lost)
            .map(|k| k.at)
            .min()
    }

    /// When the money came back to the buyer (a full refund, a lost dispute), if it did.
    #[must_use]
    pub fn taken_back_at(&self) -> Option<i64> {
        let refunded = self
            .fully_refunded
            .then_some(self.refunded_at.unwrap_or(i64::MIN));
        min_known(refunded, self.lost_at())
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
            .or(self.invoice_id.as_deref())
    }
}

/// The union of two dispute maps, joining the facts of a dispute both know.
fn merge_disputes(
    mut a: BTreeMap<String, DisputeFacts>,
    b: BTreeMap<String, DisputeFacts>,
) -> BTreeMap<String, DisputeFacts> {
    for (id, facts) in b {
        let merged = match a.remove(&id) {
            Some(known) => known.merge(facts),
            None => facts,
        };
        a.insert(id, merged);
    }
    a
}
