//! A user's Stripe customers as the API uses them.
//!
//! Invariants: the `customers` table is the only source (nothing the client sends names a
//! customer); a customer Stripe answers `resource_missing` for is marked gone (`gone_at`), never
//! deleted, because its row still attributes that customer's past events to the user; the API
//! acts only on customers that are not gone; a replacement customer is created with an
//! idempotency key naming the customer it replaces, so concurrent requests create one.

use shared::ids::UserId;
use tokio_postgres::types::Type;

use super::ApiState;
use super::error::ApiError;
use crate::stripe::StripeClient;

/// The user's Stripe customer ids that Stripe is not known to have lost, oldest first.
///
/// # Errors
/// [`ApiError::Internal`] when Postgres fails.
pub async fn customers_of(state: &ApiState, user: &UserId) -> Result<Vec<String>, ApiError> {
    let client = state.pool.get().await.map_err(ApiError::database)?;
    let rows = client
        .query_typed(
            "SELECT customer_id FROM customers WHERE user_id = $1 AND gone_at IS NULL
              ORDER BY created_at, customer_id",
            &[(&user.as_str(), Type::TEXT)],
        )
        .await
        .map_err(ApiError::internal)?;
    rows.iter()
        .map(|r| r.try_get(0).map_err(ApiError::internal))
        .collect()
}

/// Records that Stripe no longer knows `customer`.
///
/// # Errors
/// [`ApiError::Internal`] when Postgres fails.
pub async fn mark_gone(state: &ApiState, customer: &str) -> Result<(), ApiError> {
    let client = state.pool.get().await.map_err(ApiError::database)?;
    let marked = client
        .execute_typed(
            "UPDATE customers SET gone_at = now() WHERE customer_id = $1 AND gone_at IS NULL",
            &[(&customer, Type::TEXT)],
        )
        .await
        .map_err(ApiError::internal)?;
    if marked > 0 {
        tracing::warn!(
            customer,
            "stripe no longer knows this customer; it will not be used again"
        );
    }
    Ok(())
}

/// The user's Stripe customer: the oldest usable one, else a new one (in place of the customer
/// that went missing last, if any) whose mapping is stored.
///
/// # Errors
/// [`ApiError::StripeUnavailable`] when the customer cannot be created, [`ApiError::Internal`] when
/// Postgres fails.
pub async fn ensure_customer(
    state: &ApiState,
    stripe: &StripeClient,
    user: &UserId,
) -> Result<String, ApiError> {
    if let Some(existing) = customers_of(state, user).await?.into_iter().next() {
        return Ok(existing);
    }
    let client = state.pool.get().await.map_err(ApiError::database)?;
    let gone: Option<String> = client
        .query_typed_opt(
            "SELECT customer_id FROM customers WHERE user_id = $1 AND gone_at IS NOT NULL
              ORDER BY gone_at DESC, customer_id DESC LIMIT 1",
            &[(&user.as_str(), Type::TEXT)],
        )
        .await
        .map_err(ApiError::internal)?
        .map(|row| row.try_get(0))
        .transpose()
        .map_err(ApiError::internal)?;
    let customer = match &gone {
        None => stripe.create_customer(user, None).await?,
        Some(gone) => stripe.replace_customer(user, gone).await?,
    };
    // The projection attributes this customer's payments to the user through this row.
    client
        .execute_typed(
            "INSERT INTO customers (customer_id, user_id) VALUES ($1, $2)
             ON CONFLICT (customer_id) DO NOTHING",
            &[
                (&customer.id.as_str(), Type::TEXT),
                (&user.as_str(), Type::TEXT),
            ],
        )
        .await
        .map_err(ApiError::internal)?;
    tracing::info!(user_id = %user, customer = %customer.id, replaced = gone.as_deref(), "stripe customer created");
    Ok(customer.id)
}
