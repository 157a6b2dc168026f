//! The product registry's admin routes (`ADMIN_API_TOKEN`): `PUT`, `GET` and `DELETE`
//! (= unpublish) `/v1/products/{key}`, `GET /v1/products`, and `GET /v1/payments/unmatched`,
//! the operator's list of payments that resolve to no registered product.
//!
//! Invariants: every route needs the admin token (404 without one configured, 401 with a wrong
//! one); a body is validated before anything is written, and a validation error is a 422 naming
//! the field; nothing here deletes a product or takes a price away from live subscriptions.

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;

use super::ApiState;
use super::error::ApiError;
use crate::auth::AdminToken;
use crate::domain::projection::{Product, Registry, is_product_key};
use crate::registry::{self, ProductInput, RegistryError};
use crate::store::{self, PRODUCT_COLUMNS};

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::Invalid { field, message } => Self::Invalid {
                field: field.to_owned(),
                message,
            },
            RegistryError::Configured(_) => Self::Conflict {
                code: "configured_product",
                message: e.to_string(),
            },
            RegistryError::PriceTaken { .. } => Self::Conflict {
                code: "price_taken",
                message: e.to_string(),
            },
            RegistryError::Store(cause) => Self::internal(cause),
        }
    }
}

/// `PUT /v1/products/{key}`: 201 when registered now, 200 when replaced.
pub(crate) async fn put(
    State(state): State<ApiState>,
    _admin: AdminToken,
    Path(key): Path<String>,
    body: Result<Json<ProductInput>, JsonRejection>,
) -> Result<(StatusCode, Json<Product>), ApiError> {
    let Json(input) = body.map_err(|e| match e {
        JsonRejection::JsonDataError(e) => ApiError::Invalid {
            field: "body".into(),
            message: e.body_text(),
        },
        other => ApiError::BadRequest(other.body_text()),
    })?;
    let product = input.validate(&key)?;
    let created = registry::put(&state.pool, &product).await?;
    tracing::info!(product = %product.key, created, "product registered");
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(product)))
}

/// `GET /v1/products/{key}`.
pub(crate) async fn get(
    State(state): State<ApiState>,
    _admin: AdminToken,
    Path(key): Path<String>,
) -> Result<Json<Product>, ApiError> {
    let client = state.pool.get().await.map_err(ApiError::internal)?;
    registry::get(&**client, &key)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::UnknownProduct(key))
}

/// `DELETE /v1/products/{key}`: unpublishes; buyers keep access.
pub(crate) async fn unpublish(
    State(state): State<ApiState>,
    _admin: AdminToken,
    Path(key): Path<String>,
) -> Result<Json<Product>, ApiError> {
    let product = registry::unpublish(&state.pool, &key)
        .await?
        .ok_or_else(|| ApiError::UnknownProduct(key))?;
    tracing::info!(product = %product.key, "product unpublished");
    Ok(Json(product))
}

/// Query of `GET /v1/products`: keyset pagination.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListQuery {
    /// Only keys after this one.
    pub after: Option<String>,
    /// At most this many (1-500, default 100).
    pub limit: Option<i64>,
}

/// `GET /v1/products`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProductList {
    pub data: Vec<Product>,
    /// Pass as `after` for the next page; `null` on the last.
    pub next_after: Option<String>,
}

pub(crate) async fn list(
    State(state): State<ApiState>,
    _admin: AdminToken,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<ProductList>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    if query.after.as_deref().is_some_and(|a| !is_product_key(a)) {
        return Err(ApiError::BadRequest("after must be a product key".into()));
    }
    let limit = query.limit.unwrap_or(100);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::BadRequest(
            "limit must be between 1 and 500".into(),
        ));
    }
    let client = state.pool.get().await.map_err(ApiError::internal)?;
    let products = registry::list(&**client, query.after.as_deref(), limit).await?;
    let next_after = (i64::try_from(products.len()) == Ok(limit))
        .then(|| products.last().map(|p| p.key.clone()))
        .flatten();
    Ok(Json(ProductList {
        data: products,
        next_after,
    }))
}

/// One payment that resolves to no registered product.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Unmatched {
    /// `purchase` or `subscription`.
    pub kind: &'static str,
    /// The purchase's source id (payment intent, session or charge) or the subscription id.
    pub id: String,
    pub user_id: Option<String>,
    pub customer_id: Option<String>,
    pub product_key: Option<String>,
    pub price_id: Option<String>,
    pub amount_cents: Option<i64>,
    pub currency: Option<String>,
    pub status: String,
}

/// `GET /v1/payments/unmatched`: the newest 200 paid purchases and live subscriptions that grant
/// nothing because no registered product matches what was paid.
pub(crate) async fn unmatched(
    State(state): State<ApiState>,
    _admin: AdminToken,
) -> Result<Json<Vec<Unmatched>>, ApiError> {
    let client = state.pool.get().await.map_err(ApiError::internal)?;
    let purchases_sql = format!(
        "SELECT {} FROM purchases WHERE paid ORDER BY id DESC LIMIT 1000",
        store::PURCHASE_COLUMNS
    );
    let subscriptions_sql = format!(
        "SELECT {} FROM subscriptions WHERE status <> 'incomplete'
          ORDER BY updated_at DESC LIMIT 1000",
        store::SUBSCRIPTION_COLUMNS
    );
    let purchase_rows = client
        .query(&purchases_sql, &[])
        .await
        .map_err(ApiError::internal)?;
    let subscription_rows = client
        .query(&subscriptions_sql, &[])
        .await
        .map_err(ApiError::internal)?;
    let product_rows = client
        .query(&format!("SELECT {PRODUCT_COLUMNS} FROM products"), &[])
        .await
        .map_err(ApiError::internal)?;
    let registry = Registry::new(
        product_rows
            .iter()
            .map(store::product_from_row)
            .collect::<Result<Vec<_>, _>>()
            .map_err(ApiError::internal)?,
    );
    let mut out = Vec::new();
    for row in &purchase_rows {
        let p = store::purchase_facts(row).map_err(ApiError::internal)?;
        if !p.is_invoice_payment() && registry.purchase_product(&p).is_none() {
            out.push(Unmatched {
                kind: "purchase",
                id: p.source_id().unwrap_or_default().to_owned(),
                status: p.status().as_str().to_owned(),
                user_id: p.user_id,
                customer_id: p.customer_id,
                product_key: p.product_key,
                price_id: p.price_id,
                amount_cents: p.amount_cents,
                currency: p.currency,
            });
        }
    }
    for row in &subscription_rows {
        let s = store::subscription_facts(row).map_err(ApiError::internal)?;
        if registry.subscription_product(&s).is_none() {
            out.push(Unmatched {
                kind: "subscription",
                status: s.status().as_str().to_owned(),
                price_id: s.price.as_ref().map(|c| c.price_id.clone()),
                id: s.id,
                user_id: s.user_id,
                customer_id: s.customer_id,
                product_key: s.product_key,
                amount_cents: None,
                currency: None,
            });
        }
    }
    out.truncate(200);
    Ok(Json(out))
}
