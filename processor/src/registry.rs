//! The product registry's storage: the `products` table, the only map from what is sold to the
//! entitlement keys it grants. Static products come from the configuration
//! (`STRIPE_PRICE_PRO_LIFETIME`, `CATALOG_FILE`) and are written by [`sync_config`] at start-up;
//! dynamic products (content items, …) are registered by the application through the admin API
//! ([`put`], [`unpublish`]). The projection resolves rows against these rows
//! ([`crate::domain::projection::Registry`]); checkout sells them.
//!
//! Invariants:
//! - A product row is never deleted: unpublishing stops sales, and buyers keep what they bought.
//! - A product's prices and amounts have a history (`product_prices`, `product_amounts`, written
//!   by a trigger on every write of `products`): a new price or amount sells from then on, and
//!   every earlier one still resolves to the product, so no registry change takes access from
//!   those who paid what was asked at the time. A price belongs to one product for good: giving
//!   it to another is refused with [`RegistryError::PriceTaken`]. After a change of what a
//!   product grants, `processor recompute` re-derives entitlements through the same projection.
//! - Configured products belong to the configuration: the admin API cannot overwrite them.
//! - Writes to one product serialize on a transaction-scoped advisory lock of its key.

use deadpool_postgres::Pool;
use tokio_postgres::GenericClient;

use crate::catalog::Catalog;
use crate::domain::events::CheckoutMode;
use crate::domain::projection::{
    BPS_WHOLE, Product, ProductStatus, SubscriptionPolicy, is_price_id, is_product_key,
};
use crate::store::{PRODUCT_COLUMNS, StoreError, product_from_row};

/// Where a product row comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// `STRIPE_PRICE_PRO_LIFETIME` or `CATALOG_FILE`, rewritten at start-up.
    Config,
    /// `PUT /v1/products/{key}`.
    Admin,
}

impl Origin {
    fn as_str(self) -> &'static str {
        match self {
            Self::Config => "config",
            Self::Admin => "admin",
        }
    }
}

/// Why a registry operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// A field of the product is invalid; `field` is its JSON name.
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    /// The key belongs to a product of the configuration.
    #[error(
        "product {0:?} is defined by the configuration (STRIPE_PRICE_PRO_LIFETIME or CATALOG_FILE)"
    )]
    Configured(String),
    /// Another product is, or was ever, sold at this price.
    #[error("price {price} is (or was) sold as product {other:?}; a price belongs to one product")]
    PriceTaken { price: String, other: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<tokio_postgres::Error> for RegistryError {
    fn from(e: tokio_postgres::Error) -> Self {
        Self::Store(StoreError::Db(e))
    }
}

impl From<deadpool_postgres::PoolError> for RegistryError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        Self::Store(StoreError::Pool(e))
    }
}

/// The body of `PUT /v1/products/{key}`, before validation. Read as its OpenAPI schema states
/// it: a field is absent or of its type (`null` is no value), and an `integer` is any number
/// without a fraction (`7.0` as `7`).
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProductInput {
    #[serde(default, deserialize_with = "shared::json::present")]
    pub title: Option<String>,
    #[serde(default, deserialize_with = "shared::json::optional_integer")]
    pub amount_cents: Option<i64>,
    #[serde(default, deserialize_with = "shared::json::present")]
    pub currency: Option<String>,
    #[serde(default, deserialize_with = "shared::json::present")]
    pub price_id: Option<String>,
    #[serde(default, deserialize_with = "shared::json::present")]
    pub mode: Option<CheckoutMode>,
    #[serde(default, deserialize_with = "shared::json::present")]
    pub grants: Option<Vec<String>>,
    /// A Stripe Entitlements feature `lookup_key` granting this product's keys.
    #[serde(default, deserialize_with = "shared::json::present")]
    pub feature_lookup_key: Option<String>,
    #[serde(default, deserialize_with = "shared::json::present")]
    pub creator_id: Option<String>,
    #[serde(default, deserialize_with = "shared::json::optional_integer")]
    pub platform_fee_bps: Option<i64>,
    #[serde(default, deserialize_with = "shared::json::optional_integer")]
    pub organization_fee_bps: Option<i64>,
    #[serde(default, deserialize_with = "shared::json::present")]
    pub status: Option<ProductStatus>,
}

fn invalid(field: &'static str, message: impl Into<String>) -> RegistryError {
    RegistryError::Invalid {
        field,
        message: message.into(),
    }
}

/// A product key, by [`is_product_key`] (the catalog's rule too).
///
/// # Errors
/// [`RegistryError::Invalid`] for field `key`.
pub fn validate_key(key: &str) -> Result<(), RegistryError> {
    if is_product_key(key) {
        Ok(())
    } else {
        Err(invalid("key", "must be 1-64 of a-z, 0-9, _ and -"))
    }
}

impl ProductInput {
    /// The product `key` this input describes: `amountCents` + `currency` or a `priceId`;
    /// `mode` defaults to `payment` (`subscription` needs a `priceId`), `grants` to
    /// `["content:{key}"]`, fees to 0 (they may not exceed the whole), `status` to `published`.
    ///
    /// # Errors
    /// [`RegistryError::Invalid`] naming the first invalid field.
    pub fn validate(self, key: &str) -> Result<Product, RegistryError> {
        validate_key(key)?;
        if self.title.as_ref().is_some_and(|t| t.chars().count() > 200) {
            return Err(invalid("title", "at most 200 characters"));
        }
        let title = self
            .title
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty());
        if let Some(price) = &self.price_id
            && !is_price_id(price)
        {
            return Err(invalid(
                "priceId",
                "expected a Stripe price id like price_1AbC…",
            ));
        }
        if let Some(amount) = self.amount_cents
            && !(0..=99_999_999).contains(&amount)
        {
            return Err(invalid("amountCents", "must be between 0 and 99999999"));
        }
        let currency = self.currency.map(|c| c.to_ascii_lowercase());
        if let Some(c) = &currency
            && !(c.len() == 3 && c.bytes().all(|b| b.is_ascii_lowercase()))
        {
            return Err(invalid(
                "currency",
                "expected a three-letter ISO code like usd",
            ));
        }
        match (self.amount_cents, &currency, &self.price_id) {
            (Some(_), None, _) => return Err(invalid("currency", "required with amountCents")),
            (None, Some(_), _) => return Err(invalid("amountCents", "required with currency")),
            (None, None, None) => {
                return Err(invalid(
                    "amountCents",
                    "amountCents and currency, or priceId, required",
                ));
            }
            _ => {}
        }
        let mode = self.mode.unwrap_or(CheckoutMode::Payment);
        if mode == CheckoutMode::Subscription && self.price_id.is_none() {
            return Err(invalid(
                "priceId",
                "a subscription product needs a Stripe price",
            ));
        }
        let grants = self
            .grants
            .unwrap_or_else(|| vec![format!("content:{key}")]);
        if grants.is_empty() || grants.len() > 20 {
            return Err(invalid("grants", "between 1 and 20 entitlement keys"));
        }
        for grant in &grants {
            shared::ids::EntitlementKey::parse(grant)
                .map_err(|e| invalid("grants", format!("{grant:?}: {e}")))?;
        }
        let mut grants = grants;
        grants.sort();
        grants.dedup();
        let bps = |field: &'static str, raw: Option<i64>| {
            let value = raw.unwrap_or(0);
            if (0..=BPS_WHOLE).contains(&value) {
                Ok(value)
            } else {
                Err(invalid(field, "basis points between 0 and 10000"))
            }
        };
        let platform_fee_bps = bps("platformFeeBps", self.platform_fee_bps)?;
        let organization_fee_bps = bps("organizationFeeBps", self.organization_fee_bps)?;
        if platform_fee_bps + organization_fee_bps > BPS_WHOLE {
            return Err(invalid(
                "organizationFeeBps",
                "platform and organization fees together exceed 10000 basis points",
            ));
        }
        if let Some(feature) = &self.feature_lookup_key
            && !((1..=80).contains(&feature.len()) && feature.bytes().all(|b| b.is_ascii_graphic()))
        {
            return Err(invalid(
                "featureLookupKey",
                "1-80 printable ASCII characters without spaces",
            ));
        }
        if let Some(creator) = &self.creator_id {
            shared::ids::UserId::parse(creator).map_err(|e| invalid("creatorId", e.to_string()))?;
        }
        Ok(Product {
            key: key.to_owned(),
            title,
            price_id: self.price_id,
            amount_cents: self.amount_cents,
            currency,
            mode,
            grants,
            feature_lookup_key: self.feature_lookup_key,
            creator_id: self.creator_id,
            platform_fee_bps,
            organization_fee_bps,
            status: self.status.unwrap_or(ProductStatus::Published),
            retired_price_ids: Vec::new(),
            retired_amounts: Vec::new(),
        })
    }
}

/// The product with this key.
///
/// # Errors
/// [`RegistryError::Store`] when the query fails or the row is unreadable.
pub async fn get(client: &impl GenericClient, key: &str) -> Result<Option<Product>, RegistryError> {
    let sql = format!("SELECT {PRODUCT_COLUMNS} FROM products WHERE key = $1");
    let row = client.query_opt(&sql, &[&key]).await?;
    Ok(row.as_ref().map(product_from_row).transpose()?)
}

/// One page of products in key order, after `after` (a key) when given.
///
/// # Errors
/// [`RegistryError::Store`] when the query fails or a row is unreadable.
pub async fn list(
    client: &impl GenericClient,
    after: Option<&str>,
    limit: i64,
) -> Result<Vec<Product>, RegistryError> {
    let sql = format!(
        "SELECT {PRODUCT_COLUMNS} FROM products WHERE key > COALESCE($1, '') ORDER BY key LIMIT $2"
    );
    let rows = client.query(&sql, &[&after, &limit]).await?;
    Ok(rows
        .iter()
        .map(product_from_row)
        .collect::<Result<Vec<_>, _>>()?)
}

/// Writes the subscription policy beside the products (one per deployment: the last process
/// started with a different one sets it), bumping the registry's generation when it changes so
/// every process resolves with it.
///
/// # Errors
/// [`RegistryError::Store`] on a database failure.
pub async fn sync_policy(pool: &Pool, policy: SubscriptionPolicy) -> Result<(), RegistryError> {
    let client = pool.get().await.map_err(StoreError::from)?;
    client
        .execute(
            "UPDATE registry_generation
                SET refund_policy = $1, past_due_grace_seconds = $2, generation = generation + 1
              WHERE (refund_policy, past_due_grace_seconds) IS DISTINCT FROM ($1, $2)",
            &[&policy.refund.as_str(), &policy.past_due_grace],
        )
        .await
        .map_err(StoreError::from)?;
    Ok(())
}

/// Registers or replaces an admin product. Returns the stored product and whether it was new.
///
/// # Errors
/// [`RegistryError::Configured`] for a configured key, [`RegistryError::PriceTaken`] when
/// another product is or was sold at the price, [`RegistryError::Store`] on a database failure.
pub async fn put(pool: &Pool, product: &Product) -> Result<bool, RegistryError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let before = lock_and_get(&tx, &product.key).await?;
    if let Some((origin, _)) = &before
        && *origin == Origin::Config
    {
        return Err(RegistryError::Configured(product.key.clone()));
    }
    refuse_taken_price(&tx, &product.key, product.price_id.as_deref()).await?;
    upsert(&tx, product, Origin::Admin).await?;
    tx.commit().await?;
    Ok(before.is_none())
}

/// Unpublishes a product (`DELETE /v1/products/{key}`): it can no longer be bought; buyers keep
/// access. Returns the product, or `None` when there is none with this key.
///
/// # Errors
/// [`RegistryError::Configured`] for a configured product, [`RegistryError::Store`] otherwise.
pub async fn unpublish(pool: &Pool, key: &str) -> Result<Option<Product>, RegistryError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let Some((origin, mut product)) = lock_and_get(&tx, key).await? else {
        return Ok(None);
    };
    if origin == Origin::Config {
        return Err(RegistryError::Configured(key.to_owned()));
    }
    tx.execute(
        "UPDATE products SET status = 'unpublished', updated_at = now() WHERE key = $1",
        &[&key],
    )
    .await?;
    tx.commit().await?;
    product.status = ProductStatus::Unpublished;
    Ok(Some(product))
}

/// Writes the configured products (`pro` and the `CATALOG_FILE` ones) into the registry. A
/// configured product that left the configuration is unpublished (its buyers keep access);
/// `pro` always exists and loses only its price when `STRIPE_PRICE_PRO_LIFETIME` is unset.
///
/// # Errors
/// [`RegistryError::PriceTaken`] when the configuration gives a product a price another one is
/// or was sold at (start-up stops and names it), [`RegistryError::Configured`] when a catalog
/// key is already registered through the admin API, [`RegistryError::Store`] otherwise.
pub async fn sync_config(pool: &Pool, catalog: &Catalog) -> Result<(), RegistryError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    // One process at a time rewrites the configured rows.
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('products:config'))",
        &[],
    )
    .await?;
    let mut wanted: Vec<Product> = catalog.products().cloned().collect();
    if catalog.get("pro").is_none() {
        wanted.push(Product {
            key: "pro".into(),
            title: Some("Pro (lifetime)".into()),
            price_id: None,
            amount_cents: None,
            currency: None,
            mode: CheckoutMode::Payment,
            grants: vec!["pro".into()],
            feature_lookup_key: None,
            creator_id: None,
            platform_fee_bps: 0,
            organization_fee_bps: 0,
            status: ProductStatus::Published,
            retired_price_ids: Vec::new(),
            retired_amounts: Vec::new(),
        });
    }
    for product in &wanted {
        if let Some((Origin::Admin, _)) = lock_and_get(&tx, &product.key).await? {
            return Err(RegistryError::Configured(product.key.clone()));
        }
        refuse_taken_price(&tx, &product.key, product.price_id.as_deref()).await?;
        upsert(&tx, product, Origin::Config).await?;
    }
    let keys: Vec<&str> = wanted.iter().map(|p| p.key.as_str()).collect();
    tx.execute(
        "UPDATE products SET status = 'unpublished', updated_at = now()
          WHERE origin = 'config' AND NOT (key = ANY($1)) AND status = 'published'",
        &[&keys],
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Locks `products:{key}` for the transaction and reads the row with its origin.
async fn lock_and_get(
    tx: &tokio_postgres::Transaction<'_>,
    key: &str,
) -> Result<Option<(Origin, Product)>, RegistryError> {
    let lock = format!("products:{key}");
    tx.execute("SELECT pg_advisory_xact_lock(hashtext($1))", &[&lock])
        .await?;
    let sql = format!("SELECT origin, {PRODUCT_COLUMNS} FROM products WHERE key = $1");
    let Some(row) = tx.query_opt(&sql, &[&key]).await? else {
        return Ok(None);
    };
    let origin = match row.try_get::<_, &str>("origin")? {
        "config" => Origin::Config,
        _ => Origin::Admin,
    };
    Ok(Some((origin, product_from_row(&row)?)))
}

/// Refuses `price` for `key` when another product is or was ever sold at it (a price belongs to
/// one product for good, so its earlier buyers keep resolving to it).
async fn refuse_taken_price(
    tx: &tokio_postgres::Transaction<'_>,
    key: &str,
    price: Option<&str>,
) -> Result<(), RegistryError> {
    let Some(price) = price else {
        return Ok(());
    };
    let other: Option<String> = tx
        .query_opt(
            "SELECT product_key FROM product_prices WHERE price_id = $1 AND product_key <> $2",
            &[&price, &key],
        )
        .await?
        .map(|r| r.try_get(0))
        .transpose()?;
    match other {
        Some(other) => Err(RegistryError::PriceTaken {
            price: price.to_owned(),
            other,
        }),
        None => Ok(()),
    }
}

async fn upsert(
    tx: &tokio_postgres::Transaction<'_>,
    p: &Product,
    origin: Origin,
) -> Result<(), RegistryError> {
    let platform =
        i32::try_from(p.platform_fee_bps).map_err(|_| invalid("platformFeeBps", "out of range"))?;
    let organization = i32::try_from(p.organization_fee_bps)
        .map_err(|_| invalid("organizationFeeBps", "out of range"))?;
    tx.execute(
        "INSERT INTO products (key, origin, title, price_id, amount_cents, currency, mode, grants,
             creator_id, platform_fee_bps, organization_fee_bps, status, feature_lookup_key)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
         ON CONFLICT (key) DO UPDATE SET origin = EXCLUDED.origin, title = EXCLUDED.title,
             price_id = EXCLUDED.price_id, amount_cents = EXCLUDED.amount_cents,
             currency = EXCLUDED.currency, mode = EXCLUDED.mode, grants = EXCLUDED.grants,
             creator_id = EXCLUDED.creator_id, platform_fee_bps = EXCLUDED.platform_fee_bps,
             organization_fee_bps = EXCLUDED.organization_fee_bps, status = EXCLUDED.status,
             feature_lookup_key = EXCLUDED.feature_lookup_key, updated_at = now()",
        &[
            &p.key,
            &origin.as_str(),
            &p.title,
            &p.price_id,
            &p.amount_cents,
            &p.currency,
            &p.mode.as_str(),
            &p.grants,
            &p.creator_id,
            &platform,
            &organization,
            &p.status.as_str(),
            &p.feature_lookup_key,
        ],
    )
    .await?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn field(input: ProductInput) -> &'static str {
        match input.validate("item-1") {
            Err(RegistryError::Invalid { field, .. }) => field,
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    #[test]
    fn an_item_defaults_to_a_published_payment_granting_its_content_key() {
        let product = ProductInput {
            title: Some(" Lesson 1 ".into()),
            amount_cents: Some(999),
            currency: Some("USD".into()),
            creator_id: Some("creator_1".into()),
            platform_fee_bps: Some(1000),
            ..ProductInput::default()
        }
        .validate("item-1")
        .unwrap();
        assert_eq!(product.grants, ["content:item-1"]);
        assert_eq!(product.mode, CheckoutMode::Payment);
        assert_eq!(product.status, ProductStatus::Published);
        assert_eq!(product.currency.as_deref(), Some("usd"));
        assert_eq!(product.title.as_deref(), Some("Lesson 1"));
        assert_eq!(product.split(999).creator_payout_cents, 900);
    }

    #[test]
    fn the_body_reads_as_its_schema_states_integral_numbers_yes_nulls_no() {
        let read = |body: &str| serde_json::from_str::<ProductInput>(body);
        let input =
            read(r#"{"amountCents": 738.0, "currency": "usd", "platformFeeBps": 5}"#).unwrap();
        assert_eq!(
            (input.amount_cents, input.platform_fee_bps),
            (Some(738), Some(5))
        );
        assert_eq!(read("{}").unwrap().title, None);
        for refused in [
            r#"{"amountCents": 738.5}"#,
            r#"{"amountCents": 1e300}"#,
            r#"{"title": null}"#,
            r#"{"grants": null}"#,
            r#"{"platformFeeBps": null}"#,
            r#"{"amountCents": "738"}"#,
        ] {
            assert!(read(refused).is_err(), "{refused}");
        }
    }

    #[test]
    fn validation_names_the_field() {
        let amount = |a| ProductInput {
            amount_cents: Some(a),
            currency: Some("usd".into()),
            ..ProductInput::default()
        };
        assert_eq!(field(ProductInput::default()), "amountCents");
        assert_eq!(field(amount(-1)), "amountCents");
        assert_eq!(
            field(ProductInput {
                currency: Some("dollars".into()),
                ..amount(1)
            }),
            "currency"
        );
        assert_eq!(
            field(ProductInput {
                price_id: Some("prod_1".into()),
                ..ProductInput::default()
            }),
            "priceId"
        );
        assert_eq!(
            field(ProductInput {
                mode: Some(CheckoutMode::Subscription),
                ..amount(100)
            }),
            "priceId"
        );
        assert_eq!(
            field(ProductInput {
                grants: Some(vec![]),
                ..amount(100)
            }),
            "grants"
        );
        assert_eq!(
            field(ProductInput {
                platform_fee_bps: Some(6000),
                organization_fee_bps: Some(5000),
                ..amount(100)
            }),
            "organizationFeeBps"
        );
        assert_eq!(
            field(ProductInput {
                creator_id: Some("has space".into()),
                ..amount(100)
            }),
            "creatorId"
        );
        assert!(matches!(
            amount(1).validate("Bad Key"),
            Err(RegistryError::Invalid { field: "key", .. })
        ));
    }
}
