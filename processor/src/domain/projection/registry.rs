//! The product registry as the projection sees it: which product an event's money trail
//! resolves to, which entitlement keys that product grants, and how its payment is split.
//!
//! Invariants:
//! - A row grants only through a registered product, and only when what was paid matches it:
//!   a known price id must be the product's price (and agree with any product key our metadata
//!   names) — or, being an ad-hoc `price_data` price, belong to an item sold by amount that our
//!   metadata names, at its amount and currency; without a price id, the product key our checkout wrote must name the product and,
//!   when the product is sold by amount (`price_data`), the amount and currency must be its own.
//!   A row nothing resolves (a Payment Link's `client_reference_id` alone, a price outside the
//!   registry, a $1 "Pro") grants nothing.
//! - A product's prices have a history: it sells at its current price (or amount), and every
//!   price and amount it was sold at before still resolves to it ([`Product::retired_price_ids`],
//!   [`Product::retired_amounts`]), so a price change never takes access from earlier buyers. A
//!   price belongs to one product for good (the database refuses to reuse it).
//! - A subscription's newest price decides its product (a plan change in the billing portal
//!   changes the price, not the metadata); the metadata key is only a fallback while no event
//!   has reported a price.
//! - Resolution reads the registry passed in, never the clock or the database, so re-deriving
//!   after a mapping change is the same function over the same rows.

use std::collections::BTreeMap;

use super::{FeeSplit, PurchaseFacts, SubscriptionFacts};
use crate::domain::events::CheckoutMode;

/// Basis points in a whole.
pub const BPS_WHOLE: i64 = 10_000;

/// Whether `key` is a product key: 1-64 of `a-z`, `0-9`, `_`, `-`. The one rule the catalog
/// file and the admin API both apply.
#[must_use]
pub fn is_product_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 64
        && key
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// Whether `price` looks like a Stripe price id: `price_` then 1-249 of `A-Z`, `a-z`, `0-9`,
/// `_` (at most 255 bytes in all). The one rule the catalog file and the admin API both apply.
#[must_use]
pub fn is_price_id(price: &str) -> bool {
    price.len() > "price_".len()
        && price.len() <= 255
        && price.starts_with("price_")
        && price
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Whether a product can be bought now. Unpublished products keep granting to their buyers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProductStatus {
    Published,
    Unpublished,
}

impl ProductStatus {
    /// The column / API spelling.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Published => "published",
            Self::Unpublished => "unpublished",
        }
    }

    /// Parses the column spelling.
    #[must_use]
    pub fn from_column(raw: &str) -> Option<Self> {
        match raw {
            "published" => Some(Self::Published),
            "unpublished" => Some(Self::Unpublished),
            _ => None,
        }
    }
}

/// One registered product (serialized as the admin API shows it).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Product {
    pub key: String,
    pub title: Option<String>,
    /// The Stripe price it is sold at; `None` for `price_data` products.
    pub price_id: Option<String>,
    /// The amount it is sold at through `price_data` (with `currency`).
    pub amount_cents: Option<i64>,
    /// Lower-case ISO code.
    pub currency: Option<String>,
    pub mode: CheckoutMode,
    /// The entitlement keys a paid purchase or live subscription grants; never empty.
    pub grants: Vec<String>,
    /// The Stripe Entitlements feature (`lookup_key`) that grants this product's keys to a
    /// customer whose active entitlement summary lists it.
    pub feature_lookup_key: Option<String>,
    pub creator_id: Option<String>,
    pub platform_fee_bps: i64,
    pub organization_fee_bps: i64,
    pub status: ProductStatus,
    /// Stripe prices it was sold at before `price_id`: they sell no more and still resolve to it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub retired_price_ids: Vec<String>,
    /// Amounts it was sold at (through `price_data`) before `amount_cents`: the same.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub retired_amounts: Vec<SoldAmount>,
}

/// An amount a product was sold at, with its lower-case ISO currency.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SoldAmount {
    pub amount_cents: i64,
    pub currency: String,
}

impl Product {
    /// How `amount_cents` paid for this product is split: the fees are rounded down, the
    /// creator gets the rest, so the three parts always add up.
    #[must_use]
    pub fn split(&self, amount_cents: i64) -> FeeSplit {
        let fee = |bps: i64| {
            i64::try_from(i128::from(amount_cents) * i128::from(bps) / i128::from(BPS_WHOLE))
                .unwrap_or(0)
                .clamp(0, amount_cents.max(0))
        };
        let platform = fee(self.platform_fee_bps);
        let organization = fee(self.organization_fee_bps).min(amount_cents - platform);
        FeeSplit {
            platform_fee_cents: platform,
            organization_fee_cents: organization,
            creator_payout_cents: amount_cents - platform - organization,
        }
    }

    /// Every amount the product is or was sold at, current first.
    fn amounts(&self) -> impl Iterator<Item = (i64, &str)> {
        let current = self.amount_cents.zip(self.currency.as_deref());
        current.into_iter().chain(
            self.retired_amounts
                .iter()
                .map(|a| (a.amount_cents, a.currency.as_str())),
        )
    }

    /// True when the product is or was sold by amount.
    fn sold_by_amount(&self) -> bool {
        self.amounts().next().is_some()
    }

    /// True when `amount`/`currency` is one the product is or was sold at, or when it was only
    /// ever sold at Stripe prices (the metadata our checkout set names it).
    fn amount_matches(&self, amount: Option<i64>, currency: Option<&str>) -> bool {
        !self.sold_by_amount()
            || self.amounts().any(|(expected, expected_currency)| {
                amount == Some(expected)
                    && currency.is_some_and(|c| c.eq_ignore_ascii_case(expected_currency))
            })
    }
}

/// What a full refund of a subscription's latest payment does to its access
/// (`SUBSCRIPTION_REFUND_POLICY`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RefundPolicy {
    /// The money for the current period went back: access ends (revoked) at once.
    #[default]
    EndAccess,
    /// A goodwill refund: access stays until the period's end, as paid.
    KeepUntilPeriodEnd,
}

impl RefundPolicy {
    /// The configuration and column spelling.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::EndAccess => "end_access",
            Self::KeepUntilPeriodEnd => "keep_until_period_end",
        }
    }

    /// Parses [`RefundPolicy::as_str`]'s spelling.
    #[must_use]
    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "end_access" => Some(Self::EndAccess),
            "keep_until_period_end" => Some(Self::KeepUntilPeriodEnd),
            _ => None,
        }
    }
}

/// How subscriptions answer for their payments, beside the products: one policy for every
/// process of a deployment (written at start-up, kept with the registry).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SubscriptionPolicy {
    pub refund: RefundPolicy,
    /// How long a past-due subscription keeps access after it fell past due, in seconds; `None`
    /// until the end of the period it is in (`SUBSCRIPTION_GRACE=period`), `Some(0)` not at
    /// all (suspended at once).
    pub past_due_grace: Option<i64>,
}

/// The products the projection resolves rows against (all of them, or those the rows name),
/// and the subscription policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Registry {
    products: BTreeMap<String, Product>,
    by_price: BTreeMap<String, String>,
    by_feature: BTreeMap<String, String>,
    policy: SubscriptionPolicy,
}

impl Registry {
    /// This registry under `policy`.
    #[must_use]
    pub fn with_policy(mut self, policy: SubscriptionPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// How subscriptions answer for their payments.
    #[must_use]
    pub fn policy(&self) -> SubscriptionPolicy {
        self.policy
    }

    /// A registry of `products` (a later product with the same key or price replaces an
    /// earlier one, and a current price wins over a retired one; the database keeps prices to
    /// one product).
    #[must_use]
    pub fn new(products: impl IntoIterator<Item = Product>) -> Self {
        let mut registry = Self::default();
        let mut retired = Vec::new();
        for product in products {
            if let Some(price) = &product.price_id {
                registry.by_price.insert(price.clone(), product.key.clone());
            }
            retired.extend(
                product
                    .retired_price_ids
                    .iter()
                    .map(|price| (price.clone(), product.key.clone())),
            );
            if let Some(feature) = &product.feature_lookup_key {
                registry
                    .by_feature
                    .insert(feature.clone(), product.key.clone());
            }
            registry.products.insert(product.key.clone(), product);
        }
        for (price, key) in retired {
            registry.by_price.entry(price).or_insert(key);
        }
        registry
    }

    /// The product with this key.
    #[must_use]
    pub fn get(&self, key: &str) -> Option<&Product> {
        self.products.get(key)
    }

    /// The product sold at this Stripe price, now or before.
    #[must_use]
    pub fn by_price(&self, price_id: &str) -> Option<&Product> {
        self.products.get(self.by_price.get(price_id)?)
    }

    /// The product a Stripe Entitlements feature (`lookup_key`) maps to.
    #[must_use]
    pub fn by_feature(&self, lookup_key: &str) -> Option<&Product> {
        self.products.get(self.by_feature.get(lookup_key)?)
    }

    /// Every product, in key order.
    pub fn products(&self) -> impl Iterator<Item = &Product> {
        self.products.values()
    }

    /// The product a purchase paid for, if what was paid matches one (module invariants).
    #[must_use]
    pub fn purchase_product(&self, p: &PurchaseFacts) -> Option<&Product> {
        if p.unknown_to_stripe {
            return None;
        }
        match (&p.price_id, &p.product_key) {
            (Some(price), key) => match self.by_price(price) {
                Some(product) => key
                    .as_ref()
                    .is_none_or(|k| *k == product.key)
                    .then_some(product),
                // An ad-hoc price (what Checkout `price_data` creates): only an item sold by
                // amount, named by our metadata, at an amount and currency it was sold at.
                None => {
                    let product = self.get(key.as_ref()?)?;
                    (product.sold_by_amount()
                        && product.amount_matches(p.amount_cents, p.currency.as_deref()))
                    .then_some(product)
                }
            },
            // Our metadata alone: an item sold by amount at an amount it was sold at; a product
            // sold at a Stripe price only with its Checkout Session (the price paid is that
            // session's: a payment intent alone says nothing of it).
            (None, Some(key)) => {
                let product = self.get(key)?;
                let priced = product.sold_by_amount() || p.checkout_session_id.is_some();
                (priced && product.amount_matches(p.amount_cents, p.currency.as_deref()))
                    .then_some(product)
            }
            (None, None) => None,
        }
    }

    /// The product a subscription is on: its newest price, else (no price reported yet) the
    /// product key of our checkout's metadata.
    #[must_use]
    pub fn subscription_product(&self, s: &SubscriptionFacts) -> Option<&Product> {
        match &s.price {
            Some(claim) => self.by_price(&claim.price_id),
            None => self.get(s.product_key.as_deref()?),
        }
    }

    /// The split of a purchase's amount: its product's rule, else everything to the creator.
    #[must_use]
    pub fn purchase_split(&self, p: &PurchaseFacts) -> Option<FeeSplit> {
        let amount = p.amount_cents?;
        Some(
            self.purchase_product(p)
                .map_or_else(|| FeeSplit::of(amount), |product| product.split(amount)),
        )
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    pub(crate) fn product(key: &str, price: Option<&str>, amount: Option<i64>) -> Product {
        Product {
            key: key.into(),
            title: None,
            price_id: price.map(str::to_owned),
            amount_cents: amount,
            currency: amount.map(|_| "usd".into()),
            mode: CheckoutMode::Payment,
            grants: vec![key.into()],
            feature_lookup_key: None,
            creator_id: None,
            platform_fee_bps: 0,
            organization_fee_bps: 0,
            status: ProductStatus::Published,
            retired_price_ids: Vec::new(),
            retired_amounts: Vec::new(),
        }
    }

    /// A paid purchase known through its Checkout Session.
    fn paid(key: Option<&str>, price: Option<&str>, amount: i64) -> PurchaseFacts {
        PurchaseFacts {
            checkout_session_id: Some("cs_1".into()),
            product_key: key.map(str::to_owned),
            price_id: price.map(str::to_owned),
            amount_cents: Some(amount),
            currency: Some("usd".into()),
            paid: true,
            ..PurchaseFacts::default()
        }
    }

    #[test]
    fn purchases_resolve_by_price_or_by_our_metadata_with_a_matching_amount() {
        let registry = Registry::new([
            product("pro", Some("price_pro"), None),
            product("video", None, Some(1500)),
        ]);
        let key = |p: &PurchaseFacts| registry.purchase_product(p).map(|p| p.key.as_str());
        assert_eq!(key(&paid(None, Some("price_pro"), 4900)), Some("pro"));
        assert_eq!(
            key(&paid(Some("pro"), Some("price_pro"), 4900)),
            Some("pro")
        );
        assert_eq!(key(&paid(Some("pro"), None, 4900)), Some("pro"));
        assert_eq!(key(&paid(Some("video"), None, 1500)), Some("video"));
        // A payment intent alone: the amount decides an item; a product sold at a Stripe
        // price needs its session (the price paid is the session's).
        let intent = |key: &str, amount: i64| PurchaseFacts {
            checkout_session_id: None,
            payment_intent_id: Some("pi_1".into()),
            ..paid(Some(key), None, amount)
        };
        assert_eq!(key(&intent("pro", 4900)), None);
        assert_eq!(key(&intent("pro", 50)), None);
        assert_eq!(key(&intent("video", 1500)), Some("video"));
        assert_eq!(key(&intent("video", 50)), None);
        // A session Stripe does not know grants nothing, whatever it says.
        let unknown = PurchaseFacts {
            unknown_to_stripe: true,
            ..paid(Some("pro"), Some("price_pro"), 4900)
        };
        assert_eq!(key(&unknown), None);
        // The ad-hoc price Checkout creates for price_data.
        assert_eq!(
            key(&paid(Some("video"), Some("price_adhoc"), 1500)),
            Some("video")
        );
        assert_eq!(key(&paid(Some("video"), Some("price_adhoc"), 100)), None);
        assert_eq!(key(&paid(Some("pro"), Some("price_adhoc"), 4900)), None);
        // The $1 Payment Link: no metadata, a price the registry does not sell.
        assert_eq!(key(&paid(None, Some("price_other"), 100)), None);
        assert_eq!(key(&paid(None, None, 100)), None);
        // Metadata that disagrees with the price, or an amount that is not the item's.
        assert_eq!(key(&paid(Some("video"), Some("price_pro"), 1500)), None);
        assert_eq!(key(&paid(Some("video"), None, 100)), None);
        let mut eur = paid(Some("video"), None, 1500);
        eur.currency = Some("eur".into());
        assert_eq!(key(&eur), None);
        assert_eq!(key(&paid(Some("gold"), None, 100)), None);
    }

    #[test]
    fn every_price_and_amount_a_product_was_sold_at_still_resolves_to_it() {
        let mut pro = product("pro", Some("price_b"), None);
        pro.retired_price_ids = vec!["price_a".into()];
        let mut video = product("video", None, Some(2000));
        video.retired_amounts = vec![SoldAmount {
            amount_cents: 1500,
            currency: "usd".into(),
        }];
        // A retired price some other product claims now: the current one wins.
        let mut other = product("other", Some("price_c"), None);
        other.retired_price_ids = vec!["price_b".into()];
        let registry = Registry::new([pro, video, other]);
        let key = |p: &PurchaseFacts| registry.purchase_product(p).map(|p| p.key.as_str());
        assert_eq!(key(&paid(None, Some("price_a"), 4900)), Some("pro"));
        assert_eq!(key(&paid(None, Some("price_b"), 9900)), Some("pro"));
        assert_eq!(key(&paid(Some("video"), None, 1500)), Some("video"));
        assert_eq!(key(&paid(Some("video"), None, 2000)), Some("video"));
        assert_eq!(
            key(&paid(Some("video"), Some("price_adhoc"), 1500)),
            Some("video")
        );
        assert_eq!(key(&paid(Some("video"), None, 1000)), None);
        let mut eur = paid(Some("video"), None, 1500);
        eur.currency = Some("eur".into());
        assert_eq!(key(&eur), None);
        let sub = SubscriptionFacts {
            price: Some(super::super::PriceClaim {
                at: 1,
                price_id: "price_a".into(),
                quantity: None,
            }),
            ..SubscriptionFacts::new("sub_1".into())
        };
        assert_eq!(
            registry.subscription_product(&sub).map(|p| p.key.as_str()),
            Some("pro")
        );
    }

    #[test]
    fn splits_round_fees_down_and_always_add_up() {
        let mut item = product("video", None, Some(999));
        item.platform_fee_bps = 1000;
        item.organization_fee_bps = 250;
        let split = item.split(999);
        assert_eq!(split.platform_fee_cents, 99);
        assert_eq!(split.organization_fee_cents, 24);
        assert_eq!(split.creator_payout_cents, 876);
        for amount in [0, 1, 7, 999, 1_000_000_007] {
            let s = item.split(amount);
            assert_eq!(
                s.platform_fee_cents + s.organization_fee_cents + s.creator_payout_cents,
                amount
            );
        }
        let all = product("x", None, Some(1));
        assert_eq!(all.split(500), FeeSplit::of(500));
    }

    #[test]
    fn keys_and_prices_follow_one_rule() {
        for key in ["pro", "content-item_7", &"k".repeat(64)] {
            assert!(is_product_key(key), "{key}");
        }
        for key in ["", "Pro", "pro plan", "pro/x", "é", &"k".repeat(65)] {
            assert!(!is_product_key(key), "{key}");
        }
        for price in [
            "price_1AbC",
            "price_x",
            &format!("price_{}", "a".repeat(249)),
        ] {
            assert!(is_price_id(price), "{price}");
        }
        let too_long = format!("price_{}", "a".repeat(250));
        for price in [
            "",
            "price_",
            "prod_1",
            "price_1-2",
            "price_1 ",
            too_long.as_str(),
        ] {
            assert!(!is_price_id(price), "{price}");
        }
    }

    proptest::proptest! {
        /// Whatever the history of a product's prices and amounts, and whatever other products
        /// hold, every price and amount it was ever sold at resolves to it, and nothing else does.
        #[test]
        fn any_price_history_keeps_every_earlier_sale_resolving(
            prices in proptest::collection::vec(0u8..6, 1..5),
            amounts in proptest::collection::vec(1i64..5, 1..4),
            probe in 0u8..8,
            spent in 1i64..6,
        ) {
            let price = |n: u8| format!("price_{n}");
            let mut pro = product("pro", prices.last().map(|n| price(*n)).as_deref(), None);
            pro.retired_price_ids = prices[..prices.len() - 1].iter().map(|n| price(*n)).collect();
            let mut item = product("item", None, amounts.last().map(|a| a * 100));
            item.retired_amounts = amounts[..amounts.len() - 1]
                .iter()
                .map(|a| SoldAmount { amount_cents: a * 100, currency: "usd".into() })
                .collect();
            // Another product sells at a price outside the history.
            let other = product("other", Some("price_7"), None);
            let registry = Registry::new([pro, item, other]);
            let key = |p: &PurchaseFacts| registry.purchase_product(p).map(|p| p.key.clone());
            let sold = prices.contains(&probe);
            let expected = if sold {
                Some("pro".to_owned())
            } else if probe == 7 {
                Some("other".to_owned())
            } else {
                None
            };
            proptest::prop_assert_eq!(key(&paid(None, Some(&price(probe)), 4900)), expected);
            let item_sold = amounts.contains(&spent);
            proptest::prop_assert_eq!(
                key(&paid(Some("item"), None, spent * 100)),
                item_sold.then(|| "item".to_owned())
            );
        }
    }
}
