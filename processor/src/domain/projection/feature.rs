//! Stripe Entitlements (features) of a customer as a join of monotone facts.
//!
//! Invariant: the feature list is a last-writer-wins register ordered by (event `created`,
//! lookup keys) — a total order, so a stale summary never overrides a newer one and two
//! summaries of one second resolve the same way in any order. The list held is always a
//! complete one (the worker completes cut lists from Stripe before they reach the projection).

/// The features one summary event asserts, at its `created`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FeatureClaim {
    pub at: i64,
    /// Sorted, deduplicated `lookup_key`s.
    pub lookup_keys: Vec<String>,
}

/// Everything learned about one customer's Stripe features.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureFacts {
    pub customer_id: String,
    pub user_id: Option<String>,
    pub claim: Option<FeatureClaim>,
}

impl FeatureFacts {
    /// The join of two fact sets about the same customer.
    #[must_use]
    pub fn merge(self, other: Self) -> Self {
        Self {
            customer_id: self.customer_id.max(other.customer_id),
            user_id: self.user_id.max(other.user_id),
            claim: self.claim.max(other.claim),
        }
    }

    /// The features active now, by lookup key.
    #[must_use]
    pub fn lookup_keys(&self) -> &[String] {
        self.claim
            .as_ref()
            .map_or(&[], |c| c.lookup_keys.as_slice())
    }
}
