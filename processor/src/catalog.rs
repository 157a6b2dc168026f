//! The product catalog: which product keys a user may buy, at which Stripe price, in which
//! Checkout mode, and which entitlement each one grants.
//!
//! Sources: `STRIPE_PRICE_PRO_LIFETIME` defines product `pro` (one-time payment granting `pro`);
//! the optional TOML file named by `CATALOG_FILE` adds products:
//!
//! ```toml
//! [products.team_monthly]
//! price = "price_123"
//! mode = "subscription"      # or "payment"
//! entitlement = "team"
//! also_grants = ["pro"]      # optional: more entitlement keys the product grants
//! feature = "team-seats"     # optional: a Stripe Entitlements feature lookup_key granting them
//! ```
//!
//! These are the registry's static products: start-up writes them into the `products` table
//! ([`crate::registry::sync_config`]), where they sit beside the products the application
//! registers through the admin API.
//!
//! Invariant: a loaded catalog is valid (keys well-formed and unique across both sources, price
//! ids look like Stripe price ids and are not shared by two products, so an event's price maps
//! back to exactly one product). Every error names the variable or file and the product.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use shared::config::{ConfigError, Env};
use shared::ids::EntitlementKey;

use crate::domain::events::CheckoutMode;
use crate::domain::projection::{Product, ProductStatus, is_price_id, is_product_key};

/// The validated set of products.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Catalog {
    products: BTreeMap<String, Product>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogFile {
    #[serde(default)]
    products: BTreeMap<String, FileProduct>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileProduct {
    price: String,
    mode: CheckoutMode,
    entitlement: String,
    #[serde(default)]
    also_grants: Vec<String>,
    #[serde(default)]
    feature: Option<String>,
}

/// The variable naming the catalog file; errors about the file's content name it too.
const CATALOG_VAR: &str = "CATALOG_FILE";
const PRO_VAR: &str = "STRIPE_PRICE_PRO_LIFETIME";

impl Catalog {
    /// Reads `STRIPE_PRICE_PRO_LIFETIME` and, when set, the file named by `CATALOG_FILE`.
    /// Neither set gives an empty catalog (every checkout then answers `unknown_product`).
    ///
    /// # Errors
    /// A [`ConfigError`] naming the variable (and the file and product) that is wrong.
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        Self::load(env.get(PRO_VAR), env.get(CATALOG_VAR).map(Path::new))
    }

    /// [`Catalog::from_env`] from values already read: the Pro lifetime price and the path of
    /// the catalog file.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the variable (and the file and product) that is wrong.
    pub fn load(
        pro_lifetime_price: Option<&str>,
        file: Option<&Path>,
    ) -> Result<Self, ConfigError> {
        let file = match file.map(|p| p.display().to_string()) {
            None => None,
            Some(path) => {
                let text = std::fs::read_to_string(Path::new(&path)).map_err(|e| {
                    ConfigError::new(CATALOG_VAR, format!("cannot read {path}: {e}"))
                })?;
                Some((path, text))
            }
        };
        Self::from_sources(
            pro_lifetime_price,
            file.as_ref().map(|(p, t)| (p.as_str(), t.as_str())),
        )
    }

    /// Builds the catalog from the Pro lifetime price and an optional `(file name, TOML text)`.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the variable, file and product that is wrong.
    pub fn from_sources(
        pro_lifetime_price: Option<&str>,
        file: Option<(&str, &str)>,
    ) -> Result<Self, ConfigError> {
        let mut catalog = Self::default();
        if let Some(price) = pro_lifetime_price {
            let product = build(
                PRO_VAR,
                "pro",
                price.trim(),
                CheckoutMode::Payment,
                "pro",
                &[],
            )?;
            catalog.insert(PRO_VAR, product)?;
        }
        if let Some((name, text)) = file {
            let parsed: CatalogFile = toml::from_str(text)
                .map_err(|e| ConfigError::new(CATALOG_VAR, format!("{name}: {e}")))?;
            for (key, p) in parsed.products {
                let context = format!("{CATALOG_VAR} ({name})");
                let mut product = build(
                    &context,
                    &key,
                    p.price.trim(),
                    p.mode,
                    &p.entitlement,
                    &p.also_grants,
                )?;
                product.feature_lookup_key = p
                    .feature
                    .map(|f| f.trim().to_owned())
                    .filter(|f| !f.is_empty());
                catalog.insert(&context, product)?;
            }
        }
        Ok(catalog)
    }

    fn insert(&mut self, context: &str, product: Product) -> Result<(), ConfigError> {
        let var = context_var(context);
        if self.products.contains_key(&product.key) {
            return Err(ConfigError::new(
                var,
                format!(
                    "{context}: product {:?} is defined twice ({PRO_VAR} already defines \"pro\")",
                    product.key
                ),
            ));
        }
        let price = product.price_id.as_deref().unwrap_or_default();
        if let Some(other) = self.find_by_price(price) {
            return Err(ConfigError::new(
                var,
                format!(
                    "{context}: products {:?} and {:?} share price {price}",
                    other.key, product.key
                ),
            ));
        }
        self.products.insert(product.key.clone(), product);
        Ok(())
    }

    /// The product with this key.
    #[must_use]
    pub fn get(&self, key: &str) -> Option<&Product> {
        self.products.get(key)
    }

    /// The product sold at this Stripe price, to map a paid line item back to its entitlement.
    #[must_use]
    pub fn find_by_price(&self, price_id: &str) -> Option<&Product> {
        self.products
            .values()
            .find(|p| p.price_id.as_deref() == Some(price_id))
    }

    /// All products, in key order.
    pub fn products(&self) -> impl Iterator<Item = &Product> {
        self.products.values()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.products.is_empty()
    }
}

/// `CATALOG_FILE (path)` → `CATALOG_FILE`, so `ConfigError::var` is always a variable name.
fn context_var(context: &str) -> &str {
    context.split_whitespace().next().unwrap_or(context)
}

fn build(
    context: &str,
    key: &str,
    price: &str,
    mode: CheckoutMode,
    entitlement: &str,
    also_grants: &[String],
) -> Result<Product, ConfigError> {
    let var = context_var(context);
    if !is_product_key(key) {
        return Err(ConfigError::new(
            var,
            format!("{context}: product key {key:?} must be 1-64 of a-z, 0-9, _ and -"),
        ));
    }
    if !is_price_id(price) {
        return Err(ConfigError::new(
            var,
            format!(
                "{context}: product {key:?} has price {price:?}, expected a Stripe price id like price_1AbC…"
            ),
        ));
    }
    let parse = |raw: &str| {
        EntitlementKey::parse(raw)
            .map_err(|e| ConfigError::new(var, format!("{context}: product {key:?}: {e}")))
    };
    // The product's entitlement first, then `also_grants`, each once.
    let mut grants: Vec<String> = Vec::with_capacity(1 + also_grants.len());
    for raw in std::iter::once(entitlement).chain(also_grants.iter().map(String::as_str)) {
        let grant = parse(raw)?.as_str().to_owned();
        if !grants.contains(&grant) {
            grants.push(grant);
        }
    }
    Ok(Product {
        key: key.to_owned(),
        title: None,
        price_id: Some(price.to_owned()),
        amount_cents: None,
        currency: None,
        mode,
        grants,
        feature_lookup_key: None,
        creator_id: None,
        platform_fee_bps: 0,
        organization_fee_bps: 0,
        status: ProductStatus::Published,
        retired_price_ids: Vec::new(),
        retired_amounts: Vec::new(),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const FILE: &str = r#"
        [products.team_monthly]
        price = "price_team1"
        mode = "subscription"
        entitlement = "team"
        also_grants = ["pro"]

        [products.credits]
        price = "price_credits"
        mode = "payment"
        entitlement = "credits"
    "#;

    #[test]
    fn the_pro_lifetime_price_defines_the_pro_product() {
        let catalog = Catalog::from_sources(Some("price_pro123"), None).unwrap();
        let pro = catalog.get("pro").unwrap();
        assert_eq!(pro.price_id.as_deref(), Some("price_pro123"));
        assert_eq!(pro.mode, CheckoutMode::Payment);
        assert_eq!(pro.grants, ["pro"]);
        assert_eq!(catalog.products().count(), 1);
    }

    #[test]
    fn the_catalog_file_adds_products_next_to_pro() {
        let catalog =
            Catalog::from_sources(Some("price_pro123"), Some(("catalog.toml", FILE))).unwrap();
        let keys: Vec<_> = catalog.products().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["credits", "pro", "team_monthly"]);
        let team = catalog.get("team_monthly").unwrap();
        assert_eq!(team.mode, CheckoutMode::Subscription);
        assert_eq!(team.grants, ["team", "pro"]);
        assert_eq!(
            catalog.find_by_price("price_team1").unwrap().key,
            "team_monthly"
        );
        assert!(catalog.get("gold").is_none());
        assert!(Catalog::from_sources(None, None).unwrap().is_empty());
    }

    #[test]
    fn a_bad_pro_price_names_the_variable() {
        let err = Catalog::from_sources(Some("prod_123"), None).unwrap_err();
        assert_eq!(err.var, PRO_VAR);
        assert!(err.to_string().contains("prod_123"), "{err}");
    }

    #[test]
    fn file_errors_name_the_file_and_the_product() {
        let cases = [
            (
                "[products.x]\nprice = \"price_1\"\nmode = \"rental\"\nentitlement = \"x\"",
                "rental",
            ),
            (
                "[products.x]\nprice = \"sku_1\"\nmode = \"payment\"\nentitlement = \"x\"",
                "\"x\"",
            ),
            (
                "[products.\"Bad Key\"]\nprice = \"price_1\"\nmode = \"payment\"\nentitlement = \"x\"",
                "Bad Key",
            ),
            (
                "[products.x]\nprice = \"price_1\"\nmode = \"payment\"\nentitlement = \"a b\"",
                "\"x\"",
            ),
            (
                "[products.x]\nprice = \"price_1\"\nmode = \"payment\"\nentitlement = \"x\"\ncolour = \"red\"",
                "colour",
            ),
            (
                "[products.x]\nprice = \"price_1\"\nmode = \"payment\"",
                "entitlement",
            ),
        ];
        for (text, needle) in cases {
            let err = Catalog::from_sources(None, Some(("/etc/catalog.toml", text))).unwrap_err();
            assert_eq!(err.var, CATALOG_VAR, "{text}");
            let msg = err.to_string();
            assert!(msg.contains("/etc/catalog.toml"), "{msg}");
            assert!(msg.contains(needle), "{needle} not in {msg}");
        }
    }

    #[test]
    fn duplicate_keys_and_shared_prices_are_refused() {
        let pro_again =
            "[products.pro]\nprice = \"price_2\"\nmode = \"payment\"\nentitlement = \"pro\"";
        let err = Catalog::from_sources(Some("price_1"), Some(("c.toml", pro_again))).unwrap_err();
        assert!(err.to_string().contains("defined twice"), "{err}");

        let same_price =
            "[products.other]\nprice = \"price_1\"\nmode = \"payment\"\nentitlement = \"o\"";
        let err = Catalog::from_sources(Some("price_1"), Some(("c.toml", same_price))).unwrap_err();
        assert!(err.to_string().contains("share price price_1"), "{err}");
    }

    #[test]
    fn from_env_reads_the_file_named_by_catalog_file() {
        let path = std::env::temp_dir().join(format!("catalog-{}.toml", uuid::Uuid::new_v4()));
        std::fs::write(&path, FILE).unwrap();
        let env = Env::from_pairs([(CATALOG_VAR, path.to_str().unwrap())]);
        let catalog = Catalog::from_env(&env).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(catalog.products().count(), 2);

        let env = Env::from_pairs([(CATALOG_VAR, "/nonexistent/catalog.toml")]);
        let err = Catalog::from_env(&env).unwrap_err();
        assert_eq!(err.var, CATALOG_VAR);
        assert!(err.to_string().contains("/nonexistent/catalog.toml"));
    }
}
