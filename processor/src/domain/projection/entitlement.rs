//! Entitlements derived from a user's purchase, subscription and Stripe feature rows.
//!
//! Invariant: [`derive_entitlements`] is a pure function of the rows and the [`Registry`] (not
//! of the order they were written in, nor of the clock), returning one entitlement per key,
//! sorted by key: the best source under a fixed total order. A row grants the keys of the
//! product it resolves to (none when it resolves to nothing), so several sources may grant one
//! key and ending one leaves what another still grants.
//!
//! Status mapping. Purchases: completed → active (lifetime); disputed → suspended; refunded
//! (full refund or lost dispute) → revoked; pending/failed → nothing. Subscriptions:
//! trialing/active → active until `current_period_end`; past_due → past_due (grace) until the
//! period's end, or for [`SubscriptionPolicy::past_due_grace`](super::SubscriptionPolicy) after
//! it fell past due (suspended when the grace is zero); unpaid/paused → suspended (payment is owed or collection is paused: the user had access and
//! will get it back on payment); incomplete → nothing (the first payment never succeeded, there
//! was never access to suspend); canceled/incomplete_expired → expired at `ended_at`. A
//! subscription answers for its payments: an open chargeback on one suspends it, a lost one
//! revokes it unless a later payment stands, and a full refund of its latest payment revokes
//! it under [`RefundPolicy::EndAccess`] (the default). A lapsed
//! `expires_at` is for readers to compare with their clock; the projection stays clock-free so
//! replays converge.

use super::{
    DisputeState, FeatureFacts, Product, PurchaseFacts, PurchaseStatus, RefundPolicy, Registry,
    SubscriptionFacts,
};
use crate::domain::events::SubscriptionStatus;
use std::cmp::Ordering;
use std::collections::BTreeMap;

/// `entitlements.status`; serialized in its column spelling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntitlementStatus {
    Active,
    PastDue,
    Suspended,
    Revoked,
    Expired,
}

impl EntitlementStatus {
    /// The column / API spelling.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::PastDue => "past_due",
            Self::Suspended => "suspended",
            Self::Revoked => "revoked",
            Self::Expired => "expired",
        }
    }

    /// Parses the column spelling.
    #[must_use]
    pub fn from_column(raw: &str) -> Option<Self> {
        Some(match raw {
            "active" => Self::Active,
            "past_due" => Self::PastDue,
            "suspended" => Self::Suspended,
            "revoked" => Self::Revoked,
            "expired" => Self::Expired,
            _ => return None,
        })
    }

    /// Higher is better for the user; picks the source that decides a key.
    fn rank(self) -> u8 {
        match self {
            Self::Active => 5,
            Self::PastDue => 4,
            Self::Suspended => 3,
            Self::Revoked => 2,
            Self::Expired => 1,
        }
    }
}

/// `entitlements.source`; serialized in its column spelling.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum EntitlementSource {
    Purchase,
    Subscription,
    /// A Stripe Entitlements feature of the customer (`entitlements.active_entitlement_summary`).
    StripeFeature,
}

impl EntitlementSource {
    /// The column / API spelling.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Purchase => "purchase",
            Self::Subscription => "subscription",
            Self::StripeFeature => "stripe_feature",
        }
    }

    /// The contract's spelling of `source` (`purchase|subscription`): a Stripe feature comes
    /// from the customer's subscriptions in Stripe, so it reads as `subscription` there; the
    /// exact kind is in `sources`.
    #[must_use]
    pub fn contract(self) -> Self {
        match self {
            Self::StripeFeature => Self::Subscription,
            other => other,
        }
    }

    /// Parses the column spelling.
    #[must_use]
    pub fn from_column(raw: &str) -> Option<Self> {
        Some(match raw {
            "purchase" => Self::Purchase,
            "subscription" => Self::Subscription,
            "stripe_feature" => Self::StripeFeature,
            _ => return None,
        })
    }
}

impl PartialEq<&str> for EntitlementStatus {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<&str> for EntitlementSource {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// One derived entitlement of a user (the user is implied by the rows it came from): the best
/// of its sources decides it; every source granting the key is listed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Entitlement {
    pub key: String,
    pub status: EntitlementStatus,
    pub source: EntitlementSource,
    pub source_id: String,
    /// Unix seconds; `None` is lifetime.
    pub expires_at: Option<i64>,
    /// Every row granting the key, best first (the first is the one above).
    pub sources: Vec<GrantSource>,
}

/// One row granting a key, as the API names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GrantSource {
    pub source: EntitlementSource,
    pub source_id: String,
    pub status: EntitlementStatus,
    /// Unix seconds; `None` is lifetime.
    pub expires_at: Option<i64>,
    /// Seats of a subscription (its item's quantity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantity: Option<i64>,
    /// The organisation the source belongs to, when a member holds it through one (set by
    /// [`member_view`](crate::domain::organization::member_view), never stored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub organization_id: Option<String>,
}

fn from_purchase(p: &PurchaseFacts, registry: &Registry) -> Vec<(String, GrantSource)> {
    // A subscription's payment grants through its subscription only.
    if p.is_invoice_payment() {
        return Vec::new();
    }
    let status = match p.status() {
        PurchaseStatus::Completed => EntitlementStatus::Active,
        PurchaseStatus::Disputed => EntitlementStatus::Suspended,
        PurchaseStatus::Refunded => EntitlementStatus::Revoked,
        PurchaseStatus::Pending | PurchaseStatus::Failed => return Vec::new(),
    };
    let (Some(product), Some(source_id)) = (registry.purchase_product(p), p.source_id()) else {
        return Vec::new();
    };
    let source = GrantSource {
        source: EntitlementSource::Purchase,
        source_id: source_id.to_owned(),
        status,
        expires_at: None,
        quantity: None,
        organization_id: None,
    };
    for_each_grant(product, &source)
}

/// `source` once per key `product` grants.
fn for_each_grant(product: &Product, source: &GrantSource) -> Vec<(String, GrantSource)> {
    product
        .grants
        .iter()
        .map(|key| (key.clone(), source.clone()))
        .collect()
}

/// What a subscription's payments (`payments`: the rows whose `subscription_id` is its) say of
/// its access, if anything: a chargeback lost and not followed by a payment that stands ends
/// it, as does a full refund of its latest payment under [`RefundPolicy::EndAccess`]; an open
/// chargeback suspends it.
fn payments_verdict(
    payments: &[&PurchaseFacts],
    policy: RefundPolicy,
) -> Option<EntitlementStatus> {
    let standing = |p: &&&PurchaseFacts| p.paid && p.taken_back_at().is_none();
    let last_standing = payments
        .iter()
        .filter(standing)
        .filter_map(|p| p.paid_at)
        .max();
    let lost = payments
        .iter()
        .filter_map(|p| p.lost_at())
        .any(|lost| last_standing.is_none_or(|paid| paid <= lost));
    let latest = payments
        .iter()
        .filter(|p| p.paid)
        .max_by_key(|p| (p.paid_at, p.source_id()));
    let refunded = latest.is_some_and(|p| p.fully_refunded) && policy == RefundPolicy::EndAccess;
    if lost || refunded {
        Some(EntitlementStatus::Revoked)
    } else if payments.iter().any(|p| p.dispute() == DisputeState::Open) {
        Some(EntitlementStatus::Suspended)
    } else {
        None
    }
}

fn from_subscription(
    s: &SubscriptionFacts,
    payments: &[&PurchaseFacts],
    registry: &Registry,
) -> Vec<(String, GrantSource)> {
    let Some(product) = registry.subscription_product(s) else {
        return Vec::new();
    };
    let policy = registry.policy();
    let (mut status, expires_at) = match s.status() {
        SubscriptionStatus::Trialing | SubscriptionStatus::Active => {
            (EntitlementStatus::Active, s.current_period_end)
        }
        SubscriptionStatus::PastDue => match policy.past_due_grace {
            None => (EntitlementStatus::PastDue, s.current_period_end),
            Some(0) => (EntitlementStatus::Suspended, s.current_period_end),
            Some(grace) => {
                let since = s.past_due_since().or(s.claim.map(|c| c.at));
                (
                    EntitlementStatus::PastDue,
                    since.map(|at| at.saturating_add(grace)),
                )
            }
        },
        SubscriptionStatus::Unpaid | SubscriptionStatus::Paused => {
            (EntitlementStatus::Suspended, s.current_period_end)
        }
        SubscriptionStatus::Incomplete => return Vec::new(),
        SubscriptionStatus::Canceled | SubscriptionStatus::IncompleteExpired => (
            EntitlementStatus::Expired,
            s.ended_at.or(s.current_period_end),
        ),
    };
    match payments_verdict(payments, policy.refund) {
        Some(EntitlementStatus::Revoked) => status = EntitlementStatus::Revoked,
        Some(EntitlementStatus::Suspended)
            if matches!(
                status,
                EntitlementStatus::Active | EntitlementStatus::PastDue
            ) =>
        {
            status = EntitlementStatus::Suspended;
        }
        _ => {}
    }
    let source = GrantSource {
        source: EntitlementSource::Subscription,
        source_id: s.id.clone(),
        status,
        expires_at,
        quantity: s.price.as_ref().and_then(|c| c.quantity),
        organization_id: None,
    };
    for_each_grant(product, &source)
}

/// A customer's active Stripe features grant, active and without expiry, the keys of the
/// products they map to (named by the customer).
fn from_features(f: &FeatureFacts, registry: &Registry) -> Vec<(String, GrantSource)> {
    let source = GrantSource {
        source: EntitlementSource::StripeFeature,
        source_id: f.customer_id.clone(),
        status: EntitlementStatus::Active,
        expires_at: None,
        quantity: None,
        organization_id: None,
    };
    f.lookup_keys()
        .iter()
        .filter_map(|k| registry.by_feature(k))
        .flat_map(|product| for_each_grant(product, &source))
        .collect()
}

/// Total order on candidates for one key: better status, then lifetime before dated, then the
/// later expiry, then purchase before subscription, then the smaller source id (then a user's
/// own source before an organisation's, then the smaller organisation id).
#[must_use]
pub fn better(a: &GrantSource, b: &GrantSource) -> Ordering {
    a.status
        .rank()
        .cmp(&b.status.rank())
        .then_with(|| match (a.expires_at, b.expires_at) {
            (None, None) => Ordering::Equal,
            (None, Some(_)) => Ordering::Greater,
            (Some(_), None) => Ordering::Less,
            (Some(x), Some(y)) => x.cmp(&y),
        })
        .then_with(|| b.source.cmp(&a.source))
        .then_with(|| b.source_id.cmp(&a.source_id))
        .then_with(|| a.quantity.cmp(&b.quantity))
        .then_with(|| b.organization_id.cmp(&a.organization_id))
}

/// Which of one user's purchases are second payments for something already owned: paid while
/// an earlier paid purchase of the same product (by payment time, then id) still held it (its
/// money had not come back). Each is a purchase of its own and grants like the first, so
/// refunding one of two keeps access and refunding both ends it; the flag tells operators which
/// payment to refund. A function of the rows alone: `result[i]` belongs to `purchases[i]`.
#[must_use]
pub fn duplicate_payments(purchases: &[PurchaseFacts], registry: &Registry) -> Vec<bool> {
    let paid: Vec<Option<(&str, (i64, &str))>> = purchases
        .iter()
        .map(|p| {
            let product = registry.purchase_product(p).filter(|_| p.paid)?;
            Some((
                product.key.as_str(),
                (p.paid_at.unwrap_or(i64::MAX), p.source_id()?),
            ))
        })
        .collect();
    paid.iter()
        .map(|this| {
            let Some((key, order)) = this else {
                return false;
            };
            purchases.iter().zip(&paid).any(|(earlier, other)| {
                other.is_some_and(|(k, o)| {
                    k == *key
                        && o < *order
                        && earlier.taken_back_at().is_none_or(|back| back > order.0)
                })
            })
        })
        .collect()
}

/// The user's entitlements implied by their rows and the products they resolve to in
/// `registry`, one per key, sorted by key. Rows are expected to belong to one user; rows that
/// grant nothing are skipped.
#[must_use]
pub fn derive_entitlements(
    purchases: &[PurchaseFacts],
    subscriptions: &[SubscriptionFacts],
    features: &[FeatureFacts],
    registry: &Registry,
) -> Vec<Entitlement> {
    let mut by_key: BTreeMap<String, Vec<GrantSource>> = BTreeMap::new();
    let candidates = purchases
        .iter()
        .flat_map(|p| from_purchase(p, registry))
        .chain(subscriptions.iter().flat_map(|s| {
            let payments: Vec<&PurchaseFacts> = purchases
                .iter()
                .filter(|p| p.subscription_id.as_deref() == Some(s.id.as_str()))
                .collect();
            from_subscription(s, &payments, registry)
        }))
        .chain(features.iter().flat_map(|f| from_features(f, registry)));
    for (key, source) in candidates {
        by_key.entry(key).or_default().push(source);
    }
    by_key
        .into_iter()
        .filter_map(|(key, mut sources)| {
            // Best first, under a total order: the list does not depend on the row order.
            sources.sort_by(|a, b| better(b, a));
            sources.dedup();
            let best = sources.first()?.clone();
            Some(Entitlement {
                key,
                status: best.status,
                source: best.source,
                source_id: best.source_id,
                expires_at: best.expires_at,
                sources,
            })
        })
        .collect()
}
