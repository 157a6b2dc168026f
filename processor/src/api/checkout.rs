//! `POST /api/checkout/session` and `POST /api/billing/portal`.
//!
//! Invariants: everything sent to Stripe except the product key comes from the server (the user
//! from the token, prices and amounts from the product registry, return URLs from the configuration); a double click
//! yields one Checkout Session (the `Idempotency-Key` and every parameter, `expires_at` included,
//! are the same within a ten-minute bucket); a user who already holds any entitlement the
//! product grants gets 409 instead of a second payment; an unpublished product is not sold; a customer Stripe no longer knows is marked gone and
//! replaced by a new one (checkout) or skipped (portal), never reported as an outage; other
//! Stripe failures surface as 502 with a generic text.

use std::collections::BTreeMap;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use shared::ids::UserId;

use super::ApiState;
use super::customers::{customers_of, ensure_customer, mark_gone};
use super::entitlements::{load_access, load_snapshot};
use super::error::ApiError;
use super::organizations::{OrganizationBody, payer};
use crate::auth::AuthCaller;
use crate::domain::offer::{CheckoutOffer, OfferedPrice};
use crate::domain::projection::{Product, ProductStatus};
use crate::domain::view::status_of;
use crate::registry;
use crate::store;
use crate::stripe::{CheckoutSessionRequest, LineItemPrice};

/// Width of the idempotency bucket: clicks within it reuse one session.
pub const IDEMPOTENCY_BUCKET_SECONDS: i64 = 600;
/// A session lives at least this long (Stripe's minimum is 30 minutes).
const SESSION_LIFETIME_SECONDS: i64 = 3600;

/// The request body of `POST /api/checkout/session`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckoutBody {
    pub product_key: String,
    /// Buy for this organisation (the caller must be allowed to bill for it).
    #[serde(default, deserialize_with = "shared::json::present")]
    pub organization_id: Option<String>,
}

/// The answer of `POST /api/checkout/session`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckoutAnswer {
    pub session_id: String,
    pub url: String,
    pub expires_at: DateTime<Utc>,
}

/// The answer of `POST /api/billing/portal`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PortalAnswer {
    pub url: String,
}

/// The idempotency key and `expires_at` of a checkout of `product` by `user` as `customer` at
/// unix time `now`: both constant within one bucket, so a replayed request carries identical
/// parameters. The customer is part of the key: a checkout retried with a replacement customer
/// is a new request, not a replay with other parameters.
#[must_use]
pub fn checkout_identity(user: &UserId, product: &str, customer: &str, now: i64) -> (String, i64) {
    let bucket = now.div_euclid(IDEMPOTENCY_BUCKET_SECONDS);
    let mut hash = Sha256::new();
    // Length-prefixed so ("ab","c") and ("a","bc") differ.
    for part in [user.as_str(), product, customer] {
        hash.update(part.len().to_be_bytes());
        hash.update(part.as_bytes());
    }
    hash.update(bucket.to_be_bytes());
    let digest = hash.finalize();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    let expires_at = (bucket + 1) * IDEMPOTENCY_BUCKET_SECONDS + SESSION_LIFETIME_SECONDS;
    (format!("checkout-v1-{hex}"), expires_at)
}

pub(crate) async fn create_session(
    State(state): State<ApiState>,
    AuthCaller(caller): AuthCaller,
    body: Result<Json<CheckoutBody>, JsonRejection>,
) -> Result<Json<CheckoutAnswer>, ApiError> {
    let Json(body) = body?;
    // Whom the session is for: the caller, or the organisation they bill for.
    let user = payer(&state, &caller, body.organization_id.as_deref()).await?;
    let product = sellable_product(&state, &body.product_key).await?;
    let snapshot = if user == caller.user {
        load_access(&state, &user).await?
    } else {
        load_snapshot(&state, &user).await?
    };
    let now = Utc::now();
    if product
        .grants
        .iter()
        .any(|key| status_of(&snapshot.entitlements, key, now).is_allowed())
    {
        return Err(ApiError::AlreadyEntitled);
    }
    // A Stripe price when the product has one, else `price_data` at the registered amount; the
    // identity names the amount so a re-priced item never reuses an older session's key.
    let (price, identity) = match (&product.price_id, product.amount_cents, &product.currency) {
        (Some(price), _, _) => (LineItemPrice::Id(price.clone()), product.key.clone()),
        (None, Some(amount), Some(currency)) => (
            LineItemPrice::Data {
                currency: currency.clone(),
                unit_amount: amount,
                product_name: product.title.clone().unwrap_or_else(|| product.key.clone()),
            },
            format!("{}#{currency}{amount}", product.key),
        ),
        _ => return Err(ApiError::UnknownProduct(product.key.clone())),
    };
    let stripe = state.stripe()?;
    super::limits::take(&state, &super::limits::CHECKOUT, &caller.user).await?;
    let success_url = state
        .urls
        .checkout_success
        .clone()
        .ok_or(ApiError::NotConfigured("CHECKOUT_SUCCESS_URL"))?;
    let cancel_url = state
        .urls
        .checkout_cancel
        .clone()
        .ok_or(ApiError::NotConfigured("CHECKOUT_CANCEL_URL"))?;
    let mut customer = ensure_customer(&state, stripe, &user).await?;
    let mut request = CheckoutSessionRequest {
        mode: product.mode,
        price,
        quantity: 1,
        success_url,
        cancel_url,
        client_reference_id: user.as_str().to_owned(),
        customer: None,
        metadata: BTreeMap::from([
            ("user_id".to_owned(), user.as_str().to_owned()),
            ("product_key".to_owned(), product.key.clone()),
        ]),
        expires_at: None,
    };
    // A customer Stripe no longer knows is replaced, once.
    let mut replaced = false;
    let session = loop {
        let (idempotency_key, expires_at) =
            checkout_identity(&user, &identity, &customer, Utc::now().timestamp());
        request.customer = Some(customer.clone());
        request.expires_at = Some(expires_at);
        match stripe
            .create_checkout_session(&request, &idempotency_key)
            .await
        {
            Err(error) if error.is_missing_customer() && !replaced => {
                mark_gone(&state, &customer).await?;
                customer = ensure_customer(&state, stripe, &user).await?;
                replaced = true;
            }
            other => break other?,
        }
    };
    let url = session
        .url
        .ok_or_else(|| ApiError::internal("checkout session answered without a url"))?;
    tracing::info!(user_id = %user, product = %product.key, session = %session.id, "checkout session created");
    record_offer(&state, &user, &product, &request.price, &session.id).await;
    Ok(Json(CheckoutAnswer {
        session_id: session.id,
        url,
        expires_at: DateTime::from_timestamp(session.expires_at, 0)
            .ok_or_else(|| ApiError::internal("checkout session expiry out of range"))?,
    }))
}

/// Records what `session` charges, so its completion needs no Stripe read. Best effort: a
/// session without its offer is completed from Stripe, as a foreign one is.
async fn record_offer(
    state: &ApiState,
    user: &UserId,
    product: &Product,
    price: &LineItemPrice,
    session: &str,
) {
    let offer = CheckoutOffer {
        session_id: session.to_owned(),
        user_id: user.as_str().to_owned(),
        product_key: product.key.clone(),
        mode: product.mode,
        price: match price {
            LineItemPrice::Id(price) => OfferedPrice::Stripe(price.clone()),
            LineItemPrice::Data {
                currency,
                unit_amount,
                ..
            } => OfferedPrice::Amount {
                amount_cents: *unit_amount,
                currency: currency.clone(),
            },
        },
    };
    let recorded = match state.pool.get().await {
        Ok(client) => store::offers::record(&**client, &offer).await,
        Err(error) => Err(error.into()),
    };
    if let Err(error) = recorded {
        metrics::counter!("checkout_offers_unrecorded_total").increment(1);
        tracing::warn!(%error, session, "checkout offer not recorded; its completion will be read from Stripe");
    }
}

/// The registered product `key` if it can be bought now: 404 `unknown_product` when it is not
/// registered, unpublished or has no way to be charged; 422 `free_product` when it costs nothing.
async fn sellable_product(state: &ApiState, key: &str) -> Result<Product, ApiError> {
    let client = state.pool.get().await.map_err(ApiError::internal)?;
    let product = registry::get(&**client, key)
        .await
        .map_err(ApiError::internal)?
        .filter(|p| p.status == ProductStatus::Published)
        .ok_or_else(|| ApiError::UnknownProduct(key.to_owned()))?;
    match (&product.price_id, product.amount_cents) {
        (None, None) => Err(ApiError::UnknownProduct(key.to_owned())),
        (None, Some(0)) => Err(ApiError::FreeProduct(key.to_owned())),
        _ => Ok(product),
    }
}

pub(crate) async fn portal(
    State(state): State<ApiState>,
    AuthCaller(caller): AuthCaller,
    body: Bytes,
) -> Result<Json<PortalAnswer>, ApiError> {
    let organization = OrganizationBody::read(&body)?.organization_id;
    let user = payer(&state, &caller, organization.as_deref()).await?;
    let customers = customers_of(&state, &user).await?;
    if customers.is_empty() {
        return Err(ApiError::NoBillingAccount);
    }
    let stripe = state.stripe()?;
    super::limits::take(&state, &super::limits::PORTAL, &caller.user).await?;
    let return_url = state
        .urls
        .portal_return
        .as_deref()
        .ok_or(ApiError::NotConfigured("BILLING_PORTAL_RETURN_URL"))?;
    // The oldest customer Stripe still knows; the ones it lost are marked and skipped.
    for customer in customers {
        match stripe
            .create_billing_portal_session(
                &customer,
                return_url,
                state.urls.portal_configuration.as_deref(),
            )
            .await
        {
            Ok(session) => return Ok(Json(PortalAnswer { url: session.url })),
            Err(error) if error.is_missing_customer() => mark_gone(&state, &customer).await?,
            Err(error) => return Err(error.into()),
        }
    }
    Err(ApiError::NoBillingAccount)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_double_click_within_the_bucket_has_one_identity() {
        let user = UserId::parse("u1").unwrap();
        let t = 1_700_000_400; // a bucket boundary
        let first = checkout_identity(&user, "pro", "cus_1", t + 1);
        assert_eq!(first, checkout_identity(&user, "pro", "cus_1", t + 599));
        assert_ne!(first.0, checkout_identity(&user, "pro", "cus_1", t + 600).0);
        assert_ne!(first.0, checkout_identity(&user, "team", "cus_1", t + 1).0);
        assert_ne!(first.0, checkout_identity(&user, "pro", "cus_2", t + 1).0);
        assert_ne!(
            first.0,
            checkout_identity(&UserId::parse("u2").unwrap(), "pro", "cus_1", t + 1).0
        );
        assert!(first.0.len() <= 255);
    }

    #[test]
    fn sessions_expire_between_one_hour_and_one_hour_ten_from_now() {
        let user = UserId::parse("u1").unwrap();
        for now in [1_700_000_400, 1_700_000_401, 1_700_000_999] {
            let (_, expires_at) = checkout_identity(&user, "pro", "cus_1", now);
            let lifetime = expires_at - now;
            assert!(
                (SESSION_LIFETIME_SECONDS..=SESSION_LIFETIME_SECONDS + IDEMPOTENCY_BUCKET_SECONDS)
                    .contains(&lifetime),
                "{lifetime}"
            );
        }
    }
}
